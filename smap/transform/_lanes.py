"""Which values of a per-lane program differ between lanes.

A mapping transform writes a state back with the mapped axis only when the
value written depends on the lane. The answer must not depend on how the
lanes are executed, so it is read off the traced program itself: a value is
lane-dependent when it is computed from a lane-dependent input, from the
lane's index, or from a collective that hands each lane its own part;
reductions over the mapped axis (``psum``, ``pmax``, ``pmin``,
``all_gather``) give every lane the same value.

The analysis is the interpreter's (``smap._interpret.analyse``, which
follows JAX's own batching rules for control flow and calls) with one rule,
for the collectives (the table of primitives is ``smap._compat.PRIMITIVES``);
it is conservative elsewhere: it may call a value lane-dependent that JAX
would not, which only costs a broadcast, never a wrong result.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from jax.extend.core import Jaxpr

from .. import _compat, _interpret
from .._compat import Kind

__all__ = ["lane_dependent", "lanes_rule"]

_SAME_ON_EVERY_LANE = (Kind.REDUCTION, Kind.GATHER)


def lane_dependent(jaxpr: Jaxpr, inputs: Sequence[bool], axis_name: Hashable | None) -> list[bool]:
    """For each output of ``jaxpr``, whether it depends on the lane.

    Arguments:
        jaxpr: the per-lane program (constvars count as lane-independent).
        inputs: for each input, whether it differs between lanes.
        axis_name: the mapped axis name that collectives may use, or None.
    """
    return _interpret.analyse(jaxpr, inputs, lanes_rule(axis_name))


def lanes_rule(axis_name: Hashable | None) -> _interpret.FactRule:
    """The lanes analysis' rule: a collective over ``axis_name`` decides whether its outputs
    depend on the lane; a program the interpreter does not follow does when it communicates."""

    def rule(eqn: Any, ins: list[bool]) -> list[bool] | None:
        if axis_name is not None and _compat.names_axis(eqn, axis_name):
            return [_compat.kind(eqn) not in _SAME_ON_EVERY_LANE] * len(eqn.outvars)
        if axis_name is not None and _interpret.opaque(eqn) and _interpret.uses_axis(eqn, axis_name):
            return [True] * len(eqn.outvars)
        return None

    return rule
