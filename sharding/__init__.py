"""The sharding layer of smap: meshes, state placement and SPMD mapping functions.

Example:
    >>> import jax, jax.numpy as jnp, smap, sharding
    >>> mesh = sharding.make_mesh(data=jax.device_count())
    >>> count = smap.ShortTermState(jnp.zeros(jax.device_count()))
    >>> def step(x):
    ...     count.value = count.value + x
    ...     return jax.lax.psum(x, 'batch')
    >>> step_all = smap.StatefulMapping(step, state_in_axes=smap.ShortTermState, axis_name='batch',
    ...                                 mapping_fn=sharding.shard_map(mesh, axis='data'))
    >>> float(step_all(jnp.ones(jax.device_count()))[0]) == jax.device_count()
    True
    >>> tuple(count.value.sharding.spec)
    ('data',)
"""

from ._adapters import Pmap, ShardMap, adapt, pmap, shard_map
from ._distributed import global_batch, initialize, to_host
from ._mesh import emulate_cpu_devices, make_mesh
from ._placement import StateTable, describe, place, spec_for

__all__ = [
    "make_mesh",
    "emulate_cpu_devices",
    "shard_map",
    "pmap",
    "ShardMap",
    "Pmap",
    "adapt",
    "spec_for",
    "place",
    "describe",
    "StateTable",
    "initialize",
    "global_batch",
    "to_host",
]
