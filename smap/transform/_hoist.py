"""The lane-invariant tail of a per-lane program, run outside the lanes.

In a training step mapped over the lanes, everything after the ``pmean`` of
the gradients (the optimizer update, a step counter, an average of the
weights) has the same value in every lane. Inside the mapping it would run
once per device on whole values: a state split over the lane axis (FSDP's
weights and Adam moments) would be gathered for it. :func:`split_tail` cuts
the program in two: the **head**, run per lane by the mapping, and the
**tail**, the equations that depend only on lane-invariant values and feed
only outputs that leave the lanes unmapped. The mapping runs the tail after
the lanes, in the enclosing program, where XLA's partitioner computes each
state where its shards live.

The cut is a partition of the program's equations: the tail's equations are
the program's own, evaluated on the same values, so no result changes.
Which values differ between lanes is the lanes analysis
(:mod:`smap.transform._lanes`); an equation that communicates over the
mapped axis, or has effects, stays in the head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from .. import _compat, _interpret
from ._lanes import lanes_rule

__all__ = ["Tail", "split_tail"]


@dataclasses.dataclass(frozen=True)
class Tail:
    """A per-lane program cut in two.

    Attributes:
        head: the per-lane part: the program's inputs; its outputs are the
            program's outputs at ``kept``, then the values the tail reads
            from it (the boundary, the same in every lane).
        tail: the lane-invariant part, a jaxpr of ``sources``; its outputs
            are the program's outputs at ``hoisted``.
        kept: positions of the program's outputs that the head computes.
        hoisted: positions of the program's outputs that the tail computes.
        sources: for each input of the tail, where it comes from:
            ``('input', i)`` the program's input ``i``, ``('const', i)`` its
            constant ``i``, ``('head', j)`` the head's boundary output ``j``.
    """

    head: ClosedJaxpr
    tail: Jaxpr
    kept: tuple[int, ...]
    hoisted: tuple[int, ...]
    sources: tuple[tuple[str, int], ...]

    def head_out_axes(self, out_axes: Sequence[int | None]) -> tuple[int | None, ...]:
        """The mapped axes of the head's outputs: the kept ones', then None for the boundary."""
        boundary = sum(1 for kind, _ in self.sources if kind == "head")
        return tuple(out_axes[k] for k in self.kept) + (None,) * boundary

    def finish(self, head_results: Sequence[Any], inputs: Sequence[Any], consts: Sequence[Any]) -> list[Any]:
        """The program's outputs, from the head's results and the tail evaluated after the lanes."""
        n_kept = len(self.kept)
        boundary = head_results[n_kept:]
        where = {"input": inputs, "const": consts, "head": boundary}
        tail_inputs = [where[kind][i] for kind, i in self.sources]
        tail_results = jax.core.eval_jaxpr(self.tail, [], *tail_inputs)
        outputs: list[Any] = [None] * (n_kept + len(self.hoisted))
        for k, value in zip(self.kept, head_results[:n_kept]):
            outputs[k] = value
        for k, value in zip(self.hoisted, tail_results):
            outputs[k] = value
        return outputs


def split_tail(
    program: ClosedJaxpr, inputs: Sequence[bool], out_axes: Sequence[int | None], axis_name: Hashable | None
) -> Tail | None:
    """Cut ``program`` into a per-lane head and a lane-invariant tail, or None when the tail is empty.

    Arguments:
        program: the per-lane program.
        inputs: for each input, whether it differs between lanes.
        out_axes: for each output, where its mapped axis goes, or None when
            it leaves the lanes once (only those can come from the tail).
        axis_name: the mapped axis that collectives may use, or None.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from smap.transform._hoist import split_tail
        >>> def lane(x, w):
        ...     g = jax.lax.psum(x * w, "i")
        ...     return x * 2, w - 0.1 * g
        >>> program = jax.make_jaxpr(lane, axis_env=[("i", 4)])(jnp.ones(3), jnp.ones(3))
        >>> cut = split_tail(program, [True, False], [0, None], "i")
        >>> cut.kept, cut.hoisted, [str(e.primitive) for e in cut.tail.eqns]
        ((0,), (1,), ['mul', 'sub'])
    """
    jaxpr = program.jaxpr
    dependent: dict[Any, bool] = {}
    _interpret.analyse(jaxpr, inputs, lanes_rule(axis_name), record=dependent)
    movable = [
        not any(dependent.get(v, False) for v in [*eqn.invars, *eqn.outvars] if not isinstance(v, Literal))
        and not eqn.effects
        and not (axis_name is not None and _interpret.uses_axis(eqn, axis_name))
        for eqn in jaxpr.eqns
    ]

    # Walk backwards: an equation joins the tail when all its results go only to the tail
    # or to outputs that leave the lanes unmapped.
    unmapped_outputs = {v for v, axis in zip(jaxpr.outvars, out_axes) if axis is None and not isinstance(v, Literal)}
    mapped_outputs = {v for v, axis in zip(jaxpr.outvars, out_axes) if axis is not None and not isinstance(v, Literal)}
    read_by_head: set[Any] = set(mapped_outputs)
    in_tail = [False] * len(jaxpr.eqns)
    for i in reversed(range(len(jaxpr.eqns))):
        eqn = jaxpr.eqns[i]
        if movable[i] and not any(v in read_by_head for v in eqn.outvars):
            in_tail[i] = True
        else:
            read_by_head.update(v for v in eqn.invars if not isinstance(v, Literal))
    if not any(in_tail):
        return None

    made_in_tail = {v for eqn, t in zip(jaxpr.eqns, in_tail) if t for v in eqn.outvars}
    hoisted = tuple(
        k
        for k, v in enumerate(jaxpr.outvars)
        if not isinstance(v, Literal) and v in unmapped_outputs and v in made_in_tail
    )
    if not hoisted:
        return None
    kept = tuple(k for k in range(len(jaxpr.outvars)) if k not in hoisted)
    tail_eqns = [eqn for eqn, t in zip(jaxpr.eqns, in_tail) if t]
    head_eqns = [eqn for eqn, t in zip(jaxpr.eqns, in_tail) if not t]

    positions = {v: ("input", i) for i, v in enumerate(jaxpr.invars)}
    positions.update({v: ("const", i) for i, v in enumerate(jaxpr.constvars)})
    tail_invars: list[Any] = []
    sources: list[tuple[str, int]] = []
    boundary: list[Any] = []
    for eqn in tail_eqns:
        for v in eqn.invars:
            if isinstance(v, Literal) or v in made_in_tail or v in tail_invars:
                continue
            tail_invars.append(v)
            if v in positions:
                sources.append(positions[v])
            else:
                sources.append(("head", len(boundary)))
                boundary.append(v)

    head = _compat.sub_jaxpr(jaxpr, jaxpr.invars, [jaxpr.outvars[k] for k in kept] + boundary, head_eqns)
    tail = _compat.sub_jaxpr(jaxpr, tail_invars, [jaxpr.outvars[k] for k in hoisted], tail_eqns)
    return Tail(ClosedJaxpr(head, program.consts), tail, kept, hoisted, tuple(sources))
