"""Tests of ``smap.transform._plan.plan``: lane plans of small programs, worked out by hand.

Each test traces a per-lane program the way a mapping does (a batched state
enters with its mapped axis removed) and checks every field of the plan.
"""

import jax
import jax.numpy as jnp
import pytest

import smap
from smap._tracing import abstract, trace_program
from smap.filter import OfType
from smap.transform import BatchAxisError
from smap.transform._axes import normalise_state_axes
from smap.transform._plan import LaneInputs, LanePlan, plan


def trace(f, *args, batched=None):
    """The per-lane program of ``f``: ``batched`` maps a state to the axis its value is batched along."""
    batched = batched or {}

    def make_input(state, value):
        aval = abstract(value)
        if state in batched:
            axis = batched[state]
            return aval.update(shape=aval.shape[:axis] + aval.shape[axis + 1 :])
        return aval

    return trace_program(f, args, {}, make_input=make_input, name="f")


def test_mapped_argument_and_shared_state_written_with_a_lane_independent_value():
    total = smap.State(jnp.zeros(()))

    def f(x, w):
        total.value = total.value + 1.0
        return x * w

    program = trace(f, jnp.ones(()), jnp.ones(()))
    assert plan(program, LaneInputs(arg_axes=(0, None), axis_size=4)) == LanePlan(
        in_axes=(0, None, None), out_axes=(0, None), axis_name=None, axis_size=4
    )


def test_batched_state_keeps_its_axis_and_outputs_resolve_negative_axes():
    h = smap.HiddenState(jnp.zeros((2, 5)))

    def f(x):
        h.value = h.value + x
        return h.value, x.sum()

    program = trace(f, jnp.ones(2), batched={h: 1})
    inputs = LaneInputs(arg_axes=(0,), state_axes={h: (1,)}, axis_size=5)
    assert plan(program, inputs, out_axes=(-1, 0)) == LanePlan(
        in_axes=(0, 1), out_axes=(1, 0, 1), axis_name=None, axis_size=5
    )


def test_shared_state_written_per_lane_follows_state_out_axes_or_is_reported():
    stats = smap.LongTermState(jnp.zeros(3))
    other = smap.ShortTermState(jnp.zeros(3))

    def f(x):
        stats.value = stats.value + x
        other.value = other.value * x
        return x

    program = trace(f, jnp.ones(3))
    inputs = LaneInputs(arg_axes=(0,), axis_size=2)
    selected = plan(program, inputs, state_out_axes=normalise_state_axes({1: OfType(smap.LongTermState)}, "s"))
    # stats is selected at axis 1; other is not selected: axis 0 and reported.
    assert selected == LanePlan(
        in_axes=(0, None, None), out_axes=(0, 1, 0), axis_name=None, axis_size=2, unexpected_writes=(1,)
    )
    assert plan(program, inputs).unexpected_writes == (0, 1)


def test_a_reduction_over_the_axis_name_is_written_back_as_it_is():
    mean = smap.State(jnp.zeros(()))

    def f(x):
        mean.value = jax.lax.pmean(x, "i")
        return x - mean.value

    program = trace_program(f, (jnp.ones(()),), {}, make_input=lambda s, v: abstract(v), name="f", axis_env=[("i", 3)])
    result = plan(program, LaneInputs(arg_axes=(0,), axis_size=3), axis_name="i")
    assert result == LanePlan(in_axes=(0, None), out_axes=(0, None), axis_name="i", axis_size=3)


def test_a_state_with_its_own_lanes_takes_its_next_value_when_written_per_lane():
    rng = smap.random.RandomState(0)
    unread = smap.random.RandomState(1)

    def f(x):
        _ = unread.value  # read, not written: its key does not advance
        return x + rng.normal()

    program = trace(f, jnp.ones(()))
    inputs = LaneInputs(arg_axes=(0,), own_lanes=frozenset({rng, unread}), axis_size=4)
    assert program.states == (unread, rng)
    assert plan(program, inputs) == LanePlan(
        in_axes=(0, 0, 0), out_axes=(0, 0), axis_name=None, axis_size=4, own_lanes=(0, 1), take_next=(1,)
    )


def test_errors_name_what_is_wrong():
    h = smap.HiddenState(jnp.zeros((4, 2)))

    def f(x):
        h.value = h.value + x
        return x

    program = trace(f, jnp.ones(2), batched={h: 0})
    with pytest.raises(ValueError, match="axis_size is required"):
        plan(program, LaneInputs(arg_axes=(None,)))
    with pytest.raises(ValueError, match=r"out_axes is None for output, but it differs between lanes"):
        plan(program, LaneInputs(arg_axes=(0,), state_axes={h: (0,)}, axis_size=4), out_axes=None)
    with pytest.raises(BatchAxisError, match="mapped along axis 0 by state_in_axes but along axis 1"):
        plan(
            program,
            LaneInputs(arg_axes=(None,), state_axes={h: (0,)}, axis_size=4),
            state_out_axes=normalise_state_axes({1: smap.HiddenState}, "state_out_axes"),
        )


def test_plan_prints_its_fields():
    text = repr(LanePlan(in_axes=(0, None), out_axes=(0,), axis_name="i", axis_size=2, own_lanes=(1,)))
    assert text == (
        "LanePlan(in_axes=(0, None), out_axes=(0,), axis_name='i', axis_size=2, own_lanes=(1,), "
        "take_next=(), unexpected_writes=())"
    )
