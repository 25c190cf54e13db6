"""Locks that make a call of a transform one step for other threads.

A call reads its states, computes, and writes the results back. Calls from
several threads stay correct when each call holds, from the read to the
write-back, a lock that every other call touching one of its states also
takes. States used together share one lock: each state belongs to a
:class:`Group`, and a transform's states are joined into one group when it
first sees them (two groups merge into one). A call then takes a single
lock, whatever the number of its states; calls whose states were never used
together take different locks and run side by side.

Only :func:`joined` ever waits for more than one lock, and it is never called
while its thread holds a group's lock, so no two threads can each hold a lock
the other waits for.

Example:
    >>> import jax.numpy as jnp, smap
    >>> from smap import _locks
    >>> a, b = smap.State(jnp.zeros(())), smap.State(jnp.ones(()))
    >>> _locks.group_of(a) is _locks.group_of(b)
    False
    >>> group = _locks.joined([a, b])
    >>> _locks.group_of(a) is group is _locks.group_of(b)
    True
    >>> with _locks.Holding(group):
    ...     a.value = a.value + 1
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

__all__ = ["Group", "group_of", "joined", "Holding"]


class Group:
    """The lock of a set of states; ``merged_into`` is set once the set joins a larger one."""

    __slots__ = ("lock", "merged_into")

    def __init__(self) -> None:
        self.lock = threading.RLock()  # reentrant: a thread may take a lock it holds
        self.merged_into: Group | None = None

    def current(self) -> Group:
        """The group this one is now part of (itself unless it was merged)."""
        group = self
        while group.merged_into is not None:
            group = group.merged_into
        return group

    def acquire(self) -> Group:
        """Take the lock of the group this one is part of, and return that group.

        A merge may make the group taken part of another while this thread
        waits for its lock; then the lock is given back and the larger one taken.
        """
        while True:
            group = self.current()
            group.lock.acquire()
            if group.merged_into is None:
                return group
            group.lock.release()


_merging = threading.Lock()  # one merge at a time


def group_of(state: Any) -> Group:
    """The group of ``state`` now."""
    group = state._lock = state._lock.current()
    return group


def joined(states: Iterable[Any]) -> Group:
    """One group holding every state of ``states``: their groups merge into the first.

    A merge waits until no call holds the lock of a group it merges away. Never
    call it while holding a group's lock.
    """
    with _merging:
        groups = list({id(g): g for g in map(group_of, states)}.values())
        if not groups:
            return Group()
        target, others = groups[0], groups[1:]
        for group in others:
            group.lock.acquire()
        for group in others:
            group.merged_into = target
        for group in others:
            group.lock.release()
        return target


class Holding:
    """Hold the lock of ``group`` (as it is when the block starts) for a ``with`` block."""

    __slots__ = ("group", "held")

    def __init__(self, group: Group):
        self.group = group
        self.held: Group | None = None

    def __enter__(self) -> None:
        self.held = self.group.acquire()

    def __exit__(self, *exc: Any) -> None:
        assert self.held is not None
        self.held.lock.release()
        self.held = None
