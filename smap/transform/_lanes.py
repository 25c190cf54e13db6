"""Which values of a per-lane program differ between lanes.

A mapping transform writes a state back with the mapped axis only when the
value written depends on the lane. The answer must not depend on how the
lanes are executed, so it is read off the traced program itself: a value is
lane-dependent when it is computed from a lane-dependent input, from the
lane's index, or from a collective that hands each lane its own part;
reductions over the mapped axis (``psum``, ``pmax``, ``pmin``,
``all_gather``) give every lane the same value.

The analysis follows JAX's own batching rules for control flow and calls
(``scan``, ``while``, ``cond``, ``jit``, ``custom_jvp``, ...) and is
conservative elsewhere: it may call a value lane-dependent that JAX would
not, which only costs a broadcast, never a wrong result.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from .._compat import jaxprs_in_params

__all__ = ["lane_dependent"]

_REDUCTIONS = {"psum", "pmax", "pmin", "all_gather", "psum_invariant", "all_gather_invariant"}
_AXIS_PARAMS = ("axes", "axis_name")


def _axes_of(params: dict) -> tuple:
    for name in _AXIS_PARAMS:
        if name in params:
            axes = params[name]
            return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)
    return ()


def _open(jaxpr: Jaxpr | ClosedJaxpr) -> Jaxpr:
    return jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr


def _mentions_axis(jaxpr: Jaxpr, axis_name: Hashable) -> bool:
    """Whether anything in ``jaxpr`` (nested jaxprs included) uses ``axis_name``."""
    for eqn in jaxpr.eqns:
        if axis_name in _axes_of(eqn.params):
            return True
        if any(_mentions_axis(_open(sub), axis_name) for sub in jaxprs_in_params(eqn.params)):
            return True
    return False


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
    name, params, n_out = eqn.primitive.name, eqn.params, len(eqn.outvars)
    if axis_name is not None and axis_name in _axes_of(params):
        return [name not in _REDUCTIONS] * n_out
    if name == "scan":
        return _scan(params, ins, axis_name)
    if name == "while":
        return _while(params, ins, axis_name)
    if name == "cond":
        return _cond(params, ins, axis_name)
    subs = list(jaxprs_in_params(params))
    if len(subs) == 1:
        sub = _open(subs[0])
        if len(sub.invars) == len(ins) and len(sub.outvars) == n_out:
            return lane_dependent(sub, ins, axis_name)
    if any(ins) or (axis_name is not None and any(_mentions_axis(_open(s), axis_name) for s in subs)):
        return [True] * n_out
    return [False] * n_out


def _scan(params: dict, ins: list[bool], axis_name: Hashable | None) -> list[bool]:
    body = _open(params["jaxpr"])
    n_consts, n_carry = params["num_consts"], params["num_carry"]
    consts, carry, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[n_consts + n_carry :]
    while True:
        outs = lane_dependent(body, consts + carry + xs, axis_name)
        new_carry = [a or b for a, b in zip(carry, outs[:n_carry])]
        if new_carry == carry:
            return carry + outs[n_carry:]
        carry = new_carry


def _while(params: dict, ins: list[bool], axis_name: Hashable | None) -> list[bool]:
    cond, body = _open(params["cond_jaxpr"]), _open(params["body_jaxpr"])
    n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
    cond_consts, body_consts, carry = ins[:n_cond], ins[n_cond : n_cond + n_body], ins[n_cond + n_body :]
    while True:
        if lane_dependent(cond, cond_consts + carry, axis_name)[0]:
            return [True] * len(carry)
        outs = lane_dependent(body, body_consts + carry, axis_name)
        new_carry = [a or b for a, b in zip(carry, outs)]
        if new_carry == carry:
            return carry
        carry = new_carry


def _cond(params: dict, ins: list[bool], axis_name: Hashable | None) -> list[bool]:
    branches = [_open(b) for b in params["branches"]]
    n_out = len(branches[0].outvars)
    if ins[0]:
        return [True] * n_out
    outs = [False] * n_out
    for branch in branches:
        outs = [a or b for a, b in zip(outs, lane_dependent(branch, ins[1:], axis_name))]
    return outs
