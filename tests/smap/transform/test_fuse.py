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
    return m.lower(*case.args).compile().as_text(), case


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


@pytest.mark.parametrize("n", [2, 4])
def test_no_per_lane_weight_gradient_and_no_gathered_activations_on_devices(n):
    mesh = sharding.make_mesh(data=n, devices=jax.devices()[:n])
    fused, case = compiled_hlo(PROGRAMS["mlp"], 0, mapping_fn=sharding.shard_map(mesh))
    unfused, _ = compiled_hlo(PROGRAMS["mlp"], 0, mapping_fn=sharding.shard_map(mesh), fuse_lane_sums=False)
    assert per_lane_arrays(unfused, B // n, case.weights)
    assert per_lane_arrays(fused, B // n, case.weights) == []
    # The lanes are contracted on their device; only the gradients are summed over devices.
    assert "all-gather" not in fused
    assert fused.count("all-reduce(") == unfused.count("all-reduce(")


def lowered_text(build: Callable, seed: int, **mapping: Any) -> str:
    """The lowered program of the mapping (StableHLO), after one call; smap's fresh axis names numberless."""
    case = build(np.random.default_rng(seed))
    m = smap.StatefulMapping(case.fn, axis_name=AXIS, out_axes=case.out_axes, **mapping)
    m(*case.args)
    return re.sub(r"(_smap_[a-z]+_)\d+", r"\1", m.lower(*case.args).as_text())


@pytest.mark.parametrize("adapter", ["shard_map", "pmap"])
def test_one_lane_per_device_runs_the_program_unfused(adapter):
    """A device's sum over its one lane is that lane's product: the lanes run the program as traced
    (XLA:CPU gives the traced weight gradients faster kernels than the fused contraction's)."""
    devices = jax.devices()[:B]
    make = {
        "shard_map": lambda: sharding.shard_map(sharding.make_mesh(data=B, devices=devices)),
        "pmap": lambda: sharding.pmap(devices),
    }[adapter]
    fused = lowered_text(PROGRAMS["mlp"], 0, mapping_fn=make())
    unfused = lowered_text(PROGRAMS["mlp"], 0, mapping_fn=make(), fuse_lane_sums=False)
    assert fused == unfused
    # With two lanes per device the sum is fused: another program.
    two = lambda: sharding.shard_map(sharding.make_mesh(data=B // 2, devices=devices[: B // 2]))  # noqa: E731
    fused = lowered_text(PROGRAMS["mlp"], 0, mapping_fn=two())
    assert fused != lowered_text(PROGRAMS["mlp"], 0, mapping_fn=two(), fuse_lane_sums=False)


# -- rewrites that never change a value: regression tests against plain JAX ------------------
#
# Each runs under jax.vmap and on the 8 devices with 1, 2 and 4 lanes per device, with
# each of the four ways of mapping onto devices (PLACES).

SPELLINGS: dict[str, Callable[[], tuple[Callable, dict]]] = {
    "sharding.shard_map": lambda: (sharding.shard_map(sharding.make_mesh(data=8)), {}),
    "sharding.pmap": lambda: (sharding.pmap(jax.devices()), {}),
    "jax.shard_map": lambda: (jax.shard_map, {"mesh": sharding.make_mesh(data=8)}),
    "jax.pmap": lambda: (jax.pmap, {}),
}
PLACES = ["jax.vmap", "sharding.shard_map-1", "sharding.pmap-2", "jax.shard_map-4", "jax.pmap-2"]


def place(where: str) -> tuple[dict, int]:
    """``StatefulMapping`` keywords for ``where`` ('<spelling>-<lanes per device>'), and the lanes."""
    if where == "jax.vmap":
        return {}, 16
    spelling, per_device = where.rsplit("-", 1)
    mapping_fn, mapping_kwargs = SPELLINGS[spelling]()
    return {"mapping_fn": mapping_fn, "mapping_kwargs": mapping_kwargs}, 8 * int(per_device)


def _per_example_grads(loss: Callable, w: Any, *batch: Any) -> jax.Array:
    return jax.vmap(jax.grad(loss), (None, *[0] * len(batch)))(w, *batch)


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("axes", ["seq", ("batch", "seq")])
def test_nested_mapping_on_devices_sums_over_its_own_lanes_once(where, axes):
    """An inner mapping over each example's tokens pmeans per-token gradients over its own
    axis ('seq'), or over ('batch', 'seq'); the outer mapping runs on devices. The inner lane
    sum must not be summed over the devices again (it was: the gradient came back ×devices)."""
    mapping, lanes = place(where)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((lanes, 3, 4)).astype(np.float32)
    w0 = _normal(rng, 4, 3)
    w = smap.ParamState(w0)

    def example(xe):
        def token(xt):
            g = smap.grad(lambda: jnp.sum(jnp.tanh(xt @ w.value)), grad_states=w)()
            return jax.lax.pmean(g, axes)

        g = smap.StatefulMapping(token, axis_name="seq", out_axes=None)(xe)
        per_example = g
        if axes == "seq":
            g = jax.lax.pmean(g, AXIS)
        w.value = w.value - LR * g
        return per_example

    got = smap.StatefulMapping(example, axis_name=AXIS, **mapping)(x)
    loss = lambda v, xt: jnp.sum(jnp.tanh(xt @ v))  # noqa: E731
    per_token = jax.vmap(lambda xe: _per_example_grads(loss, w0, xe))(x)  # (lanes, tokens, 4, 3)
    want = per_token.mean(1) if axes == "seq" else jnp.broadcast_to(per_token.mean((0, 1)), per_token.mean(1).shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.value, w0 - LR * per_token.mean((0, 1)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", PLACES)
def test_complex_per_lane_factor_keeps_the_product_complex(where):
    """psum(phase * g): a complex per-example scalar times a real per-example gradient. The
    fused sum's imaginary part was 0 (the factor was cast to the gradient's real dtype)."""
    mapping, lanes = place(where)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((lanes, 4)).astype(np.float32)
    phase = np.exp(1j * rng.uniform(0, 2 * np.pi, lanes)).astype(np.complex64)
    w0 = _normal(rng, 4, 3)
    w = smap.ParamState(w0)

    def step(xe, ph):
        g = smap.grad(lambda: jnp.sum(jnp.tanh(xe @ w.value)), grad_states=w)()
        return jax.lax.psum(ph * g, AXIS)

    got = smap.StatefulMapping(step, axis_name=AXIS, out_axes=None, **mapping)(x, phase)
    want = jnp.einsum("b,bij->ij", phase, _per_example_grads(lambda v, xe: jnp.sum(jnp.tanh(xe @ v)), w0, x))
    assert got.dtype == jnp.complex64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _float16_master(scale: float) -> tuple[np.ndarray, smap.ParamState, Callable]:
    """Float32 master weights (3, 2), their initial value, and a float16 loss scaled by ``scale``."""
    w0 = np.full((3, 2), 0.3, np.float32)

    def loss(v, xe):
        y = xe.astype(jnp.float16) @ v.astype(jnp.float16)
        return jnp.sum(y.astype(jnp.float32) ** 2) * scale

    return w0, smap.ParamState(w0), loss


@pytest.mark.parametrize("where", PLACES)
def test_float16_sum_over_lanes_accumulates_in_float32(where):
    """Float32 master weights, float16 compute, a scaled loss: each lane's gradient and their
    mean fit in float16, their sum does not. The original program sums float32 values; the
    fused sum was computed in float16 and overflowed to inf."""
    mapping, lanes = place(where)
    rng = np.random.default_rng(2)
    x = (4 + 0.1 * rng.standard_normal((lanes, 3))).astype(np.float32)
    scale = 512.0
    w0, w, loss = _float16_master(scale)

    def step(xe):
        g = smap.grad(lambda: loss(w.value, xe), grad_states=w)()
        w.value = w.value - LR * jax.lax.pmean(g, AXIS) / scale
        return g

    per_lane = smap.StatefulMapping(step, axis_name=AXIS, **mapping)(x)
    grads = _per_example_grads(loss, w0, x)
    assert float(jnp.max(jnp.abs(grads))) < 65504 < float(jnp.max(jnp.abs(grads.sum(0))))
    np.testing.assert_allclose(per_lane, grads, rtol=1e-3)
    np.testing.assert_allclose(w.value, w0 - LR * grads.mean(0) / scale, rtol=1e-3)


@pytest.mark.parametrize("where", PLACES)
def test_a_float16_lane_that_overflows_gives_inf_as_written(where):
    """Found by the fuzzer (seed 3149): float32 master weights, float16 compute, loss scale
    8192. One lane's float16 gradient overflows to ±inf in the program as written (what
    dynamic loss scaling watches for), so the pmean is inf or NaN there; the fused sum
    never formed that lane's product and was finite. Such products are not fused."""
    mapping, lanes = place(where)
    rng = np.random.default_rng(7)
    x = rng.uniform(0.5, 1.0, (lanes, 3)).astype(np.float32)
    x[1, 0], x[2, 0] = 10.0, -10.0  # lane 1's row 0 overflows; lane 2's too, the other sign
    scale = 8192.0
    w0, w, loss = _float16_master(scale)

    def step(xe):
        g = smap.grad(lambda: loss(w.value, xe), grad_states=w)()
        mean = jax.lax.pmean(g, AXIS)
        w.value = w.value - LR * mean / scale
        return mean

    got = smap.StatefulMapping(step, axis_name=AXIS, out_axes=None, **mapping)(x)
    want = _per_example_grads(loss, w0, x).mean(0)
    assert not np.isfinite(want[0]).any() and np.isfinite(want[1:]).all()
    np.testing.assert_allclose(got, want, rtol=1e-3)  # inf and NaN where the program as written has them
    np.testing.assert_allclose(w.value, w0 - LR * want / scale, rtol=1e-3)


@pytest.mark.parametrize("where", PLACES)
def test_float32_factors_on_float16_parameters_are_applied_in_float32(where):
    """psum(s * g) with float32 per-example weights s (around 1e-7) and float16 gradients g:
    the program multiplies in float32. The fused sum cast s to float16 first, where such
    weights keep one or two bits (errors up to 30 %)."""
    mapping, lanes = place(where)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((lanes, 4)).astype(np.float32)
    s = rng.uniform(0.5e-7, 2e-7, lanes).astype(np.float32)
    w0 = _normal(rng, 4, 3).astype(np.float16)
    w = smap.ParamState(w0)
    loss = lambda v, xe: jnp.sum(jnp.tanh(xe.astype(jnp.float16) @ v))  # noqa: E731

    def step(xe, se):
        g = smap.grad(lambda: loss(w.value, xe), grad_states=w)()
        return jax.lax.psum(se * g, AXIS)

    got = smap.StatefulMapping(step, axis_name=AXIS, out_axes=None, **mapping)(x, s)
    want = jnp.einsum("b,bij->ij", s, _per_example_grads(loss, w0, x).astype(jnp.float32))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("where", PLACES)
def test_gradient_of_a_contrastive_loss_over_all_gather(where):
    """Each lane's loss compares its embedding with every lane's (all_gather): its gradient
    holds a psum_scatter, which raised NotImplementedError with several lanes per device."""
    mapping, lanes = place(where)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((lanes, 4)).astype(np.float32)
    w0 = _normal(rng, 4, 3)
    w = smap.ParamState(w0)

    def lane_loss(v, xe, everyone):
        e = jnp.tanh(xe @ v)
        return jax.nn.logsumexp(everyone @ e) - e @ e

    def step(xe):
        def loss():
            e = jnp.tanh(xe @ w.value)
            return lane_loss(w.value, xe, jax.lax.all_gather(e, AXIS))

        g, value = smap.grad(loss, grad_states=w, return_value=True)()
        w.value = w.value - LR * jax.lax.pmean(g, AXIS)
        return value

    values = smap.StatefulMapping(step, axis_name=AXIS, **mapping)(x)

    def batch_loss(v):
        everyone = jnp.tanh(x @ v)
        return jax.vmap(lane_loss, (None, 0, None))(v, x, everyone)

    np.testing.assert_allclose(values, batch_loss(w0), rtol=1e-5)
    np.testing.assert_allclose(w.value, w0 - LR * jax.grad(lambda v: batch_loss(v).mean())(w0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("tiled", [True, False])
def test_psum_scatter_gives_each_lane_its_block_of_the_sum(where, tiled):
    mapping, lanes = place(where)
    x = np.random.default_rng(5).standard_normal((lanes, 3, lanes * (2 if tiled else 1))).astype(np.float32)
    scatter = lambda v: jax.lax.psum_scatter(v, AXIS, scatter_dimension=1, tiled=tiled)  # noqa: E731
    got = smap.StatefulMapping(scatter, axis_name=AXIS, **mapping)(x)
    total = x.sum(0)
    want = total.reshape(3, lanes, 2).transpose(1, 0, 2) if tiled else total.T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("where", PLACES)
def test_a_ppermute_with_several_lanes_per_device_is_run_as_jax_vmap_runs_it(where):
    """A collective the spanning has no rule of its own for (here ppermute) gathers every lane's value."""
    mapping, lanes = place(where)
    count = smap.LongTermState(jnp.zeros(()))

    def shift(x):
        count.value = count.value + 1
        return jax.lax.ppermute(x, AXIS, [(i, (i + 1) % lanes) for i in range(lanes)])

    np.testing.assert_array_equal(
        smap.StatefulMapping(shift, axis_name=AXIS, **mapping)(jnp.arange(float(lanes))),
        jnp.roll(jnp.arange(float(lanes)), 1),
    )
    assert float(count.value) == 1.0


@pytest.mark.parametrize("where", PLACES)
def test_complex_factor_on_a_float16_gradient_keeps_the_product_complex(where):
    """Found by the fuzzer (seed 110): float16 compute, float32 master weights, psum(phase * g).
    The gradient is converted float16 -> float32 -> complex64 before the factor; the fused sum
    converted the complex product back to float32 at the first convert (imaginary part 0)."""
    mapping, lanes = place(where)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((lanes, 4)).astype(np.float32)
    phase = np.exp(1j * rng.uniform(0, 2 * np.pi, lanes)).astype(np.complex64)
    w0 = _normal(rng, 4, 3)
    w = smap.ParamState(w0)
    loss = lambda v, xe: jnp.sum(jnp.tanh(xe.astype(jnp.float16) @ v.astype(jnp.float16))).astype(jnp.float32)  # noqa: E731

    def step(xe, ph):
        g = smap.grad(lambda: loss(w.value, xe), grad_states=w)()
        return jax.lax.psum(ph * g, AXIS)

    got = smap.StatefulMapping(step, axis_name=AXIS, out_axes=None, **mapping)(x, phase)
    want = jnp.einsum("b,bij->ij", phase, _per_example_grads(loss, w0, x))
    assert got.dtype == jnp.complex64
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-3 * float(jnp.max(jnp.abs(want))))


@pytest.mark.filterwarnings("ignore:Casting complex values to real")  # the program takes the real part
def test_a_complex_factor_is_not_moved_past_a_real_part():
    """psum(c * real(z)) with complex per-lane c and complex per-lane products z, the real
    part taken by a convert: it does not commute with c, so the sum is computed as written."""

    def lane(a, b, c):
        z = jax.lax.dot_general(a[:, None], b[None, :], (((1,), (0,)), ((), ())))
        return jax.lax.psum(c * jax.lax.convert_element_type(z, jnp.float32).astype(jnp.complex64), AXIS)

    rng = np.random.default_rng(7)
    a = (rng.standard_normal((B, 3)) + 1j * rng.standard_normal((B, 3))).astype(np.complex64)
    b = (rng.standard_normal((B, 2)) + 1j * rng.standard_normal((B, 2))).astype(np.complex64)
    c = np.exp(1j * rng.uniform(0, 2 * np.pi, B)).astype(np.complex64)
    got = smap.StatefulMapping(lane, axis_name=AXIS, out_axes=None)(a, b, c)
    want = jnp.einsum("b,bij->ij", c, jnp.einsum("bi,bj->bij", a, b).real)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("where", ["jax.pmap-2", "sharding.shard_map-1", "jax.shard_map-4"])
def test_bfloat16_sum_over_lanes_on_devices_differs_from_vmap_only_by_its_order(where):
    """Found by the fuzzer (seed 222): bfloat16 parameters and compute, two Adam steps in a
    while_loop, psum over ('batch',), jax.pmap with 2 lanes per device: Adam's moments
    differed from jax.vmap's by 1e-4 (largest 8.6e-4). Not a defect: a bfloat16 psum rounds
    every partial sum; jax.vmap sums the lanes in one reduction, a device its block of lanes
    and then the blocks, and where the lanes' gradients cancel the two orders round apart.
    Summed in float32 and rounded once, the step gives jax.vmap's values; summed in bfloat16,
    each order's sum is within bfloat16's error bound of the exact sum."""
    mapping, lanes = place(where)
    rng = np.random.default_rng(8)
    x = rng.standard_normal((lanes, 3, 4)).astype(np.float32)
    y = rng.standard_normal((lanes, 3, 2)).astype(np.float32)
    w0 = _normal(rng, 4, 2).astype(jnp.bfloat16)
    zeros = np.zeros((4, 2), np.float32)
    bf16 = jnp.bfloat16

    def loss(v, xe, ye):
        return jnp.mean((jnp.tanh(xe.astype(bf16) @ v) - ye.astype(bf16)).astype(jnp.float32) ** 2)

    def summed(g, wide):
        return jax.lax.psum(g.astype(jnp.float32), (AXIS,)).astype(bf16) if wide else jax.lax.psum(g, (AXIS,))

    def train(w, m, s, xe, ye, wide):
        def adam(carry):
            i, w, m, s = carry
            g = summed(jax.grad(loss)(w, xe, ye), wide).astype(jnp.float32) / lanes
            m, s = 0.9 * m + 0.1 * g, 0.99 * s + 0.01 * g**2
            return i + 1, (w - 0.01 * m / (jnp.sqrt(s) + 1e-3)).astype(bf16), m, s

        return jax.lax.while_loop(lambda c: c[0] < 2, adam, (0, w, m, s))[1:]

    w, m, s = smap.ParamState(w0), smap.LongTermState(zeros), smap.LongTermState(zeros)

    def step(xe, ye):
        w.value, m.value, s.value = train(w.value, m.value, s.value, xe, ye, True)
        return summed(jax.grad(loss)(w0, xe, ye), False)

    on_devices = smap.StatefulMapping(step, axis_name=AXIS, out_axes=None, **mapping)(x, y)
    reference = jax.vmap(lambda xe, ye: train(w0, zeros, zeros, xe, ye, True), axis_name=AXIS, out_axes=None)(x, y)
    for got, want in zip((w.value, m.value, s.value), reference):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-6, atol=1e-9)

    per_lane = np.asarray(_per_example_grads(loss, w0, x, y), np.float64)  # bfloat16 values
    in_one_reduction = jax.vmap(lambda g: summed(g, False), axis_name=AXIS, out_axes=None)(per_lane.astype(bf16))
    unit = 2.0**-8  # bfloat16 keeps 8 significant bits
    bound = (lanes - 1) * unit / (1 - (lanes - 1) * unit) * np.abs(per_lane).sum(0)
    for total in (on_devices, in_one_reduction):
        assert np.all(np.abs(np.asarray(total, np.float64) - per_lane.sum(0)) <= bound)
