"""Checkpoints of states, sharded or not, written by one process or many, restored onto any mesh.

A checkpoint step is a folder with one data file per writing process (the
raw bytes of its distinct shards) and a JSON manifest (states, types,
shapes, dtypes, each shard's index ranges, file, offset and sha256). Saves
can go on in the background (``wait=False``). See ``docs/checkpoints.md``.

Example:
    >>> import tempfile, jax.numpy as jnp, smap
    >>> directory = tempfile.mkdtemp()
    >>> count = smap.LongTermState(jnp.ones(2))
    >>> smap.checkpoint.save(directory, {'count': count}, step=3)
    >>> count.value = jnp.zeros(2)
    >>> smap.checkpoint.restore(directory, {'count': count}), count.value
    (3, Array([1., 1.], dtype=float32))
"""

from ._checkpoint import CheckpointError, PendingSave, restore, save, steps

__all__ = ["save", "restore", "steps", "CheckpointError", "PendingSave"]
