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
    adapter, _ = adapt(mapping.mapping_fn, mapping.mapping_kwargs, mapping.axis_name)
    if not isinstance(adapter, ShardMap):
        raise TypeError(
            f"the mapping {mapping.name!r} runs with {mapping.mapping_fn!r}, which has no mesh; "
            f"spec_for and place need sharding.shard_map(...) or jax.shard_map as mapping_fn."
        )
    return adapter


def _rule_spec(state: State, rules: Rules | None) -> PartitionSpec | None:
    """The first rule that selects ``state``; a rule that fits none of its leaves is an error.

    A rule fits a leaf of at least its rank. A state whose value is a pytree
    (an optax state) may hold leaves of lower rank (a scalar step count):
    those are replicated, and the rule places the others.
    """
    if rules is not None and not isinstance(rules, Mapping):
        raise TypeError(
            f"rules must be a dict from a selector (a State type, filter, path or tag) to a PartitionSpec, "
            f"got {type(rules).__name__}."
        )
    for selector, spec in (rules or {}).items():
        if not isinstance(spec, PartitionSpec):
            entries = (
                ", ".join(map(repr, spec)) if isinstance(spec, (tuple, list)) else "" if spec is None else repr(spec)
            )
            raise TypeError(
                f"rules[{selector!r}] must be a PartitionSpec, got {type(spec).__name__} {spec!r}; "
                f"write PartitionSpec({entries}), a mesh axis (or None) per dimension."
            )
        if to_filter(selector)(state.path, state):
            ranks = [np.ndim(x) for x in jax.tree_util.tree_leaves(state.peek())]
            most = max(ranks, default=0)
            if len(spec) > most:
                has = f"its value has {most}" if len(ranks) == 1 else f"its leaves have at most {most}"
                raise ValueError(f"the rule {spec} for {state.describe()} names {len(spec)} dimensions, but {has}.")
            return spec
    return None


def _check_state(state: Any, what: str) -> None:
    if not isinstance(state, State):
        raise TypeError(f"{what} must be a smap.State, got {type(state).__name__}; wrap arrays in a State.")


def _leaf_spec(
    state: State, where: str, ndim: int, rule: PartitionSpec | None, axis: int | None, adapter: ShardMap | None
) -> PartitionSpec:
    """The spec of a leaf of rank ``ndim`` (at ``where`` in the state's value): its rule if it fits, its lanes."""
    entries = list(rule) if rule is not None and len(rule) <= ndim else []
    entries += [None] * (ndim - len(entries))
    if axis is not None and adapter is not None:
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"the mapping splits {state.describe()} along axis {axis}, but its leaf{where} has rank {ndim}."
            )
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


def _leaf_specs(state: State, mapping: StatefulMapping | None, rules: Rules | None) -> Any:
    """A PartitionSpec per leaf of the state's value, in a pytree of the value's structure."""
    adapter = None if mapping is None else mesh_mapping(mapping)
    axis = None if mapping is None else mapping.state_axis(state)
    rule = _rule_spec(state, rules)
    leaves, tree = jax.tree_util.tree_flatten_with_path(state.peek())
    specs = [_leaf_spec(state, jax.tree_util.keystr(path), np.ndim(x), rule, axis, adapter) for path, x in leaves]
    return jax.tree_util.tree_unflatten(tree, specs)


def spec_for(mapping: StatefulMapping, state: State, rules: Rules | None = None) -> Any:
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

    Rules apply per leaf: for a state whose value is a pytree (an optax
    state, a dict of buffers) the result is a pytree of that structure with
    one PartitionSpec per leaf. A rule places each leaf of at least its rank;
    a leaf of lower rank (a scalar step count) is replicated. A rule that
    fits no leaf is an error.

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> h = smap.HiddenState(jnp.zeros((jax.device_count(), 3)))
        >>> step = smap.StatefulMapping(lambda x: x, state_in_axes=smap.HiddenState,
        ...                             mapping_fn=smap.devices.shard_map(mesh))
        >>> tuple(smap.devices.spec_for(step, h))
        ('data',)
        >>> buffers = smap.LongTermState({'count': jnp.zeros((), jnp.int32), 'sum': jnp.zeros((16, 2))})
        >>> specs = smap.devices.spec_for(step, buffers, {smap.LongTermState: P('data')})
        >>> {name: tuple(spec) for name, spec in specs.items()}
        {'count': (), 'sum': ('data',)}
    """
    mesh_mapping(mapping)
    _check_state(state, "spec_for: state")
    return _leaf_specs(state, mapping, rules)


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _check_divides(state: State, specs: Any, mesh: Any) -> None:
    """Every dimension that a leaf's spec partitions is a multiple of its mesh axes' size."""
    leaves = jax.tree_util.tree_flatten_with_path(state.peek())[0]
    for (path, leaf), spec in zip(leaves, jax.tree_util.tree_leaves(specs, is_leaf=_is_spec)):
        where = f" (leaf {jax.tree_util.keystr(path)})" if path else ""
        for dim, entry in enumerate(spec):
            names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            for name in names:
                if name not in mesh.shape:
                    raise ValueError(
                        f"the spec {spec} for {state.describe()} names mesh axis {name!r}, but the mesh "
                        f"has axes {tuple(mesh.axis_names)}."
                    )
            size = int(np.prod([mesh.shape[name] for name in names]))
            if np.shape(leaf)[dim] % size:
                axes = " x ".join(f"{name!r} ({mesh.shape[name]})" for name in names)
                raise ValueError(
                    f"{state.describe()}{where} has size {np.shape(leaf)[dim]} in dimension {dim}, which the "
                    f"mesh axis {axes} of size {size} does not divide (spec {spec})."
                )


def placement(state: State, mesh: Any, mapping: StatefulMapping | None = None, rules: Rules | None = None) -> Any:
    """The sharding each leaf of ``state`` gets on ``mesh`` (the mapping's mesh when ``mesh`` is None).

    With ``mapping``, as :func:`spec_for` says; without it, as the first of
    ``rules`` that selects the state says, or replicated. A NamedSharding
    for a state holding one array; for a pytree value, a pytree of that
    structure with one NamedSharding per leaf. ``sharding.place`` and
    ``smap.checkpoint.restore`` place states so.

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> tuple(smap.devices.placement(smap.ParamState(jnp.ones(4)), mesh).spec)
        ()
    """
    if mapping is not None:
        mesh = mesh_mapping(mapping).mesh if mesh is None else mesh
    specs = _leaf_specs(state, mapping, rules)
    _check_divides(state, specs, mesh)
    return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def move(states: Sequence[State], shardings: Sequence[Any]) -> None:
    """Put each state's value on the devices with its sharding: every state, or (after an error) none.

    A state's sharding is one NamedSharding for all its leaves, or a pytree
    of the value's structure with one per leaf (as :func:`placement` gives).

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
        jax.tree_util.tree_map(functools.partial(_compat.put, sharding=s), state.peek())
        if isinstance(s, NamedSharding)
        else jax.tree_util.tree_map(_compat.put, state.peek(), s)
        for state, s in zip(states, shardings)
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
