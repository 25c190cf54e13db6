"""Sharding annotations inside lanes: a layout the per-lane code asks for, kept on the axes a lane has.

Per-lane code may lay out its values as JAX code does under a global mesh
(``jax.set_mesh``): ``jax.lax.with_sharding_constraint``, ``out_sharding=`` of
jnp operations, ``jax.sharding.reshard``. smap traces a lane under the
ambient mesh's abstract mesh when the code needs one (see
``smap._tracing.trace_program``; JAX checks there that the axes exist and, on
Explicit axes, that they divide the dimensions), and binds each annotation
for the mesh context the lane then runs in (:func:`bind_annotation`):

- an entry naming a **lane axis** (a mesh axis the mapping splits the lanes
  over: manual in a ``shard_map`` around the lane, or named by
  :func:`lanes_over`) is dropped from the lane's annotation: along that axis
  the lanes are the split, so the mapped axis already lies over it;
- an entry on a dimension of size 1 is dropped (the lane's slice of a batch
  annotated for the whole batch);
- the other entries are kept, as a constraint on a mesh of Auto axes and a
  reshard on one of Explicit axes; where the context has no mesh (``jax.pmap``)
  or made the axis manual, the annotation has nothing to lay out and is dropped.

An annotation never changes a value: a dropped one changes where a value
lives, never what it is.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from jax.extend.core import ClosedJaxpr
from jax.sharding import NamedSharding, PartitionSpec

from . import _compat, _interpret

__all__ = ["bind_annotation", "evaluate", "lanes_over"]

_local = threading.local()


@contextlib.contextmanager
def lanes_over(axes: Sequence[str]) -> Iterator[None]:
    """While an adapter maps a program: the mesh axes its lanes are split over (none for ``jax.pmap``)."""
    previous: frozenset[str] = getattr(_local, "axes", frozenset())
    _local.axes = previous | frozenset(axes)
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.axes = previous
        _local.depth -= 1


def in_lanes() -> bool:
    """Whether annotations bound now are a lane's (inside :func:`evaluate` or :func:`lanes_over`)."""
    return getattr(_local, "depth", 0) > 0


def _names(entry: Any) -> tuple:
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def lane_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Any) -> PartitionSpec | None:
    """The part of ``spec`` that a lane's value of ``shape`` keeps in a context of abstract mesh ``mesh``."""
    kinds = _compat.axis_kinds(mesh)
    lanes = getattr(_local, "axes", frozenset()) | _compat.manual_axes(mesh)
    entries: list[Any] = []
    for dim, entry in enumerate(spec):
        names = _names(entry)
        if dim < len(shape) and shape[dim] == 1:
            names = ()
        kept = tuple(n for n in names if n not in lanes and kinds.get(n) in ("auto", "explicit"))
        entries.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    if not any(e is not None for e in entries):
        return None
    return PartitionSpec(*entries)


def bind_annotation(eqn: Any, ins: Sequence[Any]) -> list:
    """Bind a sharding annotation equation for the mesh context it runs in (see the module's rules)."""
    found = _compat.annotation_spec(eqn)
    assert found is not None
    spec, param = found
    mesh = _compat.context_mesh()
    base = _compat.bind_unannotated(eqn, ins)
    kept = lane_spec(spec, jax.numpy.shape(base), mesh)
    if kept is None:
        return [base]
    kinds = _compat.axis_kinds(mesh)
    if any(kinds[n] == "explicit" for entry in kept for n in _names(entry)):
        if _compat.lays_out_operand(eqn):
            return [jax.sharding.reshard(base, kept)]
        return _compat.bind_equation(eqn, ins, **{param: NamedSharding(mesh, kept)})
    return [jax.lax.with_sharding_constraint(base, kept)]


def evaluate(jaxpr: ClosedJaxpr, *args: Any) -> list:
    """Evaluate a program whose annotations are bound for the context (calls holding some are inlined)."""

    def rule(eqn: Any, ins: list) -> list:
        if _compat.kind(eqn) is _compat.Kind.CALL and _interpret.inside(eqn, _has_annotation):
            return _interpret.evaluate(_compat.call_body(eqn), ins, rule)
        return _interpret.bind(eqn, ins)

    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        return _interpret.evaluate(jaxpr, args, rule)
    finally:
        _local.depth -= 1


def _has_annotation(eqn: Any) -> bool:
    return _compat.annotation_spec(eqn) is not None


def _bind_in_lanes(eqn: Any, ins: Sequence[Any]) -> list | None:
    """``bind_annotation`` inside lanes; None (bind as traced) outside them."""
    return bind_annotation(eqn, ins) if in_lanes() else None


_compat.annotation_binder = _bind_in_lanes
