"""The sharding layer of smap: meshes, state placement and SPMD mapping functions.

The device mapping functions (``shard_map``, ``pmap``, ``adapt``) and
``spec_for`` live in :mod:`smap.devices`, beside the mapping that runs them;
this package names them too. It uses only smap's public names.

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

from smap.devices import Pmap, ShardMap, adapt, pmap, shard_map, spec_for

from ._distributed import global_batch, initialize, to_host
from ._mesh import emulate_cpu_devices, make_mesh
from ._placement import StateTable, describe, place

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
