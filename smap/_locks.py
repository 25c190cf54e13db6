"""One lock per State, so that a call of a transform is atomic for the states it uses.

A call reads its states, computes, and writes the results back. Calls from
several threads stay correct when each call holds the locks of its states
from the read to the write-back: calls that share a state run one after the
other, calls that share none run side by side. Every call takes its locks in
one global order, the order in which the states were created, so two calls
can never each hold a lock the other waits for.

Example:
    >>> import jax.numpy as jnp, smap
    >>> from smap import _locks
    >>> a, b = smap.State(jnp.zeros(())), smap.State(jnp.ones(()))
    >>> locks = _locks.ordered([b, a])
    >>> locks == (_locks.lock_of(a), _locks.lock_of(b))
    True
    >>> with _locks.Holding(locks):
    ...     a.value = a.value + 1
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["new_lock", "lock_of", "ordered", "Holding"]

_created = itertools.count()  # next() is atomic in CPython: a unique rank per state


def new_lock() -> tuple[int, threading.RLock]:
    """The rank and the lock of a new state. Reentrant: a thread may take a lock it holds."""
    return next(_created), threading.RLock()


def lock_of(state: Any) -> threading.RLock:
    """The lock of ``state``."""
    return state._lock[1]


def ordered(states: Iterable[Any]) -> tuple[threading.RLock, ...]:
    """The locks of ``states``, each once, in the global order in which calls take them."""
    ranked = {state._lock[0]: state._lock[1] for state in states}
    return tuple(ranked[rank] for rank in sorted(ranked))


class Holding:
    """Hold ``locks`` (from :func:`ordered`) for the duration of a ``with`` block."""

    __slots__ = ("locks",)

    def __init__(self, locks: tuple[threading.RLock, ...]):
        self.locks = locks

    def __enter__(self) -> None:
        taken = 0
        try:
            for lock in self.locks:
                lock.acquire()
                taken += 1
        except BaseException:  # KeyboardInterrupt while waiting: give back what was taken
            for lock in reversed(self.locks[:taken]):
                lock.release()
            raise

    def __exit__(self, *exc: Any) -> None:
        for lock in reversed(self.locks):
            lock.release()
