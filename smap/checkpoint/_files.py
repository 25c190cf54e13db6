"""The files of a checkpoint directory: one folder per step, written durably, made visible atomically.

    directory/
        step_00000012/              a complete step: visible only once complete
            manifest.json           what the step holds (written last)
            3.0.1.npy               state 3, leaf 0, shard 1 of that leaf
        .partial_step_00000013/     a save under way, or one that was interrupted: never loaded

A step folder is written under its partial name, every file and the folder
are fsynced, and one ``rename`` gives it its final name, so a folder named
``step_<n>`` is always complete. Folders leave the same way: renamed to a
hidden name first, then deleted.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from pathlib import Path

import numpy as np

__all__ = [
    "MANIFEST",
    "step_dir",
    "partial_dir",
    "complete_steps",
    "write_durably",
    "sync_dir",
    "commit",
    "remove",
    "encode",
    "decode",
    "sha256",
]

MANIFEST = "manifest.json"
_STEP = re.compile(r"step_(\d+)")


def step_dir(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}"


def partial_dir(directory: Path, step: int) -> Path:
    return directory / f".partial_step_{step:08d}"


def complete_steps(directory: Path) -> list[int]:
    """The steps of ``directory`` whose folder has its final name, in increasing order."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = _STEP.fullmatch(entry.name)
        if match and (entry / MANIFEST).is_file():
            found.append(int(match.group(1)))
    return sorted(found)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and flush it to the disk."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sync_dir(path: Path) -> None:
    """Flush a folder's entries (names of new, renamed or removed files) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(partial: Path, final: Path) -> None:
    """Give the complete folder ``partial`` the name ``final``, replacing any folder of that name."""
    sync_dir(partial)
    if final.exists():
        remove(final)
    os.rename(partial, final)
    sync_dir(final.parent)


def remove(folder: Path) -> None:
    """Delete a step folder: hidden first, so a half-deleted step is never taken for a complete one."""
    hidden = folder.with_name(f".removing_{folder.name}")
    if hidden.exists():
        shutil.rmtree(hidden)
    os.rename(folder, hidden)
    sync_dir(folder.parent)
    shutil.rmtree(hidden)


def encode(array: np.ndarray) -> bytes:
    """``array`` as the bytes of a ``.npy`` file.

    Types NumPy's format has no name for (``bfloat16``, ``float8_*``, ``int4``)
    are stored as unsigned integers of the same width; the manifest keeps the
    real dtype.
    """
    array = np.asarray(array, order="C")  # (np.ascontiguousarray makes scalars 1-d)
    if array.dtype.kind not in "biufc":
        array = array.view(np.dtype(f"u{array.dtype.itemsize}"))
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode(data: bytes, dtype: np.dtype) -> np.ndarray:
    """The array in the bytes of a ``.npy`` file, as ``dtype``."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    return array if array.dtype == dtype else array.view(dtype)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
