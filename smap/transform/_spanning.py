"""Collectives that span devices and the lanes each device holds.

When a device holds several lanes, the per-lane program runs under a local
``jax.vmap`` inside ``shard_map`` (or ``pmap``). A collective the user wrote on
the mapping's ``axis_name`` must then reduce over both the local lanes and
the devices, and ``axis_index`` must give the global lane index
``device_index * lanes_per_device + local_index``; any other collective
(``ppermute``, ``all_to_all``) runs as ``jax.vmap`` runs it, over every
lane's inputs gathered to each device. :func:`spanning_lane`
re-interprets the traced per-lane program with those collectives rewritten;
everything else is bound unchanged. A fused sum over the lanes
(``smap.transform._fuse``) is rewritten only when it sums over the mapping's
own axis: one of a nested mapping, over that mapping's axis, already ran
over its lanes and is bound unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Literal

from .. import _compat, _interpret
from .._compat import Kind
from ._cpu_forms import CpuForms
from ._fuse import is_lane_sum, sum_over_lanes
from ._lanes import lanes_rule

__all__ = ["Span", "spanning_lane"]

_fresh = itertools.count()


@dataclasses.dataclass(frozen=True)
class Span:
    """How the user's axis is laid out: devices (major) times local lanes (minor)."""

    axis_name: Hashable
    device_axes: tuple[Hashable, ...]
    device_sizes: tuple[int, ...]
    local_name: str
    local_size: int
    adapter: str

    @staticmethod
    def fresh_name(kind: str = "lanes") -> str:
        """A new axis name that no user program can mention."""
        return f"_smap_{kind}_{next(_fresh)}"

    def device_index(self) -> jax.Array:
        index = jnp.zeros((), jnp.int32)
        for name, size in zip(self.device_axes, self.device_sizes):
            index = index * size + jax.lax.axis_index(name)
        return index

    @property
    def local_axes(self) -> tuple[str, ...]:
        """The local lane axis, or none where a device holds one lane (it then runs without ``jax.vmap``)."""
        return (self.local_name,) if self.local_size > 1 else ()

    def local_index(self) -> jax.Array | int:
        """The lane's place among its device's lanes (0 where a device holds one lane)."""
        return jax.lax.axis_index(self.local_name) if self.local_size > 1 else 0

    def lane_index(self) -> jax.Array:
        return self.device_index() * self.local_size + self.local_index()


def spanning_lane(closed: ClosedJaxpr, span: Span, mapped: Sequence[bool]) -> Callable[..., list]:
    """The per-lane program ``closed`` with collectives on ``span.axis_name`` spanning devices and lanes.

    ``mapped[i]`` says whether input ``i`` differs between lanes. Where a device
    holds one lane, the program runs without ``jax.vmap``, and a ``cond`` whose
    branch depends on the lane and whose branches communicate runs every
    branch and selects, as ``jax.vmap`` runs it: each device then takes part in
    every branch's collectives.
    """
    jaxpr = _compat.open_jaxpr(closed)
    varies: dict[Any, bool] = {}
    if span.local_size == 1:
        _interpret.analyse(jaxpr, mapped, lanes_rule(span.axis_name), varies)
    forms = CpuForms(jaxpr, swap_products=span.local_size == 1)

    def rule(eqn: Any, ins: list) -> list:
        if _compat.names_axis(eqn, span.axis_name):
            return _collective(eqn, ins, span)
        if is_lane_sum(eqn, span.axis_name):
            # A sum over every lane written as products: over the device's own lanes, then over devices.
            outs = sum_over_lanes(eqn, ins, span.axis_name, span.local_name, span.local_size)
            return [jax.lax.psum(y, span.device_axes) for y in outs]
        rewritten = forms.rewrite(eqn, ins, rule)
        if rewritten is not None:
            return rewritten
        if not _interpret.uses_axis(eqn, span.axis_name):
            return _interpret.bind(eqn, ins)
        if _compat.kind(eqn) is Kind.COND and not isinstance(eqn.invars[0], Literal) and varies.get(eqn.invars[0]):
            outs = [_interpret.evaluate(branch, ins[1:], rule) for branch in _compat.cond_branches(eqn)]
            return [jax.lax.select_n(ins[0], *values) for values in zip(*outs)]
        nested = _interpret.nested(eqn, ins, lambda program, args: _interpret.evaluate(program, args, rule))
        if nested is None:
            raise NotImplementedError(
                f"{span.adapter}: {eqn.primitive.name!r} holds a collective on the mapped axis {span.axis_name!r}, "
                f"which cannot be spread over devices holding several lanes."
            )
        return nested

    return lambda *args: _interpret.evaluate(closed, args, rule)


def _collective(eqn: Any, ins: list, span: Span) -> list:
    kind = _compat.kind(eqn)
    found = _compat.collective_axes(eqn)
    assert found is not None, f"{eqn.primitive.name} communicates over no axes"
    others = tuple(a for a in found[1] if a != span.axis_name)
    if kind is Kind.REDUCTION:
        return _compat.rebind_on_axes(eqn, ins, others + span.local_axes + span.device_axes)
    if kind is Kind.INDEX:
        return [span.lane_index()]
    if kind is Kind.GATHER and not others:
        return [_all_gather(ins[0], eqn, span)]
    if kind is Kind.SCATTER and not others:
        return [_reduce_scatter(x, eqn, span) for x in ins]
    if span.local_size == 1:
        # One lane per device: the device axes are the mapped axis, lane for lane.
        return _compat.rebind_on_axes(eqn, ins, others + span.device_axes)
    return _as_vmap_runs_it(eqn, ins, span)


def _every_lane(x: jax.Array, span: Span) -> jax.Array:
    """The values ``x`` of every lane, on every device: stacked along a new leading axis, in lane order."""
    gathered = jax.lax.all_gather(x, span.local_name) if span.local_size > 1 else x[None]
    gathered = jax.lax.all_gather(gathered, span.device_axes if len(span.device_axes) > 1 else span.device_axes[0])
    return gathered.reshape((-1, *x.shape))


def _as_vmap_runs_it(eqn: Any, ins: list, span: Span) -> list:
    """Any other collective on the mapped axis (``ppermute``, ``all_to_all``, ...), as ``jax.vmap`` runs it.

    Every lane's inputs are gathered to every device, the collective runs over
    them under ``jax.vmap`` on the mapped axis (its batching rule, which is what
    a mapping's values are held to), and each lane takes its own outputs. It
    costs an ``all_gather`` of the collective's inputs.
    """
    outs = jax.vmap(lambda *xs: _interpret.bind(eqn, list(xs)), axis_name=span.axis_name)(
        *[_every_lane(x, span) for x in ins]
    )
    lane = span.lane_index()
    return [jax.lax.dynamic_index_in_dim(y, lane, keepdims=False) for y in outs]


def _all_gather(x: jax.Array, eqn: Any, span: Span) -> jax.Array:
    lanes = _every_lane(x, span)
    dim, tiled = _compat.gather_layout(eqn)
    lanes = jnp.moveaxis(lanes, 0, dim)
    if tiled:
        shape = x.shape[:dim] + (lanes.shape[dim] * x.shape[dim],) + x.shape[dim + 1 :]
        lanes = lanes.reshape(shape)
    return lanes


def _reduce_scatter(x: jax.Array, eqn: Any, span: Span) -> jax.Array:
    """Each lane's block of the sum over all lanes: summed over the device's lanes, scattered
    over devices (a device gets its lanes' blocks), then split between the device's lanes."""
    dim, tiled = _compat.scatter_layout(eqn)
    block = x.shape[dim] // (span.local_size * math.prod(span.device_sizes))  # 1 when not tiled
    summed = jax.lax.psum(x, span.local_axes)
    devices = span.device_axes if len(span.device_axes) > 1 else span.device_axes[0]
    mine = jax.lax.psum_scatter(summed, devices, scatter_dimension=dim, tiled=True)
    start = span.local_index() * block
    lane = jax.lax.dynamic_slice_in_dim(mine, start, block, axis=dim)
    return lane if tiled else jnp.squeeze(lane, dim)
