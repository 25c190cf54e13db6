"""Tests of ``smap._aot``: every transform's ``trace``/``lower``/``compile``, as ``jax.jit``'s.

The program a transform lowers is checked against the same program written
in plain JAX (``jax.jit`` of ``jax.vmap``/``jax.shard_map``/``jax.grad`` with
the states passed explicitly): the same collectives in XLA's optimised HLO,
the same argument bytes, the same values when the traced jaxpr is evaluated.
Lowering never writes a state, and a bad argument raises the call's error.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import smap

_ALL_REDUCE = re.compile(r"\ball-reduce(-start)?\(")


def all_reduces(hlo: str) -> int:
    return len(_ALL_REDUCE.findall(hlo))


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=jnp.float32)


def mesh(n):
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,))


def sgd_step(w, x, axis_name):
    """One data-parallel step, the same in plain JAX and in smap: pmean of per-example gradients."""
    g = jax.grad(lambda w: jnp.sum((x @ w) ** 2))(w)
    return w - 0.1 * jax.lax.pmean(g, axis_name), jnp.sum(x @ w)


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_collective_count_matches_plain_shard_map(devices):
    m = mesh(devices)
    w = smap.ParamState(rand(3, 2, seed=1))

    def step(x):
        w.value, out = sgd_step(w.value, x, "data")
        return out

    mapped = smap.StatefulMapping(
        step, axis_name="data", mapping_fn=jax.shard_map, mapping_kwargs={"mesh": m}, fuse_lane_sums=False
    )
    x = rand(8, 3)
    before = w.value
    hlo = mapped.lower(x).compile().as_text()
    np.testing.assert_array_equal(w.value, before)  # lowering writes nothing

    # The same step in plain JAX: the lanes of a device are a vmap, the devices a shard_map.
    def plain_step(w, x):
        # Per device: the lanes' gradients summed locally, then pmean over the devices.
        def per_device(w, x):
            g = jax.vmap(jax.grad(lambda w, xi: jnp.sum((xi @ w) ** 2)), in_axes=(None, 0))(w, x)
            g = jax.lax.psum(g.sum(0), "data") / x.shape[0] / devices
            return w - 0.1 * g, jax.vmap(lambda xi: jnp.sum(xi @ w))(x)

        # check_vma=False: with it, the gradient of the replicated w would be all-reduced per example
        # (JAX's transpose of an invariant input), which a hand-written data-parallel step avoids.
        return jax.shard_map(
            per_device, mesh=m, in_specs=(P(), P("data")), out_specs=(P(), P("data")), check_vma=False
        )(w, x)

    reference = jax.jit(plain_step).lower(before, x).compile().as_text()
    assert all_reduces(hlo) == all_reduces(reference) == 1

    out = mapped(x)
    w_ref, out_ref = plain_step(before, x)
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.value, w_ref, rtol=1e-5, atol=1e-6)


def test_lower_takes_the_states_current_values():
    """The lowered program's inputs are the states' values now: their bytes, and a new shape after a reset."""
    h = smap.HiddenState(jnp.zeros((4, 3)))

    @smap.vmap(state_in_axes=smap.HiddenState)
    def step(x):
        h.value = 0.5 * h.value + x
        return h.value.sum()

    x = rand(4, 3)
    stats = step.lower(x).compile().memory_analysis()
    assert stats.argument_size_in_bytes == h.value.nbytes + x.nbytes
    np.testing.assert_array_equal(h.value, jnp.zeros((4, 3)))

    h.reset(jnp.zeros((6, 3)))
    x6 = rand(6, 3)
    assert step.lower(x6).compile().memory_analysis().argument_size_in_bytes == h.value.nbytes + x6.nbytes
    np.testing.assert_array_equal(h.value, jnp.zeros((6, 3)))


def test_traced_jaxpr_computes_what_a_call_computes():
    """``trace(...).jaxpr`` evaluated on the states' values and the arguments gives the call's results."""
    w = smap.ParamState(rand(3, seed=1))
    count = smap.LongTermState(jnp.zeros(()))

    @smap.jit
    def f(x):
        count.value = count.value + 1
        return jnp.tanh(x * w.value)

    x = rand(3, seed=2)
    traced = f.trace(x)
    assert count.value == 0
    # The inputs: the states in the order the function first touched them (count, w), then the arguments.
    inputs = [count.value, w.value, x]
    flat = jax.core.eval_jaxpr(traced.jaxpr.jaxpr, traced.jaxpr.consts, *inputs)
    np.testing.assert_allclose(flat[0], jnp.tanh(x * w.value), rtol=1e-6)
    np.testing.assert_allclose(flat[1], 1.0)
    # The traced program lowers to what lower() gives.
    assert traced.lower().as_text() == f.lower(x).as_text()
    np.testing.assert_allclose(f(x), flat[0], rtol=1e-6)
    assert count.value == 1


def test_grad_lowers_and_matches_jax_grad():
    w = smap.ParamState(rand(4, 2, seed=1))
    loss = smap.grad(lambda x: jnp.sum(jnp.tanh(x @ w.value) ** 2), grad_states=w)
    x = rand(5, 4, seed=2)
    lowered = loss.lower(x)
    with_value = smap.grad(lambda x: jnp.sum(jnp.tanh(x @ w.value) ** 2), grad_states=w, return_value=True).lower(x)
    # smap.grad computes what jax.grad does, and with return_value=True what jax.value_and_grad does.
    f = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)  # noqa: E731
    for ours, plain in ((lowered, jax.jit(jax.grad(f))), (with_value, jax.jit(jax.value_and_grad(f)))):
        compiled, theirs = ours.compile(), plain.lower(w.value, x).compile()
        costs = [c[0] if isinstance(c, list) else c for c in (compiled.cost_analysis(), theirs.cost_analysis())]
        assert costs[0]["flops"] == costs[1]["flops"]  # (a list on some JAX versions)
        # The loss's value leaves the program only when asked for (an output more: 3-5 µs a cached call).
        assert compiled.memory_analysis().output_size_in_bytes == theirs.memory_analysis().output_size_in_bytes
    assert lowered.compile().memory_analysis().output_size_in_bytes == 4 * 2 * 4
    assert lowered.cost_analysis() is not None
    assert "stablehlo" in lowered.as_text() and "HloModule" in lowered.as_text(dialect="hlo")
    np.testing.assert_allclose(loss(x), jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))(w.value), rtol=1e-5)


def test_lower_before_any_call_finds_the_states():
    """A first lower() discovers the states it touches, and a later call runs with them."""
    total = smap.State(jnp.zeros(2))

    @smap.vmap(in_axes=0, axis_name="i")
    def add(x):
        total.value = total.value + jax.lax.psum(x, "i")
        return x

    x = rand(4, 2)
    assert "all-reduce" not in add.lower(x).compile().as_text()  # vmap's psum is a sum, not a collective
    np.testing.assert_array_equal(total.value, jnp.zeros(2))
    add(x)
    np.testing.assert_allclose(total.value, x.sum(0), rtol=1e-6)


def test_lower_with_arguments_of_the_wrong_structure_names_the_argument():
    w = smap.ParamState(jnp.ones(3))

    @smap.vmap(in_axes=(0, {"a": 0, "b": None}))
    def step(y, d):
        w.value = w.value + y + d["a"] * d["b"]
        return y

    with pytest.raises(ValueError, match=r"in_axes\[1\], for args\[1\], .* does not match"):
        step.lower(jnp.ones((4, 3)), [jnp.ones((4, 3)), jnp.ones(3)])
    with pytest.raises(ValueError, match=r"args\[0\] \(axis 0\) has size 4, args\[1\]\['a'\] \(axis 0\) has size 5"):
        step.lower(jnp.ones((4, 3)), {"a": jnp.ones((5, 3)), "b": jnp.ones(3)})
    with pytest.raises(TypeError, match=r"args\[1\]\['b'\]"):
        step.lower(jnp.ones((4, 3)), {"a": jnp.ones((4, 3)), "b": "three"})
    np.testing.assert_array_equal(w.value, jnp.ones(3))
    step.lower(jnp.ones((4, 3)), {"a": jnp.ones((4, 3)), "b": jnp.ones(3)})  # the right structure lowers
    np.testing.assert_array_equal(w.value, jnp.ones(3))


def test_lower_inside_a_transform_is_refused():
    f = smap.jit(lambda x: x + 1)
    g = smap.jit(lambda x: f.lower(x))
    with pytest.raises(RuntimeError, match="outside of smap transforms"):
        g(jnp.ones(2))


def test_the_compiled_program_is_called_as_jax_jits_is_on_the_arguments_it_was_lowered_for():
    """``f.lower(x).compile()(x)`` runs the step and writes its states, as the plain-JAX step with the state
    passed explicitly computes it; arguments of another signature are a TypeError naming both, and no state
    changes. A weak type may differ, as for jax.jit's compiled object."""
    h = smap.HiddenState(jnp.zeros((4, 3)))

    @smap.vmap(state_in_axes=smap.HiddenState)
    def step(x):
        h.value = 0.5 * h.value + x
        return h.value.sum()

    def plain(h, x):
        h = 0.5 * h + x
        return h.sum(axis=1), h

    x = rand(4, 3)
    compiled = step.lower(jax.ShapeDtypeStruct((4, 3), jnp.float32)).compile()
    expected, h_expected = plain(jnp.zeros((4, 3)), x)
    np.testing.assert_allclose(compiled(x), expected, rtol=1e-6)
    np.testing.assert_allclose(h.value, h_expected, rtol=1e-6)
    expected, h_expected = plain(h_expected, jnp.full((4, 3), 2.0))
    np.testing.assert_allclose(compiled(jnp.full((4, 3), 2.0)), expected, rtol=1e-6)  # (weakly typed)
    np.testing.assert_allclose(h.value, h_expected, rtol=1e-6)
    before = h.value
    with pytest.raises(
        TypeError,
        match=r"compiled for arguments \(\(float32\[4, 3\],\), \{\}\), called with "
        r"\(\(float32\[5, 3\],\), \{\}\)",
    ):
        compiled(rand(5, 3))
    assert h.value is before
    lowered_jit = smap.jit(lambda x, n: x * n, static_argnums=1).lower(jnp.ones(2), 3)
    np.testing.assert_allclose(lowered_jit.compile()(jnp.ones(2), 3), [3.0, 3.0])
    with pytest.raises(TypeError, match=r"and static \{1: 3\}, called with .* and static \{1: 4\}"):
        lowered_jit.compile()(jnp.ones(2), 4)


def test_eval_shape_gives_what_jax_eval_shape_gives_for_the_pure_step_and_writes_no_state():
    w = smap.ParamState(rand(3, 2, seed=1))
    count = smap.State(jnp.zeros(()))

    def loss(x):
        count.value = count.value + 1  # jax.eval_shape refuses a function that writes a state
        return jnp.sum(jnp.tanh(x @ w.value)), {"h": x @ w.value}

    def pure(w, x):
        return jnp.sum(jnp.tanh(x @ w)), {"h": x @ w}

    x = rand(5, 3, seed=2)
    assert smap.jit(loss).eval_shape(x) == jax.eval_shape(pure, w.value, x)
    assert smap.vmap(loss).eval_shape(x) == jax.eval_shape(jax.vmap(pure, (None, 0)), w.value, x)
    grads = smap.grad(loss, grad_states=w, has_aux=True, return_value=True).eval_shape(x[0])
    assert grads == jax.eval_shape(lambda w, x: (jax.grad(lambda w: pure(w, x)[0])(w), *pure(w, x)), w.value, x[0])
    assert count.value == 0
    with pytest.raises(TypeError, match=r"writes State float32\[\] from inside .* smap.jit\(loss\).eval_shape\(...\)"):
        jax.eval_shape(smap.jit(loss), x)  # refused, naming the method that gives the shapes
    assert count.value == 0
