"""Tracing: states written inside JAX's own transformations of the traced function.

A function that smap traces may write a State inside a ``jax.lax.scan``,
``fori_loop``, ``while_loop``, ``cond``/``switch``, ``jax.checkpoint``, a
nested ``jax.jit`` or a ``jax.custom_vjp`` (a running statistic updated per
layer of a scanned stack, dropout drawn per step). Each program below is
checked against the same computation in plain JAX with the state passed
explicitly through the loop or branch. Writes JAX cannot carry out of its
transformation (a per-example value under ``jax.vmap``, a differentiated one
under ``jax.grad``) are refused naming the state, which keeps its value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mapping_helpers import assert_unchanged, snapshot

import sharding
import smap
from smap.filter import OfType

X = jnp.array([0.5, -1.0, 2.0])


def _scan(total, x):
    def body(c, _):
        total.value = total.value + jnp.sin(c)
        return c * 0.5 + 1.0, None

    return jax.lax.scan(body, x, None, length=3)[0]


def _scan_ref(t, x):
    def body(carry, _):
        c, t = carry
        return (c * 0.5 + 1.0, t + jnp.sin(c)), None

    (c, t), _ = jax.lax.scan(body, (x, t), None, length=3)
    return c, t


def _fori(total, x):
    def body(i, c):
        total.value = total.value * 0.9 + c * i
        return c + 1.0

    return jax.lax.fori_loop(0, 4, body, x)


def _fori_ref(t, x):
    def body(i, carry):
        c, t = carry
        return c + 1.0, t * 0.9 + c * i

    return jax.lax.fori_loop(0, 4, body, (x, t))


def _while(total, x):
    def body(c):
        total.value = total.value + c
        return c * 2.0

    return jax.lax.while_loop(lambda c: jnp.sum(c) < 20.0, body, x)


def _while_ref(t, x):
    def body(carry):
        c, t = carry
        return c * 2.0, t + c

    return jax.lax.while_loop(lambda carry: jnp.sum(carry[0]) < 20.0, body, (x, t))


def _cond(total, x):
    def written(c):
        total.value = total.value + c  # one branch writes, the other does not
        return c * 2.0

    return jax.lax.cond(jnp.sum(x) > 1.0, written, lambda c: c - 1.0, x)


def _cond_ref(t, x):
    return jax.lax.cond(jnp.sum(x) > 1.0, lambda c, t: (c * 2.0, t + c), lambda c, t: (c - 1.0, t), x, t)


def _switch_constant(total, x):
    def zeroed(c):
        total.value = jnp.zeros(3)  # a constant written in one branch only
        return c

    return jax.lax.switch(jnp.argmax(x), [lambda c: c + 1.0, zeroed, lambda c: c * 3.0], x)


def _switch_constant_ref(t, x):
    branches = [lambda c, t: (c + 1.0, t), lambda c, t: (c, jnp.zeros(3)), lambda c, t: (c * 3.0, t)]
    return jax.lax.switch(jnp.argmax(x), branches, x, t)


def _checkpoint(total, x):
    def layer(c):
        total.value = total.value + jax.lax.stop_gradient(c)
        return jnp.tanh(c)

    return jax.checkpoint(layer)(x)


def _checkpoint_ref(t, x):
    return jnp.tanh(x), t + x


def _inner_jit(total, x):
    def inner(c):
        total.value = total.value - c
        return c**2

    return jax.jit(inner)(x)


def _inner_jit_ref(t, x):
    return x**2, t - x


def _custom_vjp(total, x):
    def forward(c):
        total.value = total.value + c
        return c * 3.0

    scaled = jax.custom_vjp(forward)
    scaled.defvjp(lambda c: (forward(c), None), lambda _, g: (g * 3.0,))
    return scaled(x)


def _custom_vjp_ref(t, x):
    return x * 3.0, t + x


PROGRAMS = {
    "scan": (_scan, _scan_ref),
    "fori_loop": (_fori, _fori_ref),
    "while_loop": (_while, _while_ref),
    "cond": (_cond, _cond_ref),
    "switch, a constant in one branch": (_switch_constant, _switch_constant_ref),
    "jax.checkpoint": (_checkpoint, _checkpoint_ref),
    "jax.jit": (_inner_jit, _inner_jit_ref),
    "jax.custom_vjp": (_custom_vjp, _custom_vjp_ref),
}


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize("x", [X, -X], ids=["x", "-x"])
def test_a_write_inside_a_jax_transformation_leaves_it_under_smap_jit(name, x, close):
    program, reference = PROGRAMS[name]
    total = smap.State(jnp.arange(3.0))
    traces = []

    @smap.jit
    def step(x):
        traces.append(1)
        return program(total, x)

    want_out, want_total = reference(jnp.arange(3.0), x)
    close(step(x), want_out)
    close(total.value, want_total)
    count = len(traces)  # traced again once, with the state held in a Ref
    want_out, want_total = reference(want_total, x)
    close(step(x), want_out)
    close(total.value, want_total)
    assert len(traces) == count  # the second call is cached


def test_running_statistics_of_a_scanned_layer_stack_under_smap_grad(close):
    """BatchNorm-like running means, one per layer, updated inside the scan over the layers."""
    ws = jnp.stack([jnp.eye(3) * s for s in (0.5, 1.0, 1.5)])
    weights = smap.ParamState(ws)
    means = smap.LongTermState(jnp.zeros((3, 3)))

    def loss(x):
        def layer(h, i):
            h = jnp.tanh(h @ weights.value[i])
            means.value = means.value.at[i].set(0.9 * means.value[i] + 0.1 * jax.lax.stop_gradient(h.mean(0)))
            return h, None

        h, _ = jax.lax.scan(layer, x, jnp.arange(3))
        return jnp.sum(h**2)

    def ref_loss(ws, m, x):
        def layer(carry, i):
            h, m = carry
            h = jnp.tanh(h @ ws[i])
            return (h, m.at[i].set(0.9 * m[i] + 0.1 * jax.lax.stop_gradient(h.mean(0)))), None

        (h, m), _ = jax.lax.scan(layer, (x, m), jnp.arange(3))
        return jnp.sum(h**2), m

    xs = jnp.arange(6.0).reshape(2, 3) / 6
    grads = smap.grad(loss, grad_states=weights)(xs)
    (_, want_means), want_grads = jax.value_and_grad(ref_loss, has_aux=True)(ws, jnp.zeros((3, 3)), xs)
    close(grads, want_grads)
    close(means.value, want_means)


def _draws(key, n):
    """``n`` draws of ``smap.random.normal(size=())`` from a RandomState holding ``key``."""
    values = []
    for _ in range(n):
        key, sub = jax.random.split(key)
        values.append(jax.random.normal(sub, ()))
    return jnp.stack(values), key


def test_draws_inside_a_scan_follow_the_key_as_drawn_one_by_one(close):
    rng = smap.random.RandomState(3)
    key = rng.value

    @smap.jit
    def noisy(x):
        return jax.lax.scan(lambda c, _: (c, c + rng.normal(size=())), x, None, length=4)[1]

    want, next_key = _draws(key, 4)
    close(noisy(jnp.float32(1.0)), 1.0 + want)
    np.testing.assert_array_equal(rng.value, next_key)


MESH = {
    "jax.vmap": lambda: {},
    "sharding.shard_map, 2 lanes per device": lambda: {
        "mapping_fn": sharding.shard_map(sharding.make_mesh(data=4, devices=jax.devices()[:4]))
    },
}


@pytest.mark.parametrize("where", MESH)
def test_per_lane_and_shared_states_written_inside_a_scan_of_each_lane(where, close):
    """A batched state per lane, a shared one written with a pmean and the lanes' draws, all inside a scan."""
    lanes = 8
    h0, w0 = jnp.arange(lanes * 3.0).reshape(lanes, 3) / 10, jnp.ones(3)
    h, w = smap.HiddenState(h0), smap.ParamState(w0)
    key = smap.random.DEFAULT.value

    def lane(x):
        def body(c, _):
            h.value = 0.5 * h.value + c * w.value
            w.value = w.value - 0.1 * jax.lax.pmean(c, "b")
            return jnp.tanh(c + smap.random.normal(size=3)), None

        return jax.lax.scan(body, x, None, length=2)[0]

    def ref_lane(x, h, w, lane_key):
        def body(carry, _):
            c, h, w, k = carry
            h = 0.5 * h + c * w
            w = w - 0.1 * jax.lax.pmean(c, "b")
            k, sub = jax.random.split(k)
            return (jnp.tanh(c + jax.random.normal(sub, (3,))), h, w, k), None

        (c, h, w, _), _ = jax.lax.scan(body, (x, h, w, lane_key), None, length=2)
        return c, h, w

    xs = jnp.linspace(-1.0, 1.0, lanes * 3).reshape(lanes, 3)
    mapped = smap.StatefulMapping(lane, state_in_axes=OfType(smap.HiddenState), axis_name="b", **MESH[where]())
    out = mapped(xs)
    want, want_h, want_w = jax.vmap(ref_lane, (0, 0, None, 0), (0, 0, None), axis_name="b")(
        xs, h0, w0, jax.random.split(key, lanes)
    )
    close(out, want)
    close(h.value, want_h)
    close(w.value, want_w)
    np.testing.assert_array_equal(smap.random.DEFAULT.value, jax.random.split(key, lanes + 1)[lanes])


def test_a_mapping_called_inside_a_scan_of_smap_jit_writes_its_states(close):
    h = smap.State(jnp.zeros(4))
    accumulate = smap.vmap(
        lambda x: (setattr(h, "value", h.value + x), 2 * h.value)[1], state_in_axes=OfType(smap.State)
    )

    @smap.jit
    def loop(xs):
        return jax.lax.scan(lambda c, x: (c, accumulate(x)), 0, xs)[1]

    xs = jnp.arange(12.0).reshape(3, 4)
    close(loop(xs), 2 * jnp.cumsum(xs, 0))
    close(h.value, xs.sum(0))


def test_a_jax_ref_written_inside_a_scan_of_smap_jit(close):
    ref = jax.new_ref(jnp.zeros(2))

    @smap.jit
    def f(xs):
        def body(c, x):
            ref[...] = ref[...] + x
            return c, None

        jax.lax.scan(body, 0.0, xs)
        return ref[...] * 2

    xs = jnp.arange(6.0).reshape(3, 2)
    close(f(xs), 2 * xs.sum(0))
    close(ref[...], xs.sum(0))


REFUSED = {
    "a per-example value under jax.vmap": lambda s: smap.jit(lambda x: jax.vmap(lambda y: setattr(s, "value", y))(x))(
        jnp.ones((2, 3))
    ),
    "a differentiated value under jax.grad": lambda s: smap.jit(
        lambda x: jax.grad(lambda y: (setattr(s, "value", y), jnp.sum(y**2))[1])(x)
    )(jnp.ones(3)),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_write_jax_cannot_carry_out_is_refused_naming_the_state(name):
    class Holder(smap.nn.Module):
        def __init__(self):
            self.acc = smap.LongTermState(jnp.arange(3.0))

    holder = Holder()
    holder.states()  # records the state's path, which errors name
    before = snapshot(holder.acc)
    with pytest.raises(TypeError, match=r"state 'acc' \(LongTermState\) is written .* cannot carry the write out"):
        REFUSED[name](holder.acc)
    assert_unchanged([holder.acc], before)


def test_a_failing_call_after_a_write_inside_a_scan_changes_nothing():
    total = smap.State(jnp.arange(3.0))

    @smap.jit
    def step(x, w):
        return _scan(total, x) @ w

    before = snapshot(total)
    with pytest.raises(TypeError, match="dot_general"):
        step(jnp.ones(3), jnp.ones((4, 2)))
    assert_unchanged([total], before)


def test_a_write_inside_a_scan_with_another_shape_than_the_state_holds_is_refused(close):
    """A shared state holding the lanes' axis, written per lane (state_out_axes): as the lane returns it
    is written back row by row; inside a scan it would change shape there, which is refused."""
    rows = smap.State(jnp.zeros((8, 3)))
    xs = jnp.arange(24.0).reshape(8, 3)

    def lane_returns(x):
        rows.value = x * 2
        return x

    def inside_a_scan(x):
        return jax.lax.scan(lambda c, _: (lane_returns(c), None), x, None, length=1)[0]

    smap.vmap(lane_returns, state_out_axes={0: [rows]})(xs)
    close(rows.value, xs * 2)
    before = snapshot(rows)
    with pytest.raises(TypeError, match=r"State float32\[8,3\] is written inside .* select it in state_in_axes"):
        smap.vmap(inside_a_scan, state_out_axes={0: [rows]})(xs + 1)
    assert_unchanged([rows], before)
    smap.vmap(inside_a_scan, state_in_axes={0: [rows]})(xs + 1)  # each lane holds its row
    close(rows.value, (xs + 1) * 2)


@pytest.mark.parametrize("where", MESH)
def test_per_example_gradients_of_a_loss_that_writes_a_statistic_inside_its_scan(where, close):
    """The lane's gradient program holds what JAX leaves of the discharged scan (a call with no
    outputs), which the fusion's lane norms met. Found by trying it."""
    lanes = 8
    w, stat = smap.ParamState(jnp.ones(3)), smap.State(jnp.zeros(3))
    xs = jnp.linspace(-1.0, 1.0, lanes * 3).reshape(lanes, 3)

    def lane(x):
        def loss(x):
            def body(c, _):
                stat.value = stat.value + jax.lax.stop_gradient(jax.lax.pmean(c, "b"))
                return jnp.tanh(c * w.value), None

            return jnp.sum(jax.lax.scan(body, x, None, length=2)[0])

        g = smap.grad(loss, grad_states=w)(x)
        w.value = w.value - 0.1 * jax.lax.pmean(g, "b")
        return jnp.sum(g**2)

    def ref_loss(w, x):
        def body(carry, _):
            c, s = carry
            return (jnp.tanh(c * w), s + jax.lax.pmean(c, "b")), None

        (c, s), _ = jax.lax.scan(body, (x, jnp.zeros(3)), None, length=2)
        return jnp.sum(c), s

    norms = smap.StatefulMapping(lane, axis_name="b", **MESH[where]())(xs)
    (_, stats), grads = jax.vmap(jax.value_and_grad(ref_loss, has_aux=True), (None, 0), axis_name="b")(jnp.ones(3), xs)
    close(norms, jnp.sum(grads**2, axis=1))
    close(w.value, 1.0 - 0.1 * grads.mean(0))
    close(stat.value, stats[0])


def test_a_module_returned_is_refused_with_the_way_to_make_one_per_lane():
    count = smap.LongTermState(jnp.zeros(()))

    class Member(smap.nn.Module):
        def __init__(self, scale):
            self.w = smap.ParamState(scale * jnp.ones(2))

    def make(scale):
        count.value = count.value + 1
        return Member(scale)

    for transform, scales in ((smap.jit, jnp.float32(2.0)), (smap.vmap, jnp.ones(3))):
        with pytest.raises(TypeError, match=r"returned a Member as its output: .* \(an ensemble\), write its States"):
            transform(make)(scales)
    np.testing.assert_array_equal(count.value, 0.0)


@pytest.mark.parametrize("transform", ["jit", "vmap", "grad"])
def test_a_state_or_other_object_returned_is_refused_naming_the_output_and_the_states_keep_their_values(transform):
    count = smap.LongTermState(jnp.zeros(()))

    def returns_state(x):
        count.value = count.value + 1
        loss = jnp.sum(x**2)
        return (loss, {"n": count}) if transform == "grad" else (x, {"n": count})

    def returns_string(x):
        count.value = count.value + 1
        return (jnp.sum(x**2), "done") if transform == "grad" else [x, "done"]

    wrap = {
        "jit": smap.jit,
        "vmap": smap.vmap,
        "grad": lambda f: smap.grad(f, has_aux=True),
    }[transform]
    if transform != "grad":  # (has_aux's own check names aux)
        with pytest.raises(TypeError, match=r"returned a LongTermState as output\[1\]\['n'\]: .* state.value"):
            wrap(returns_state)(jnp.ones((2, 3)))
        with pytest.raises(TypeError, match=r"returned a str as output\[1\]: a transformed function returns arrays"):
            wrap(returns_string)(jnp.ones((2, 3)))
    else:
        with pytest.raises(TypeError, match=r"aux\['n'\] is a LongTermState"):
            wrap(returns_state)(jnp.ones((2, 3)))
    np.testing.assert_array_equal(count.value, 0.0)
