"""Several processes, one mesh: start-up, per-process data and reading results back.

Every process runs the same program. :func:`initialize` connects it to the
others through ``jax.distributed``; after that ``jax.devices()`` lists the
devices of all processes, a mesh over them is global, and a
``StatefulMapping`` with ``sharding.shard_map(mesh)`` runs one program over
all of them. Each process feeds its own slice of the batch
(:func:`global_batch`); states live as global arrays; :func:`to_host` reads
any array back on every process.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ._mesh import emulate_cpu_devices

__all__ = ["initialize", "global_batch", "to_host"]

ENV_COORDINATOR = "SMAP_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SMAP_NUM_PROCESSES"
ENV_PROCESS_ID = "SMAP_PROCESS_ID"
ENV_CPU_DEVICES = "SMAP_CPU_DEVICES"


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_devices: int | None = None,
    heartbeat_timeout_seconds: int = 10,
    initialization_timeout: int = 60,
) -> bool:
    """Join this process to a multi-process JAX job; call before any JAX computation.

    Settings come from the arguments, else from the variables that
    ``scripts/launch_local.py`` sets (``SMAP_COORDINATOR_ADDRESS``,
    ``SMAP_NUM_PROCESSES``, ``SMAP_PROCESS_ID``, ``SMAP_CPU_DEVICES``). With
    none of them, nothing is done and ``False`` is returned: a single
    process. On GPU hosts, TPU pods and SLURM, call
    ``jax.distributed.initialize()`` instead: it finds its settings itself.

    CPU processes use gloo collectives, emulate ``cpu_devices`` devices each,
    and a coordinator on a loopback address binds to that address only. A
    process whose peers stop sending heartbeats for
    ``heartbeat_timeout_seconds`` fails instead of waiting forever.

    Returns:
        Whether a multi-process job was joined.

    Example:
        >>> import sharding
        >>> sharding.initialize()   # outside launch_local.py: a single process
        False
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes if num_processes is not None else _int_env(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _int_env(ENV_PROCESS_ID)
    cpu_devices = cpu_devices or _int_env(ENV_CPU_DEVICES)
    if cpu_devices:
        emulate_cpu_devices(cpu_devices)
    if coordinator_address is None:
        return False
    if num_processes is None or process_id is None:
        raise ValueError(
            f"initialize: with coordinator {coordinator_address!r}, num_processes and process_id are "
            f"needed too (or {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})."
        )
    if not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
        raise ValueError(f"initialize: num_processes must be a positive int, got {num_processes!r}.")
    if not isinstance(process_id, (int, np.integer)) or not 0 <= process_id < num_processes:
        raise ValueError(
            f"initialize: process_id must be an int from 0 to num_processes - 1 = {num_processes - 1}, "
            f"got {process_id!r}."
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    host = coordinator_address.rsplit(":", 1)[0]
    bind = coordinator_address if host in ("127.0.0.1", "localhost", "[::1]") else None
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        coordinator_bind_address=bind,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout=initialization_timeout,
    )
    return True


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def global_batch(local: Any, mesh: Any, axis: str | tuple[str, ...] = "data") -> Any:
    """Global arrays from this process's slice of a batch (split along axis 0).

    Process ``p`` passes rows ``p * n : (p + 1) * n`` of the global batch; the
    result is partitioned over ``axis`` of ``mesh``. In a single process it
    places the whole batch.

    Example:
        >>> import jax, numpy as np, sharding
        >>> mesh = sharding.make_mesh(data=jax.device_count())
        >>> x = sharding.global_batch(np.ones((jax.device_count() * 2, 3), np.float32), mesh)
        >>> tuple(x.sharding.spec)
        ('data',)
    """
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"global_batch: mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    for name in (axis,) if isinstance(axis, str) else axis:
        if name not in mesh.axis_names:
            raise ValueError(f"global_batch: the mesh has axes {tuple(mesh.axis_names)}, not {name!r}.")
    sharding = NamedSharding(mesh, PartitionSpec(axis))

    def place(path: Any, x: Any) -> jax.Array:
        x = np.asarray(x)
        where = f"local{jax.tree_util.keystr(path)}"
        if x.ndim == 0:
            raise ValueError(f"global_batch: {where} is a scalar; a batch is split along its axis 0.")
        try:
            return jax.make_array_from_process_local_data(sharding, x)
        except ValueError as error:  # rows that the mesh axis does not divide: JAX's words, our argument's name
            raise ValueError(
                f"global_batch: {where} (shape {x.shape}) cannot be split along axis 0 over mesh axis "
                f"{axis!r} ({error})"
            ) from error

    return jax.tree_util.tree_map_with_path(place, local)


def to_host(x: Any) -> Any:
    """NumPy copies of (global) arrays, the whole value on every process.

    Example:
        >>> import jax.numpy as jnp, sharding
        >>> sharding.to_host({'a': jnp.arange(3)})
        {'a': array([0, 1, 2], dtype=int32)}
    """

    def fetch(a: Any) -> np.ndarray:
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(a)

    return jax.tree_util.tree_map(fetch, x)
