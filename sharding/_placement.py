"""Where states live: PartitionSpecs from state axes, placement, and a table of it all."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import smap
from smap.devices import ShardMap, mesh_mapping, move, placement
from smap.filter import AtPath

__all__ = ["place", "describe", "StateTable"]

Rules = Mapping[Any, PartitionSpec]


def _check_tag_rules(states: Iterable[smap.State], rules: Rules | None) -> None:
    """A string selects by tag; one that selects nothing but names a path is a mistake."""
    states = list(states)
    for selector in rules or {}:
        if isinstance(selector, str) and not any(selector in s.tags for s in states):
            at_path = AtPath(selector)
            if any(at_path(s.path, s) for s in states):
                raise ValueError(
                    f"the rule {selector!r} selects states tagged {selector!r}, and none is; a string in "
                    f"rules is a tag. For the state at path {selector!r}, write smap.filter.AtPath({selector!r})."
                )


def _check_state(state: Any, what: str) -> None:
    if not isinstance(state, smap.State):
        raise TypeError(f"{what} must be a smap.State, got {type(state).__name__}; wrap arrays in a State.")


def _states(target: Any) -> dict[str, smap.State]:
    if isinstance(target, smap.nn.Module):
        return target.states()
    if isinstance(target, smap.State):
        return {".".join(map(str, target.path)) or type(target).__name__: target}
    if isinstance(target, Mapping):
        states = {str(k): v for k, v in target.items()}
        for k, v in target.items():
            _check_state(v, f"target[{k!r}]")
        return states
    if isinstance(target, Iterable) and not isinstance(target, (jax.Array, np.ndarray, str)):
        listed = list(target)
        for i, s in enumerate(listed):
            _check_state(s, f"target[{i}]")
        return {".".join(map(str, s.path)) or f"[{i}]": s for i, s in enumerate(listed)}
    raise TypeError(f"target must be a Module, a State, or a dict or list of States, got {type(target).__name__}.")


def place(
    target: Any, mapping: smap.StatefulMapping | None = None, *, mesh: Any = None, rules: Rules | None = None
) -> None:
    """Put the values of the states in ``target`` on the mesh, ahead of the first call.

    With ``mapping``, batched states are partitioned as :func:`spec_for` says;
    without it, every state follows ``rules`` (as :func:`spec_for` reads them)
    or is replicated over ``mesh``. Transforms keep a written state's
    placement, so states stay where this puts them. A string in ``rules`` is a
    tag; one that selects no state's tag but names a state's path is a
    ``ValueError`` (write ``smap.filter.AtPath(path)``), raised before any
    state moves.

    Example:
        >>> import jax, jax.numpy as jnp, smap, sharding
        >>> mesh = sharding.make_mesh(data=jax.device_count())
        >>> w = smap.ParamState(jnp.ones((4, 4)))
        >>> sharding.place([w], mesh=mesh)
        >>> tuple(w.value.sharding.spec)
        ()
    """
    if mapping is not None:
        mesh = mesh_mapping(mapping).mesh if mesh is None else mesh
    if mesh is None:
        raise ValueError("place needs a mesh, or a mapping that runs on one.")
    states = list(_states(target).values())
    _check_tag_rules(states, rules)
    move(states, [placement(state, mesh, mapping, rules) for state in states])


@dataclasses.dataclass(frozen=True)
class StateRow:
    path: str
    type: str
    shape: tuple | str
    dtype: str
    spec: str
    bytes_per_device: int
    gathered: str | None = None  # with a mapping: the lane axes a call gathers it over, or "no"


class StateTable(list):
    """The rows of :func:`describe`; prints as an aligned table."""

    HEADER = ("path", "type", "shape", "dtype", "spec", "bytes/device", "gathered")

    def __str__(self) -> str:
        columns = 7 if any(r.gathered is not None for r in self) else 6
        rows = [self.HEADER[:columns]] + [
            (r.path, r.type, str(r.shape), r.dtype, r.spec, f"{r.bytes_per_device:,}", str(r.gathered))[:columns]
            for r in self
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(columns)]
        lines = [
            "  ".join(
                cell.rjust(w) if i == 5 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
            ).rstrip()
            for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    __repr__ = __str__


def _spec_text(x: Any) -> str:
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        entries = [repr(e) for e in sharding.spec]
        return f"P({', '.join(entries)}{',' if len(entries) == 1 else ''})"
    if sharding is not None and len(sharding.device_set) == 1:
        device = next(iter(sharding.device_set))
        return f"{device.platform}:{device.id}"  # the same on every JAX version (str(device) is not)
    return str(sharding)


def _bytes_per_device(x: Any) -> int:
    shards = getattr(x, "addressable_shards", None)
    if shards:
        return max(shard.data.nbytes for shard in shards)
    return int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize


def _gathered(leaves: list, axis: int | None, adapter: ShardMap) -> str:
    """The lane axes over which a call gathers these leaves, read from their shardings.

    The call's ``shard_map`` is manual over the lane axes only and takes a
    value whole over them, except its mapped dimension ``axis``, which it
    takes split over exactly the lane axes in order. So a leaf is gathered
    over each lane axis that splits one of its other dimensions (or that
    splits its mapped dimension in another order). Splits over the other
    mesh axes stay in place during the call.
    """
    lanes = adapter.axes
    gathered: set[str] = set()
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, NamedSharding) or sharding.mesh != adapter.mesh:
            return "not on mesh"
        mapped = None if axis is None else axis % np.ndim(x)
        for dim, entry in enumerate(sharding.spec):
            names = (entry,) if isinstance(entry, str) else tuple(entry or ())
            on_lanes = tuple(n for n in names if n in lanes)
            if dim != mapped or on_lanes not in ((), lanes):
                gathered.update(on_lanes)
    return "over " + ",".join(a for a in lanes if a in gathered) if gathered else "no"


def describe(target: Any, mapping: smap.StatefulMapping | None = None) -> StateTable:
    """One row per state: path, type, shape, dtype, PartitionSpec, bytes per device.

    ``bytes/device`` is the largest piece of the state one device holds at
    rest. With ``mapping`` (one that runs with ``sharding.shard_map`` or
    ``jax.shard_map``), a ``gathered`` column says, per state, over which of
    the mapping's lane axes its call gathers it whole (``no`` when it does not,
    ``not on mesh`` for a value not yet placed on the mapping's mesh). It is
    read from the state's sharding and the lane axes: a call is manual over the
    lane axes only, so splits over every other mesh axis stay during the call.

    Example:
        >>> import jax.numpy as jnp, smap, sharding
        >>> class Layer(smap.nn.Module):
        ...     def __init__(self):
        ...         self.w = smap.ParamState(jnp.ones((2, 3)))
        >>> print(sharding.describe(Layer()))  # doctest: +NORMALIZE_WHITESPACE
        path  type        shape   dtype    spec   bytes/device
        ----  ----------  ------  -------  -----  ------------
        w     ParamState  (2, 3)  float32  cpu:0            24
    """
    adapter = None if mapping is None else mesh_mapping(mapping)
    table = StateTable()
    for path, state in _states(target).items():
        leaves = jax.tree_util.tree_leaves(state.peek())
        single = len(leaves) == 1
        axis = None if mapping is None else mapping.state_axis(state)
        table.append(
            StateRow(
                path=path,
                type=type(state).__name__,
                shape=tuple(np.shape(leaves[0])) if single else f"{len(leaves)} arrays",
                dtype=str(leaves[0].dtype) if single else ",".join(sorted({str(x.dtype) for x in leaves})),
                spec=_spec_text(leaves[0]) if single else "; ".join(sorted({_spec_text(x) for x in leaves})),
                bytes_per_device=sum(_bytes_per_device(x) for x in leaves),
                gathered=None if adapter is None else _gathered(leaves, axis, adapter),
            )
        )
    return table
