"""JAX API details the sharding layer depends on (JAX 0.9 and 0.10), in one place.

- ``jax.shard_map`` runs without replication checks: the lanes decide what
  varies between devices.
- smap's meshes have axes of type ``Auto``, so that XLA may place values
  freely around the mapped program.
- The ambient mesh is the one ``jax.set_mesh`` sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax._src import mesh as mesh_lib
from jax.sharding import Mesh

try:  # public since JAX 0.10
    from jax.extend.core import jaxprs_in_params
except ImportError:
    from jax._src.core import jaxprs_in_params

__all__ = ["shard_map", "is_shard_map", "make_auto_mesh", "ambient_mesh", "backend_started", "bind_equation", "jaxprs_in_params"]


def is_shard_map(fn: Any) -> bool:
    """Whether ``fn`` is JAX's shard_map (``jax.shard_map`` or the deprecated experimental one)."""
    return fn is jax.shard_map or (
        getattr(fn, "__name__", None) == "shard_map" and getattr(fn, "__module__", "").startswith("jax.")
    )


def shard_map(f: Callable, mesh: Any, in_specs: Any, out_specs: Any, manual_axes: Sequence[str]) -> Callable:
    """``jax.shard_map`` without replication checks, manual over ``manual_axes`` only.

    The other mesh axes are left to the compiler (``axis_names``, the same
    keyword in JAX 0.9 to 0.12): values keep their shardings over them inside
    the mapped program.
    """
    return jax.shard_map(
        f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=frozenset(manual_axes), check_vma=False
    )


def make_auto_mesh(shape: Sequence[int], names: Sequence[str], devices: Sequence[Any] | None = None) -> Mesh:
    axis_types = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(shape), tuple(names), axis_types=axis_types, devices=devices)


def ambient_mesh() -> Any | None:
    """The mesh set by ``jax.set_mesh``, or None.

    The concrete mesh is read (``jax.set_mesh`` records it beside the abstract
    one): smap traces per-lane programs with the abstract mesh cleared (see
    ``smap._compat.without_ambient_mesh``).
    """
    mesh = mesh_lib.get_concrete_mesh()
    return None if mesh is None or mesh.empty else mesh


def backend_started() -> bool:
    """Whether JAX has already created its backends (device count is then fixed)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def bind_equation(eqn: Any, ins: Sequence[Any]) -> list:
    """Apply a jaxpr equation's primitive to ``ins``, as ``jax.core.eval_jaxpr`` does."""
    outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]
