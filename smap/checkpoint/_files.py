"""The files of a checkpoint directory: one folder per step, written durably, made visible atomically.

    directory/
        step_00000012/              a complete step: visible only once complete
            manifest.json           what the step holds (written last, after every process's part)
            data_0.bin              the shards process 0 wrote, one after another (see ``_io``)
        .partial_step_00000013/     a save under way, or one that was interrupted: never loaded
        .old_step_00000012/         the step an overwrite replaces, until the new one has its name
        .step_00000013.lock         held (``flock``) by the process that saves step 13

A step folder is written under its partial name, every file and the folder
are fsynced, and one ``rename`` gives it its final name, so a folder named
``step_<n>`` is always complete. An overwrite first renames the old folder
to ``.old_step_<n>`` and deletes it only once the new one has its name: in
between, the old folder is step ``n``. Folders leave by being renamed to a
hidden name first, then deleted. ``clean`` removes what interrupted saves
left, and never a folder whose save still holds its lock.

Only the standard library is used here, and little of it (the SIGKILL test
starts processes that import this module alone). The data files are written
and read by ``_io``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = [
    "MANIFEST",
    "step_dir",
    "partial_dir",
    "folder_of",
    "complete_steps",
    "write_durably",
    "sync_dir",
    "commit",
    "remove",
    "step_lock",
    "clean",
    "clean_step",
]

MANIFEST = "manifest.json"
_STEP = re.compile(r"step_(\d+)")
_LEFTOVER = re.compile(r"\.(partial_step|old_step|step)_(\d+)(\.lock)?")


def step_dir(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}"


def partial_dir(directory: Path, step: int) -> Path:
    return directory / f".partial_step_{step:08d}"


def _old_dir(directory: Path, step: int) -> Path:
    return directory / f".old_step_{step:08d}"


def _lock_path(directory: Path, step: int) -> Path:
    return directory / f".step_{step:08d}.lock"


def folder_of(directory: Path, step: int) -> Path:
    """The folder holding complete step ``step``: its own, or the old one an interrupted overwrite left."""
    final, old = step_dir(directory, step), _old_dir(directory, step)
    return old if not (final / MANIFEST).is_file() and (old / MANIFEST).is_file() else final


def complete_steps(directory: Path) -> list[int]:
    """The complete steps of ``directory`` (a folder with its final name, or the old one of an overwrite)."""
    if not directory.is_dir():
        return []
    found = set()
    for entry in directory.iterdir():
        match = _STEP.fullmatch(entry.name.removeprefix(".old_"))
        if match and (entry / MANIFEST).is_file():
            found.add(int(match.group(1)))
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
    """Give the complete folder ``partial`` the name ``final``; a folder of that name is replaced atomically.

    The replaced folder is renamed to ``.old_<name>`` and deleted only once
    ``partial`` has the name: a kill at any moment leaves the old step or the
    new one (``folder_of`` reads the old one while the new has no name yet).
    """
    sync_dir(partial)
    if not final.exists():
        os.rename(partial, final)
        sync_dir(final.parent)
        return
    old = final.with_name(f".old_{final.name}")
    os.rename(final, old)
    os.rename(partial, final)
    sync_dir(final.parent)
    shutil.rmtree(old)


def remove(folder: Path) -> None:
    """Delete a step folder: hidden first, so a half-deleted step is never taken for a complete one."""
    hidden = folder.with_name(f".removing_{folder.name}")
    if hidden.exists():
        shutil.rmtree(hidden)
    os.rename(folder, hidden)
    sync_dir(folder.parent)
    shutil.rmtree(hidden)


@contextlib.contextmanager
def step_lock(directory: Path, step: int, *, block: bool = True) -> Iterator[bool]:
    """Hold the lock of saving ``step`` in ``directory`` (yields whether it was taken; always, if ``block``).

    A process that dies releases it, so a partial folder whose lock is free is a leftover.
    """
    path = _lock_path(directory, step)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    finally:
        os.close(fd)


def clean(directory: Path, busy: Sequence[int] = ()) -> None:
    """Remove what interrupted saves left in ``directory``; a step's folders stay while its lock is held.

    Partial folders go; an ``.old_step_<n>`` folder is deleted if step ``n``
    has its new folder, or takes its name back if the overwrite was
    interrupted before. ``busy``: steps this process is saving (its own locks
    do not stop it).
    """
    if not directory.is_dir():
        return
    steps = set()
    for entry in directory.iterdir():
        if entry.name.startswith(".removing_"):
            shutil.rmtree(entry, ignore_errors=True)
        elif match := _LEFTOVER.fullmatch(entry.name):
            steps.add(int(match.group(2)))
    for step in sorted(steps.difference(busy)):
        with step_lock(directory, step, block=False) as taken:
            if taken:  # else a save of this step is under way
                clean_step(directory, step)


def clean_step(directory: Path, step: int) -> None:
    """Remove what interrupted saves of ``step`` left; the caller holds the step's lock."""
    old, final = _old_dir(directory, step), step_dir(directory, step)
    if old.exists():
        if (final / MANIFEST).is_file() or not (old / MANIFEST).is_file():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)
            sync_dir(directory)
    shutil.rmtree(partial_dir(directory, step), ignore_errors=True)
