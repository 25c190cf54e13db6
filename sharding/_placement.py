"""Where states live: PartitionSpecs from state axes, placement, and a table of it all."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import smap
from smap import _locks
from smap.filter import to_filter

from ._adapters import ShardMap, adapt

__all__ = ["spec_for", "place", "describe", "StateTable"]

Rules = Mapping[Any, PartitionSpec]


def _adapter(mapping: smap.StatefulMapping) -> ShardMap:
    if not isinstance(mapping, smap.StatefulMapping):
        raise TypeError(f"mapping must be a smap.StatefulMapping, got {type(mapping).__name__}.")
    adapter, _ = adapt(mapping.mapping_fn, mapping.mapping_kwargs)
    if not isinstance(adapter, ShardMap):
        raise TypeError(
            f"the mapping {mapping.name!r} runs with {mapping.mapping_fn!r}, which has no mesh; "
            f"spec_for and place need sharding.shard_map(...) or jax.shard_map as mapping_fn."
        )
    return adapter


def _rule_spec(state: smap.State, rules: Rules | None) -> PartitionSpec | None:
    """The first rule that selects ``state``, checked against its rank."""
    for selector, spec in (rules or {}).items():
        if not isinstance(spec, PartitionSpec):
            raise TypeError(
                f"rules[{selector!r}] must be a PartitionSpec, got {type(spec).__name__} {spec!r}; "
                f"write PartitionSpec({spec!r}) to partition the first dimension."
            )
        if to_filter(selector)(state.path, state):
            ndim = min((np.ndim(x) for x in jax.tree_util.tree_leaves(state.peek())), default=0)
            if len(spec) > ndim:
                raise ValueError(
                    f"the rule {spec} for {state.describe()} names {len(spec)} dimensions, but its value has {ndim}."
                )
            return spec
    return None


def spec_for(mapping: smap.StatefulMapping, state: smap.State, rules: Rules | None = None) -> PartitionSpec:
    """The PartitionSpec that ``state`` gets under ``mapping``.

    A state that ``mapping.state_in_axes`` batches along axis ``a`` is
    partitioned over the mapping's mesh axis at dimension ``a``; a shared
    state is replicated, unless ``rules`` (``{selector: PartitionSpec}``, the
    selectors of ``state_in_axes``) place its other dimensions.

    Example:
        >>> import jax, jax.numpy as jnp, smap, sharding
        >>> mesh = sharding.make_mesh(data=jax.device_count())
        >>> h = smap.HiddenState(jnp.zeros((jax.device_count(), 3)))
        >>> step = smap.StatefulMapping(lambda x: x, state_in_axes=smap.HiddenState,
        ...                             mapping_fn=sharding.shard_map(mesh))
        >>> tuple(sharding.spec_for(step, h))
        ('data',)
    """
    adapter = _adapter(mapping)
    _check_state(state, "spec_for: state")
    value = state.peek()
    ndim = min(np.ndim(x) for x in jax.tree_util.tree_leaves(value)) if jax.tree_util.tree_leaves(value) else 0
    axis = mapping.state_axis(state)
    rule = _rule_spec(state, rules)
    entries = list(rule or ()) + [None] * (ndim - len(rule or ()))
    if axis is not None:
        lane = adapter.lane_spec(ndim, axis % ndim)
        if entries[axis % ndim] is not None:
            raise ValueError(
                f"the rule {rule} for {state.describe()} places dimension {axis % ndim}, which the "
                f"mapping splits over {lane[axis % ndim]!r}."
            )
        entries[axis % ndim] = lane[axis % ndim]
    while entries and entries[-1] is None:
        entries.pop()
    return PartitionSpec(*entries)


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
        states = list(target)
        for i, s in enumerate(states):
            _check_state(s, f"target[{i}]")
        return {".".join(map(str, s.path)) or f"[{i}]": s for i, s in enumerate(states)}
    raise TypeError(
        f"target must be a Module, a State, or a dict or list of States, got {type(target).__name__}."
    )


def _check_divides(state: smap.State, spec: PartitionSpec, mesh: Any) -> None:
    """Every dimension that ``spec`` partitions is a multiple of its mesh axes' size."""
    for leaf in jax.tree_util.tree_leaves(state.peek()):
        for dim, entry in enumerate(spec):
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            for name in names:
                if name not in mesh.shape:
                    raise ValueError(
                        f"the spec {spec} for {state.describe()} names mesh axis {name!r}, but the mesh "
                        f"has axes {tuple(mesh.axis_names)}."
                    )
            size = int(np.prod([mesh.shape[name] for name in names]))
            if dim < np.ndim(leaf) and np.shape(leaf)[dim] % size:
                axes = " x ".join(f"{name!r} ({mesh.shape[name]})" for name in names)
                raise ValueError(
                    f"{state.describe()} has size {np.shape(leaf)[dim]} in dimension {dim}, which the "
                    f"mesh axis {axes} of size {size} does not divide (spec {spec})."
                )


def place(target: Any, mapping: smap.StatefulMapping | None = None, *, mesh: Any = None, rules: Rules | None = None) -> None:
    """Put the values of the states in ``target`` on the mesh, ahead of the first call.

    With ``mapping``, batched states are partitioned as :func:`spec_for` says;
    without it, every state follows ``rules`` or is replicated over ``mesh``.
    Transforms keep a written state's placement, so states stay where this
    puts them.

    Example:
        >>> import jax, jax.numpy as jnp, smap, sharding
        >>> mesh = sharding.make_mesh(data=jax.device_count())
        >>> w = smap.ParamState(jnp.ones((4, 4)))
        >>> sharding.place([w], mesh=mesh)
        >>> tuple(w.value.sharding.spec)
        ()
    """
    if mapping is not None:
        adapter = _adapter(mapping)
        mesh = adapter.mesh if mesh is None else mesh
    if mesh is None:
        raise ValueError("place needs a mesh, or a mapping that runs on one.")
    states = list(_states(target).values())
    placed = []  # every value is placed before any state changes: a failure leaves them all where they were
    for state in states:
        if mapping is not None:
            spec = spec_for(mapping, state, rules)
        else:
            spec = _rule_spec(state, rules) or PartitionSpec()
        _check_divides(state, spec, mesh)
        sharding = NamedSharding(mesh, spec)
        placed.append(jax.tree_util.tree_map(lambda x: _put(x, sharding), state.peek()))
    with _locks.Holding(_locks.ordered(states)):
        for state, value in zip(states, placed):
            state.write_back(value)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same value on every process) placed with ``sharding``."""
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    # Across processes, each builds its own shards from its copy of the value
    # (jax.device_put of a single-device array fails there with one device per process).
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


@dataclasses.dataclass(frozen=True)
class StateRow:
    path: str
    type: str
    shape: tuple | str
    dtype: str
    spec: str
    bytes_per_device: int


class StateTable(list):
    """The rows of :func:`describe`; prints as an aligned table."""

    HEADER = ("path", "type", "shape", "dtype", "spec", "bytes/device")

    def __str__(self) -> str:
        rows = [self.HEADER] + [
            (r.path, r.type, str(r.shape), r.dtype, r.spec, f"{r.bytes_per_device:,}") for r in self
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.HEADER))]
        lines = ["  ".join(cell.ljust(w) if i < 5 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
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


def describe(target: Any) -> StateTable:
    """One row per state: path, type, shape, dtype, PartitionSpec, bytes per device.

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
    table = StateTable()
    for path, state in _states(target).items():
        leaves = jax.tree_util.tree_leaves(state.peek())
        single = len(leaves) == 1
        table.append(
            StateRow(
                path=path,
                type=type(state).__name__,
                shape=tuple(np.shape(leaves[0])) if single else f"{len(leaves)} arrays",
                dtype=str(leaves[0].dtype) if single else ",".join(sorted({str(x.dtype) for x in leaves})),
                spec=_spec_text(leaves[0]) if single else "; ".join(sorted({_spec_text(x) for x in leaves})),
                bytes_per_device=sum(_bytes_per_device(x) for x in leaves),
            )
        )
    return table
