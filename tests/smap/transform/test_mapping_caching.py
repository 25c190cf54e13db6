"""Tests of a mapping's dispatch and caching.

Static arguments, one trace per signature, cache keys, and failed calls
that keep every state.

Every result is checked against an independent reference: the same
computation written with plain ``jax.vmap`` and explicit state passing, or
values worked out by hand.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mapping_helpers import assert_unchanged, rand, snapshot

import smap
from smap.filter import OfType
from smap.transform import StatefulMapping, vmap2

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
