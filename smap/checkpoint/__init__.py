"""Checkpoints of states, sharded or not, written by one process or many, restored onto any mesh.

A checkpoint step is a folder of NumPy ``.npy`` files, one per distinct
shard of each array, and a JSON manifest (states, types, shapes, dtypes,
shard index ranges, sha256 checksums). See ``docs/checkpoints.md``.

Example:
    >>> import tempfile, jax.numpy as jnp, smap
    >>> directory = tempfile.mkdtemp()
    >>> count = smap.LongTermState(jnp.ones(2))
    >>> smap.checkpoint.save(directory, {'count': count}, step=3)
    >>> count.value = jnp.zeros(2)
    >>> smap.checkpoint.restore(directory, {'count': count}), count.value
    (3, Array([1., 1.], dtype=float32))
"""

from ._checkpoint import CheckpointError, restore, save, steps

__all__ = ["save", "restore", "steps", "CheckpointError"]
