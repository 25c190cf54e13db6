"""The lane plan: how a per-lane program runs over the lanes, as one value.

A mapping's trace records how each input enters the lanes (:class:`LaneInputs`);
:func:`plan`, a pure function of the program and those findings, gives each
input its mapped axis and each output where its mapped axis goes
(:class:`LanePlan`). Nothing else decides how a value crosses the lanes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
from jax.extend.core import ClosedJaxpr

from .._state import State
from .._tracing import Program, leaf_names
from ._axes import AxisSpec, StateAxes, leaf_axes, resolve_axis, select_axis
from ._lanes import lane_dependent

__all__ = ["LaneInputs", "LanePlan", "Lanes", "plan", "BatchAxisError"]


class BatchAxisError(ValueError):
    """A state's mapped axis is not what the mapping was told it would be."""


BatchAxisError.__module__ = "smap"


@dataclasses.dataclass(frozen=True)
class LaneInputs:
    """What the trace of a mapping found out about its inputs.

    Attributes:
        arg_axes: for each array leaf of the arguments, its mapped axis, or
            None when every lane sees the whole leaf.
        state_axes: for each state that ``state_in_axes`` batches, the mapped
            axis of each of its leaves. Other states are shared.
        own_lanes: the states whose type gives each lane its own value
            (:meth:`smap.State.lane_values`), such as a random key.
        axis_size: the number of lanes, or None when nothing gave it.
        lane_shaped: the shared states that ``state_out_axes`` selects and
            the lanes wrote with a lane's slice of their value: the selected
            axis and the state's sizes along it.
    """

    arg_axes: tuple[int | None, ...]
    state_axes: Mapping[State, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    own_lanes: frozenset[State] = frozenset()
    axis_size: int | None = None
    lane_shaped: Mapping[State, tuple[int, frozenset[int]]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class LanePlan:
    """How a per-lane program (its inputs and outputs as :class:`~smap._tracing.Program` orders them) runs.

    Attributes:
        in_axes: for each input leaf, its mapped axis, or None when shared.
        out_axes: for each output leaf, where its mapped axis goes, or None
            when it is the same in every lane and is returned once.
        axis_name: the name collectives use, or None.
        axis_size: the number of lanes.
        own_lanes: indices in ``program.states`` of the states whose type
            gives each lane its own value (they enter along axis 0).
        take_next: indices in ``program.states`` of the written states that
            take their type's next value after the call, because the lanes
            wrote them with per-lane values.
        unexpected_writes: indices in ``program.states`` of shared states
            that the lanes write with per-lane values although
            ``state_out_axes`` does not select them; they are written back
            with the mapped axis at 0.
    """

    in_axes: tuple[int | None, ...]
    out_axes: tuple[int | None, ...]
    axis_name: Hashable | None
    axis_size: int
    own_lanes: tuple[int, ...] = ()
    take_next: tuple[int, ...] = ()
    unexpected_writes: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class Lanes:
    """One lane's program and the plan that maps it: what a mapping hands a device mapping.

    Attributes:
        program: one lane's traced program; its inputs and outputs are the
            ones ``plan`` maps.
        plan: how the program runs over the lanes.
        run: the program with its sharding annotations laid out where the
            lane runs (see ``smap._annotations``); None to evaluate it as traced.
        fused: the lane's fused form (sums over the lanes of per-lane
            products written as one product, see ``smap.transform._fuse``),
            which a lane runs when there is one; None when nothing was fused.
    """

    program: ClosedJaxpr
    plan: LanePlan
    run: Callable[..., list] | None = None
    fused: Callable[..., list] | None = None

    def __call__(self, *leaves: Any) -> list:
        """One lane: the program's outputs from its input leaves."""
        if self.fused is not None:
            return self.fused(*leaves)
        if self.run is not None:
            return self.run(*leaves)
        return jax.core.eval_jaxpr(self.program.jaxpr, self.program.consts, *leaves)

    def unfused(self) -> Lanes:
        """These lanes with their sums over the lanes computed lane by lane, as traced.

        Where a device holds one lane, a fused sum contracts that lane's
        product alone: the same product as the traced one (the lane's, then
        the collective over devices), in the form XLA's own programs take.
        """
        return self if self.fused is None else dataclasses.replace(self, fused=None)

    @functools.cached_property
    def jaxpr(self) -> ClosedJaxpr:
        """What one lane runs, as a jaxpr: the program, or its fused form or ``run`` traced once (for rewrites)."""
        if self.fused is None and self.run is None:
            return self.program
        axis_env = [] if self.plan.axis_name is None else [(self.plan.axis_name, self.plan.axis_size)]
        return jax.make_jaxpr(self, axis_env=axis_env)(*self.program.in_avals)


def plan(
    program: Program,
    inputs: LaneInputs,
    *,
    out_axes: AxisSpec = 0,
    state_out_axes: StateAxes | None = None,
    axis_name: Hashable | None = None,
    name: str = "smap.vmap",
) -> LanePlan:
    """The plan that runs ``program`` over the lanes, from what its trace found.

    An output takes the axis ``out_axes`` (as in ``jax.vmap``) gives it; a
    written state keeps the axis it was batched along, takes the axis
    ``state_out_axes`` (``{axis: Filter}``) gives it when the lanes write it
    with per-lane values, and is written back as it is when they write a
    value that does not depend on the lane. ``name`` names the mapping in errors.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> from smap._tracing import trace_program, TraceContext
        >>> from smap.transform._plan import LaneInputs, plan
        >>> total = smap.State(jnp.zeros(()))
        >>> def f(x):
        ...     total.value = total.value + 1.0
        ...     return x * total.value
        >>> program = trace_program(f, (jnp.ones(()),), {}, make_input=TraceContext().make_input, name="f")
        >>> plan(program, LaneInputs(arg_axes=(0,), axis_size=3))
        LanePlan(in_axes=(0, None), out_axes=(0, None), axis_name=None, axis_size=3, own_lanes=(), \
take_next=(), unexpected_writes=())
    """
    if inputs.axis_size is None:
        raise ValueError(f"{name}: axis_size is required when no argument is mapped and no state is batched.")
    in_axes = list(inputs.arg_axes)
    for state, tree in zip(program.states, program.state_trees):
        n = tree.num_leaves
        in_axes.extend([0] * n if state in inputs.own_lanes else inputs.state_axes.get(state, (None,) * n))
    dependent = lane_dependent(program.jaxpr.jaxpr, [a is not None for a in in_axes], axis_name)
    outputs = _output_axes(program, dependent[: program.n_outs], out_axes, name)
    written, take_next, unexpected = _written_axes(program, inputs, dependent[program.n_outs :], state_out_axes, name)
    return LanePlan(
        in_axes=tuple(in_axes),
        out_axes=tuple(outputs + written),
        axis_name=axis_name,
        axis_size=inputs.axis_size,
        own_lanes=tuple(i for i, state in enumerate(program.states) if state in inputs.own_lanes),
        take_next=take_next,
        unexpected_writes=unexpected,
    )


def _output_axes(program: Program, dependent: list[bool], out_axes: AxisSpec, name: str) -> list[int | None]:
    avals = program.jaxpr.out_avals[: program.n_outs]
    outs = jax.tree_util.tree_unflatten(program.out_tree, avals)
    resolved: list[int | None] = []
    for axis, aval, dep, leaf in zip(
        leaf_axes(out_axes, outs, f"{name}: out_axes"), avals, dependent, leaf_names(outs, "output")
    ):
        if axis is None and dep:
            raise ValueError(f"{name}: out_axes is None for {leaf}, but it differs between lanes; give it an axis.")
        resolved.append(None if axis is None else resolve_axis(axis, aval.ndim + 1, f"{name}: out_axes for {leaf}"))
    return resolved


def _written_axes(
    program: Program, inputs: LaneInputs, dependent: list[bool], state_out_axes: StateAxes | None, name: str
) -> tuple[list[int | None], tuple[int, ...], tuple[int, ...]]:
    """The written states' out axes, the states that take their next value, the unexpected per-lane writes."""
    axes: list[int | None] = []
    take_next: list[int] = []
    unexpected: list[int] = []
    avals_per_state = program.per_state(program.jaxpr.out_avals[program.n_outs :], program.written)
    for i, avals, deps in zip(program.written, avals_per_state, program.per_state(dependent, program.written)):
        state, per_lane = program.states[i], any(deps)
        in_axes = inputs.state_axes.get(state)
        selected, out_axis = select_axis(state_out_axes or {}, state.path, state, "state_out_axes")
        if state in inputs.own_lanes:
            if per_lane:
                take_next.append(i)
            axes.extend([0 if per_lane else None] * len(avals))
        elif in_axes is not None:
            if (
                selected
                and out_axis is not None
                and any(
                    not -a.ndim - 1 <= out_axis <= a.ndim or out_axis % (a.ndim + 1) != ax
                    for a, ax in zip(avals, in_axes)
                )
            ):
                raise BatchAxisError(
                    f"{name}: {state.describe()} is mapped along axis {in_axes[0]} by state_in_axes "
                    f"but along axis {out_axis} by state_out_axes; a state keeps one mapped axis."
                )
            axes.extend(in_axes)
        elif state in inputs.lane_shaped or per_lane:
            if state in inputs.lane_shaped:  # written with a lane's slice: it needs one slice per lane
                axis, sizes = inputs.lane_shaped[state]
                if not per_lane or sizes != {inputs.axis_size}:
                    got = "the same value in every lane" if not per_lane else f"{inputs.axis_size} lanes"
                    raise ValueError(
                        f"{name}: {state.describe()} is written with a slice of its value along axis {axis} "
                        f"(state_out_axes), so it needs one slice per lane and {sorted(sizes)[0]} lanes, got {got}."
                    )
            elif state.fixed_shape:
                raise BatchAxisError(
                    f"{name}: {state.describe()} is shared by the lanes but written with a per-lane value, and a "
                    f"jax.Ref cannot gain the mapped axis; select it in state_in_axes or, passed as an argument, "
                    f"give it an axis in in_axes (one slice per lane), or write a value that is the same in every "
                    f"lane (a pmean over axis_name)."
                )
            if not (selected and out_axis is not None):
                unexpected.append(i)
                out_axis = 0
            where = f"{name}: state_out_axes for {state.describe()}"
            axes.extend(resolve_axis(out_axis, a.ndim + 1, where) for a in avals)
        else:
            axes.extend([None] * len(avals))
    return axes, tuple(take_next), tuple(unexpected)
