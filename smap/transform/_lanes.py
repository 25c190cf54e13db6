"""Which values of a per-lane program differ between lanes.

A mapping writes a state back with the mapped axis only when the value
written depends on the lane, and the answer must not depend on how the lanes
run: it is read off the program. A value depends on the lane when it is
computed from a lane-dependent input, the lane's index, or a collective that
hands each lane its own part; a reduction over the mapped axis (``psum``,
``all_gather``, ...) gives every lane the same value. The analysis is the
interpreter's, with one rule for the collectives; elsewhere it may call a
value lane-dependent that JAX would not, which only costs a broadcast.
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
    """For each output of ``jaxpr``, whether it depends on the lane, from which ``inputs`` do
    (constvars do not) and the mapped axis that collectives may name (or None)."""
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
