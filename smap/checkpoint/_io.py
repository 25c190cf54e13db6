"""The data files of a step: shards written and read in parallel by threads, hashed as they pass.

Each process writes its shards into one file, ``data_<process>.bin``, each
starting on a page (``ALIGN``): one file to fsync instead of one per shard.
Writing, reading and sha256 hashing release the GIL, so the threads
overlap them; a shard is hashed from the buffer it is written from or read
into, never read twice.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import math
import os
import queue
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

__all__ = ["ALIGN", "THREADS", "start_workers", "parallel", "empty", "write_pieces", "read_piece"]

ALIGN = 4096  # each shard starts on a page of its data file: parallel reads share no page
_CHUNK = 1 << 26  # bytes per pwrite/preadv call
T = TypeVar("T")


THREADS = 8  # threads a save or restore reads or writes with (its own and 7 workers)
_jobs: queue.SimpleQueue = queue.SimpleQueue()
_workers: list[threading.Thread] = []
_workers_lock = threading.Lock()


def start_workers() -> None:
    """Start the worker threads if not yet done (they are daemons that wait for jobs).

    A background save calls this before it starts: once the interpreter is
    exiting, new threads cannot be started (Python 3.12), but these still run.
    """
    with _workers_lock:
        while len(_workers) < THREADS - 1:
            worker = threading.Thread(target=_serve, name="smap.checkpoint I/O", daemon=True)
            worker.start()
            _workers.append(worker)


def _serve() -> None:
    while True:
        _jobs.get()()


def parallel(tasks: Sequence[Callable[[], T]]) -> list[T]:
    """The results of ``tasks``, run by the calling thread and the workers; the first exception is raised.

    Workers of its own rather than a ``concurrent.futures`` pool: that pool
    refuses work once the interpreter begins to exit, when a background save
    may still be writing. The calling thread takes tasks too, so calls from
    several threads at once always progress.
    """
    start_workers()
    results: list[Any] = [None] * len(tasks)
    errors: list[BaseException] = []
    claim = itertools.count()
    lock = threading.Lock()
    finished = threading.Semaphore(0)

    def work() -> None:
        while True:
            with lock:
                i = next(claim)
            if i >= len(tasks) or errors:
                return
            try:
                results[i] = tasks[i]()
            except BaseException as error:  # re-raised in the calling thread below
                errors.append(error)

    def assist() -> None:
        try:
            work()
        finally:
            finished.release()

    helpers = min(THREADS, len(tasks)) - 1
    for _ in range(helpers):
        _jobs.put(assist)
    work()
    for _ in range(helpers):
        finished.acquire()
    if errors:
        raise errors[0]
    return results


def empty(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """A new array whose buffer starts on a page: JAX's CPU client takes such a buffer without copying it."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _write_at(fd: int, offset: int, data: memoryview) -> str:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + _CHUNK], offset + done)
    return hashlib.sha256(data).hexdigest()


def write_pieces(path: Path, pieces: Sequence[Any]) -> list[tuple[int, int, str]]:
    """Write the byte buffers ``pieces`` into a new file ``path`` in parallel, flushed to the disk.

    Each starts at a multiple of ``ALIGN``. Returns ``(offset, nbytes, sha256)`` per piece.
    """
    views = [memoryview(piece).cast("B") for piece in pieces]
    offsets, end = [], 0
    for view in views:
        offsets.append(end)
        end += -(-len(view) // ALIGN) * ALIGN
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        digests = parallel([functools.partial(_write_at, fd, offset, view) for offset, view in zip(offsets, views)])
        os.fsync(fd)
    finally:
        os.close(fd)
    return [(offset, len(view), digest) for offset, view, digest in zip(offsets, views, digests)]


def read_piece(fd: int, offset: int, into: Any) -> str:
    """Fill the writable buffer ``into`` from ``fd`` at ``offset``; the sha256 of what was read."""
    view = memoryview(into).cast("B")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done : done + _CHUNK]], offset + done)
        if got == 0:
            raise OSError(errno.EIO, "the file ends before the shard does")
        done += got
    return hashlib.sha256(view).hexdigest()
