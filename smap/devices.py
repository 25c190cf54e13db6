"""Running lanes on devices: the device mapping functions and where a mapping puts states.

A :class:`~smap.StatefulMapping` runs its per-lane program with a
``mapping_fn``. The ones here run it on several devices with exactly the
results of ``jax.vmap``: :func:`shard_map` (lanes split over mesh axes,
``jax.shard_map``) and :func:`pmap` (lanes split over a list of devices,
``jax.pmap``); collectives on the mapping's ``axis_name`` span every lane of
every device. :func:`adapt` is the one rule that routes ``jax.pmap``,
``jax.shard_map`` and ``jax.smap`` given as ``mapping_fn`` to them.

:func:`spec_for` and :func:`placement` say where a mapping puts a state's
value (its batched axis over the lane axes, other dimensions as placement
rules say), and :func:`move` puts values there, every state or none.

The ``sharding`` package builds on these (``sharding.shard_map``,
``sharding.place``, ``sharding.describe`` ...); smap itself never imports it.

Example:
    >>> import jax, jax.numpy as jnp, smap
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> h = smap.HiddenState(jnp.zeros((jax.device_count(), 3)))
    >>> step = smap.StatefulMapping(lambda x: x, state_in_axes=smap.HiddenState,
    ...                             mapping_fn=smap.devices.shard_map(mesh))
    >>> tuple(smap.devices.spec_for(step, h))
    ('data',)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from . import _compat, _locks
from ._state import State
from .filter import to_filter
from .transform import StatefulMapping
from .transform._adapters import Pmap, ShardMap, adapt, pmap, shard_map

__all__ = [
    "ShardMap",
    "Pmap",
    "shard_map",
    "pmap",
    "adapt",
    "mesh_mapping",
    "spec_for",
    "placement",
    "move",
    "backend_started",
]

Rules = Mapping[Any, PartitionSpec]


def mesh_mapping(mapping: StatefulMapping) -> ShardMap:
    """The :class:`ShardMap` that ``mapping`` runs its lanes with (its mesh and lane axes).

    Raises ``TypeError`` for a mapping whose ``mapping_fn`` has no mesh.

    Example:
        >>> import jax, smap
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> step = smap.StatefulMapping(lambda x: x, mapping_fn=smap.devices.shard_map(mesh))
        >>> smap.devices.mesh_mapping(step).axes
        ('data',)
    """
    if not isinstance(mapping, StatefulMapping):
        raise TypeError(f"mapping must be a smap.StatefulMapping, got {type(mapping).__name__}.")
    adapter, _ = adapt(mapping.mapping_fn, mapping.mapping_kwargs)
    if not isinstance(adapter, ShardMap):
        raise TypeError(
            f"the mapping {mapping.name!r} runs with {mapping.mapping_fn!r}, which has no mesh; "
            f"spec_for and place need sharding.shard_map(...) or jax.shard_map as mapping_fn."
        )
    return adapter


def _rule_spec(state: State, rules: Rules | None) -> PartitionSpec | None:
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


def _check_state(state: Any, what: str) -> None:
    if not isinstance(state, State):
        raise TypeError(f"{what} must be a smap.State, got {type(state).__name__}; wrap arrays in a State.")


def spec_for(mapping: StatefulMapping, state: State, rules: Rules | None = None) -> PartitionSpec:
    """The PartitionSpec that ``state`` gets under ``mapping``.

    A state that ``mapping.state_in_axes`` batches along axis ``a`` is
    partitioned over the mapping's lane axes at dimension ``a``; its other
    dimensions, and all of a shared state, are replicated unless ``rules``
    place them. ``rules`` is ``{selector: PartitionSpec}``: a selector is any
    filter of ``state_in_axes`` (a State type, a tag string, a filter such as
    ``smap.filter.AtPath('mlp.w1')`` for a dotted path), and the first rule
    that selects a state gives the spec of its leading dimensions. A batched
    state's rule leaves its mapped dimension ``None``. ``sharding.spec_for``
    is this function.

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> h = smap.HiddenState(jnp.zeros((jax.device_count(), 3)))
        >>> step = smap.StatefulMapping(lambda x: x, state_in_axes=smap.HiddenState,
        ...                             mapping_fn=smap.devices.shard_map(mesh))
        >>> tuple(smap.devices.spec_for(step, h))
        ('data',)
    """
    adapter = mesh_mapping(mapping)
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


def _check_divides(state: State, spec: PartitionSpec, mesh: Any) -> None:
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


def placement(
    state: State, mesh: Any, mapping: StatefulMapping | None = None, rules: Rules | None = None
) -> NamedSharding:
    """The sharding ``state`` gets on ``mesh`` (the mapping's mesh when ``mesh`` is None).

    With ``mapping``, as :func:`spec_for` says; without it, as the first of
    ``rules`` that selects the state says, or replicated. ``sharding.place``
    and ``smap.checkpoint.restore`` place states so.

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> tuple(smap.devices.placement(smap.ParamState(jnp.ones(4)), mesh).spec)
        ()
    """
    if mapping is not None:
        mesh = mesh_mapping(mapping).mesh if mesh is None else mesh
        spec = spec_for(mapping, state, rules)
    else:
        spec = _rule_spec(state, rules) or PartitionSpec()
    _check_divides(state, spec, mesh)
    return NamedSharding(mesh, spec)


def _put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (the same value on every process) placed with ``sharding``."""
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    # Across processes, each builds its own shards from its copy of the value
    # (jax.device_put of a single-device array fails there with one device per process).
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def move(states: Sequence[State], shardings: Sequence[NamedSharding]) -> None:
    """Put each state's value on the devices with its sharding: every state, or (after an error) none.

    Every value is placed before any state changes, and the states are
    written together under their lock, so a concurrent call of a transform
    sees them all before or all after.

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> from jax.sharding import NamedSharding, PartitionSpec
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> w = smap.ParamState(jnp.ones(jax.device_count()))
        >>> smap.devices.move([w], [NamedSharding(mesh, PartitionSpec("data"))])
        >>> tuple(w.value.sharding.spec)
        ('data',)
    """
    states = list(states)
    placed = [
        jax.tree_util.tree_map(functools.partial(_put, sharding=s), state.peek()) for state, s in zip(states, shardings)
    ]
    with _locks.Holding(_locks.joined(states)):
        for state, value in zip(states, placed):
            state.write_back(value)


def backend_started() -> bool:
    """Whether JAX has created its backends (the number of devices is then fixed).

    Example:
        >>> import jax, smap
        >>> _ = jax.devices()
        >>> smap.devices.backend_started()
        True
    """
    return _compat.backend_started()
