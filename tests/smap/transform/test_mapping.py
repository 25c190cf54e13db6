"""Tests of ``smap.transform.StatefulMapping`` and ``vmap2``.

Every result is checked against an independent reference: the same
computation written with plain ``jax.vmap`` and explicit state passing, or
values worked out by hand.
"""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap
from smap.filter import OfType
from smap.transform import StatefulMapping, vmap2

# -- helpers ---------------------------------------------------------------------


def snapshot(*states):
    """Copies of the states' values (and the default random key)."""
    return [jax.tree_util.tree_map(np.array, s.value) for s in (*states, smap.random.DEFAULT)]


def assert_unchanged(states, before):
    """Every state (and the default random key) holds exactly the value of `before`."""
    for state, old in zip((*states, smap.random.DEFAULT), before):
        now = jax.tree_util.tree_map(np.asarray, state.value)
        assert jax.tree_util.tree_structure(now) == jax.tree_util.tree_structure(old)
        for a, b in zip(jax.tree_util.tree_leaves(now), jax.tree_util.tree_leaves(old)):
            assert a.shape == b.shape and a.dtype == b.dtype, (state, a.shape, b.shape)
            np.testing.assert_array_equal(a, b)


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=jnp.float32)


def lane_draw_normal(lane_key, *shape):
    """The draw of `RandomState(lane_key).normal(size=shape)`, written with jax.random."""
    return jax.random.normal(jax.random.split(lane_key)[1], shape)


@functools.partial(jax.jit, static_argnums=1)
def _lanes_normal(lane_keys, shape):
    return jax.vmap(lambda k: lane_draw_normal(k, *shape))(lane_keys)


def lanes_normal(lane_keys, *shape):
    """`lane_draw_normal` for every lane key, stacked."""
    return _lanes_normal(lane_keys, shape)


def lanes_reference(draw, lane_keys, *args):
    """Stack over lanes of `draw(RandomState(lane_key), *lane_args)`: what each lane should draw."""
    return jax.jit(jax.vmap(lambda k, *a: draw(smap.random.RandomState(k), *a)))(lane_keys, *args)


# -- construction and attributes -------------------------------------------------


def test_public_names():
    assert smap.vmap is vmap2
    assert smap.vmap2 is vmap2
    assert smap.StatefulMapping is StatefulMapping
    assert smap.BatchAxisError is smap.transform.BatchAxisError
    assert issubclass(smap.BatchAxisError, ValueError)
    assert str(StatefulMapping) == "<class 'smap.transform.StatefulMapping'>"


def test_attributes_are_normalised_as_the_tutorial_prints_them():
    accumulator = smap.ShortTermState(jnp.zeros(4))

    def accumulate(x):
        accumulator.value = accumulator.value + x
        return accumulator.value

    mapped = vmap2(accumulate, in_axes=0, out_axes=0, axis_size=4, state_in_axes={0: OfType(smap.ShortTermState)})
    assert isinstance(mapped, StatefulMapping)
    assert str(type(mapped)) == "<class 'smap.transform.StatefulMapping'>"
    assert mapped.origin_fun is accumulate
    assert mapped.in_axes == 0
    assert mapped.out_axes == 0
    assert str(mapped.state_in_axes) == "{0: OfType(<class 'smap.ShortTermState'>)}"
    assert mapped.state_out_axes == {}
    assert str(mapped.state_out_axes) == "{}"
    assert mapped.axis_name is None
    assert mapped.axis_size == 4
    assert mapped.mapping_fn is jax.vmap
    assert mapped.name == "accumulate"


def test_attributes_of_a_direct_statefulmapping():
    mapping_fn = functools.partial(jax.vmap, spmd_axis_name=None)
    mapped = StatefulMapping(
        lambda x: x,
        in_axes=(1,),
        out_axes=-1,
        state_out_axes={1: OfType(smap.LongTermState)},
        axis_name="batch",
        axis_size=3,
        name="custom",
        mapping_fn=mapping_fn,
    )
    assert mapped.in_axes == (1,)
    assert mapped.out_axes == -1
    assert mapped.state_in_axes == {}
    assert str(mapped.state_out_axes) == "{1: OfType(<class 'smap.LongTermState'>)}"
    assert mapped.axis_name == "batch"
    assert mapped.axis_size == 3
    assert mapped.name == "custom"
    assert mapped.mapping_fn is mapping_fn


def test_bare_selector_class_means_axis_0():
    mapped = vmap2(lambda x: x, state_in_axes=smap.ShortTermState, state_out_axes=smap.LongTermState)
    assert str(mapped.state_in_axes) == "{0: OfType(<class 'smap.ShortTermState'>)}"
    assert str(mapped.state_out_axes) == "{0: OfType(<class 'smap.LongTermState'>)}"


def test_bare_selector_instance_and_list_select_exactly_those_states():
    a, b, c = (smap.ShortTermState(jnp.zeros(3)) for _ in range(3))
    one = vmap2(lambda x: x, state_in_axes=a)
    assert list(one.state_in_axes) == [0]
    assert one.state_in_axes[0]((), a) and not one.state_in_axes[0]((), b)
    some = vmap2(lambda x: x, state_in_axes=[a, b])
    assert list(some.state_in_axes) == [0]
    assert some.state_in_axes[0]((), a) and some.state_in_axes[0]((), b)
    assert not some.state_in_axes[0]((), c)


@pytest.mark.parametrize(
    "selector",
    ["class", "instance", "list", "dict", "filter"],
)
def test_bare_selector_forms_batch_the_same_state(selector, close):
    state = smap.ShortTermState(jnp.arange(6.0).reshape(3, 2))
    other = smap.ShortTermState(jnp.ones(2))  # read, selected only by the class-based forms
    spec = {
        "class": smap.HiddenState,  # selects nothing here
        "instance": state,
        "list": [state],
        "dict": {0: state},
        "filter": OfType(smap.ShortTermState) & smap.filter.Not([other]),
    }[selector]

    def step(x):
        state.value = state.value * x + other.value
        return state.value.sum()

    before = np.asarray(state.value)
    xs = jnp.array([1.0, 2.0, 3.0])
    if selector == "class":
        # Not selected: the state is shared and written with a per-lane value.
        out = vmap2(step, state_in_axes=spec)(xs)
        expected_state = jax.vmap(lambda x: before * x + 1.0)(xs)
        close(state.value, expected_state)
        close(out, expected_state.sum(axis=(1, 2)))
        return
    out = vmap2(step, state_in_axes=spec)(xs)
    close(state.value, before * xs[:, None] + 1.0)
    close(out, (before * xs[:, None] + 1.0).sum(axis=1))
    close(other.value, jnp.ones(2))


def test_unknown_policy_is_rejected_at_construction():
    with pytest.raises(ValueError, match="unexpected_out_state_mapping"):
        vmap2(lambda x: x, unexpected_out_state_mapping="explode")
    with pytest.raises(ValueError, match="unexpected_out_state_mapping"):
        StatefulMapping(lambda x: x, unexpected_out_state_mapping="Ignore")


@pytest.mark.parametrize("policy", ["ignore", "warn", "raise"])
def test_known_policies_are_accepted(policy):
    mapped = vmap2(lambda x: x * 2, unexpected_out_state_mapping=policy)
    np.testing.assert_array_equal(mapped(jnp.arange(3.0)), [0.0, 2.0, 4.0])


def test_state_axes_keys_must_be_ints_or_none():
    with pytest.raises((TypeError, ValueError), match="state_in_axes"):
        vmap2(lambda x: x, state_in_axes={"0": smap.ShortTermState})
    with pytest.raises((TypeError, ValueError), match="state_out_axes"):
        vmap2(lambda x: x, state_out_axes={1.0: smap.ShortTermState})


def test_decorator_forms(close):
    @vmap2
    def double(x):
        return x * 2

    @vmap2(in_axes=(0, None))
    def scale(x, w):
        return x * w

    @smap.vmap(in_axes=1, out_axes=1)
    def cumsum(x):
        return jnp.cumsum(x)

    assert isinstance(double, StatefulMapping) and isinstance(scale, StatefulMapping)
    close(double(jnp.arange(3.0)), jnp.arange(3.0) * 2)
    close(scale(jnp.arange(3.0), 4.0), jnp.arange(3.0) * 4)
    m = rand(4, 3)
    close(cumsum(m), jax.vmap(jnp.cumsum, in_axes=1, out_axes=1)(m))


def test_repr_names_the_function():
    def my_function(x):
        return x

    assert "my_function" in repr(vmap2(my_function))
    assert vmap2(my_function).__name__ == "my_function"


# -- in_axes ---------------------------------------------------------------------


def _f_sum_rows(x):
    return jnp.sum(x * jnp.arange(x.shape[-1]), axis=-1)


def _f_two(x, y):
    return x * 2.0 + jnp.sum(y)


def _f_matvec(m, v):
    return m @ v


def _f_dict(d):
    return d["a"] * d["b"].sum() + d["c"]


def _f_tuple(t):
    a, (b, c) = t
    return a.sum() + b * c


def _f_mixed(x, params):
    return x @ params["w"] + params["b"]


IN_AXES_CASES = {
    "int0": (_f_sum_rows, 0, lambda: (rand(3, 4),)),
    "int1": (_f_sum_rows, 1, lambda: (rand(4, 3),)),
    "negative": (_f_sum_rows, -1, lambda: (rand(4, 3),)),
    "negative2": (_f_sum_rows, -2, lambda: (rand(3, 4),)),
    "none_and_int": (_f_two, (None, 0), lambda: (rand(2), rand(5, 3))),
    "int_and_none": (_f_two, (0, None), lambda: (rand(5, 2), rand(3))),
    "per_arg_axes": (_f_matvec, (2, 0), lambda: (rand(3, 2, 4), rand(4, 2))),
    "per_arg_negative": (_f_matvec, (-1, -2), lambda: (rand(3, 2, 4), rand(4, 2))),
    "list": (_f_two, [0, None], lambda: (rand(3, 2), rand(3))),
    "dict_prefix": (
        _f_dict,
        ({"a": 0, "b": None, "c": 1},),
        lambda: ({"a": rand(4, 2), "b": rand(3), "c": rand(2, 4)},),
    ),
    "dict_prefix_int": (_f_dict, (0,), lambda: ({"a": rand(4, 2), "b": rand(4, 3), "c": rand(4, 2)},)),
    "tuple_prefix": (_f_tuple, ((None, (0, -1)),), lambda: ((rand(3), (rand(5, 2), rand(2, 5))),)),
    "mixed_prefix": (
        _f_mixed,
        (0, {"w": None, "b": 0}),
        lambda: (rand(4, 3), {"w": rand(3, 2), "b": rand(4, 2)}),
    ),
    "mixed_prefix_none": (_f_mixed, (0, None), lambda: (rand(4, 3), {"w": rand(3, 2), "b": rand(2)})),
}


@pytest.mark.parametrize("case", list(IN_AXES_CASES))
def test_in_axes_match_jax_vmap(case, close):
    fn, in_axes, make_args = IN_AXES_CASES[case]
    args = make_args()
    expected = jax.vmap(fn, in_axes=tuple(in_axes) if isinstance(in_axes, list) else in_axes)(*args)
    close(vmap2(fn, in_axes=in_axes)(*args), expected)


def test_keyword_arguments_are_mapped_along_axis_0(close):
    def fn(x, y, scale=1.0):
        return (x + y) * scale

    xs, ys, scales = rand(4, 2), rand(4, 2, seed=1), jnp.arange(4.0)
    mapped = vmap2(fn, in_axes=(0, None))
    expected = jax.vmap(lambda x, s: (x + ys[0]) * s)(xs, scales)
    close(mapped(xs, ys[0], scale=scales), expected)
    close(vmap2(fn)(xs, y=ys), jax.vmap(lambda x, y: x + y)(xs, ys))


def test_keyword_arguments_must_have_the_mapped_size():
    with pytest.raises(ValueError, match=r"kwargs\['y'\].*|sizes"):
        vmap2(lambda x, y: x + y)(jnp.ones(3), y=jnp.ones(4))


def test_in_axes_none_everywhere_with_axis_size(close):
    out = vmap2(lambda x, y: x * y, in_axes=None, axis_size=3)(rand(2), 2.0)
    close(out, jnp.broadcast_to(rand(2) * 2.0, (3, 2)))


def test_python_scalars_can_be_broadcast(close):
    close(vmap2(lambda x, c: x + c, in_axes=(0, None))(jnp.arange(3.0), 5), jnp.arange(3.0) + 5)


def test_none_arguments_and_numpy_inputs(close):
    fn = lambda x, y: x * 2 if y is None else x + y  # noqa: E731
    close(vmap2(fn, in_axes=(0, None))(jnp.arange(3.0), None), jnp.arange(3.0) * 2)
    close(vmap2(fn)(np.arange(3.0), None), jnp.arange(3.0) * 2)
    close(vmap2(fn)(np.arange(3.0), np.ones(3)), jnp.arange(3.0) + 1)


def test_namedtuple_arguments_and_outputs(close):
    from typing import NamedTuple

    class Pair(NamedTuple):
        a: jax.Array
        b: jax.Array

    def fn(p):
        return Pair(p.b, p.a * 2)

    arg = Pair(jnp.arange(3.0), jnp.ones(2))
    out = vmap2(fn, in_axes=(Pair(0, None),), out_axes=Pair(1, 0))(arg)
    assert isinstance(out, Pair)
    close(out, jax.vmap(fn, in_axes=(Pair(0, None),), out_axes=Pair(1, 0))(arg))


def test_mapping_a_scalar_is_an_error():
    with pytest.raises(ValueError, match=r"args\[0\].*\(\)"):
        vmap2(lambda x: x)(1.0)


# -- out_axes --------------------------------------------------------------------


def _g_vec(x):
    return jnp.stack([x, 2 * x, 3 * x])


def _g_pair(x):
    return x * 2, jnp.outer(x, x)


def _g_dict(x):
    return {"row": x * 2, "mat": jnp.outer(x, x)}


def _g_with_constant(x):
    return x * 2, jnp.arange(3.0)


OUT_AXES_CASES = {
    "int0": (_g_vec, 0),
    "int1": (_g_vec, 1),
    "negative": (_g_vec, -1),
    "negative_first": (_g_vec, -3),
    "tuple": (_g_pair, (1, 2)),
    "tuple_negative": (_g_pair, (-1, -3)),
    "dict": (_g_dict, {"row": 1, "mat": 0}),
    "none_for_constant": (_g_with_constant, (0, None)),
    "prefix_broadcast": (_g_pair, 1),
}


@pytest.mark.parametrize("case", list(OUT_AXES_CASES))
def test_out_axes_match_jax_vmap(case, close):
    fn, out_axes = OUT_AXES_CASES[case]
    xs = rand(5, 2)
    close(vmap2(fn, out_axes=out_axes)(xs), jax.vmap(fn, out_axes=out_axes)(xs))


def test_out_axes_none_for_lane_independent_outputs(close):
    xs, w = rand(4, 3), rand(3, seed=1)

    def fn(x, w):
        return x * w, w * 2, jax.lax.psum(x, "b"), jax.lax.pmean(x.sum(), "b"), jnp.ones(2)

    out_axes = (0, None, None, None, None)
    expected = jax.vmap(fn, in_axes=(0, None), out_axes=out_axes, axis_name="b")(xs, w)
    out = vmap2(fn, in_axes=(0, None), out_axes=out_axes, axis_name="b")(xs, w)
    close(out, expected)
    assert out[1].shape == (3,) and out[2].shape == (3,) and out[3].shape == ()


def test_out_axes_none_for_a_lane_dependent_output_is_an_error():
    with pytest.raises(ValueError, match="out_axes"):
        vmap2(lambda x: (x, x * 2), out_axes=(0, None))(jnp.arange(3.0))


def test_none_and_integer_outputs(close):
    out = vmap2(lambda x: (x, None, x > 1, x.astype(jnp.int32)))(jnp.arange(3.0))
    assert out[1] is None
    close(out, (jnp.arange(3.0), None, jnp.arange(3.0) > 1, jnp.arange(3, dtype=jnp.int32)))
    assert out[3].dtype == jnp.int32 and out[2].dtype == jnp.bool_


def test_lane_independent_output_with_an_axis_is_broadcast(close):
    out = vmap2(lambda x: (x, jnp.arange(2.0)), out_axes=(0, 1))(jnp.arange(3.0))
    close(out, (jnp.arange(3.0), jnp.broadcast_to(jnp.arange(2.0)[:, None], (2, 3))))


def test_function_returning_none(close):
    state = smap.ShortTermState(jnp.zeros(3))

    def fn(x):
        state.value = state.value + x

    assert vmap2(fn, state_in_axes=state)(jnp.arange(3.0)) is None
    close(state.value, jnp.arange(3.0))


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


# -- axis_size -------------------------------------------------------------------


def test_axis_size_inferred_from_arguments():
    out = vmap2(lambda x, y: jnp.zeros(2), in_axes=(None, 1))(jnp.ones(7), jnp.ones((2, 5)))
    assert out.shape == (5, 2)


def test_axis_size_given_matching_the_arguments(close):
    close(vmap2(lambda x: x + 1, axis_size=3)(jnp.arange(3.0)), jnp.arange(3.0) + 1)


def test_axis_size_given_not_matching_the_arguments_is_an_error():
    with pytest.raises(ValueError, match=r"(?s)(?=.*\b5\b)(?=.*\b3\b)"):
        vmap2(lambda x: x + 1, axis_size=5)(jnp.arange(3.0))


def test_axis_size_required_when_nothing_is_mapped():
    with pytest.raises(ValueError, match="axis_size"):
        vmap2(lambda x: x * 2, in_axes=None)(jnp.arange(3.0))
    with pytest.raises(ValueError, match="axis_size"):
        vmap2(lambda: jnp.ones(2))()


def test_axis_size_with_nothing_mapped(close):
    w = smap.ParamState(jnp.arange(2.0))
    out = vmap2(lambda: w.value * 2, axis_size=3)()
    close(out, jnp.broadcast_to(jnp.arange(2.0) * 2, (3, 2)))


# -- axis_name and collectives ---------------------------------------------------

COLLECTIVES = {
    "psum": lambda x: jax.lax.psum(x, "i"),
    "pmean": lambda x: x - jax.lax.pmean(x, "i"),
    "pmax": lambda x: jax.lax.pmax(x, "i"),
    "pmin": lambda x: jax.lax.pmin(x, "i") * x,
    "all_gather": lambda x: jax.lax.all_gather(x, "i"),
    "all_gather_tiled": lambda x: jax.lax.all_gather(x, "i", tiled=True),
    "axis_index": lambda x: x * jax.lax.axis_index("i"),
    "psum_of_one": lambda x: x / jax.lax.psum(1, "i"),
    "softmax": lambda x: jnp.exp(x) / jax.lax.psum(jnp.exp(x), "i"),
}


@pytest.mark.parametrize("name", list(COLLECTIVES))
def test_collectives_see_all_lanes(name, close):
    fn = COLLECTIVES[name]
    xs = rand(5, 2)
    close(vmap2(fn, axis_name="i")(xs), jax.vmap(fn, axis_name="i")(xs))


@pytest.mark.parametrize("name", ["psum", "pmean", "pmax", "axis_index", "psum_of_one"])
def test_collectives_when_the_size_comes_from_a_batched_state(name, close):
    fn = COLLECTIVES[name]
    state = smap.ShortTermState(rand(4, 3))
    s0 = state.value

    def step():
        state.value = fn(state.value)
        return state.value.sum()

    ref_state = jax.vmap(fn, axis_name="i")(s0)
    out = vmap2(step, in_axes=None, axis_name="i", state_in_axes=state)()
    close(state.value, ref_state)
    close(out, ref_state.sum(axis=1))


def test_all_gather_when_the_size_comes_from_a_batched_state(close):
    state = smap.ShortTermState(jnp.arange(4.0))

    def step():
        gathered = jax.lax.all_gather(state.value, "i")
        return gathered @ jnp.ones(4) + state.value

    out = vmap2(step, in_axes=None, axis_name="i", state_in_axes=state)()
    close(out, jnp.arange(4.0) + 6.0)


def test_collectives_on_a_python_loop_of_named_axes(close):
    xs = rand(3, 4)

    def fn(x):
        total = jax.lax.psum(x, "i")
        rank = jax.lax.axis_index("i")
        gathered = jax.lax.all_gather(x.sum(), "i")
        return total * rank + gathered.max() - jax.lax.pmin(x, "i")

    close(vmap2(fn, axis_name="i")(xs), jax.vmap(fn, axis_name="i")(xs))


def test_collective_on_an_unknown_axis_name_is_an_error():
    state = smap.ShortTermState(jnp.zeros(3))

    def fn(x):
        state.value = state.value + x
        smap.random.normal()
        return jax.lax.psum(x, "nope")

    before = snapshot(state)
    with pytest.raises((NameError, ValueError), match="nope"):
        vmap2(fn, axis_name="i", state_in_axes=state)(jnp.arange(3.0))
    assert_unchanged([state], before)


# -- static arguments -------------------------------------------------------------


def _power(x, n):
    out = x
    for _ in range(n - 1):  # Python control flow on n: it must be static
        out = out * x
    return out


@pytest.mark.parametrize("argnums", [1, (1,), -1, [-1]])
def test_static_argnums(argnums, close):
    mapped = StatefulMapping(_power, static_argnums=argnums)
    xs = jnp.array([1.0, 2.0, 3.0])
    close(mapped(xs, 3), xs**3)
    close(mapped(xs, 2), xs**2)


def test_static_argnums_in_axes_entries_at_static_positions_are_ignored(close):
    xs = jnp.array([1.0, 2.0, 3.0])
    for in_axes in [(0, 0), (0, None), (0, 1)]:
        close(StatefulMapping(_power, in_axes=in_axes, static_argnums=1)(xs, 3), xs**3)


def test_static_argnums_with_other_in_axes(close):
    def fn(scale, x, n):
        return _power(x, n) * scale

    xs = rand(2, 3)
    mapped = StatefulMapping(fn, in_axes=(None, 1, None), static_argnums=2)
    close(mapped(2.0, xs, 2), jax.vmap(lambda x: x**2 * 2.0, in_axes=1)(xs))


def test_static_argnames(close):
    mapped = StatefulMapping(_power, static_argnames="n")
    xs = jnp.array([1.0, 2.0, 3.0])
    close(mapped(xs, n=3), xs**3)
    close(StatefulMapping(_power, static_argnames=("n",))(xs, n=2), xs**2)


def test_static_values_are_part_of_the_cache_key(close):
    calls = []

    def fn(x, n):
        calls.append(n)
        return _power(x, n)

    mapped = StatefulMapping(fn, static_argnums=1)
    xs = jnp.array([1.0, 2.0, 3.0])
    close(mapped(xs, 2), xs**2)
    close(mapped(xs, 3), xs**3)
    close(mapped(xs, 2), xs**2)
    close(mapped(xs + 1, 3), (xs + 1) ** 3)
    assert calls == [2, 3]


def test_static_argnames_passed_positionally(close):
    xs = jnp.array([1.0, 2.0, 3.0])
    close(StatefulMapping(_power, static_argnames="n")(xs, 3), xs**3)


def test_static_argnums_passed_by_keyword(close):
    xs = jnp.array([1.0, 2.0, 3.0])
    close(StatefulMapping(_power, static_argnums=1)(xs, n=3), xs**3)


@pytest.mark.parametrize("argnums", [2, -3, (0, 5)])
def test_static_argnums_out_of_range_rejected_at_construction(argnums):
    with pytest.raises(ValueError, match="static_argnums"):
        StatefulMapping(_power, static_argnums=argnums)


def test_static_argnums_with_states(close):
    state = smap.ShortTermState(jnp.ones(3))

    def fn(x, n):
        state.value = _power(state.value * x, n)
        return state.value

    mapped = StatefulMapping(fn, static_argnums=1, state_in_axes=state)
    xs = jnp.array([1.0, 2.0, 3.0])
    close(mapped(xs, 2), xs**2)
    close(state.value, xs**2)


# -- random ----------------------------------------------------------------------


@pytest.mark.parametrize("seed, n", [(0, 1), (7, 3), (123, 8)])
def test_each_lane_draws_from_its_split_key(seed, n, close):
    smap.random.seed(seed)
    key_before = np.asarray(smap.random.DEFAULT.value)
    draws = vmap2(lambda x: smap.random.normal(size=(2,)) + x)(jnp.zeros((n, 2)))
    lane_keys = jax.random.split(key_before, n)
    assert draws.shape == (n, 2)
    close(draws, lanes_normal(lane_keys, 2))
    close(draws, lanes_reference(lambda rng: rng.normal(size=(2,)), lane_keys))
    close(draws[n - 1], smap.random.RandomState(lane_keys[n - 1]).normal(size=(2,)))
    # The key advanced exactly once for the call.
    np.testing.assert_array_equal(smap.random.DEFAULT.value, jax.random.split(key_before, n + 1)[n])


def test_lanes_draw_several_times_from_their_own_stream(close):
    smap.random.seed(123)
    key_before = smap.random.DEFAULT.value

    def sample(mean):
        a = smap.random.uniform(0.0, 1.0)
        b = smap.random.normal(mean, 1.0)
        c = smap.random.randint(0, 100, size=3)
        return a + b, c

    def reference(rng, mean):
        a = rng.uniform(0.0, 1.0)
        b = rng.normal(mean, 1.0)
        return a + b, rng.randint(0, 100, size=3)

    means = jnp.array([0.0, 1.0, 2.0])
    out, ints = vmap2(sample)(means)
    ref_out, ref_ints = lanes_reference(reference, jax.random.split(key_before, 3), means)
    close(out, ref_out)
    np.testing.assert_array_equal(ints, ref_ints)
    np.testing.assert_array_equal(smap.random.DEFAULT.value, jax.random.split(key_before, 4)[3])


def test_successive_calls_draw_fresh_numbers(close):
    mapped = vmap2(lambda x: smap.random.normal() + x)
    key0 = smap.random.DEFAULT.value
    first = mapped(jnp.zeros(3))
    key1 = smap.random.DEFAULT.value
    second = mapped(jnp.zeros(3))
    close(first, lanes_normal(jax.random.split(key0, 3)))
    close(second, lanes_normal(jax.random.split(key1, 3)))
    assert not np.allclose(first, second)


def test_a_user_random_state_follows_the_same_rule(close):
    rng = smap.random.RandomState(42)
    untouched = smap.random.RandomState(5)
    key_before = rng.value
    default_before = smap.random.DEFAULT.value
    untouched_before = untouched.value
    out = vmap2(lambda x: rng.normal(size=2) * x)(jnp.ones((4, 1)))
    close(out, lanes_normal(jax.random.split(key_before, 4), 2))
    np.testing.assert_array_equal(rng.value, jax.random.split(key_before, 5)[4])
    np.testing.assert_array_equal(smap.random.DEFAULT.value, default_before)
    np.testing.assert_array_equal(untouched.value, untouched_before)


def test_a_random_state_not_drawn_from_is_unchanged(close):
    key_before = smap.random.DEFAULT.value
    out = vmap2(lambda x: x * 2)(jnp.arange(3.0))
    close(out, jnp.arange(3.0) * 2)
    np.testing.assert_array_equal(smap.random.DEFAULT.value, key_before)


def test_a_random_state_only_read_is_unchanged_and_lanes_see_their_keys(close):
    rng = smap.random.RandomState(3)
    key_before = rng.value
    out = vmap2(lambda x: jax.random.normal(rng.value) + x)(jnp.zeros(3))
    close(out, jnp.stack([jax.random.normal(k) for k in jax.random.split(key_before, 3)]))
    np.testing.assert_array_equal(rng.value, key_before)


def test_random_draws_with_batched_states_and_jit(close):
    state = smap.ShortTermState(jnp.zeros((3, 2)))

    def noisy(x):
        state.value = state.value + smap.random.normal(size=2) * x
        return state.value

    smap.random.seed(11)
    key_before = smap.random.DEFAULT.value
    out = smap.jit(vmap2(noisy, state_in_axes=state))(jnp.array([1.0, 2.0, 3.0]))
    expected = lanes_normal(jax.random.split(key_before, 3), 2) * jnp.array([1.0, 2.0, 3.0])[:, None]
    close(out, expected)
    close(state.value, expected)
    np.testing.assert_array_equal(smap.random.DEFAULT.value, jax.random.split(key_before, 4)[3])


def test_random_in_nested_mappings(close):
    smap.random.seed(3)
    k0 = smap.random.DEFAULT.value
    out = vmap2(vmap2(lambda x: smap.random.normal() + x))(jnp.zeros((2, 3)))
    expected = jnp.stack([lanes_normal(jax.random.split(ki, 3)) for ki in jax.random.split(k0, 2)])
    close(out, expected)
    np.testing.assert_array_equal(smap.random.DEFAULT.value, jax.random.split(k0, 3)[2])


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key], ids=["raw", "typed"])
def test_explicit_keys_follow_in_axes(make_key, close):
    key = make_key(0)
    scales = jnp.array([1.0, 2.0, 3.0, 4.0])

    def sample(key, scale):
        return jax.random.normal(key, ()) * scale

    shared = vmap2(sample, in_axes=(None, 0))(key, scales)
    close(shared, jax.vmap(sample, in_axes=(None, 0))(key, scales))
    close(shared, jax.random.normal(key, ()) * scales)  # the same base draw in every lane
    keys = jax.random.split(key, 4)
    unique = vmap2(sample, in_axes=(0, 0))(keys, scales)
    close(unique, jax.vmap(sample)(keys, scales))
    key_before = smap.random.DEFAULT.value
    assert len(set(np.asarray(unique / scales).round(5).tolist())) == 4
    np.testing.assert_array_equal(smap.random.DEFAULT.value, key_before)


# -- a state type that gives each lane its own value ---------------------------------


class Ticket(smap.State):
    """A user's state type: lane i gets ``n + i`` and a shared ``base``; the next call starts at ``n + lanes``."""

    def lane_values(self, value, axis_size):
        lanes = {"n": value["n"] + jnp.arange(axis_size), "base": jnp.broadcast_to(value["base"], (axis_size, 3))}
        return lanes, {"n": value["n"] + axis_size, "base": value["base"]}


def ticket(n=0):
    return Ticket({"n": jnp.asarray(n, jnp.int32), "base": jnp.arange(3.0)})


def test_a_user_state_type_gives_each_lane_its_value_and_advances(close):
    t = ticket(5)

    def serve(x):
        number = t.value["n"]
        t.value = {"n": number + 1, "base": t.value["base"]}
        return x * number + t.value["base"]

    x = jnp.array([1.0, 2.0, 3.0, 4.0])
    # by hand: lanes see n = 5, 6, 7, 8; the state then holds n = 5 + 4
    close(smap.vmap(serve)(x), x[:, None] * jnp.array([5.0, 6.0, 7.0, 8.0])[:, None] + jnp.arange(3.0))
    close(t.value, {"n": jnp.asarray(9, jnp.int32), "base": jnp.arange(3.0)})
    close(smap.jit(smap.vmap(serve))(x[:2]), x[:2, None] * jnp.array([9.0, 10.0])[:, None] + jnp.arange(3.0))
    close(t.value["n"], jnp.asarray(11, jnp.int32))


def test_a_user_state_type_read_only_or_written_lane_independently(close):
    t = ticket(2)
    read = smap.vmap(lambda x: x + t.value["n"])
    close(read(jnp.zeros(3)), jnp.array([2.0, 3.0, 4.0]))
    close(t.value["n"], jnp.asarray(2, jnp.int32))  # not written: unchanged

    def reset(x):
        t.value = {"n": jnp.asarray(40, jnp.int32), "base": jnp.ones(3)}
        return x

    smap.vmap(reset)(jnp.zeros(3))
    # a lane-independent write is written as it is
    close(t.value, {"n": jnp.asarray(40, jnp.int32), "base": jnp.ones(3)})


def test_a_user_state_type_keeps_its_value_when_the_call_fails():
    t = ticket(3)

    def bad(x):
        t.value = {"n": t.value["n"] + 1, "base": t.value["base"]}
        return x + jnp.ones(7)

    before = snapshot(t)
    with pytest.raises(TypeError):
        smap.vmap(bad)(jnp.zeros((4, 3)))
    assert_unchanged([t], before)


def test_a_user_state_type_with_a_malformed_lane_values_is_named():
    class NoLaneAxis(smap.State):
        def lane_values(self, value, axis_size):
            return value, value

    s = NoLaneAxis(jnp.zeros(2))
    with pytest.raises(TypeError, match=r"NoLaneAxis.lane_values must return .*stacked along a new axis 0"):
        smap.vmap(lambda x: x + s.value)(jnp.zeros((4, 2)))


def test_a_user_state_type_that_declines_is_left_to_state_in_axes(close):
    class Sometimes(smap.State):
        def lane_values(self, value, axis_size):
            return None if value.ndim == 2 else (jnp.broadcast_to(value, (axis_size, *value.shape)), value + 1)

    batched = Sometimes(jnp.arange(6.0).reshape(3, 2))
    f = smap.vmap(lambda x: x + batched.value, state_in_axes=Sometimes)
    close(f(jnp.ones((3, 2))), jnp.arange(6.0).reshape(3, 2) + 1)


# -- caching ---------------------------------------------------------------------


def test_traced_once_per_signature(close):
    calls = []
    state = smap.ShortTermState(jnp.zeros(3))

    def fn(x):
        calls.append(jnp.shape(x))
        state.value = state.value + jnp.sum(x)
        return x * 2

    mapped = vmap2(fn, state_in_axes=state)
    close(mapped(jnp.arange(3.0)), jnp.arange(3.0) * 2)
    close(mapped(jnp.arange(3.0) + 1), jnp.arange(3.0) * 2 + 2)
    assert len(calls) == 1
    mapped(jnp.ones((3, 2)))  # new shape
    assert len(calls) == 2
    mapped(jnp.ones((3, 2), jnp.int32))  # new dtype
    assert len(calls) == 3
    mapped(jnp.ones((3, 2)))
    mapped(jnp.arange(3.0))
    assert len(calls) == 3
    # Lane i added sum(x_i) at every call: i, i + 1, 2, 2, 2, i.
    close(state.value, jnp.array([7.0, 10.0, 13.0]))


def test_retraced_when_a_state_changes_shape(close):
    calls = []
    w = smap.ParamState(jnp.ones(2))

    def fn(x):
        calls.append(1)
        return x * w.value.sum()

    mapped = vmap2(fn)
    close(mapped(jnp.arange(3.0)), jnp.arange(3.0) * 2)
    close(mapped(jnp.arange(3.0)), jnp.arange(3.0) * 2)
    assert len(calls) == 1
    w.reset(jnp.ones(5))
    close(mapped(jnp.arange(3.0)), jnp.arange(3.0) * 5)
    assert len(calls) == 2
    w.value = jnp.ones(5) * 2  # same shape and dtype: no retrace
    close(mapped(jnp.arange(3.0)), jnp.arange(3.0) * 10)
    assert len(calls) == 2


def test_retraced_when_a_write_made_a_state_batched(close):
    calls = []
    hidden = smap.HiddenState(jnp.array(0.0))

    def fn(x):
        calls.append(1)
        hidden.value = hidden.value + x
        return hidden.value

    mapped = vmap2(fn, state_in_axes={0: [hidden]})
    # First call: the scalar cannot be split; make it batched through a shared write.
    vmap2(fn)(jnp.arange(3.0))
    assert hidden.value.shape == (3,)
    close(mapped(jnp.ones(3)), jnp.arange(3.0) + 1)
    close(mapped(jnp.ones(3)), jnp.arange(3.0) + 2)
    assert len(calls) == 2


def test_traced_once_with_collectives_and_sizes_from_arguments():
    calls = []

    def fn(x):
        calls.append(1)
        return jax.lax.psum(x, "i")

    mapped = vmap2(fn, axis_name="i")
    mapped(jnp.arange(4.0))
    mapped(jnp.arange(4.0))
    assert len(calls) == 1


def test_size_from_a_state_with_collectives_restarts_the_first_trace_once():
    """Documented: collectives need the size while tracing; a batched state gives it only
    when first read, so the first trace restarts there. Passing axis_size avoids it."""
    calls = []
    state = smap.ShortTermState(jnp.arange(4.0))

    def fn():
        calls.append(1)
        return jax.lax.psum(state.value, "i")

    mapped = vmap2(fn, in_axes=None, axis_name="i", state_in_axes=state)
    assert float(mapped()[0]) == 6.0
    mapped()
    assert len(calls) == 2
    calls.clear()
    sized = vmap2(fn, in_axes=None, axis_name="i", axis_size=4, state_in_axes=state)
    sized()
    sized()
    assert len(calls) == 1


def test_cache_key_and_jaxpr_of_the_per_lane_program(close):
    state = smap.State(jnp.array(1.0))

    def simple_op(x):
        result = x + state.value
        state.value = result
        return result * 2

    mapped = vmap2(simple_op, in_axes=0, state_out_axes={0: OfType(smap.State)})
    xs = jnp.array([1.0, 2.0])
    out = mapped(xs)
    close(out, jnp.array([4.0, 6.0]))
    close(state.value, jnp.array([2.0, 3.0]))

    key = mapped.get_arg_cache_key(xs)
    hash(key)
    closed = mapped.get_jaxpr_by_cache(key)
    assert hasattr(closed, "jaxpr") and hasattr(closed, "consts")
    # One lane: the argument without its mapped axis, then the state.
    assert [tuple(v.aval.shape) for v in closed.jaxpr.invars] == [(), ()]
    assert len(closed.jaxpr.outvars) == 2
    for i in range(2):
        lane_out, lane_state = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, xs[i], jnp.array(1.0))
        close(lane_out, (xs[i] + 1.0) * 2)
        close(lane_state, xs[i] + 1.0)


def test_cache_key_differs_between_signatures():
    mapped = vmap2(lambda x: x * 2)
    mapped(jnp.ones(3))
    mapped(jnp.ones((3, 2)))
    k1, k2 = mapped.get_arg_cache_key(jnp.ones(3)), mapped.get_arg_cache_key(jnp.ones((3, 2)))
    assert k1 != k2
    assert k1 == mapped.get_arg_cache_key(jnp.zeros(3))
    j1, j2 = mapped.get_jaxpr_by_cache(k1), mapped.get_jaxpr_by_cache(k2)
    assert [tuple(v.aval.shape) for v in j1.jaxpr.invars] == [()]
    assert [tuple(v.aval.shape) for v in j2.jaxpr.invars] == [(2,)]
    np.testing.assert_array_equal(jax.core.eval_jaxpr(j2.jaxpr, j2.consts, jnp.array([1.0, 2.0]))[0], [2.0, 4.0])


def test_cache_key_with_batched_state_and_static_arguments(close):
    state = smap.ShortTermState(jnp.zeros((3, 2)))

    def fn(x, n):
        state.value = state.value + _power(x, n)
        return state.value.sum()

    mapped = StatefulMapping(fn, static_argnums=1, state_in_axes=state)
    xs = jnp.arange(6.0).reshape(3, 2)
    mapped(xs, 2)
    mapped(xs, 3)
    k2, k3 = mapped.get_arg_cache_key(xs, 2), mapped.get_arg_cache_key(xs, 3)
    assert k2 != k3
    closed = mapped.get_jaxpr_by_cache(k3)
    assert [tuple(v.aval.shape) for v in closed.jaxpr.invars] == [(2,), (2,)]
    out, new_state = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, jnp.array([2.0, 3.0]), jnp.ones(2))
    close(new_state, jnp.array([9.0, 28.0]))
    close(out, jnp.array(37.0))


# -- nesting ---------------------------------------------------------------------


def test_nested_vmap2_matches_nested_jax_vmap(close):
    def fn(x, y):
        return jnp.sin(x) * y + jnp.sum(y)

    xs, ys = rand(3, 4, 2), rand(4, 2, 3, seed=1)
    inner_axes, outer_axes = (0, 1), (1, 0)
    expected = jax.vmap(jax.vmap(fn, in_axes=inner_axes), in_axes=outer_axes)(xs, ys)
    out = vmap2(vmap2(fn, in_axes=inner_axes), in_axes=outer_axes)(xs, ys)
    close(out, expected)


def test_nested_vmap2_with_axis_names(close):
    def fn(x):
        return x * jax.lax.axis_index("inner") - jax.lax.pmean(x, "outer") + jax.lax.psum(x, ("inner", "outer"))

    xs = rand(2, 3, 4)
    expected = jax.vmap(jax.vmap(fn, axis_name="inner"), axis_name="outer")(xs)
    close(vmap2(vmap2(fn, axis_name="inner"), axis_name="outer")(xs), expected)


def test_nested_vmap2_with_a_state_batched_on_two_axes(close):
    state = smap.ShortTermState(rand(2, 3, 4))
    s0 = state.value
    xs = rand(2, 3, 4, seed=1)

    def step(x):
        state.value = state.value * 0.5 + x
        return state.value.sum()

    def pure(s, x):
        new = s * 0.5 + x
        return new.sum(), new

    ref_out, ref_state = jax.vmap(jax.vmap(pure))(s0, xs)
    inner = vmap2(step, state_in_axes=state, unexpected_out_state_mapping="raise")
    outer = vmap2(inner, state_in_axes=state, unexpected_out_state_mapping="raise")
    close(outer(xs), ref_out)
    close(state.value, ref_state)


def test_nested_vmap2_with_a_state_batched_on_axis_1_outside(close):
    # The outer mapping splits axis 1 of the state, the inner one axis 0 of what is left.
    state = smap.ShortTermState(rand(3, 2, 4))
    s0 = state.value
    xs = rand(2, 3, 4, seed=1)
    shared = smap.LongTermState(jnp.zeros(4))

    def step(x):
        state.value = jnp.tanh(state.value + x)
        shared.value = shared.value + jax.lax.psum(state.value, ("i", "j"))
        return state.value.mean()

    def pure(s, x):
        new = jnp.tanh(s + x)
        return new.mean(), new, jax.lax.psum(new, ("i", "j"))

    ref_out, ref_state, ref_total = jax.vmap(
        jax.vmap(pure, axis_name="j", out_axes=(0, 0, None)),
        in_axes=(1, 0),
        out_axes=(0, 1, None),
        axis_name="i",
    )(s0, xs)
    inner = vmap2(step, state_in_axes={0: state}, axis_name="j", unexpected_out_state_mapping="raise")
    outer = vmap2(inner, state_in_axes={1: state}, axis_name="i", unexpected_out_state_mapping="raise")
    close(outer(xs), ref_out)
    close(state.value, ref_state)
    close(shared.value, ref_total)
    assert shared.value.shape == (4,)


def test_nested_shared_state_written_per_lane_gets_both_axes(close):
    total = smap.LongTermState(jnp.zeros(2))

    def step(x):
        total.value = total.value + x
        return x

    xs = rand(3, 4)
    vmap2(vmap2(step, state_out_axes={1: total}), state_out_axes={0: total})(xs)
    # Inner lanes put their axis at 1 of the (2,) value, then outer lanes at 0.
    expected = jax.vmap(jax.vmap(lambda x: jnp.zeros(2) + x, out_axes=1), out_axes=0)(xs)
    assert total.value.shape == (3, 2, 4)
    close(total.value, expected)


def test_jit_of_vmap2(close):
    calls = []
    state = smap.ShortTermState(jnp.zeros((4, 2)))
    w = smap.ParamState(rand(2, 2))
    w0 = w.value

    def step(x):
        calls.append(1)
        state.value = state.value @ w.value + x
        return state.value.sum()

    def pure(s, x):
        new = s @ w0 + x
        return new.sum(), new

    compiled = smap.jit(vmap2(step, state_in_axes=state))
    s, xs = jnp.zeros((4, 2)), rand(4, 2, seed=1)
    for _ in range(3):
        ref_out, s = jax.vmap(pure)(s, xs)
        close(compiled(xs), ref_out)
        close(state.value, s)
    assert len(calls) == 1
    close(w.value, w0)


def test_jit_of_vmap2_where_a_shared_state_becomes_batched(close):
    total = smap.State(jnp.zeros(2))

    def step(x):
        total.value = total.value + x
        return x

    compiled = smap.jit(vmap2(step))
    close(compiled(jnp.arange(3.0)), jnp.arange(3.0))
    close(total.value, jnp.broadcast_to(jnp.arange(3.0)[:, None], (3, 2)))


def test_jit_of_vmap2_raise_policy_keeps_states():
    total = smap.State(jnp.zeros(2))

    def step(x):
        total.value = total.value + x
        return x

    before = snapshot(total)
    with pytest.raises(smap.BatchAxisError, match=r"State float32\[2\]"):
        smap.jit(vmap2(step, unexpected_out_state_mapping="raise"))(jnp.arange(3.0))
    assert_unchanged([total], before)


def test_jit_of_vmap2_with_static_argument(close):
    mapped = StatefulMapping(_power, static_argnums=1)
    compiled = smap.jit(mapped, static_argnums=1)
    xs = jnp.array([1.0, 2.0, 3.0])
    close(compiled(xs, 3), xs**3)
    close(compiled(xs, 2), xs**2)


def test_vmap2_of_jit(close):
    state = smap.ShortTermState(jnp.zeros(3))

    @smap.jit
    def step(x):
        state.value = state.value + x
        return state.value * 2

    out = vmap2(step, state_in_axes=state)(jnp.arange(3.0))
    close(out, jnp.arange(3.0) * 2)
    close(state.value, jnp.arange(3.0))


def test_jax_jit_around_a_pure_vmap2(close):
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    mapped = vmap2(lambda x: x * w.value.sum())
    close(jax.jit(mapped)(jnp.arange(3.0)), jnp.arange(3.0) * 3)


def test_per_example_gradients_of_arguments(close):
    def loss_fn(x, target):
        return jnp.sum((x**2 - target) ** 2)

    xs, ts = rand(5, 3), rand(5, 3, seed=1)
    expected = jax.vmap(jax.grad(loss_fn))(xs, ts)
    close(vmap2(smap.grad(loss_fn, argnums=0))(xs, ts), expected)
    close(smap.jit(vmap2(smap.grad(loss_fn, argnums=0)))(xs, ts), expected)


def test_per_example_gradients_of_a_shared_parameter(close):
    w = smap.ParamState(jnp.array([1.0, -2.0]))
    w0 = w.value

    def loss(x, y):
        return (jnp.dot(w.value, x) - y) ** 2

    xs, ys = rand(4, 2), rand(4, seed=1)
    expected = jax.vmap(jax.grad(lambda w, x, y: (jnp.dot(w, x) - y) ** 2), in_axes=(None, 0, 0))(w0, xs, ys)
    close(vmap2(smap.grad(loss, grad_states=w))(xs, ys), expected)
    np.testing.assert_array_equal(w.value, w0)


def test_per_example_gradients_with_value(close):
    w = smap.ParamState(jnp.array([0.5, 1.5]))
    w0 = w.value

    def loss(x):
        return jnp.dot(w.value, x) ** 2

    xs = rand(3, 2)
    grads, value = vmap2(smap.grad(loss, grad_states=w, return_value=True))(xs)
    close(grads, jax.vmap(jax.grad(lambda w, x: jnp.dot(w, x) ** 2), in_axes=(None, 0))(w0, xs))
    close(value, (xs @ w0) ** 2)


def test_per_example_gradients_with_value_and_aux(close):
    w = smap.ParamState(jnp.array([0.5, 1.5]))
    w0 = w.value

    def loss(x):
        pred = jnp.dot(w.value, x)
        return pred**2, pred

    xs = rand(3, 2)
    (grads, value, aux) = vmap2(smap.grad(loss, grad_states=w, return_value=True, has_aux=True))(xs)
    close(grads, jax.vmap(jax.grad(lambda w, x: jnp.dot(w, x) ** 2), in_axes=(None, 0))(w0, xs))
    close(value, (xs @ w0) ** 2)
    close(aux, xs @ w0)


def test_grad_of_a_loss_that_uses_vmap2(close):
    w = smap.ParamState(jnp.array([1.0, -2.0]))
    w0 = w.value
    xs, ys = rand(4, 2), rand(4, seed=1)

    def per_example(x, y):
        return (jnp.dot(w.value, x) - y) ** 2

    grads = smap.grad(lambda: vmap2(per_example)(xs, ys).mean(), grad_states=w)()
    expected = jax.grad(lambda w: jax.vmap(lambda x, y: (jnp.dot(w, x) - y) ** 2)(xs, ys).mean())(w0)
    close(grads, expected)


def test_grad_of_a_loss_that_uses_vmap2_writing_a_state(close):
    w = smap.ParamState(jnp.ones(2))
    seen = smap.LongTermState(jnp.zeros(()))

    def per_example(x):
        seen.value = seen.value + jax.lax.psum(1.0, "b")
        return jnp.dot(w.value, x) ** 2

    xs = rand(3, 2)
    grads = smap.grad(lambda xs: vmap2(per_example, axis_name="b")(xs).sum(), grad_states=w)(xs)
    close(grads, jax.grad(lambda w: jnp.sum((xs @ w) ** 2))(jnp.ones(2)))
    close(seen.value, jnp.array(3.0))


def test_state_created_inside_the_mapped_function_does_not_leak_a_tracer(close):
    kept = []

    def fn(x):
        temp = smap.State(x * 2)
        temp.value = temp.value + 1
        kept.append(temp)
        return temp.value

    close(vmap2(fn)(jnp.arange(3.0)), jnp.arange(3.0) * 2 + 1)
    assert len(kept) == 1
    with pytest.raises(RuntimeError, match="inside"):
        kept[0].value  # noqa: B018
    assert "Tracer" not in repr(kept[0])


def test_state_created_inside_jit_of_vmap2_does_not_leak_a_tracer():
    kept = []

    def fn(x):
        temp = smap.ShortTermState(jnp.sin(x))
        kept.append(temp)
        return temp.value

    smap.jit(vmap2(fn))(jnp.arange(3.0))
    for temp in kept:
        try:
            value = temp.value
        except RuntimeError as error:
            assert "inside" in str(error)
        else:
            assert not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(value))


def test_a_state_created_inside_an_outer_transform_does_not_poison_the_mapping(close):
    holder = {}
    inner = vmap2(lambda x: x + holder["s"].value)

    def outer(x):
        holder["s"] = smap.State(jnp.zeros(()) + 1.0)
        return inner(x)

    close(smap.jit(outer)(jnp.arange(3.0)), jnp.arange(3.0) + 1)
    holder["s"] = smap.State(jnp.full((), 5.0))
    close(inner(jnp.arange(3.0)), jnp.arange(3.0) + 5)


def test_an_outer_mapping_sees_only_the_states_the_inner_call_reads(close):
    scalar = smap.ShortTermState(jnp.zeros(()))

    def fn(x):
        if x.ndim == 0:
            return x + scalar.value
        return x * 2

    inner = vmap2(fn)
    close(inner(jnp.arange(3.0)), jnp.arange(3.0))  # this signature reads the scalar state
    outer = vmap2(inner, state_in_axes=smap.ShortTermState)
    xs = rand(3, 4, 2)
    close(outer(xs), xs * 2)  # this one does not: nothing should try to split the scalar
    key = outer.get_arg_cache_key(xs)
    assert len(outer.get_jaxpr_by_cache(key).jaxpr.invars) == 1


# -- mapping_fn ------------------------------------------------------------------


def test_mapping_fn_partial_jax_vmap(close):
    counter = smap.ShortTermState(jnp.zeros(3))

    def increment(delta):
        counter.value = counter.value + delta
        return counter.value

    custom = StatefulMapping(
        increment,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
        name="custom_increment",
        mapping_fn=functools.partial(jax.vmap, spmd_axis_name=None),
    )
    close(custom(jnp.array([1.0, 2.0, 3.0])), jnp.array([1.0, 2.0, 3.0]))
    close(counter.value, jnp.array([1.0, 2.0, 3.0]))
    close(custom(jnp.array([1.0, 1.0, 1.0])), jnp.array([2.0, 3.0, 4.0]))
    assert custom.name == "custom_increment"


def test_a_user_mapping_fn_is_called_once_per_signature_with_identical_results():
    calls = []

    def my_vmap(fun, **kwargs):
        calls.append(kwargs)
        return jax.vmap(fun, **kwargs)

    def make(mapping_fn):
        state = smap.ShortTermState(jnp.zeros((4, 2)))
        shared = smap.LongTermState(jnp.ones(2))

        def step(x):
            state.value = state.value * shared.value + x + smap.random.normal(size=2)
            shared.value = shared.value + jax.lax.pmean(x, "b")
            return state.value.sum(), jax.lax.axis_index("b")

        mapped = StatefulMapping(
            step, state_in_axes=state, axis_name="b", mapping_fn=mapping_fn, unexpected_out_state_mapping="raise"
        )
        return mapped, state, shared

    results = {}
    for label, fn in [("default", jax.vmap), ("custom", my_vmap)]:
        smap.random.seed(4)
        mapped, state, shared = make(fn)
        outs = [mapped(rand(4, 2, seed=i)) for i in range(3)]
        results[label] = (outs, state.value, shared.value, smap.random.DEFAULT.value)
    assert len(calls) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, results["custom"], results["default"])
    assert calls[0].get("axis_name") == "b"


def test_mapping_fn_receives_a_new_call_for_a_new_signature():
    calls = []

    def my_vmap(fun, **kwargs):
        calls.append(1)
        return jax.vmap(fun, **kwargs)

    mapped = StatefulMapping(lambda x: x + 1, mapping_fn=my_vmap)
    mapped(jnp.ones(3))
    mapped(jnp.ones(3))
    assert len(calls) == 1
    mapped(jnp.ones(5))
    assert len(calls) == 2


def test_mapping_kwargs_are_passed_to_the_mapping_fn(close):
    seen = []

    def my_vmap(fun, *, extra, **kwargs):
        seen.append(extra)
        return jax.vmap(fun, **kwargs)

    mapped = StatefulMapping(lambda x: x * 3, mapping_fn=my_vmap, mapping_kwargs={"extra": "hello"})
    close(mapped(jnp.arange(3.0)), jnp.arange(3.0) * 3)
    assert seen == ["hello"]


# -- bad input: clear errors, and every state keeps its value ---------------------


def _bad_calls():
    """name -> (build(batched, shared) -> thunk, exception type, regexes the message must match)."""

    def writer(batched, shared, tail):
        def fn(*args, **kwargs):
            smap.random.normal()
            batched.value = batched.value + 1
            shared.value = shared.value * 2
            return tail(*args, **kwargs)

        return fn

    def ident(*args):
        return args[0]

    def boom(x):
        raise RuntimeError("boom")

    cases = {
        "argument_sizes": (
            lambda b, s: lambda: vmap2(writer(b, s, lambda x, y: x + y), state_in_axes=b)(jnp.ones(3), jnp.ones(4)),
            ValueError,
            [r"args\[0\]", r"args\[1\]", r"\b3\b", r"\b4\b"],
        ),
        "argument_vs_state_size": (
            lambda b, s: lambda: vmap2(writer(b, s, ident), state_in_axes=b)(jnp.ones(4)),
            ValueError,
            [r"args\[0\]", r"ShortTermState", r"\b3\b", r"\b4\b"],
        ),
        "keyword_size": (
            lambda b, s: lambda: vmap2(writer(b, s, lambda x, y: x + y), state_in_axes=b)(jnp.ones(3), y=jnp.ones(5)),
            ValueError,
            [r"kwargs\['y'\]", r"\b5\b", r"\b3\b"],
        ),
        "axis_size_vs_argument": (
            lambda b, s: lambda: vmap2(writer(b, s, ident), axis_size=5)(jnp.ones(3)),
            ValueError,
            [r"axis_size", r"args\[0\]", r"\b5\b", r"\b3\b"],
        ),
        "in_axes_out_of_range": (
            lambda b, s: lambda: vmap2(writer(b, s, ident), in_axes=2, state_in_axes=b)(jnp.ones((3, 2))),
            ValueError,
            [r"in_axes", r"args\[0\]", r"\(3, 2\)"],
        ),
        "in_axes_wrong_length": (
            lambda b, s: lambda: vmap2(writer(b, s, ident), in_axes=(0, 0, 0))(jnp.ones(3), jnp.ones(3)),
            ValueError,
            [r"in_axes", r"\b3\b", r"\b2\b"],
        ),
        "in_axes_wrong_structure": (
            lambda b, s: (
                lambda: vmap2(writer(b, s, lambda d: d["a"]), in_axes=({"a": 0, "z": 0},))(
                    {"a": jnp.ones(3), "b": jnp.ones(3)}
                )
            ),
            ValueError,
            [r"in_axes"],
        ),
        "out_axes_tree": (
            lambda b, s: (
                lambda: vmap2(writer(b, s, lambda x: (x, x)), out_axes=(0, 0, 0), state_in_axes=b)(jnp.ones(3))
            ),
            ValueError,
            [r"out_axes"],
        ),
        "out_axes_out_of_range": (
            lambda b, s: lambda: vmap2(writer(b, s, ident), out_axes=2, state_in_axes=b)(jnp.ones(3)),
            ValueError,
            [r"out_axes", r"\b2\b"],
        ),
        "out_axes_none_per_lane": (
            lambda b, s: lambda: vmap2(writer(b, s, ident), out_axes=None, state_in_axes=b)(jnp.ones(3)),
            ValueError,
            [r"out_axes"],
        ),
        "raise_policy": (
            lambda b, s: (
                lambda: vmap2(
                    writer(b, s, lambda x: setattr(s, "value", s.value + x) or x),
                    state_in_axes=b,
                    unexpected_out_state_mapping="raise",
                )(jnp.ones(3))
            ),
            smap.BatchAxisError,
            [r"LongTermState float32\[2\]"],
        ),
        "axis_size_missing": (
            lambda b, s: lambda: vmap2(writer(b, s, ident), in_axes=None)(jnp.ones(3)),
            ValueError,
            [r"axis_size"],
        ),
        "unknown_axis_name": (
            lambda b, s: (
                lambda: vmap2(writer(b, s, lambda x: jax.lax.psum(x, "nope")), axis_name="i", state_in_axes=b)(
                    jnp.ones(3)
                )
            ),
            (NameError, ValueError),
            [r"nope"],
        ),
        "state_axis_missing": (
            lambda b, s: lambda: vmap2(writer(b, s, ident), state_in_axes={2: b})(jnp.ones(3)),
            ValueError,
            [r"ShortTermState", r"\b2\b", r"\(3, 2\)"],
        ),
        "state_in_out_conflict": (
            lambda b, s: lambda: vmap2(writer(b, s, ident), state_in_axes={0: b}, state_out_axes={1: b})(jnp.ones(3)),
            smap.BatchAxisError,
            [r"ShortTermState", r"\b0\b", r"\b1\b"],
        ),
        "error_inside_fun": (
            lambda b, s: lambda: vmap2(writer(b, s, boom), state_in_axes=b)(jnp.ones(3)),
            RuntimeError,
            [r"boom"],
        ),
        "shape_change_inside_fun": (
            lambda b, s: (
                lambda: vmap2(writer(b, s, lambda x: setattr(s, "value", jnp.ones(5)) or x), state_in_axes=b)(
                    jnp.ones(3)
                )
            ),
            ValueError,
            [r"LongTermState", r"\(5,\)"],
        ),
        "inside_jit": (
            lambda b, s: lambda: smap.jit(vmap2(writer(b, s, ident), state_in_axes=b))(jnp.ones(4)),
            ValueError,
            [r"ShortTermState", r"\b3\b", r"\b4\b"],
        ),
        "inside_outer_vmap2": (
            lambda b, s: (
                lambda: vmap2(vmap2(writer(b, s, ident), state_in_axes=b), in_axes=1, state_in_axes=b)(jnp.ones((5, 3)))
            ),
            ValueError,
            [r"\b2\b", r"\b5\b"],
        ),
    }
    return cases


BAD_CALLS = _bad_calls()


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_failed_call_raises_a_clear_error_and_keeps_every_state(case):
    build, error, patterns = BAD_CALLS[case]
    batched = smap.ShortTermState(jnp.arange(6.0).reshape(3, 2))
    shared = smap.LongTermState(jnp.ones(2))
    bystander = smap.random.RandomState(9)
    before = snapshot(batched, shared, bystander)
    with pytest.raises(error) as info:
        build(batched, shared)()
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert_unchanged([batched, shared, bystander], before)


def test_a_mapping_works_after_a_failed_call(close):
    state = smap.ShortTermState(jnp.zeros((3, 2)))

    def step(x):
        state.value = state.value + x
        return state.value.sum()

    mapped = vmap2(step, state_in_axes=state)
    before = snapshot(state)
    with pytest.raises(ValueError):
        mapped(jnp.ones((4, 2)))
    assert_unchanged([state], before)
    close(mapped(jnp.ones((3, 2))), jnp.full(3, 2.0))
    close(state.value, jnp.ones((3, 2)))


def test_a_failed_call_inside_fun_keeps_the_random_key_and_batched_states():
    state = smap.ShortTermState(jnp.zeros((3, 2)))
    total = smap.LongTermState(jnp.zeros(()))

    def step(x):
        state.value = state.value + smap.random.normal(size=2)
        total.value = total.value + jax.lax.psum(x, "i")
        if x.shape == ():
            raise KeyError("not this one")
        return x

    before = snapshot(state, total)
    with pytest.raises(KeyError):
        vmap2(step, axis_name="i", state_in_axes=state)(jnp.ones(3))
    assert_unchanged([state, total], before)


# -- the seed tutorial, with its printed values ------------------------------------


def test_tutorial_1_1_in_axes(capsys):
    def square(x):
        return x**2

    vmap_square = vmap2(square, in_axes=0)
    xs = jnp.array([1.0, 2.0, 3.0, 4.0])
    print("Input shape:", xs.shape)
    print("Output:", vmap_square(xs))
    print("Output shape:", vmap_square(xs).shape)

    def weighted_sum(x, weight):
        return x * weight

    vmap_weighted = vmap2(weighted_sum, in_axes=(0, None))
    batch_x = jnp.array([1.0, 2.0, 3.0])
    single_weight = 2.0
    result = vmap_weighted(batch_x, single_weight)
    print("Batched x:", batch_x)
    print("Single weight:", single_weight)
    print("Result:", result)

    def matrix_vector_product(matrix, vector):
        return matrix @ vector

    batch_matrices = jnp.ones((4, 3, 2))
    batch_vectors = jnp.ones((4, 2))
    vmap_matmul = vmap2(matrix_vector_product, in_axes=(0, 0))
    result = vmap_matmul(batch_matrices, batch_vectors)
    print("Input shapes:", batch_matrices.shape, batch_vectors.shape)
    print("Output shape:", result.shape)
    assert capsys.readouterr().out == (
        "Input shape: (4,)\n"
        "Output: [ 1.  4.  9. 16.]\n"
        "Output shape: (4,)\n"
        "Batched x: [1. 2. 3.]\n"
        "Single weight: 2.0\n"
        "Result: [2. 4. 6.]\n"
        "Input shapes: (4, 3, 2) (4, 2)\n"
        "Output shape: (4, 3)\n"
    )
    np.testing.assert_array_equal(result, jnp.full((4, 3), 2.0))


def test_tutorial_1_2_out_axes(capsys):
    def create_vector(scalar):
        return jnp.array([scalar, scalar * 2, scalar * 3])

    vmap_default = vmap2(create_vector, in_axes=0, out_axes=0)
    result_axis0 = vmap_default(jnp.array([1.0, 2.0]))
    print("out_axes=0, shape:", result_axis0.shape)
    print(result_axis0)
    vmap_axis1 = vmap2(create_vector, in_axes=0, out_axes=1)
    result_axis1 = vmap_axis1(jnp.array([1.0, 2.0]))
    print("\nout_axes=1, shape:", result_axis1.shape)
    print(result_axis1)
    assert capsys.readouterr().out == (
        "out_axes=0, shape: (2, 3)\n"
        "[[1. 2. 3.]\n"
        " [2. 4. 6.]]\n"
        "\n"
        "out_axes=1, shape: (3, 2)\n"
        "[[1. 2.]\n"
        " [2. 4.]\n"
        " [3. 6.]]\n"
    )


def test_tutorial_1_3_axis_name(capsys):
    def normalize_batch(x):
        batch_mean = jax.lax.pmean(x, axis_name="batch")
        return x - batch_mean

    vmap_normalize = vmap2(normalize_batch, in_axes=0, axis_name="batch")
    batch_data = jnp.array([1.0, 2.0, 3.0, 4.0])
    normalized = vmap_normalize(batch_data)
    print("Input:", batch_data)
    print("Batch mean:", jnp.mean(batch_data))
    print("Normalized:", normalized)
    print("New mean:", jnp.mean(normalized))
    assert capsys.readouterr().out == (
        "Input: [1. 2. 3. 4.]\nBatch mean: 2.5\nNormalized: [-1.5 -0.5  0.5  1.5]\nNew mean: 0.0\n"
    )


def test_tutorial_1_4_axis_size(capsys):
    def generate_sequence(unused=None):
        return jnp.arange(3)

    vmap_generate = vmap2(generate_sequence, in_axes=None, axis_size=5)
    result = vmap_generate()
    print("Generated sequences:")
    print(result)
    print("Shape:", result.shape)
    assert capsys.readouterr().out == (
        "Generated sequences:\n[[0 1 2]\n [0 1 2]\n [0 1 2]\n [0 1 2]\n [0 1 2]]\nShape: (5, 3)\n"
    )


def test_tutorial_1_5_state_axes(capsys):
    class Counter(smap.nn.Module):
        def __init__(self):
            super().__init__()
            self.count = smap.ShortTermState(jnp.zeros(4))

        def __call__(self, delta):
            self.count.value = self.count.value + delta
            return self.count.value

    counter = Counter()
    vmap_counter = vmap2(
        counter,
        in_axes=0,
        out_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
    )
    deltas = jnp.array([1.0, 2.0, 3.0, 4.0])
    counts = vmap_counter(deltas)
    print("Deltas:", deltas)
    print("Counts:", counts)
    print("Final counter value:", counter.count.value)
    assert capsys.readouterr().out == (
        "Deltas: [1. 2. 3. 4.]\nCounts: [1. 2. 3. 4.]\nFinal counter value: [1. 2. 3. 4.]\n"
    )


def test_tutorial_1_6_module_states(capsys):
    class LinearLayer(smap.nn.Module):
        def __init__(self, in_features, out_features):
            super().__init__()
            self.weight = smap.ParamState(jnp.ones((in_features, out_features)))
            self.bias = smap.ParamState(jnp.zeros((out_features,)))

        def __call__(self, x):
            return x @ self.weight.value + self.bias.value

    layer = LinearLayer(3, 2)
    vmap_layer = vmap2(layer, in_axes=0, out_axes=0)
    batch_inputs = jnp.ones((4, 3))
    batch_outputs = vmap_layer(batch_inputs)
    print("Input shape:", batch_inputs.shape)
    print("Output shape:", batch_outputs.shape)
    print("Output:")
    print(batch_outputs)
    assert capsys.readouterr().out == (
        "Input shape: (4, 3)\nOutput shape: (4, 2)\nOutput:\n[[3. 3.]\n [3. 3.]\n [3. 3.]\n [3. 3.]]\n"
    )
    np.testing.assert_array_equal(layer.weight.value, jnp.ones((3, 2)))
    np.testing.assert_array_equal(layer.bias.value, jnp.zeros(2))


def test_tutorial_1_7_unexpected_out_state_mapping(capsys):
    temp_state = smap.ShortTermState(jnp.zeros(3))
    write_state = smap.LongTermState(jnp.asarray(0.0))

    def update_temp(x):
        temp_state.value = temp_state.value + x
        write_state.value = temp_state.value
        return temp_state.value

    vmap_proper = vmap2(
        update_temp,
        in_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
        unexpected_out_state_mapping="ignore",
    )
    try:
        vmap_proper(jnp.array([1.0, 2.0, 3.0]))
    except Exception as e:  # noqa: BLE001 - the tutorial prints any error; none is expected
        print(e)
    # The write state, not selected, is written back with the mapped axis at 0.
    np.testing.assert_array_equal(temp_state.value, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(write_state.value, [1.0, 2.0, 3.0])

    temp_state2 = smap.ShortTermState(jnp.array(0.0))
    write_state2 = smap.LongTermState(jnp.asarray(0.0))

    def update_temp2(x):
        temp_state2.value = temp_state2.value + x
        write_state2.value = temp_state2.value
        return temp_state2.value

    print("Before vmapping, original write state value:", write_state2.value)
    vmap_ignore = vmap2(update_temp2, in_axes=0, unexpected_out_state_mapping="ignore")
    result2 = vmap_ignore(jnp.array([1.0, 2.0, 3.0]))
    print("With 'ignore' policy:", result2)
    print("With 'ignore' policy, write state value after vmapping:", write_state2.value)
    assert capsys.readouterr().out == (
        "Before vmapping, original write state value: 0.0\n"
        "With 'ignore' policy: [1. 2. 3.]\n"
        "With 'ignore' policy, write state value after vmapping: [1. 2. 3.]\n"
    )
    np.testing.assert_array_equal(temp_state2.value, [1.0, 2.0, 3.0])


def test_tutorial_2_1_automatic_key_splitting(close):
    smap.random.seed(42)
    key_before = smap.random.DEFAULT.value

    def sample_normal(scale):
        return smap.random.normal(0.0, scale)

    scales = jnp.array([1.0, 2.0, 3.0, 4.0])
    samples = vmap2(sample_normal, in_axes=0)(scales)
    expected = lanes_reference(lambda rng, s: rng.normal(0.0, s), jax.random.split(key_before, 4), scales)
    close(samples, expected)
    assert len(set(np.asarray(samples / scales).tolist())) == 4

    smap.random.seed(123)
    key_before = smap.random.DEFAULT.value

    def sample_multiple(mean):
        sample1 = smap.random.uniform(0.0, 1.0)
        sample2 = smap.random.normal(mean, 1.0)
        return sample1 + sample2

    means = jnp.array([0.0, 1.0, 2.0])
    results = vmap2(sample_multiple, in_axes=0)(means)
    expected = lanes_reference(
        lambda rng, m: rng.uniform(0.0, 1.0) + rng.normal(m, 1.0), jax.random.split(key_before, 3), means
    )
    close(results, expected)


def test_tutorial_2_2_explicit_keys(capsys):
    def sample_with_jax_key(key, scale):
        return jax.random.normal(key, ()) * scale

    vmap_shared_key = vmap2(sample_with_jax_key, in_axes=(None, 0))
    shared_key = jax.random.PRNGKey(0)
    scales = jnp.array([1.0, 2.0, 3.0, 4.0])
    samples_shared = vmap_shared_key(shared_key, scales)
    print("Samples with shared key:", samples_shared)

    vmap_unique_keys = vmap2(sample_with_jax_key, in_axes=(0, 0))
    keys = jax.random.split(jax.random.PRNGKey(0), len(scales))
    samples_unique = vmap_unique_keys(keys, scales)
    print("Samples with unique keys:", samples_unique)
    out = capsys.readouterr().out
    assert out == (
        "Samples with shared key: [1.6226422 3.2452843 4.8679266 6.4905686]\n"
        "Samples with unique keys: [ 1.0040143 -4.8849115  3.8869078 -2.4877744]\n"
    )


def test_tutorial_2_3_dropout(close):
    class Dropout(smap.nn.Module):
        def __init__(self, rate=0.5):
            super().__init__()
            self.rate = rate

        def __call__(self, x, training=True):
            if not training:
                return x
            keep_mask = smap.random.uniform(0.0, 1.0, x.shape) > self.rate
            return jnp.where(keep_mask, x / (1 - self.rate), 0.0)

    smap.random.seed(456)
    key_before = smap.random.DEFAULT.value
    dropout = Dropout(rate=0.3)
    vmap_dropout = vmap2(lambda x: dropout(x, training=True), in_axes=0)
    batch_data = jnp.ones((4, 5))
    dropped = vmap_dropout(batch_data)
    assert dropped.shape == (4, 5)
    values = np.asarray(dropped).ravel()
    assert np.all(np.isclose(values, 0.0) | np.isclose(values, 1 / 0.7))
    masks = lanes_reference(lambda rng: rng.uniform(0.0, 1.0, (5,)) > 0.3, jax.random.split(key_before, 4))
    close(dropped, jnp.where(masks, 1 / 0.7, 0.0))
    # Different rows get different patterns (for this seed).
    assert len({tuple(row) for row in np.asarray(dropped > 0).tolist()}) > 1


def test_tutorial_3_1_inspecting(capsys):
    accumulator = smap.ShortTermState(jnp.zeros(4))

    def accumulate(x):
        accumulator.value = accumulator.value + x
        return accumulator.value

    mapped_accumulate = vmap2(
        accumulate, in_axes=0, out_axes=0, axis_size=4, state_in_axes={0: OfType(smap.ShortTermState)}
    )
    print("Type:", type(mapped_accumulate))
    print("Origin function:", mapped_accumulate.origin_fun)
    print("in_axes:", mapped_accumulate.in_axes)
    print("out_axes:", mapped_accumulate.out_axes)
    print("state_in_axes:", mapped_accumulate.state_in_axes)
    print("state_out_axes:", mapped_accumulate.state_out_axes)
    print("axis_name:", mapped_accumulate.axis_name)
    print("axis_size:", mapped_accumulate.axis_size)
    out = capsys.readouterr().out
    assert re.fullmatch(
        r"Type: <class 'smap\.transform\.StatefulMapping'>\n"
        r"Origin function: <function (\S+\.)?accumulate at 0x[0-9a-fA-F]+>\n"
        r"in_axes: 0\n"
        r"out_axes: 0\n"
        r"state_in_axes: \{0: OfType\(<class 'smap\.ShortTermState'>\)\}\n"
        r"state_out_axes: \{\}\n"
        r"axis_name: None\n"
        r"axis_size: 4\n",
        out,
    ), out
    np.testing.assert_array_equal(mapped_accumulate(jnp.arange(4.0)), jnp.arange(4.0))
    np.testing.assert_array_equal(accumulator.value, jnp.arange(4.0))


def test_tutorial_3_2_caching(capsys):
    call_count = [0]

    def counting_function(x):
        call_count[0] += 1
        return x * 2

    vmap_counting = vmap2(counting_function, in_axes=0)
    print("Before first call, count:", call_count[0])
    result1 = vmap_counting(jnp.array([1.0, 2.0, 3.0]))
    print("After first call, count:", call_count[0], "(compilation trace)")
    call_count[0] = 0
    result2 = vmap_counting(jnp.array([4.0, 5.0, 6.0]))
    print("After second call, count:", call_count[0], "(no recompilation)")
    print("\nResults:")
    print("First:", result1)
    print("Second:", result2)
    assert capsys.readouterr().out == (
        "Before first call, count: 0\n"
        "After first call, count: 1 (compilation trace)\n"
        "After second call, count: 0 (no recompilation)\n"
        "\n"
        "Results:\n"
        "First: [2. 4. 6.]\n"
        "Second: [ 8. 10. 12.]\n"
    )


def test_tutorial_3_3_state_axis_inference(capsys):
    class StatefulComputation(smap.nn.Module):
        def __init__(self):
            super().__init__()
            self.temp = smap.ShortTermState(jnp.zeros(3))
            self.param = smap.ParamState(jnp.array(1.0))

        def __call__(self, x):
            self.temp.value = self.temp.value + x
            return self.temp.value * self.param.value

    model = StatefulComputation()
    vmap_model = vmap2(
        model,
        in_axes=0,
        out_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
    )
    inputs = jnp.array([1.0, 2.0, 3.0])
    outputs = vmap_model(inputs)
    print("Inputs:", inputs)
    print("Outputs:", outputs)
    print("Final temp state:", model.temp.value)
    print("Param (unchanged):", model.param.value)
    assert capsys.readouterr().out == (
        "Inputs: [1. 2. 3.]\nOutputs: [1. 2. 3.]\nFinal temp state: [1. 2. 3.]\nParam (unchanged): 1.0\n"
    )


def test_tutorial_3_4_direct_statefulmapping(capsys):
    counter_state = smap.ShortTermState(jnp.zeros(3))

    def increment(delta):
        counter_state.value = counter_state.value + delta
        return counter_state.value

    custom_mapping = StatefulMapping(
        increment,
        in_axes=0,
        out_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
        name="custom_increment",
        mapping_fn=functools.partial(jax.vmap, spmd_axis_name=None),
    )
    deltas = jnp.array([1.0, 2.0, 3.0])
    results = custom_mapping(deltas)
    print("Custom mapping results:", results)
    print("Final counter:", counter_state.value)
    assert capsys.readouterr().out == "Custom mapping results: [1. 2. 3.]\nFinal counter: [1. 2. 3.]\n"


def test_tutorial_3_5_jaxpr(close):
    simple_state = smap.State(jnp.array(1.0))

    def simple_op(x):
        result = x + simple_state.value
        simple_state.value = result
        return result * 2

    simple_vmap = vmap2(simple_op, in_axes=0, state_out_axes={0: OfType(smap.State)})
    test_input = jnp.array([1.0, 2.0])
    out = simple_vmap(test_input)
    cache_key = simple_vmap.get_arg_cache_key(test_input)
    jaxpr = simple_vmap.get_jaxpr_by_cache(cache_key)
    text = str(jaxpr)
    assert "lambda" in text and "add" in text and "mul" in text
    close(out, jnp.array([4.0, 6.0]))
    close(simple_state.value, jnp.array([2.0, 3.0]))
    lane = jax.core.eval_jaxpr(jaxpr.jaxpr, jaxpr.consts, jnp.array(5.0), jnp.array(1.0))
    close(lane, [jnp.array(12.0), jnp.array(6.0)])


def test_tutorial_4_1_nested(capsys):
    def matrix_elem_product(x, y):
        return x * y

    vmap_rows = vmap2(matrix_elem_product, in_axes=(0, 0))
    vmap_matrix = vmap2(vmap_rows, in_axes=(0, 0))
    matrix_a = jnp.ones((3, 4))
    matrix_b = jnp.arange(12).reshape(3, 4)
    result = vmap_matrix(matrix_a, matrix_b)
    print("Matrix A shape:", matrix_a.shape)
    print("Matrix B shape:", matrix_b.shape)
    print("Result shape:", result.shape)
    print("Result:")
    print(result)
    assert capsys.readouterr().out == (
        "Matrix A shape: (3, 4)\n"
        "Matrix B shape: (3, 4)\n"
        "Result shape: (3, 4)\n"
        "Result:\n"
        "[[ 0.  1.  2.  3.]\n"
        " [ 4.  5.  6.  7.]\n"
        " [ 8.  9. 10. 11.]]\n"
    )


def test_tutorial_4_2_jit_and_grad(capsys):
    from smap.transform import grad, jit

    def loss_fn(x, target):
        pred = x**2
        return jnp.sum((pred - target) ** 2)

    batched_grad = vmap2(grad(loss_fn, argnums=0), in_axes=(0, 0))
    batched_grad_jit = jit(batched_grad)
    batch_x = jnp.array([1.0, 2.0, 3.0])
    batch_targets = jnp.array([2.0, 4.0, 6.0])
    gradients = batched_grad_jit(batch_x, batch_targets)
    print("Inputs:", batch_x)
    print("Targets:", batch_targets)
    print("Gradients:", gradients)
    assert capsys.readouterr().out == ("Inputs: [1. 2. 3.]\nTargets: [2. 4. 6.]\nGradients: [-4.  0. 36.]\n")


# -- the tutorial's examples on other inputs, against plain jax.vmap --------------


@pytest.mark.parametrize("seed", [2])
def test_tutorial_examples_on_other_inputs(seed, close):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 7))

    def f32(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    # 1.1
    xs = f32(n)
    close(vmap2(lambda x: x**2)(xs), jax.vmap(lambda x: x**2)(xs))
    w = float(rng.normal())
    close(vmap2(lambda x, w: x * w, in_axes=(0, None))(xs, w), jax.vmap(lambda x, w: x * w, in_axes=(0, None))(xs, w))
    ms, vs = f32(n, 3, 2), f32(n, 2)
    close(vmap2(lambda m, v: m @ v, in_axes=(0, 0))(ms, vs), jax.vmap(lambda m, v: m @ v)(ms, vs))

    # 1.2
    def create_vector(s):
        return jnp.array([s, s * 2, s * 3])

    for out_axes in (0, 1, -1):
        close(vmap2(create_vector, out_axes=out_axes)(xs), jax.vmap(create_vector, out_axes=out_axes)(xs))

    # 1.3
    def normalize(x):
        return x - jax.lax.pmean(x, axis_name="batch")

    close(vmap2(normalize, axis_name="batch")(xs), jax.vmap(normalize, axis_name="batch")(xs))
    close(vmap2(normalize, axis_name="batch")(xs), xs - xs.mean())

    # 1.4
    close(vmap2(lambda: jnp.arange(3), in_axes=None, axis_size=n)(), jnp.tile(jnp.arange(3), (n, 1)))

    # 1.5 / 3.3 / 3.4: a batched counter against explicit state passing
    count0 = f32(n)
    count = smap.ShortTermState(count0)
    param = smap.ParamState(jnp.array(float(rng.normal())))

    def counter(delta):
        count.value = count.value + delta
        return count.value * param.value

    deltas = f32(n)
    expected_out, expected_count = jax.vmap(lambda c, d: ((c + d) * param.value, c + d))(count0, deltas)
    out = vmap2(
        counter, state_in_axes={0: OfType(smap.ShortTermState)}, state_out_axes={0: OfType(smap.ShortTermState)}
    )(deltas)
    close(out, expected_out)
    close(count.value, expected_count)

    # 1.6
    weight, bias = smap.ParamState(f32(3, 2)), smap.ParamState(f32(2))
    batch = f32(n, 3)
    close(
        vmap2(lambda x: x @ weight.value + bias.value)(batch),
        jax.vmap(lambda x, w, b: x @ w + b, in_axes=(0, None, None))(batch, weight.value, bias.value),
    )

    # 1.7 ('ignore'): a shared scalar written per lane gets the mapped axis at 0
    temp, write = smap.ShortTermState(jnp.array(0.0)), smap.LongTermState(jnp.array(0.0))

    def update(x):
        temp.value = temp.value + x
        write.value = temp.value
        return temp.value

    close(vmap2(update)(xs), xs)
    close(temp.value, xs)
    close(write.value, xs)

    # 2.2
    key = jax.random.PRNGKey(seed)
    scales = f32(n)

    def sample(k, s):
        return jax.random.normal(k, ()) * s

    close(vmap2(sample, in_axes=(None, 0))(key, scales), jax.vmap(sample, in_axes=(None, 0))(key, scales))
    keys = jax.random.split(key, n)
    close(vmap2(sample)(keys, scales), jax.vmap(sample)(keys, scales))

    # 4.1
    a, b = f32(n, 4), f32(n, 4)
    close(vmap2(vmap2(lambda x, y: x * y))(a, b), a * b)

    # 4.2
    def loss_fn(x, t):
        return jnp.sum((x**2 - t) ** 2)

    ts = f32(n)
    close(smap.jit(vmap2(smap.grad(loss_fn, argnums=0)))(xs, ts), jax.vmap(jax.grad(loss_fn))(xs, ts))


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
    "a type and a tag": lambda h: {1: smap.filter.WithTag("h"), 0: OfType(smap.HiddenState)},
}


@pytest.mark.parametrize("name", list(SELECTED_TWICE))
@pytest.mark.parametrize("which", ["state_in_axes", "state_out_axes"])
def test_a_state_selected_at_two_axes_is_an_error_naming_it_and_both_axes(name, which):
    h = smap.HiddenState(jnp.zeros((4, 4)), tag="h")

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


# -- static_argnames and axis_size ---------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda f: smap.jit(f, static_argnames="m"),
        lambda f: StatefulMapping(f, static_argnames=("n", "m")),
    ],
)
def test_unknown_static_argnames_are_an_error_as_in_jax_jit(make):
    def f(x, n=1):
        return x * n

    with pytest.raises(ValueError, match="invalid argnames"):
        jax.jit(f, static_argnames="m")
    with pytest.raises(ValueError, match=r"f has invalid argnames \['m'\] in static_argnames.*\['x', 'n'\]"):
        make(f)
    # As in jax.jit, a function taking **kwargs accepts any name.
    g = lambda x, **kw: x * kw.get("m", 1)  # noqa: E731
    assert float(smap.jit(g, static_argnames="m")(2.0, m=3)) == float(jax.jit(g, static_argnames="m")(2.0, m=3))


def test_axis_size_0_is_accepted_as_a_size_0_mapped_argument_is(close):
    w = smap.ParamState(jnp.arange(2.0))
    out = vmap2(lambda: w.value * 2, axis_size=0)()
    assert out.shape == (0, 2)
    close(out, jax.vmap(lambda: jnp.arange(2.0) * 2, axis_size=0)())
    out = vmap2(lambda x: x + w.value, in_axes=None, axis_size=0)(jnp.ones(2))
    assert out.shape == (0, 2)
    assert vmap2(lambda x: x + 1)(jnp.ones((0, 2))).shape == (0, 2)
    with pytest.raises(ValueError, match="axis_size must be a non-negative int, got -1"):
        vmap2(lambda x: x, axis_size=-1)
