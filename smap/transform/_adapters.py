"""SPMD mapping functions with ``jax.vmap``'s calling convention.

``StatefulMapping`` hands its per-lane program to ``mapping_fn(f, in_axes=...,
out_axes=..., axis_name=..., axis_size=...)``. The adapters here run it on
several devices and give exactly the result of ``jax.vmap``: the mapped axis
is split into one contiguous block of lanes per device, each device maps its
block with a local ``jax.vmap``, and collectives on ``axis_name`` span all
lanes of all devices (see :mod:`smap.transform._spanning`). Their public names
are in :mod:`smap.devices` (and ``sharding`` re-exports them).

- :class:`ShardMap` runs the blocks with ``jax.shard_map`` over mesh axes: the
  mapped axis of arguments, outputs and batched states is partitioned over
  those axes, and stays so between calls. The ``shard_map`` is manual over
  those axes only; the other mesh axes are left to XLA, so values split over
  them (a weight over ``'model'``) stay split inside the call.
- :class:`Pmap` runs them with ``jax.pmap`` over a list of devices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from .. import _annotations, _compat
from ._plan import LanePlan, Lanes
from ._spanning import Span, spanning_lane

__all__ = ["ShardMap", "Pmap", "shard_map", "pmap", "adapt"]


def _flat_axes(axes: Any, tree: Any, what: str) -> list[int | None]:
    out: list[int | None] = []

    def expand(axis: Any, subtree: Any) -> None:
        out.extend([axis] * len(jax.tree_util.tree_leaves(subtree)))

    try:
        jax.tree_util.tree_map(expand, axes, tree, is_leaf=lambda x: x is None)
    except ValueError as error:
        raise ValueError(f"{what} {axes!r} does not match the structure it applies to: {error}") from None
    return out


def _lane_aval(x: Any, axis: int | None) -> jax.ShapeDtypeStruct:
    shape = tuple(jnp.shape(x))
    if axis is not None:
        shape = shape[:axis] + shape[axis + 1 :]
    return jax.ShapeDtypeStruct(shape, jnp.result_type(x), weak_type=getattr(x, "weak_type", False))


class _Adapter:
    """The shared steps: take a lane program and its plan, span collectives, map locally.

    A mapping hands an adapter its per-lane program and plan as one value
    (:meth:`map_lanes`); called with ``jax.vmap``'s convention, an adapter
    traces the function once into such a value itself.
    """

    name = "adapter"

    def __call__(
        self,
        f: Callable,
        in_axes: Any = 0,
        out_axes: Any = 0,
        axis_name: Hashable | None = None,
        axis_size: int | None = None,
    ) -> Callable:
        return functools.partial(self._call, f, in_axes, out_axes, axis_name, axis_size)

    def _call(
        self, f: Callable, in_axes: Any, out_axes: Any, axis_name: Hashable | None, axis_size: int | None, *args: Any
    ) -> Any:
        if isinstance(in_axes, list):
            in_axes = tuple(in_axes)
        if not isinstance(in_axes, tuple):
            in_axes = (in_axes,) * len(args)
        leaves, tree = jax.tree_util.tree_flatten(args)
        axes = [None if a is None else a % jnp.ndim(x) for a, x in zip(_flat_axes(in_axes, args, "in_axes"), leaves)]
        sizes = {jnp.shape(x)[a] for x, a in zip(leaves, axes) if a is not None}
        if axis_size is None:
            if len(sizes) != 1:
                raise ValueError(
                    f"{self.name}: cannot infer the mapped size from sizes {sorted(sizes)}; give axis_size."
                )
            axis_size = sizes.pop()
        lane_avals = [_lane_aval(x, a) for x, a in zip(leaves, axes)]

        def lane(*lane_leaves: Any) -> Any:
            return f(*jax.tree_util.tree_unflatten(tree, lane_leaves))

        axis_env = [(axis_name, axis_size)] if axis_name is not None else None
        program, out_shape = jax.make_jaxpr(lane, axis_env=axis_env, return_shape=True)(*lane_avals)
        out_leaves, out_tree = jax.tree_util.tree_flatten(out_shape)
        flat_out_axes = _flat_axes(out_axes, out_shape, "out_axes")
        lanes = Lanes(program, LanePlan(tuple(axes), tuple(flat_out_axes), axis_name, axis_size))
        return jax.tree_util.tree_unflatten(out_tree, self.map_lanes(lanes)(*leaves))

    def map_lanes(self, lanes: Lanes) -> Callable[..., list]:
        """The function of the program's input leaves that runs ``lanes`` on the devices, as its plan says.

        It returns the output leaves, each with its mapped axis where the
        plan puts it. The lane program is not traced again: collectives are
        rewritten on ``lanes.jaxpr``.
        """
        return functools.partial(self._map, lanes)

    def enclose(
        self,
        compute: Callable[..., list],
        leaves: list,
        in_axes: Sequence[int | None],
        out_axes: Sequence[int | None],
        like: list[int | None],
    ) -> list:
        """``compute(*leaves)``: a mapping's whole program (its lanes, then their tail), as the adapter runs it.

        ``in_axes`` and ``out_axes`` are the mapped axes of the leaves and
        of the outputs; ``like[k]`` is the input leaf whose layout output
        ``k`` keeps (a written state's value), or None.
        """
        return compute(*leaves)

    def _local_lanes(self, axis_size: int, n_devices: int, where: str = "") -> int:
        if axis_size % n_devices:
            raise ValueError(
                f"{self.name}: the mapped size {axis_size} is not divisible by the {n_devices} devices{where} "
                f"it is split over; use a batch that is a multiple of {n_devices}."
            )
        return axis_size // n_devices

    def _local_program(self, lanes: Lanes, axes: list, out_axes: list, span: Span) -> Callable:
        if span.local_size == 1:
            # A device's sum over its one lane is that lane's product: fusing it only rewrites the
            # contraction, in a form XLA:CPU leaves to a slower kernel (docs/performance.md).
            lanes = lanes.unfused()
        lane = (
            spanning_lane(lanes.jaxpr, span, [a is not None for a in axes])
            if lanes.plan.axis_name is not None
            else lanes
        )
        if span.local_size == 1:
            # The device's lane runs as it was traced: under a ``jax.vmap`` of one lane, every value
            # would carry an axis of size 1, and XLA:CPU's reductions run several times slower on those.
            return functools.partial(_one_lane, lane, axes, out_axes)
        return jax.vmap(
            lambda *a: tuple(lane(*a)),
            in_axes=tuple(axes),
            out_axes=tuple(out_axes),
            axis_name=span.local_name,
            axis_size=span.local_size,
        )

    def _map(self, lanes: Lanes, *leaves: Any) -> list:
        raise NotImplementedError


def _one_lane(
    lane: Callable[..., Any], axes: Sequence[int | None], out_axes: Sequence[int | None], *args: Any
) -> tuple:
    """``lane`` on a device's block of one lane: the mapped axes dropped from ``args``, put back on the outputs."""
    lane_args = [x if a is None else jax.lax.squeeze(x, (a,)) for x, a in zip(args, axes)]
    return tuple(y if a is None else jnp.expand_dims(y, a) for y, a in zip(lane(*lane_args), out_axes))


def _axes(lanes: Lanes, leaves: Sequence[Any]) -> tuple[list[int | None], list[int | None]]:
    """The plan's input and output axes, made non-negative."""
    plan = lanes.plan
    in_axes = [None if a is None else a % jnp.ndim(x) for a, x in zip(plan.in_axes, leaves)]
    out_avals = lanes.program.out_avals
    out_axes = [None if a is None else a % (len(o.shape) + 1) for a, o in zip(plan.out_axes, out_avals)]
    return in_axes, out_axes


class ShardMap(_Adapter):
    """A ``mapping_fn`` that partitions the mapped axis over mesh axes with ``jax.shard_map``.

    Arguments:
        mesh: the device mesh; ``None`` takes the ambient one (``jax.set_mesh``).
        axis: the mesh axis (or tuple of axes) that the lanes are split over;
            ``None`` means every axis of the mesh. The other axes are left to
            the compiler: values keep their shardings over them during a call.
    """

    name = "sharding.shard_map"

    def __init__(self, mesh: Any = None, axis: str | Sequence[str] | None = None):
        if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
            raise TypeError(f"{self.name}: mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}.")
        names = (axis,) if isinstance(axis, str) else axis
        if names is not None and not (isinstance(names, Sequence) and all(isinstance(a, str) for a in names)):
            raise TypeError(
                f"{self.name}: axis must be a mesh axis name, a tuple of them, or None (every axis), got {axis!r}."
            )
        self._mesh = mesh
        self._axis = None if names is None else tuple(names)
        if mesh is not None:
            self.mesh_and_axes()

    def mesh_and_axes(self) -> tuple[Any, tuple[str, ...]]:
        """The mesh and the mesh axes that lanes are split over.

        Example:
            >>> import jax, smap
            >>> mesh = jax.make_mesh((4, 2), ('data', 'model'))
            >>> smap.devices.shard_map(mesh, axis='data').mesh_and_axes()[1]
            ('data',)
            >>> smap.devices.shard_map(mesh, axis=None).mesh_and_axes()[1]  # every axis of the mesh
            ('data', 'model')
        """
        mesh = self._mesh if self._mesh is not None else _compat.ambient_mesh()
        if mesh is None:
            raise ValueError(
                f"{self.name}: no mesh. Pass one (sharding.shard_map(mesh) or "
                f"mapping_kwargs={{'mesh': mesh}} with jax.shard_map), or call under jax.set_mesh(mesh)."
            )
        axes = tuple(mesh.axis_names) if self._axis is None else self._axis
        for axis in axes:
            if axis not in mesh.axis_names:
                raise ValueError(f"{self.name}: the mesh has axes {tuple(mesh.axis_names)}, not {axis!r}.")
        return mesh, axes

    @property
    def mesh(self) -> Any:
        return self.mesh_and_axes()[0]

    @property
    def axes(self) -> tuple[str, ...]:
        return self.mesh_and_axes()[1]

    def lane_spec(self, ndim: int, axis: int | None) -> PartitionSpec:
        """The PartitionSpec of a value of rank ``ndim`` mapped along ``axis`` (None: replicated).

        Example:
            >>> import jax, smap
            >>> from jax.sharding import PartitionSpec as P
            >>> mapping_fn = smap.devices.shard_map(jax.make_mesh((8,), ('data',)), axis='data')
            >>> mapping_fn.lane_spec(2, 1) == P(None, 'data'), mapping_fn.lane_spec(2, None) == P()
            (True, True)
        """
        if axis is None:
            return PartitionSpec()
        axes = self.axes
        return PartitionSpec(*([None] * axis), axes[0] if len(axes) == 1 else axes)

    def enclose(
        self,
        compute: Callable[..., list],
        leaves: list,
        in_axes: Sequence[int | None],
        out_axes: Sequence[int | None],
        like: list[int | None],
    ) -> list:
        """``compute`` with the mesh's Explicit axes made Auto (``jax.sharding.auto_axes``) while it runs.

        Inside, the lanes' ``shard_map`` is manual over the lane axes only and
        XLA lays out the rest, as on a mesh of Auto axes: a value split over
        another axis stays split while the lanes compute. Each output comes
        back typed as the Explicit axes say: a written state as its value was
        when that was on the mesh, an output mapped along ``axis`` split over
        the lane axes there, any other output replicated.
        """
        mesh, lane_axes = self.mesh_and_axes()
        if not _compat.explicit_axes(mesh):
            return compute(*leaves)
        self._check_context(mesh)  # before auto_axes, which would refuse another context mesh itself
        specs = []
        for k, axis in enumerate(out_axes):
            j = like[k]
            kept = None if j is None or in_axes[j] != axis else _compat.spec_on(leaves[j], mesh)
            specs.append(self.lane_spec(0, axis) if kept is None else kept)
        return _compat.with_auto_axes(compute, mesh, specs)(*leaves)

    def _map(self, lanes: Lanes, *leaves: Any) -> list:
        mesh, mesh_axes = self.mesh_and_axes()
        self._check_context(mesh)
        mesh = _compat.in_context_types(mesh)
        with _annotations.lanes_over(mesh_axes):  # sharding annotations in the lanes drop these axes
            return self._map_over(mesh, mesh_axes, lanes, leaves)

    def _map_over(self, mesh: Any, mesh_axes: tuple, lanes: Lanes, leaves: tuple) -> list:
        axes, out_axes = _axes(lanes, leaves)
        sizes = tuple(mesh.shape[a] for a in mesh_axes)
        where = " of mesh " + ", ".join(f"axis {a!r} (size {n})" for a, n in zip(mesh_axes, sizes))
        local = self._local_lanes(lanes.plan.axis_size, math.prod(sizes), where)
        span = Span(lanes.plan.axis_name, mesh_axes, sizes, Span.fresh_name(), local, self.name)
        body = self._local_program(lanes, axes, out_axes, span)
        in_specs = tuple(self.lane_spec(jnp.ndim(x), a) for x, a in zip(leaves, axes))
        out_specs = tuple(self.lane_spec(0, a) for a in out_axes)
        placed = _compat.onto_mesh(leaves, mesh, in_specs)
        return list(_compat.shard_map(body, mesh, in_specs, out_specs, mesh_axes)(*placed))

    def _check_context(self, mesh: Any) -> None:
        """A mapping given its own mesh runs under no global mesh, or under that same one.

        JAX traces a program under one context mesh, and a ``jax.shard_map`` on
        another mesh inside it cannot run (JAX says "context mesh ... should
        match"). Entering the mapping's mesh for the call instead would hide
        the global one from everything else in the program (the arguments'
        shardings, annotations, an enclosing ``jax.jit``), so the call is
        refused with both meshes named and the two ways out.
        """
        ambient = _compat.ambient_mesh()
        if ambient is None or ambient == mesh:
            return
        raise ValueError(
            f"{self.name}: the mapping runs on {_mesh_text(mesh)}, but it is called under jax.set_mesh("
            f"{_mesh_text(ambient)}), and one program runs under one mesh. Call it under that mesh "
            f"(`with jax.set_mesh(mesh):`, mesh the mapping's), or build the mapping on the global mesh "
            f"(sharding.shard_map(axis=...) with no mesh, or jax.shard_map with no mesh in mapping_kwargs, "
            f"takes the one jax.set_mesh sets)."
        )

    def __repr__(self) -> str:
        return f"sharding.shard_map(mesh={self._mesh!r}, axis={self._axis!r})"


def _mesh_text(mesh: Any) -> str:
    """A mesh with its devices, which tell two meshes of the same axes apart."""
    return f"{mesh} of devices {[d.id for d in mesh.devices.flat]}"


class Pmap(_Adapter):
    """A ``mapping_fn`` that runs blocks of lanes on devices with ``jax.pmap``.

    Arguments:
        devices: the devices to use; all local devices by default. With fewer
            lanes than devices, the first ``axis_size`` devices are used.
    """

    name = "sharding.pmap"

    def __init__(self, devices: Sequence[Any] | None = None):
        self.devices = None if devices is None else _check_devices(devices, "sharding.pmap")

    def _map(self, lanes: Lanes, *leaves: Any) -> list:
        def on_devices(*leaves: Any) -> list:
            # jax.pmap brings its own devices: no ambient mesh, no Explicit mesh axes in the values' types
            # (and no mesh axis for the lanes' sharding annotations).
            with _compat.without_ambient_mesh(), _annotations.lanes_over(()):
                return self._pmap(lanes, list(leaves))

        return _compat.outside_explicit_mesh(on_devices, list(leaves), len(lanes.plan.out_axes))(*leaves)

    def _pmap(self, lanes: Lanes, leaves: list) -> list:
        axes, out_axes = _axes(lanes, leaves)
        axis_size = lanes.plan.axis_size
        devices = self.devices if self.devices is not None else jax.local_devices()
        n = max(1, min(len(devices), axis_size))  # (no lanes: one device runs none)
        local = self._local_lanes(axis_size, n)
        ambient = _compat.ambient_mesh()
        if ambient is not None and set(ambient.devices.flat) != set(devices[:n]):
            raise ValueError(
                f"{self.name}: the lanes run on devices {sorted(d.id for d in devices[:n])}, but the ambient mesh "
                f"(jax.set_mesh) holds devices {sorted(d.id for d in ambient.devices.flat)}, and one program runs "
                f"on one set of devices. Map over the mesh's devices (sharding.pmap(mesh.devices.flat)) or call "
                f"outside jax.set_mesh."
            )
        device_axis = Span.fresh_name("devices")
        span = Span(lanes.plan.axis_name, (device_axis,), (n,), Span.fresh_name(), local, self.name)
        body = self._local_program(
            lanes, [None if a is None else 0 for a in axes], [None if a is None else 0 for a in out_axes], span
        )
        blocks = [
            x if a is None else jnp.moveaxis(x, a, 0).reshape((n, local, *jnp.shape(x)[:a], *jnp.shape(x)[a + 1 :]))
            for x, a in zip(leaves, axes)
        ]
        # pmap needs a mapped argument; one that the body ignores gives it one.
        mapped = jax.pmap(
            lambda *blocks_and_device_ids: body(*blocks_and_device_ids[:-1]),
            axis_name=device_axis,
            in_axes=(*(None if a is None else 0 for a in axes), 0),
            out_axes=0,
            devices=devices[:n],
        )
        results = []
        for y, a in zip(mapped(*blocks, jnp.arange(n)), out_axes):
            if a is None:
                results.append(y[0])
            else:
                y = y.reshape((axis_size, *y.shape[2:]))
                results.append(jnp.moveaxis(y, 0, a))
        return results

    def __repr__(self) -> str:
        return f"sharding.pmap(devices={self.devices!r})"


def _check_devices(devices: Sequence[Any], what: str) -> list:
    """``devices`` as a list, or an error naming the argument and what it must hold."""
    if isinstance(devices, (str, bytes)) or not isinstance(devices, Sequence):
        raise TypeError(f"{what}: devices must be a list of JAX devices, got {type(devices).__name__} {devices!r}.")
    devices = list(devices)
    if not devices:
        raise ValueError(f"{what}: devices is empty; give at least one device (or None for all local devices).")
    for i, device in enumerate(devices):
        if not isinstance(device, jax.Device):
            raise TypeError(
                f"{what}: devices[{i}] must be a JAX device (an entry of jax.devices()), "
                f"got {type(device).__name__} {device!r}."
            )
    if len(set(devices)) < len(devices):
        twice = next(d for i, d in enumerate(devices) if d in devices[:i])
        raise ValueError(f"{what}: devices lists {twice} more than once; each device runs one block of lanes.")
    return devices


def shard_map(mesh: Any = None, axis: str | Sequence[str] | None = "data") -> ShardMap:
    """A ``mapping_fn`` that splits the lanes over ``axis`` of ``mesh`` with ``jax.shard_map``.

    Every lane runs the same program as under ``jax.vmap``; collectives on the
    mapping's ``axis_name`` see all lanes. The mapped axis of arguments,
    outputs and batched states is partitioned over the mesh axis, so batched
    states stay sharded between calls. Every other mesh axis is left to the
    compiler: a state split over it (by ``sharding.place`` rules, or as it
    was put there) stays split while the lanes compute (data and model
    parallelism at once).

    Arguments:
        mesh: a ``jax.sharding.Mesh``; ``None`` takes the ambient mesh.
        axis: the mesh axis, or a tuple of axes, to split the lanes over
            (``None``: all axes of the mesh).

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
        >>> double = smap.StatefulMapping(lambda x: 2 * x, mapping_fn=smap.devices.shard_map(mesh))
        >>> double(jnp.arange(float(jax.device_count()))).sum() == 2 * sum(range(jax.device_count()))
        Array(True, dtype=bool)
    """
    return ShardMap(mesh, axis)


def pmap(devices: Sequence[Any] | None = None) -> Pmap:
    """A ``mapping_fn`` that runs blocks of lanes on ``devices`` with ``jax.pmap``.

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> total = smap.StatefulMapping(lambda x: jax.lax.psum(x, 'i'), axis_name='i', mapping_fn=smap.devices.pmap())
        >>> total(jnp.ones(16))[0]
        Array(16., dtype=float32)
    """
    return Pmap(devices)


class _Smap(ShardMap):
    """``jax.smap`` as a mapping_fn: a :class:`ShardMap` over the one mesh axis it names."""

    name = "jax.smap"


def adapt(mapping_fn: Callable, mapping_kwargs: dict, axis_name: Hashable | None = None) -> tuple[Callable, dict]:
    """The one rule that routes JAX's SPMD maps to the sharding layer.

    ``jax.pmap``, ``jax.shard_map`` and ``jax.smap`` (or partials of them) do
    not take ``jax.vmap``'s calling convention (``smap.transform.MappingFn``):
    they become the adapter that runs the lanes the same way, with the options
    they were given. ``jax.smap`` splits the lanes over the mesh axis its
    ``axis_name`` names (in ``mapping_kwargs`` or a partial; else the
    mapping's ``axis_name``, as ``jax.smap``'s one name serves both), of the
    mesh in ``mapping_kwargs`` or else the ambient one (``jax.set_mesh``). Any other
    function (``jax.vmap``, an adapter, a user's function) is returned
    unchanged. ``StatefulMapping`` asks this of every ``mapping_fn``.

    Example:
        >>> import functools, jax, smap
        >>> adapter, _ = smap.devices.adapt(functools.partial(jax.smap, axis_name="data"), {})
        >>> adapter.name
        'jax.smap'
    """
    keywords: dict = {}
    target = mapping_fn
    if isinstance(mapping_fn, functools.partial):
        target, keywords = mapping_fn.func, dict(mapping_fn.keywords)
    options = {**keywords, **mapping_kwargs}
    if target is jax.pmap:
        _accept(options, {"devices"}, "jax.pmap")
        return Pmap(options.get("devices")), {}
    if _compat.is_shard_map(target):
        _accept(options, {"mesh", "axis_names", "check_vma", "check_rep"}, "jax.shard_map")
        names = options.get("axis_names") or None
        return ShardMap(options.get("mesh"), tuple(names) if names else None), {}
    if _compat.is_smap(target):
        _accept(options, {"mesh", "axis_name"}, "jax.smap")
        mesh_axis = options.get("axis_name", axis_name)
        if mesh_axis is None:
            raise TypeError(
                "jax.smap as mapping_fn needs the mesh axis to split the lanes over: the mapping's axis_name, "
                "mapping_kwargs={'axis_name': 'data'} or functools.partial(jax.smap, axis_name='data')."
            )
        return _Smap(options.get("mesh"), mesh_axis), {}
    return mapping_fn, mapping_kwargs


def _accept(options: dict, allowed: set[str], what: str) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(
            f"{what} as mapping_fn takes only {sorted(allowed)} in mapping_kwargs; the mapping decides the "
            f"rest (in_axes, out_axes, in_specs, out_specs, its axis_name), got {sorted(unknown)}."
        )
