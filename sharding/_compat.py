"""JAX differences across releases, handled in one place.

- ``jax.shard_map`` moved from ``jax.experimental.shard_map`` to the top
  level, and its ``check_rep`` flag became ``check_vma``.
- Mesh axes gained types (``Explicit``/``Auto``/``Manual``); smap's meshes use
  ``Auto`` so that XLA may place values freely around the mapped program.
- The ambient mesh is set by ``jax.set_mesh``/``jax.sharding.use_mesh``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

try:  # public since JAX 0.8
    from jax.extend.core import jaxprs_in_params
except ImportError:
    from jax._src.core import jaxprs_in_params

__all__ = ["shard_map", "is_shard_map", "make_auto_mesh", "ambient_mesh", "backend_started", "bind_equation", "jaxprs_in_params"]

try:
    _shard_map = jax.shard_map
except AttributeError:  # JAX before 0.6
    from jax.experimental.shard_map import shard_map as _shard_map

_CHECK_FLAG = "check_vma" if "check_vma" in inspect.signature(_shard_map).parameters else "check_rep"


def is_shard_map(fn: Any) -> bool:
    """Whether ``fn`` is JAX's shard_map (at its top-level or experimental location)."""
    return fn is _shard_map or (
        getattr(fn, "__name__", None) == "shard_map" and getattr(fn, "__module__", "").startswith("jax")
    )


def shard_map(f: Callable, mesh: Any, in_specs: Any, out_specs: Any) -> Callable:
    """``jax.shard_map`` without replication checks (the lanes decide what varies)."""
    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{_CHECK_FLAG: False})


def make_auto_mesh(shape: Sequence[int], names: Sequence[str], devices: Sequence[Any] | None = None) -> Mesh:
    kwargs: dict[str, Any] = {}
    if hasattr(jax.sharding, "AxisType"):
        kwargs["axis_types"] = (jax.sharding.AxisType.Auto,) * len(names)
    if devices is not None:
        kwargs["devices"] = list(devices)
    return jax.make_mesh(tuple(shape), tuple(names), **kwargs)


def ambient_mesh() -> Any | None:
    """The mesh set by ``jax.set_mesh`` (or a ``with mesh:`` block), or None.

    The concrete mesh is read first: smap traces per-lane programs with the
    abstract mesh cleared (see ``smap._compat.without_ambient_mesh``), and
    ``jax.set_mesh`` records both.
    """
    from jax._src import mesh as mesh_lib

    concrete = getattr(mesh_lib, "get_concrete_mesh", lambda: None)()
    if concrete is not None and not concrete.empty:
        return concrete
    get_abstract = getattr(jax.sharding, "get_abstract_mesh", None)
    if get_abstract is not None:
        mesh = get_abstract()
        if mesh is not None and not getattr(mesh, "empty", False) and mesh.shape:
            return mesh
    physical = mesh_lib.thread_resources.env.physical_mesh
    return None if physical.empty else physical


def backend_started() -> bool:
    """Whether JAX has already created its backends (device count is then fixed)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def bind_equation(eqn: Any, ins: Sequence[Any]) -> list:
    """Apply a jaxpr equation's primitive to ``ins``, as ``jax.core.eval_jaxpr`` does.

    ``Primitive.get_bind_params`` returned ``(subfuns, params)`` before JAX 0.8
    and returns ``params`` (holding ``subfuns``) since.
    """
    bound = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bound, tuple):
        subfuns, params = bound
        outs = eqn.primitive.bind(*subfuns, *ins, **params)
    else:
        outs = eqn.primitive.bind(*ins, **bound)
    return list(outs) if eqn.primitive.multiple_results else [outs]
