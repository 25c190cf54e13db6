"""Tests of how ``StatefulMapping`` maps states.

``state_in_axes``, ``state_out_axes``, and the policy for shared states
written with per-lane values.

Every result is checked against an independent reference: the same
computation written with plain ``jax.vmap`` and explicit state passing, or
values worked out by hand.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mapping_helpers import assert_unchanged, lanes_normal, rand, snapshot

import smap
from smap.filter import OfType
from smap.transform import vmap2

# -- states ----------------------------------------------------------------------


def test_batched_state_axis_0_is_split_and_written_back(close):
    state = smap.ShortTermState(rand(4, 3))
    s0 = state.value
    xs = rand(4, 3, seed=1)

    def step(x):
        state.value = state.value * 2 + x
        return (state.value**2).sum()

    def pure(s, x):
        new = s * 2 + x
        return (new**2).sum(), new

    ref_out, ref_state = jax.vmap(pure)(s0, xs)
    out = vmap2(step, state_in_axes={0: OfType(smap.ShortTermState)})(xs)
    close(out, ref_out)
    close(state.value, ref_state)


def test_a_selector_may_read_the_values_of_the_states_it_selects(close):
    """A filter of state_in_axes that looks at state.value (its shape) sees the value the state has
    outside the mapping, in a nested mapping its value in the lane, and selects as jax.vmap would be told."""
    buffers = smap.State(rand(4, 3))  # one row per lane
    scale = smap.State(rand(3, seed=2))  # shared: its shape is not (lanes, 3)
    b0, s0, xs = buffers.value, scale.value, rand(4, 3, seed=1)
    seen = []

    def per_lane_rows(path, state):
        seen.append(state.value.shape)
        return state.value.shape == (4, 3)

    def step(x):
        buffers.value = buffers.value * scale.value + x
        return buffers.value.sum()

    out = vmap2(step, state_in_axes={0: per_lane_rows})(xs)
    ref_out, ref_buffers = jax.vmap(lambda b, x: ((b * s0 + x).sum(), b * s0 + x))(b0, xs)
    close(out, ref_out)
    close(buffers.value, ref_buffers)
    close(scale.value, s0)
    assert set(seen) == {(4, 3), (3,)}

    # Inside an outer mapping the inner one's filter sees the lane's rows: (2, 3) of (3, 2, 3).
    grid = smap.State(rand(3, 2, 3, seed=3))
    g0 = grid.value
    inner = vmap2(
        lambda x: setattr(grid, "value", grid.value + x), state_in_axes={0: lambda p, s: s.value.shape == (2, 3)}
    )
    vmap2(lambda x: inner(x), state_in_axes={0: lambda p, s: s.value.shape == (3, 2, 3)})(rand(3, 2, 3, seed=4))
    close(grid.value, g0 + rand(3, 2, 3, seed=4))


@pytest.mark.parametrize("axis", [1, -1, 2, -2])
def test_batched_state_on_another_axis(axis, close):
    # The state has 3 entries along the mapped axis, whichever way it is written.
    shape = {1: (2, 3, 4), -1: (2, 4, 3), 2: (2, 4, 3), -2: (2, 3, 4)}[axis]
    state = smap.ShortTermState(rand(*shape))
    s0 = state.value
    xs = jnp.array([1.0, -2.0, 0.5])

    def step(x):
        state.value = jnp.tanh(state.value) * x
        return state.value.mean(axis=0)

    def pure(s, x):
        new = jnp.tanh(s) * x
        return new.mean(axis=0), new

    ref_out, ref_state = jax.vmap(pure, in_axes=(axis, 0), out_axes=(0, axis))(s0, xs)
    out = vmap2(step, state_in_axes={axis: state})(xs)
    close(out, ref_out)
    close(state.value, ref_state)
    assert state.value.shape == shape


def test_batched_state_gives_the_axis_size_alone(close):
    state = smap.ShortTermState(jnp.arange(8.0).reshape(4, 2))

    def step():
        state.value = state.value[::-1]
        return state.value.sum()

    out = vmap2(step, in_axes=None, state_in_axes=state)()
    close(out, jnp.arange(8.0).reshape(4, 2).sum(axis=1))
    close(state.value, jnp.arange(8.0).reshape(4, 2)[:, ::-1])


def test_batched_state_written_with_a_lane_independent_value_keeps_its_axis(close):
    state = smap.ShortTermState(rand(3, 2))

    def reset(x):
        state.value = jnp.full((2,), 7.0)
        return x

    vmap2(reset, state_in_axes=state)(jnp.arange(3.0))
    close(state.value, jnp.full((3, 2), 7.0))


def test_batched_pytree_state(close):
    state = smap.ShortTermState({"a": rand(3, 2), "b": rand(3, 4, seed=1)})
    s0 = state.value
    xs = rand(3, seed=2)

    def step(x):
        v = state.value
        state.value = {"a": v["a"] + x, "b": v["b"] * x}
        return v["a"].sum()

    def pure(v, x):
        return v["a"].sum(), {"a": v["a"] + x, "b": v["b"] * x}

    ref_out, ref_state = jax.vmap(pure)(s0, xs)
    out = vmap2(step, state_in_axes=state)(xs)
    close(out, ref_out)
    close(state.value, ref_state)


def test_shared_pytree_state_written_per_lane_gets_the_axis_on_every_leaf(close):
    state = smap.LongTermState({"a": jnp.zeros(2), "b": jnp.ones(())})

    def step(x):
        v = state.value
        state.value = {"a": v["a"] + x, "b": v["b"] * 2}  # only one leaf depends on the lane
        return x

    vmap2(step, state_out_axes={0: state}, unexpected_out_state_mapping="raise")(jnp.arange(3.0))
    close(state.value, {"a": jnp.broadcast_to(jnp.arange(3.0)[:, None], (3, 2)), "b": jnp.full(3, 2.0)})


def test_shared_read_only_states_are_broadcast_and_untouched(close):
    weight = smap.ParamState(rand(3, 2))
    bias = smap.ParamState(rand(2, seed=1))
    w0, b0 = np.asarray(weight.value), np.asarray(bias.value)

    def layer(x):
        return x @ weight.value + bias.value

    xs = rand(5, 3, seed=2)
    out = vmap2(layer, state_out_axes=OfType(smap.ParamState))(xs)
    close(out, jax.vmap(lambda x: x @ w0 + b0)(xs))
    np.testing.assert_array_equal(weight.value, w0)
    np.testing.assert_array_equal(bias.value, b0)
    assert weight.value.shape == (3, 2) and bias.value.shape == (2,)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_shared_state_written_per_lane_follows_state_out_axes(axis, close):
    total = smap.LongTermState(jnp.array([1.0, 2.0]))
    t0 = total.value
    xs = jnp.array([1.0, 2.0, 3.0])

    def step(x):
        total.value = total.value * x
        return x

    def pure(t, x):
        return x, t * x

    ref_out, ref_total = jax.vmap(pure, in_axes=(None, 0), out_axes=(0, axis))(t0, xs)
    out = vmap2(step, state_out_axes={axis: OfType(smap.LongTermState)}, unexpected_out_state_mapping="raise")(xs)
    close(out, ref_out)
    close(total.value, ref_total)


def test_state_out_axes_bare_selector_means_axis_0(close):
    total = smap.State(jnp.zeros(2))

    def step(x):
        total.value = total.value + x
        return x

    vmap2(step, state_out_axes=total, unexpected_out_state_mapping="raise")(jnp.arange(3.0))
    close(total.value, jnp.broadcast_to(jnp.arange(3.0)[:, None], (3, 2)))


def test_shared_state_written_per_lane_default_policy_ignore(close):
    total = smap.LongTermState(jnp.array([1.0, 2.0]))

    def step(x):
        total.value = total.value + x
        return x

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vmap2(step)(jnp.arange(3.0))
    close(total.value, jnp.array([1.0, 2.0]) + jnp.arange(3.0)[:, None])


def test_shared_state_written_per_lane_policy_warn(close):
    total = smap.LongTermState(jnp.array([1.0, 2.0]))

    def step(x):
        total.value = total.value + x
        return x

    with pytest.warns(UserWarning, match="LongTermState"):
        vmap2(step, unexpected_out_state_mapping="warn")(jnp.arange(3.0))
    close(total.value, jnp.array([1.0, 2.0]) + jnp.arange(3.0)[:, None])


def test_shared_state_written_per_lane_policy_raise_names_the_state():
    total = smap.LongTermState(jnp.array([1.0, 2.0]))
    other = smap.ShortTermState(jnp.zeros(3))

    def step(x):
        other.value = other.value + x
        total.value = total.value + x
        return x

    before = snapshot(total, other)
    with pytest.raises(smap.BatchAxisError, match=r"LongTermState float32\[2\]"):
        vmap2(step, state_in_axes=other, unexpected_out_state_mapping="raise")(jnp.arange(3.0))
    assert_unchanged([total, other], before)


def test_policy_raise_names_a_module_state_by_its_path():
    class Net(smap.nn.Module):
        def __init__(self):
            self.stats = smap.LongTermState(jnp.zeros(2))

        def __call__(self, x):
            self.stats.value = self.stats.value + x
            return x

    net = Net()
    with pytest.raises(smap.BatchAxisError, match="stats"):
        vmap2(net, unexpected_out_state_mapping="raise")(jnp.arange(3.0))
    np.testing.assert_array_equal(net.stats.value, jnp.zeros(2))


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda s, x: s + jax.lax.pmean(x, "batch"), id="pmean"),
        pytest.param(lambda s, x: s + jax.lax.psum(x, "batch"), id="psum"),
        pytest.param(lambda s, x: jnp.maximum(s, jax.lax.pmax(x, "batch")), id="pmax"),
        pytest.param(lambda s, x: s + jax.lax.all_gather(x, "batch").sum(), id="all_gather"),
        pytest.param(lambda s, x: jnp.full_like(s, 5.0), id="constant"),
        pytest.param(lambda s, x: s * 3 + 1, id="from_itself"),
    ],
)
def test_shared_state_written_lane_independent_is_written_back_as_is(write, close):
    total = smap.LongTermState(jnp.array([1.0, -1.0]))
    t0 = total.value
    xs = jnp.array([1.0, 2.0, 3.0, 6.0])

    def step(x):
        total.value = write(total.value, x)
        return x

    def pure(t, x):
        return write(t, x)

    expected = jax.vmap(pure, in_axes=(None, 0), out_axes=None, axis_name="batch")(t0, xs)
    vmap2(step, axis_name="batch", unexpected_out_state_mapping="raise")(xs)
    assert total.value.shape == (2,)
    close(total.value, expected)


def test_shared_state_written_from_a_shared_argument_has_no_mapped_axis(close):
    total = smap.State(jnp.zeros(2))

    def step(x, w):
        total.value = total.value + w
        return x * w

    out = vmap2(step, in_axes=(0, None), unexpected_out_state_mapping="raise")(jnp.arange(3.0)[:, None], jnp.ones(2))
    close(out, jnp.arange(3.0)[:, None] * jnp.ones(2))
    close(total.value, jnp.ones(2))


def test_explicitly_shared_states_take_precedence(close):
    a = smap.ShortTermState(jnp.arange(3.0))
    b = smap.ShortTermState(jnp.arange(3.0) * 10)

    def fn(x):
        return a.value + b.value.sum() + x

    mapped = vmap2(fn, state_in_axes={0: OfType(smap.ShortTermState), None: b})
    close(mapped(jnp.ones(3)), jnp.arange(3.0) + 30.0 + 1.0)
    # Without the None entry, b would be split too.
    close(vmap2(fn, state_in_axes=smap.ShortTermState)(jnp.ones(3)), jnp.arange(3.0) * 11 + 1.0)
    np.testing.assert_array_equal(b.value, jnp.arange(3.0) * 10)


def test_explicitly_shared_state_written_per_lane_follows_the_policy():
    a = smap.ShortTermState(jnp.zeros(3))
    b = smap.ShortTermState(jnp.zeros(3))

    def fn(x):
        a.value = a.value + x
        b.value = b.value + x
        return x

    before = snapshot(a, b)
    mapped = vmap2(
        fn,
        state_in_axes={None: [b], 0: OfType(smap.ShortTermState)},
        unexpected_out_state_mapping="raise",
    )
    with pytest.raises(smap.BatchAxisError):
        mapped(jnp.arange(3.0))
    assert_unchanged([a, b], before)


def test_explicitly_shared_state_with_state_out_axes(close):
    a = smap.ShortTermState(jnp.zeros(3))
    b = smap.ShortTermState(jnp.zeros(3))

    def fn(x):
        a.value = a.value + x
        b.value = b.value + x
        return x

    mapped = vmap2(
        fn,
        state_in_axes={None: [b], 0: OfType(smap.ShortTermState)},
        state_out_axes={1: [b]},
        unexpected_out_state_mapping="raise",
    )
    mapped(jnp.arange(3.0))
    close(a.value, jnp.arange(3.0))
    close(b.value, jnp.broadcast_to(jnp.arange(3.0), (3, 3)))


def test_state_only_selected_by_state_out_axes_and_only_read_is_untouched(close):
    w = smap.LongTermState(jnp.ones(2))
    out = vmap2(lambda x: x * w.value, state_out_axes=w)(jnp.arange(3.0)[:, None])
    close(out, jnp.arange(3.0)[:, None] * jnp.ones(2))
    np.testing.assert_array_equal(w.value, jnp.ones(2))


def test_writes_keep_the_dtype_rules_inside_the_mapping():
    counts = smap.ShortTermState(jnp.zeros(3, jnp.int32))

    def step(x):
        counts.value = counts.value + x
        return x

    before = snapshot(counts)
    with pytest.raises(TypeError, match=r"ShortTermState int32"):
        vmap2(step, state_in_axes=counts)(jnp.arange(3.0))
    assert_unchanged([counts], before)
    vmap2(step, state_in_axes=counts)(jnp.arange(3, dtype=jnp.int32))
    np.testing.assert_array_equal(counts.value, jnp.arange(3, dtype=jnp.int32))


def test_everything_selector_with_random_draws(close):
    buffer = smap.ShortTermState(jnp.zeros(3))

    def step(x):
        buffer.value = buffer.value + smap.random.normal() + x
        return x

    key_before = smap.random.DEFAULT.value
    vmap2(step, state_in_axes=smap.filter.Everything())(jnp.arange(3.0))
    close(buffer.value, lanes_normal(jax.random.split(key_before, 3)) + jnp.arange(3.0))
    np.testing.assert_array_equal(smap.random.DEFAULT.value, jax.random.split(key_before, 4)[3])


def test_different_axes_in_state_in_axes_and_state_out_axes_is_an_error():
    state = smap.ShortTermState(jnp.zeros((3, 2)))

    def step(x):
        state.value = state.value + x
        return x

    before = snapshot(state)
    with pytest.raises(smap.BatchAxisError, match=r"ShortTermState float32\[3,2\]"):
        vmap2(step, state_in_axes={0: state}, state_out_axes={1: state})(jnp.arange(3.0))
    assert_unchanged([state], before)


def test_same_axis_in_state_in_axes_and_state_out_axes_is_fine(close):
    state = smap.ShortTermState(jnp.zeros((3, 2)))

    def step(x):
        state.value = state.value + x
        return x

    vmap2(step, state_in_axes={0: state}, state_out_axes={-2: state}, unexpected_out_state_mapping="raise")(
        jnp.arange(3.0)
    )
    close(state.value, jnp.broadcast_to(jnp.arange(3.0)[:, None], (3, 2)))


def test_a_state_becomes_batched_and_is_then_split(close):
    """The tutorial's pattern: a shared scalar written per lane becomes batched."""
    hidden = smap.HiddenState(jnp.array(0.0))

    def step(x):
        hidden.value = hidden.value + x
        return hidden.value

    vmap2(step)(jnp.arange(4.0))  # 'ignore': written back with the mapped axis at 0
    close(hidden.value, jnp.arange(4.0))
    out = vmap2(step, state_in_axes=hidden)(jnp.ones(4))
    close(out, jnp.arange(4.0) + 1)
    close(hidden.value, jnp.arange(4.0) + 1)


def test_states_reached_through_a_module(close):
    class Cell(smap.nn.Module):
        def __init__(self):
            self.w = smap.ParamState(rand(2, 2))
            self.h = smap.HiddenState(jnp.zeros((5, 2)))
            self.n = smap.LongTermState(jnp.zeros(()))

        def __call__(self, x):
            self.h.value = jnp.tanh(self.h.value @ self.w.value + x)
            self.n.value = self.n.value + 1
            return self.h.value.sum()

    cell = Cell()
    w0, h0 = cell.w.value, cell.h.value
    xs = rand(5, 2, seed=3)

    def pure(h, x):
        new = jnp.tanh(h @ w0 + x)
        return new.sum(), new

    ref_out, ref_h = jax.vmap(pure)(h0, xs)
    out = vmap2(cell, state_in_axes=OfType(smap.HiddenState), unexpected_out_state_mapping="raise")(xs)
    close(out, ref_out)
    close(cell.h.value, ref_h)
    close(cell.n.value, jnp.array(1.0))
    close(cell.w.value, w0)


# -- conflicting and ambiguous state axes ----------------------------------------


@pytest.mark.parametrize("out_axis", [1, -2])
def test_state_out_axes_conflicting_with_state_in_axes_for_a_rank_1_state(out_axis):
    h = smap.HiddenState(jnp.zeros(4))

    def step(x):
        h.value = h.value + x
        return x

    before = snapshot(h)
    mapped = vmap2(step, state_in_axes={0: h}, state_out_axes={out_axis: h})
    with pytest.raises(smap.BatchAxisError, match=rf"HiddenState float32\[4\].*axis 0.*axis {out_axis}"):
        mapped(jnp.ones(4))
    assert_unchanged([h], before)


def test_state_out_axes_agreeing_with_state_in_axes_for_a_rank_1_state(close):
    h = smap.HiddenState(jnp.zeros(4))

    def step(x):
        h.value = h.value + x
        return x

    vmap2(step, state_in_axes={0: h}, state_out_axes={-1: h})(jnp.arange(4.0))
    close(h.value, jnp.arange(4.0))


SELECTED_TWICE = {
    "the same state at two keys": lambda h: {1: h, 0: h},
    "overlapping type filters": lambda h: {0: smap.ShortTermState, 1: smap.HiddenState},
    "a type and a tag": lambda h: {1: smap.filter.WithTag("selected-twice"), 0: OfType(smap.HiddenState)},
}


@pytest.mark.parametrize("name", list(SELECTED_TWICE))
@pytest.mark.parametrize("which", ["state_in_axes", "state_out_axes"])
def test_a_state_selected_at_two_axes_is_an_error_naming_it_and_both_axes(name, which):
    h = smap.HiddenState(jnp.zeros((4, 4)), tag="selected-twice")

    def step(x):
        h.value = h.value + x
        return x

    spec = SELECTED_TWICE[name](h)
    options = {"state_in_axes": spec} if which == "state_in_axes" else {"state_out_axes": spec, "axis_size": 4}
    before = snapshot(h)
    axes = sorted(k for k in spec)
    either = f"({axes[0]}|{axes[1]})"
    pattern = rf"{which} selects HiddenState float32\[4,4\] at axis {either} and at axis {either}"
    with pytest.raises(ValueError, match=pattern):
        vmap2(step, in_axes=0 if which == "state_in_axes" else None, **options)(jnp.ones(4))
    assert_unchanged([h], before)


# -- a shared state written with a lane's slice of it ------------------------------


def test_shared_state_written_with_its_lane_slice_and_selected_by_state_out_axes(close):
    s = smap.ShortTermState(jnp.zeros(4))
    xs = jnp.arange(1.0, 5.0)

    def f(x):
        s.value = x / jax.lax.psum(x, "i")
        return x

    close(vmap2(f, axis_name="i", state_out_axes=s)(xs), xs)
    close(s.value, xs / xs.sum())  # by hand: lane i wrote x_i / sum(x)


def test_lane_slice_write_along_axis_1_matches_jax_vmap(close):
    s = smap.ShortTermState(jnp.zeros((2, 3)))
    xs = rand(3, 2)

    def f(x):
        s.value = s.value[:, 0] * 0 + x * 2
        return x.sum()

    vmap2(f, state_out_axes={1: s})(xs)
    close(s.value, jax.vmap(lambda x: x * 2, out_axes=1)(xs))


def test_lane_slice_write_that_cannot_stack_to_the_state_shape_is_refused():
    s = smap.ShortTermState(jnp.zeros(4))

    def per_lane(x):
        s.value = x * 2
        return x

    def same_in_every_lane(x):
        s.value = jnp.zeros(())
        return x

    before = snapshot(s)
    with pytest.raises(ValueError, match=r"ShortTermState float32\[4\].*needs one slice per lane and 4 lanes, got 3"):
        vmap2(per_lane, state_out_axes=s)(jnp.arange(3.0))
    with pytest.raises(ValueError, match=r"ShortTermState float32\[4\].*got the same value in every lane"):
        vmap2(same_in_every_lane, state_out_axes=s)(jnp.arange(4.0))
    with pytest.raises(ValueError, match=r"ShortTermState float32\[4\]: the new value has shape \(\), expected \(4,\)"):
        vmap2(per_lane)(jnp.arange(4.0))  # not selected by state_out_axes: the lane must write the whole value
    assert_unchanged([s], before)


def test_a_custom_vmap_rule_reading_a_state_is_refused_and_the_states_keep_their_values():
    """jax.vmap calls the rule when the mapping maps the traced lane program, after the trace: a state read
    there would have no value of the trace (a write before it unseen), so it is refused, naming the state."""
    from jax.custom_batching import custom_vmap

    scale = smap.LongTermState(jnp.array(2.0))
    count = smap.LongTermState(jnp.zeros(()))

    @custom_vmap
    def f(x):
        return x * scale.value

    @f.def_vmap
    def _(axis_size, in_batched, x):
        return x * scale.value, True

    def lane(x):
        scale.value = scale.value + 1
        count.value = count.value + 1
        return f(x)

    with pytest.raises(TypeError, match=r"LongTermState float32\[\] is used inside a custom rule"):
        smap.vmap(lane)(jnp.ones(3))
    np.testing.assert_array_equal(scale.value, 2.0)
    np.testing.assert_array_equal(count.value, 0.0)
