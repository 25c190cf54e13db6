"""Tests of how ``StatefulMapping`` maps arguments and outputs.

``in_axes``, ``out_axes``, ``axis_size``, ``axis_name`` and collectives.

Every result is checked against an independent reference: the same
computation written with plain ``jax.vmap`` and explicit state passing, or
values worked out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mapping_helpers import assert_unchanged, rand, snapshot

import smap
from smap.transform import vmap2

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
