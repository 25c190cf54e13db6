"""Tests of ``smap._dispatch``: the core every transform shares.

The hooks a transform implements (``_trace_context``, ``_runner``,
``_call_result``, ``_trace``), the retry when a trace finds states the
dispatcher was not given, the cache of programs, and the write-back after a
call has succeeded. Results are checked against the same computation with
explicit state passing, or values worked out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap
from smap._dispatch import _UNLOCKED, ArgSignature, StatefulFunction
from smap._tracing import Program, TraceContext, hide_arguments
from smap.transform._jit import JittedFunction


class Doubling(StatefulFunction):
    """A minimal transform through the hooks only: runs the program, returns its outputs doubled."""

    def __init__(self, fun):
        super().__init__(fun, name="doubling")
        self.runners = 0

    def _runner(self, program: Program, key: ArgSignature, context: TraceContext):
        self.runners += 1

        def run(arg_leaves, state_values):
            leaves = [*arg_leaves, *(x for v in state_values for x in jax.tree_util.tree_leaves(v))]
            outs = program(*leaves)
            written = program.unflatten_written(outs[program.n_outs :])
            return jax.tree_util.tree_unflatten(program.out_tree, outs[: program.n_outs]), written

        return run

    _call_result = staticmethod(lambda out: jax.tree_util.tree_map(lambda x: 2 * x, out))


def test_a_transform_made_of_the_hooks_writes_states_and_shapes_its_result(close):
    total = smap.State(jnp.zeros(2))
    calls = []

    def f(x):
        calls.append(1)
        total.value = total.value + x
        return {"sum": total.value.sum()}

    g = Doubling(f)
    expected_total = np.zeros(2)
    for x in (jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0])):
        expected_total = expected_total + np.asarray(x)
        out = g(x)
        close(out, {"sum": 2 * expected_total.sum()})
        close(total.value, expected_total)
    # One trace of the Python function and one runner for the signature, whatever the number of calls.
    assert len(calls) == 1 and g.runners == 1


def test_states_found_by_the_first_trace_are_added_and_the_call_retried_without_tracing_again(close):
    a, b = smap.State(jnp.ones(())), smap.State(jnp.full((), 2.0))
    calls = []

    def f(x):
        calls.append(1)
        a.value = a.value * x
        return a.value + b.value

    g = smap.jit(f)
    assert g._state_list.states == ()
    close(g(jnp.asarray(3.0)), 3.0 + 2.0)
    # The dispatcher's first trace stopped at the unknown states; the retry took them as inputs
    # and reused the program traced the first time (the function ran once).
    assert len(calls) == 1
    assert set(map(id, g._state_list.states)) == {id(a), id(b)}
    close(a.value, 3.0)
    close(g(jnp.asarray(2.0)), 6.0 + 2.0)
    assert len(calls) == 1


def test_a_state_touched_only_by_a_new_signature_joins_the_list_and_earlier_states_stay():
    a, b = smap.State(jnp.zeros(())), smap.State(jnp.zeros(3))

    def f(x):
        if x.ndim == 0:
            a.value = a.value + x
        else:
            b.value = b.value + x
        return x

    g = smap.jit(f)
    g(jnp.asarray(1.0))
    g(jnp.ones(3))
    g(jnp.asarray(2.0))
    assert [id(s) for s in g._state_list.states] == [id(a), id(b)]
    np.testing.assert_array_equal(a.value, 3.0)
    np.testing.assert_array_equal(b.value, np.ones(3))


def test_a_cached_call_does_not_trace_the_dispatcher_again():
    s = smap.State(jnp.zeros(()))
    traces = []

    class Counting(JittedFunction):
        def _dispatch_trace(self, *args, **kwargs):
            traces.append(1)
            return super()._dispatch_trace(*args, **kwargs)

    g = Counting(lambda x: s.value + x)
    for i in range(3):
        np.testing.assert_array_equal(g(jnp.asarray(float(i))), float(i))
    assert len(traces) == 2  # the first trace (a new state found) and its retry; then JAX's cache


def test_a_call_whose_state_changed_shape_traces_a_new_program(close):
    s = smap.State(jnp.zeros(2))
    calls = []

    def f(x):
        calls.append(1)
        s.value = s.value + x
        return s.value.sum()

    g = smap.jit(f)
    close(g(jnp.asarray(1.0)), 2.0)
    s.reset(jnp.zeros(3))
    close(g(jnp.asarray(1.0)), 3.0)
    assert len(calls) == 2
    key = g.get_arg_cache_key(jnp.asarray(1.0))
    assert g.get_jaxpr_by_cache(key).in_avals[-1].shape == (3,)


def test_a_failed_call_writes_nothing_back():
    s, t = smap.State(jnp.ones(2)), smap.State(jnp.zeros(()))

    def f(x):
        s.value = s.value * 10
        t.value = t.value + 1
        return s.value @ x  # a (2,) @ (3,) mismatch: the trace fails after the writes

    with pytest.raises(TypeError, match="dot_general"):
        smap.jit(f)(jnp.ones(3))
    np.testing.assert_array_equal(s.value, np.ones(2))
    np.testing.assert_array_equal(t.value, 0.0)


def test_a_call_inside_another_transform_writes_through_the_outer_one(close):
    inner_state = smap.State(jnp.zeros(()))
    inner = smap.jit(lambda x: setattr(inner_state, "value", inner_state.value + x) or inner_state.value)
    outer = smap.jit(lambda x: inner(x) + inner(2 * x))
    close(outer(jnp.asarray(1.0)), 1.0 + 3.0)
    close(inner_state.value, 3.0)
    # The inner call runs without a lock of its own: its caller holds the states' lock.
    assert [lst.group for lst in inner._nested_lists.values()] == [_UNLOCKED]


def test_cache_key_errors_name_the_function():
    g = smap.jit(lambda x: x)
    with pytest.raises(TypeError, match="get_jaxpr_by_cache takes a key from get_arg_cache_key"):
        g.get_jaxpr_by_cache(("not", "a key"))
    with pytest.raises(KeyError, match="no program is cached under this key"):
        g.get_jaxpr_by_cache(g.get_arg_cache_key(jnp.ones(2)))


def test_a_state_first_written_by_a_later_signature_gets_a_slot_and_earlier_signatures_still_run():
    s = smap.State(jnp.zeros(()))

    def f(x):
        if x.ndim == 0:
            return s.value + x  # reads s only
        s.value = s.value + x.sum()  # writes it
        return x

    g = smap.jit(f)
    np.testing.assert_array_equal(g(jnp.asarray(1.0)), 1.0)
    assert g._state_list.writes == ()
    g(jnp.ones(3))
    assert g._state_list.writes == (s,)
    np.testing.assert_array_equal(s.value, 3.0)
    # The reading signature, on the new list: its slot for s is empty, and s keeps the value written above.
    np.testing.assert_array_equal(g(jnp.asarray(1.0)), 4.0)
    np.testing.assert_array_equal(s.value, 3.0)
    g(jnp.full(2, 0.5))
    np.testing.assert_array_equal(s.value, 4.0)


def test_written_values_that_are_not_one_array_come_back_whole():
    tree = smap.State({"a": jnp.zeros(2), "b": (jnp.ones(()),)})
    hidden = smap.HiddenState(jnp.ones(3))  # reset to None by the call: None is a value, not "not written"
    empty = smap.HiddenState(None)  # and the other way round

    @smap.jit
    def f(x):
        tree.value = {"a": tree.value["a"] + x, "b": (tree.value["b"][0] * 2,)}
        hidden.reset(None)
        empty.reset(x)

    for i in range(1, 3):
        hidden.reset(jnp.ones(3))
        empty.reset(None)
        f(jnp.full(2, 1.0))
        np.testing.assert_array_equal(tree.value["a"], np.full(2, float(i)))
        np.testing.assert_array_equal(tree.value["b"][0], 2.0**i)
        assert hidden.value is None
        np.testing.assert_array_equal(empty.value, np.ones(2))


def test_a_call_that_finds_its_token_taken_writes_back_values_that_are_not_one_array_whole(close):
    """A host callback calls a transform of its caller's lock group: that call finds the token taken and
    runs inside the caller (StatefulFunction._waited), writing back a state that holds a dict whole."""
    total = smap.State(jnp.zeros(()))
    log = smap.State({"sum": jnp.zeros(()), "n": jnp.zeros((), jnp.int32)})
    record = smap.jit(lambda v: setattr(log, "value", {"sum": log.value["sum"] + v, "n": log.value["n"] + 1}))
    record(jnp.zeros(()))  # written out before the callbacks, so only their path is left
    log.value = {"sum": jnp.zeros(()), "n": jnp.zeros((), jnp.int32)}
    waited = []
    record._waited = lambda *arguments: waited.append(1) or StatefulFunction._waited(record, *arguments)

    @smap.jit
    def step(x):
        total.value = total.value + x + 0.0 * log.value["sum"]  # reads log: one lock group for both states
        jax.debug.callback(record, total.value)
        return total.value

    for _ in range(3):
        jax.block_until_ready(step(jnp.ones(())))
    assert len(waited) >= 1
    close(total.value, 3.0)
    close(log.value["sum"], 1.0 + 2.0 + 3.0)
    assert int(log.value["n"]) == 3


def test_a_call_after_its_states_lock_group_was_merged_takes_the_merged_lock(close):
    shared, own = smap.State(jnp.zeros(())), smap.State(jnp.zeros(()))
    a = smap.jit(lambda x: setattr(shared, "value", shared.value + x))
    a(jnp.asarray(1.0))
    group_before = a._state_list.group
    b = smap.jit(lambda x: setattr(own, "value", own.value + shared.value + x))
    b(jnp.asarray(2.0))  # joins own's group and shared's: one of them is merged into the other
    a(jnp.asarray(1.0))
    a(jnp.asarray(1.0))
    assert a._state_list.group.merged_into is None
    assert a._state_list.group is b._state_list.group.current()
    assert group_before.current() is a._state_list.group
    close(shared.value, 3.0)
    close(own.value, 1.0 + 2.0)


def test_calls_shaped_unlike_the_first_give_what_explicit_state_passing_gives(close):
    """The call is written out for the first call's positional arguments; every other shape goes the general way."""
    s = smap.State(jnp.zeros(()))

    def f(x=0.0, y=1.0, *more):
        s.value = s.value + sum(jnp.sum(leaf) for leaf in jax.tree_util.tree_leaves(x)) * y + sum(more)
        return s.value

    g = smap.jit(f)
    one = jnp.asarray(1.0)
    calls = [  # (args, kwargs, what the call adds, worked out by hand)
        ((one,), {}, 1.0),
        ((one, 2.0), {}, 2.0),
        ((jnp.asarray(2.0),), {"y": 3.0}, 6.0),
        ((), {"x": 4.0}, 4.0),
        ((), {}, 0.0),
        ((one, 1.0, 5.0, 6.0), {}, 12.0),
        (((jnp.ones(2), np.ones(3)),), {}, 5.0),  # a tuple: not a plain type
        ((np.full((), 3.0),), {}, 3.0),  # a NumPy array and a Python float are plain
        ((0.5,), {}, 0.5),
    ]
    expected = 0.0
    for args, kwargs, added in calls:
        expected += added
        close(g(*args, **kwargs), expected)
        close(s.value, expected)
    assert g.__call__.__name__ == "call"  # written out for one positional argument, and kept
    stateless = smap.jit(lambda x, y=2.0: x * y)
    close(stateless(3.0), 6.0)
    close(stateless(3.0, y=3.0), 9.0)
    close(stateless(jnp.asarray(3.0), 4.0), 12.0)


def test_a_call_with_concrete_arguments_inside_another_transform_writes_through_it(close):
    inner_state = smap.State(jnp.zeros(()))

    @smap.jit
    def inner(x):
        inner_state.value = inner_state.value + x
        return inner_state.value

    close(inner(1.0), 1.0)  # the call written out for one positional argument
    outer = smap.jit(lambda x: inner(2.0) + x)  # a Python float: the written-out call sees the trace
    close(outer(jnp.asarray(10.0)), 13.0)
    close(outer(jnp.asarray(10.0)), 15.0)
    close(inner_state.value, 5.0)


def test_a_module_where_the_first_call_had_one_goes_the_written_out_way_and_every_other_argument_the_general(
    close, monkeypatch
):
    """A Module argument is held on the written-out path (no search of the arguments) while its layout holds;
    another Module, a changed layout, an array there or a keyword goes the general way, with the same values."""
    from smap import _dispatch

    searched = []
    monkeypatch.setattr(_dispatch, "hide_arguments", lambda *a: searched.append(1) or hide_arguments(*a))

    class Scale(smap.nn.Module):
        def __init__(self, k):
            self.k = k
            self.total = smap.State(jnp.zeros(()))

    @smap.jit
    def step(m, x):
        m.total.value = m.total.value + m.k * x
        return m.total.value

    a, b, x = Scale(2.0), Scale(3.0), jnp.asarray(1.0)
    close(step(a, x), 2.0)  # the first call, then written out for (Module, plain)
    searched.clear()
    for expected in (4.0, 6.0, 8.0):
        close(step(a, x), expected)
    assert not searched  # the written-out path: no search of the arguments
    close(step(b, x), 3.0)  # another Module: its own program and states
    a.k = 10.0  # a new layout: the function traced again, as jax.jit's static argument
    close(step(a, x), 18.0)
    close(step(a, x=x), 28.0)  # a keyword: the general way
    assert searched
    searched.clear()
    close(step(a, x), 38.0)
    close(step(b, x), 6.0)
    assert not searched
    with pytest.raises(AttributeError, match="total"):
        step(x, x)  # an array where the Module was: the general way, and the function's own error
    close(a.total.value, 38.0)
    close(b.total.value, 6.0)
