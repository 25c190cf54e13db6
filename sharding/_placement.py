"""Where states live: PartitionSpecs from state axes, placement, and a table of it all."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import smap
from smap.devices import ShardMap, mesh_mapping, move, placement
from smap.filter import AtPath, check_tag_string

__all__ = ["place", "describe", "StateTable"]

Rules = Mapping[Any, PartitionSpec]


def _check_tag_rules(states: Iterable[smap.State], rules: Rules | None) -> None:
    """Rules that select nothing: a string that is no tag, or a path written as a tag, is an error.

    A string is a tag: one that no State has is a ``ValueError`` naming what
    it could have meant (:func:`smap.filter.check_tag_string`), and so is a
    tag that none of ``states`` has but that names one's path. An ``AtPath``
    rule that selects none of ``states`` warns (a pattern written for another
    model, or a typo); other selectors may rightly select nothing here (a
    rule set shared by several models, placing part of one).
    """
    states = list(states)
    for selector in rules or {}:
        if isinstance(selector, str):
            if not any(selector in s.tags for s in states) and any(AtPath(selector)(s.path, s) for s in states):
                raise ValueError(
                    f"the rule {selector!r} selects states tagged {selector!r}, and none is; a string in "
                    f"rules is a tag. For the state at path {selector!r}, write smap.filter.AtPath({selector!r})."
                )
            check_tag_string(selector, "a key of rules", states)
        elif isinstance(selector, AtPath) and not any(selector(s.path, s) for s in states):
            paths = sorted(".".join(map(str, s.path)) for s in states if s.path)
            warnings.warn(
                f"the rule {selector!r} selects none of the states placed (their paths: "
                f"{', '.join(map(repr, paths)) or 'none'}); it places nothing.",
                UserWarning,
                stacklevel=3,
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
    swapped = " (the states go first and the mapping second)" if isinstance(target, smap.StatefulMapping) else ""
    raise TypeError(
        f"target must be a Module, a State, or a dict or list of States, got {type(target).__name__}{swapped}."
    )


def place(
    target: Any,
    mapping: smap.StatefulMapping | jax.sharding.Mesh | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    rules: Rules | None = None,
) -> None:
    """Put the values of the states in ``target`` on the mesh, ahead of the first call.

    With ``mapping``, batched states are partitioned as :func:`spec_for` says;
    without it, every state follows ``rules`` (as :func:`spec_for` reads them)
    or is replicated over ``mesh``. A mesh given second is the mesh:
    ``place(target, mesh)`` is ``place(target, mesh=mesh)``. Transforms keep a written state's
    placement, so states stay where this puts them. A string in ``rules`` is a
    tag: one that no State has, or one that none of ``target``'s states has
    but that names a state's path (write ``smap.filter.AtPath(path)``), is a
    ``ValueError`` naming the tags and paths it could have meant, raised
    before any state moves. An ``AtPath`` rule that selects none of
    ``target``'s states warns; other rules may select nothing.

    Example:
        >>> import jax, jax.numpy as jnp, smap, sharding
        >>> mesh = sharding.make_mesh(data=jax.device_count())
        >>> w = smap.ParamState(jnp.ones((4, 4)))
        >>> sharding.place([w], mesh)
        >>> tuple(w.value.sharding.spec)
        ()
    """
    states = list(_states(target).values())
    if isinstance(mapping, jax.sharding.Mesh):
        if mesh is not None:
            raise TypeError("place got two meshes: give the mesh second or as mesh=, not both.")
        mapping, mesh = None, mapping
    if mapping is not None:
        mesh = mesh_mapping(mapping).mesh if mesh is None else mesh
    if mesh is None:
        raise ValueError("place needs a mesh, or a mapping that runs on one.")
    _check_tag_rules(states, rules)
    move(states, [placement(state, mesh, mapping, rules) for state in states])


@dataclasses.dataclass(frozen=True)
class StateRow:
    path: str
    type: str
    shape: tuple
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


def _gathered(leaves: list, axis: int | None, adapter: ShardMap, read_in_lanes: bool | None) -> str:
    """The lane axes over which a call gathers these leaves, from the program and their shardings.

    The call's ``shard_map`` is manual over the lane axes only and takes a
    value whole over them, except its mapped dimension ``axis``, which it
    takes split over exactly the lane axes in order. So a leaf that the lanes
    read is gathered over each lane axis that splits one of its other
    dimensions (or that splits its mapped dimension in another order). A
    state that only the lane-invariant tail reads (``read_in_lanes`` False:
    an optimizer's moments) is never taken by the ``shard_map``: it is
    updated where its shards live. Splits over the other mesh axes stay in
    place during the call, on Auto and Explicit axes alike.
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
    if not gathered or read_in_lanes is False:
        return "no"
    return "over " + ",".join(a for a in lanes if a in gathered)


def describe(target: Any, mapping: smap.StatefulMapping | None = None) -> StateTable:
    """One row per state: path, type, shape, dtype, PartitionSpec, bytes per device.

    A state whose value is a pytree (an optax state, a dict of buffers) has
    one row per leaf, its path followed by the leaf's key path
    (``opt[0].mu['w']``), so a leaf that a rule leaves replicated shows.

    ``bytes/device`` is the largest piece of the state one device holds at
    rest. With ``mapping`` (one that runs with ``sharding.shard_map`` or
    ``jax.shard_map``), a ``gathered`` column says, per state, over which of
    the mapping's lane axes its call gathers it whole (``no`` when it does not,
    ``not on mesh`` for a value not yet placed on the mapping's mesh). It comes
    from the program the mapping built at its last call (which states its lanes
    read: one that only the lane-invariant tail reads, such as an optimizer's
    moment, is updated where its shards live) and the state's sharding: a call
    is manual over the lane axes only, so splits over every other mesh axis
    stay during the call. Before the first call every state counts as read by
    the lanes.

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
        axis = None if mapping is None else mapping.state_axis(state)
        read_in_lanes = None if mapping is None else mapping.read_in_lanes(state)
        for leaf_path, x in jax.tree_util.tree_flatten_with_path(state.peek())[0]:
            table.append(
                StateRow(
                    path=path + jax.tree_util.keystr(leaf_path),
                    type=type(state).__name__,
                    shape=tuple(np.shape(x)),
                    dtype=str(x.dtype),
                    spec=_spec_text(x),
                    bytes_per_device=_bytes_per_device(x),
                    gathered=None if adapter is None else _gathered([x], axis, adapter, read_in_lanes),
                )
            )
    return table
