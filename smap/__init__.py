"""smap: state-aware mapping across devices, on JAX.

Write stateful code with :class:`State` and :class:`nn.Module`, then map it
over a batch with :func:`vmap` (or :class:`StatefulMapping` with any
``mapping_fn``): the same program gives the same results under ``jax.vmap``,
``jax.pmap``, ``jax.shard_map`` and the ``sharding`` adapters.

Example:
    >>> import jax.numpy as jnp, smap
    >>> count = smap.ShortTermState(jnp.zeros(3))
    >>> @smap.vmap(state_in_axes=smap.ShortTermState)
    ... def step(x):
    ...     count.value = count.value + x
    ...     return count.value
    >>> step(jnp.array([1.0, 2.0, 3.0]))
    Array([1., 2., 3.], dtype=float32)
"""

from . import _compat, checkpoint, devices, filter, nn, privacy, random, transform
from ._state import HiddenState, LongTermState, ParamState, ShortTermState, State
from .transform import BatchAxisError, StatefulMapping, grad, jit, vmap2

vmap = vmap2

if _compat.HAS_REFS:
    from . import _refs  # noqa: F401  (jax.Refs read or written inside smap's traces are states)

__all__ = [
    "State",
    "ShortTermState",
    "LongTermState",
    "ParamState",
    "HiddenState",
    "StatefulMapping",
    "BatchAxisError",
    "vmap",
    "vmap2",
    "jit",
    "grad",
    "nn",
    "random",
    "privacy",
    "filter",
    "transform",
    "checkpoint",
    "devices",
]

__version__ = "0.1.0"
