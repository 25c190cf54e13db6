"""Sums over the lanes of per-lane products (per-example weight gradients).

With ``fuse_lane_sums`` (the default) a psum over the mapping's axis of
per-lane weight gradients is computed as one product over the lanes. Each
program below (randomised shapes and values) must give the values of the
unfused program under ``jax.vmap``, ``sharding.shard_map`` and
``sharding.pmap`` on 1, 2, 4 and 8 devices, and XLA's optimised HLO must hold
no (lanes per device, weight shape) array, on one device or several.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
import smap

B = 8  # lanes
AXIS = "batch"
LR = 0.1


@dataclasses.dataclass
class Case:
    fn: Callable
    states: list[smap.State]
    args: tuple
    weights: list[tuple[int, ...]]  # shapes of the weights whose per-lane gradient must not appear
    out_axes: Any = 0


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def _sgd(params: list[smap.State], grads: list) -> None:
    for p, g in zip(params, grads):
        p.value = p.value - LR * g


def mlp(rng: np.random.Generator) -> Case:
    """Two tanh layers, softmax cross-entropy, pmean of the gradients."""
    d_in, d_h, d_out = rng.integers(9, 17, size=3)
    params = [
        smap.ParamState(_normal(rng, d_in, d_h)),
        smap.ParamState(np.zeros(d_h, np.float32)),
        smap.ParamState(_normal(rng, d_h, d_out)),
        smap.ParamState(np.zeros(d_out, np.float32)),
    ]

    def step(x, y):
        def loss():
            h = jnp.tanh(x @ params[0].value + params[1].value)
            return -jax.nn.log_softmax(h @ params[2].value + params[3].value)[y]

        grads, value = smap.grad(loss, grad_states=params, return_value=True)()
        _sgd(params, jax.lax.pmean(grads, AXIS))
        return value

    x = rng.standard_normal((B, d_in)).astype(np.float32)
    y = rng.integers(0, d_out, size=B).astype(np.int32)
    return Case(step, params, (x, y), [(d_in, d_h), (d_h, d_out)])


def tokens(rng: np.random.Generator) -> Case:
    """A lane is a sequence of tokens: the weight gradient already contracts over them; psum."""
    t, d_in, d_out = (int(rng.integers(2, 6)), *rng.integers(9, 17, size=2))
    w = smap.ParamState(_normal(rng, d_in, d_out))

    def step(x):
        grad = smap.grad(lambda: jnp.sum(jnp.sin(x @ w.value)), grad_states=w)()
        _sgd([w], [jax.lax.psum(grad, AXIS) / B])
        return x.sum()

    return Case(step, [w], (rng.standard_normal((B, t, d_in)).astype(np.float32),), [(d_in, d_out)])


def tied(rng: np.random.Generator) -> Case:
    """An autoencoder with tied weights: w in the encoder and w.T in the decoder."""
    d_in, d_h = rng.integers(9, 17, size=2)
    w = smap.ParamState(_normal(rng, d_in, d_h))

    def step(x):
        grad = smap.grad(lambda: jnp.sum((jnp.tanh(x @ w.value) @ w.value.T - x) ** 2), grad_states=w)()
        _sgd([w], [jax.lax.pmean(grad, AXIS)])
        return jnp.zeros(())

    return Case(step, [w], (rng.standard_normal((B, d_in)).astype(np.float32),), [(d_in, d_h)])


def twice(rng: np.random.Generator) -> Case:
    """One square weight used by two layers in a row; the update is scaled by a shared rate."""
    d = int(rng.integers(9, 17))
    w = smap.ParamState(_normal(rng, d, d))
    rate = smap.LongTermState(np.float32(0.5))

    def step(x):
        grad = smap.grad(lambda: jnp.sum(jnp.tanh(jnp.tanh(x @ w.value) @ w.value)), grad_states=w)()
        w.value = w.value + rate.value * jax.lax.pmean(-grad, AXIS)
        return jnp.zeros(())

    return Case(step, [w, rate], (rng.standard_normal((B, d)).astype(np.float32),), [(d, d)])


def scaled(rng: np.random.Generator) -> Case:
    """Each lane's gradient is scaled by its own weight (a per-lane scalar) before the sum."""
    d_in, d_out = rng.integers(9, 17, size=2)
    w = smap.ParamState(_normal(rng, d_in, d_out))

    def step(x, c):
        grad = smap.grad(lambda: jnp.sum(jnp.cos(x @ w.value)), grad_states=w)()
        _sgd([w], [jax.lax.psum(c * (grad * 2.0), AXIS)])
        return c

    x = rng.standard_normal((B, d_in)).astype(np.float32)
    return Case(step, [w], (x, rng.uniform(0.5, 2, size=B).astype(np.float32)), [(d_in, d_out)])


def kept_per_lane(rng: np.random.Generator) -> Case:
    """The gradient is both returned per lane (per-example gradients) and averaged."""
    d_in, d_out = rng.integers(9, 17, size=2)
    w = smap.ParamState(_normal(rng, d_in, d_out))

    def step(x):
        grad = smap.grad(lambda: jnp.sum(jnp.tanh(x @ w.value)), grad_states=w)()
        _sgd([w], [jax.lax.pmean(grad, AXIS)])
        return grad

    return Case(step, [w], (rng.standard_normal((B, d_in)).astype(np.float32),), [])


def gathered(rng: np.random.Generator) -> Case:
    """The sum over lanes written as all_gather then a sum, next to a psum over a tuple of axes."""
    d_in, d_out = rng.integers(9, 17, size=2)
    w = smap.ParamState(_normal(rng, d_in, d_out))
    v = smap.ParamState(_normal(rng, d_in, d_out))

    def step(x):
        gw, gv = smap.grad(lambda: jnp.sum(jnp.tanh(x @ w.value) * jnp.sin(x @ v.value)), grad_states=[w, v])()
        _sgd([w, v], [jnp.sum(jax.lax.all_gather(gw, AXIS), axis=0) / B, jax.lax.psum(gv, (AXIS,)) / B])
        return jnp.zeros(())

    return Case(step, [w, v], (rng.standard_normal((B, d_in)).astype(np.float32),), [])


def scanned(rng: np.random.Generator) -> Case:
    """Three SGD steps inside a scan, each with its own pmean of the gradients."""
    d_in, d_out = rng.integers(9, 17, size=2)
    w = smap.ParamState(_normal(rng, d_in, d_out))

    def step(xs):
        def body(weight, x):
            grad = jax.grad(lambda v: jnp.sum(jnp.tanh(x @ v)))(weight)
            return weight - LR * jax.lax.pmean(grad, AXIS), jnp.sum(x)

        w.value, sums = jax.lax.scan(body, w.value, xs)
        return sums

    return Case(step, [w], (rng.standard_normal((B, 3, d_in)).astype(np.float32),), [(d_in, d_out)])


def recurrent(rng: np.random.Generator) -> Case:
    """A recurrent cell unrolled by a scan inside the lane; the gradient, summed over
    the time steps by the scan, is averaged over the lanes after it."""
    d_in, d_h = rng.integers(9, 17, size=2)
    w_in, w_h = smap.ParamState(_normal(rng, d_in, d_h)), smap.ParamState(_normal(rng, d_h, d_h))

    def step(xs):
        def loss():
            def cell(h, x):
                h = jnp.tanh(x @ w_in.value + h @ w_h.value)
                return h, jnp.sum(h**2)

            return jnp.sum(jax.lax.scan(cell, jnp.zeros(d_h), xs)[1])

        grads = smap.grad(loss, grad_states=[w_in, w_h])()
        _sgd([w_in, w_h], jax.lax.pmean(grads, AXIS))
        return jnp.zeros(())

    return Case(step, [w_in, w_h], (rng.standard_normal((B, 3, d_in)).astype(np.float32),), [])


def rematerialised(rng: np.random.Generator) -> Case:
    """A layer under jax.checkpoint, in bfloat16 with float32 accumulation. Its weight
    gradient is computed inside the checkpoint, which the rewrite leaves alone."""
    d_in, d_out = rng.integers(9, 17, size=2)
    w = smap.ParamState(_normal(rng, d_in, d_out))

    @jax.checkpoint
    def layer(x, v):
        y = jnp.dot(x.astype(jnp.bfloat16), v.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
        return jnp.tanh(y)

    def step(x):
        grad = smap.grad(lambda: jnp.sum(layer(x, w.value) ** 2), grad_states=w)()
        _sgd([w], [jax.lax.pmean(grad, AXIS)])
        return jnp.zeros(())

    return Case(step, [w], (rng.standard_normal((B, d_in)).astype(np.float32),), [(d_in, d_out)])


PROGRAMS = {
    f.__name__: f
    for f in (mlp, tokens, tied, twice, scaled, kept_per_lane, gathered, scanned, recurrent, rematerialised)
}


def run(build: Callable, seed: int, **mapping: Any) -> tuple[Any, list]:
    """One call of the program under ``smap.StatefulMapping(**mapping)``: outputs and state values."""
    case = build(np.random.default_rng(seed))
    m = smap.StatefulMapping(case.fn, axis_name=AXIS, out_axes=case.out_axes, **mapping)
    out = m(*case.args)
    return out, [s.value for s in case.states]


def compiled_hlo(build: Callable, seed: int, **mapping: Any) -> tuple[str, Case]:
    """The optimised HLO of the program's mapping, after one call."""
    case = build(np.random.default_rng(seed))
    m = smap.StatefulMapping(case.fn, axis_name=AXIS, out_axes=case.out_axes, **mapping)
    m(*case.args)
    values = [s.value for s in m._state_list.states]
    return m._state_list.dispatch.lower(values, *case.args).compile().as_text(), case


def per_lane_arrays(hlo: str, lanes: int, weights: list[tuple[int, ...]]) -> list[str]:
    """Arrays in the HLO whose dims are (lanes, a weight's dims), in any order."""
    wanted = [sorted((lanes, *w)) for w in weights]
    found = set()
    for dims in re.findall(r"\b[fb]f?\d+\[([\d,]+)\]", hlo):
        shape = [int(d) for d in dims.split(",")]
        if sorted(shape) in wanted:
            found.add(dims)
    return sorted(found)


# -- jax.vmap ------------------------------------------------------------------------

FUSED = ["mlp", "tokens", "tied", "twice", "scaled", "scanned"]  # the others keep per-lane products


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_fused_program_gives_the_unfused_values(name, seed, close):
    want = run(PROGRAMS[name], seed, fuse_lane_sums=False)
    got = run(PROGRAMS[name], seed)
    close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", FUSED)
def test_no_per_lane_weight_gradient_in_the_optimised_program(name):
    fused, case = compiled_hlo(PROGRAMS[name], 0)
    unfused, _ = compiled_hlo(PROGRAMS[name], 0, fuse_lane_sums=False)
    assert per_lane_arrays(unfused, B, case.weights), "the unfused program should hold per-lane gradients"
    assert per_lane_arrays(fused, B, case.weights) == []


def test_mlp_step_matches_plain_jax():
    rng = np.random.default_rng(3)
    case = PROGRAMS["mlp"](rng)
    initial = [np.asarray(s.value) for s in case.states]
    step = smap.StatefulMapping(case.fn, axis_name=AXIS)
    losses = step(*case.args)

    def loss(p, x, y):
        h = jnp.tanh(x @ p[0] + p[1])
        return -jax.nn.log_softmax(h @ p[2] + p[3])[y]

    x, y = case.args
    grads = jax.grad(lambda p: jnp.mean(jax.vmap(loss, (None, 0, 0))(p, x, y)))(initial)
    np.testing.assert_allclose(losses, jax.vmap(loss, (None, 0, 0))(initial, x, y), rtol=1e-6)
    for state, w, g in zip(case.states, initial, grads):
        np.testing.assert_allclose(state.value, w - LR * g, rtol=1e-5, atol=1e-6)


def test_a_gradient_that_is_not_summed_stays_per_lane():
    rng = np.random.default_rng(4)
    case = PROGRAMS["kept_per_lane"](rng)
    (w,) = case.states
    initial = np.asarray(w.value)
    (x,) = case.args
    per_example = smap.StatefulMapping(case.fn, axis_name=AXIS)(x)
    want = jax.vmap(jax.grad(lambda v, xi: jnp.sum(jnp.tanh(xi @ v))), (None, 0))(initial, x)
    assert per_example.shape == (B, *initial.shape)
    np.testing.assert_allclose(per_example, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.value, initial - LR * want.mean(0), rtol=1e-5, atol=1e-6)


def test_a_custom_mapping_fn_gets_the_fused_program(close):
    calls = []

    def my_vmap(f, **kwargs):  # a mapping_fn with jax.vmap's calling convention
        calls.append(kwargs["axis_name"])
        return jax.vmap(f, **kwargs)

    want = run(PROGRAMS["tied"], 2, fuse_lane_sums=False)
    close(run(PROGRAMS["tied"], 2, mapping_fn=my_vmap), want, rtol=1e-5, atol=1e-6)
    assert calls == [AXIS]


def test_fuse_lane_sums_must_be_a_bool():
    with pytest.raises(TypeError, match="fuse_lane_sums must be True or False, got 'no'"):
        smap.StatefulMapping(lambda x: x, fuse_lane_sums="no")


def test_sum_over_a_lane_dependent_bias_is_left_alone():
    # psum(outer(x, g) + x[:, None]) is not a product alone: it must still be the plain sum.
    def lane(x, g):
        return jax.lax.psum(jnp.outer(x, g) + x[:, None], AXIS)

    x, g = jnp.arange(B * 3.0).reshape(B, 3), jnp.ones((B, 2))
    m = smap.StatefulMapping(lane, axis_name=AXIS, out_axes=None)
    want = x.T @ g + x.sum(0)[:, None]
    np.testing.assert_allclose(m(x, g), want, rtol=1e-6)


# -- the sharding adapters -------------------------------------------------------------

ADAPTERS = {
    **{
        f"shard_map-{n}dev": lambda n=n: sharding.shard_map(sharding.make_mesh(data=n, devices=jax.devices()[:n]))
        for n in (1, 2, 4, 8)
    },
    **{f"pmap-{n}dev": lambda n=n: sharding.pmap(jax.devices()[:n]) for n in (1, 2, 4, 8)},
}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_fused_program_on_devices_gives_the_unfused_vmap_values(name, adapter, close):
    want = run(PROGRAMS[name], 5, fuse_lane_sums=False)
    got = run(PROGRAMS[name], 5, mapping_fn=ADAPTERS[adapter]())
    close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [2, 8])
def test_no_per_lane_weight_gradient_and_no_gathered_activations_on_devices(n):
    mesh = sharding.make_mesh(data=n, devices=jax.devices()[:n])
    fused, case = compiled_hlo(PROGRAMS["mlp"], 0, mapping_fn=sharding.shard_map(mesh))
    unfused, _ = compiled_hlo(PROGRAMS["mlp"], 0, mapping_fn=sharding.shard_map(mesh), fuse_lane_sums=False)
    assert per_lane_arrays(unfused, B // n, case.weights)
    assert per_lane_arrays(fused, B // n, case.weights) == []
    # The lanes are contracted on their device; only the gradients are summed over devices.
    assert "all-gather" not in fused
    assert fused.count("all-reduce(") == unfused.count("all-reduce(")
