"""Which values of a per-lane program differ between lanes.

A mapping transform writes a state back with the mapped axis only when the
value written depends on the lane. The answer must not depend on how the
lanes are executed, so it is read off the traced program itself: a value is
lane-dependent when it is computed from a lane-dependent input, from the
lane's index, or from a collective that hands each lane its own part;
reductions over the mapped axis (``psum``, ``pmax``, ``pmin``,
``all_gather``) give every lane the same value.

The analysis follows JAX's own batching rules for control flow and calls
(``scan``, ``while``, ``cond``, ``jit``, ``custom_jvp``, ...; the table of
primitives is ``smap._compat.PRIMITIVES``) and is conservative elsewhere: it
may call a value lane-dependent that JAX would not, which only costs a
broadcast, never a wrong result.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from jax.extend.core import Jaxpr, Literal

from .. import _compat
from .._compat import Kind, open_jaxpr

__all__ = ["lane_dependent"]

_SAME_ON_EVERY_LANE = (Kind.REDUCTION, Kind.GATHER)


def lane_dependent(jaxpr: Jaxpr, inputs: Sequence[bool], axis_name: Hashable | None) -> list[bool]:
    """For each output of ``jaxpr``, whether it depends on the lane.

    Arguments:
        jaxpr: the per-lane program (constvars count as lane-independent).
        inputs: for each input, whether it differs between lanes.
        axis_name: the mapped axis name that collectives may use, or None.
    """
    dependent: dict[Any, bool] = {v: bool(d) for v, d in zip(jaxpr.invars, inputs)}

    def get(v: Any) -> bool:
        return False if isinstance(v, Literal) else dependent.get(v, False)

    for eqn in jaxpr.eqns:
        ins = [get(v) for v in eqn.invars]
        outs = _equation(eqn, ins, axis_name)
        for v, d in zip(eqn.outvars, outs):
            dependent[v] = d
    return [get(v) for v in jaxpr.outvars]


def _equation(eqn: Any, ins: list[bool], axis_name: Hashable | None) -> list[bool]:
    kind, n_out = _compat.kind(eqn), len(eqn.outvars)
    if axis_name is not None and _compat.names_axis(eqn, axis_name):
        return [kind not in _SAME_ON_EVERY_LANE] * n_out
    if kind is Kind.SCAN:
        return _scan(eqn, ins, axis_name)
    if kind is Kind.WHILE:
        return _while(eqn, ins, axis_name)
    if kind is Kind.COND:
        return _cond(eqn, ins, axis_name)
    # A call, or an unknown primitive that runs one program on its inputs: follow the program.
    subs = [_compat.call_body(eqn)] if kind is Kind.CALL else list(_compat.jaxprs_in_params(eqn.params))
    if len(subs) == 1:
        sub = open_jaxpr(subs[0])
        if len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
            return lane_dependent(sub, ins, axis_name)
    if any(ins) or (axis_name is not None and any(_compat.mentions_axis(s, axis_name) for s in subs)):
        return [True] * n_out
    return [False] * n_out


def _scan(eqn: Any, ins: list[bool], axis_name: Hashable | None) -> list[bool]:
    body, n_consts, n_carry = _compat.scan_parts(eqn)
    body = open_jaxpr(body)
    consts, carry, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[n_consts + n_carry :]
    while True:
        outs = lane_dependent(body, consts + carry + xs, axis_name)
        new_carry = [a or b for a, b in zip(carry, outs[:n_carry])]
        if new_carry == carry:
            return carry + outs[n_carry:]
        carry = new_carry


def _while(eqn: Any, ins: list[bool], axis_name: Hashable | None) -> list[bool]:
    cond, body, n_cond, n_body = _compat.while_parts(eqn)
    cond, body = open_jaxpr(cond), open_jaxpr(body)
    cond_consts, body_consts, carry = ins[:n_cond], ins[n_cond : n_cond + n_body], ins[n_cond + n_body :]
    while True:
        if lane_dependent(cond, cond_consts + carry, axis_name)[0]:
            return [True] * len(carry)
        outs = lane_dependent(body, body_consts + carry, axis_name)
        new_carry = [a or b for a, b in zip(carry, outs)]
        if new_carry == carry:
            return carry
        carry = new_carry


def _cond(eqn: Any, ins: list[bool], axis_name: Hashable | None) -> list[bool]:
    branches = [open_jaxpr(b) for b in _compat.cond_branches(eqn)]
    n_out = len(branches[0].outvars)
    if ins[0]:
        return [True] * n_out
    outs = [False] * n_out
    for branch in branches:
        outs = [a or b for a, b in zip(outs, lane_dependent(branch, ins[1:], axis_name))]
    return outs
