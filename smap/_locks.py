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

import sys
import threading
import types
from collections.abc import Iterable
from typing import Any

__all__ = ["CALL_FILE", "Group", "TOKEN", "group_of", "joined", "Holding"]


TOKEN = True  # what a group's ``tokens`` list holds while no call holds the group
CALL_FILE = "<smap call"  # how the file names of the calls that smap._dispatch writes out begin
_given_back = threading.Condition(threading.Lock())  # what threads waiting for a token wait on


class Group:
    """The lock of a set of states; ``merged_into`` is set once the set joins a larger one.

    The lock is a token in a list: a call takes it with ``tokens.pop()`` and
    gives it back with ``tokens.append(TOKEN)``, two operations the
    interpreter makes atomic, so a call that finds the group free pays no
    more than that (a ``threading.RLock``'s acquire and release, with the
    thread's identity, cost about 0.2 µs more: a third of a cached call's
    own time). The lock is reentrant: a host callback that runs inside a
    call, on its thread, and calls a transform of the same group goes on
    inside that call. To see that a call on this thread holds the token,
    :meth:`take` (the path of a call that found the token taken) looks at
    ``holder``, the thread that took it through :meth:`take`, and at this
    thread's frames: a call written out by ``smap._dispatch`` (its code's
    file name begins with :data:`CALL_FILE`) holds the token while its local
    ``holding`` is the group, which costs it a local variable rather than
    a call. A call that finds the token taken by another thread waits in
    :meth:`take`; ``waiting`` counts those threads, and a call that gives
    the token back while it is not 0 wakes them (:meth:`give`).
    """

    __slots__ = ("tokens", "holder", "waiting", "merged_into")

    def __init__(self) -> None:
        self.tokens = [TOKEN]
        self.holder: int | None = None  # the thread that took the token through take()
        self.waiting = 0
        self.merged_into: Group | None = None

    def current(self) -> Group:
        """The group this one is now part of (itself unless it was merged)."""
        group = self
        while group.merged_into is not None:
            group = group.merged_into
        return group

    def take(self) -> bool:
        """Take the token, waiting while another thread holds it; False, taking nothing, if this thread does."""
        me = threading.get_ident()
        if not self._pop():
            if self.holder == me or self._held_by_a_call_here():
                return False
            with _given_back:
                self.waiting += 1
                try:
                    while not self._pop():
                        _given_back.wait()  # the thread that gives the token back wakes this one
                finally:
                    self.waiting -= 1
        self.holder = me
        return True

    def _pop(self) -> bool:
        try:
            self.tokens.pop()
        except IndexError:
            return False
        return True

    def _held_by_a_call_here(self) -> bool:
        """Whether a written-out call on this thread's stack holds the token."""
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None:
            if frame.f_code.co_filename.startswith(CALL_FILE) and frame.f_locals.get("holding") is self:
                return True
            frame = frame.f_back
        return False

    def give(self) -> None:
        """Give the token back, and wake the threads that wait for it.

        The token goes back before ``waiting`` is read, and a waiting thread
        counts itself before it looks for the token: one of the two sees the other.
        """
        self.holder = None
        self.tokens.append(TOKEN)
        if self.waiting:
            self.wake()

    def wake(self) -> None:
        """Wake the threads waiting for a token (of any group: they look for theirs, and wait again)."""
        with _given_back:
            _given_back.notify_all()


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
        for group in groups[1:]:
            taken = group.take()
            group.merged_into = groups[0]
            if taken:
                group.give()
        return groups[0]


class Holding:
    """Hold, for a ``with`` block, the lock of the group that ``group`` is part of (:meth:`Group.current`).

    A merge may make the group taken part of another while this thread
    waits for it; then the token is given back and the larger one's taken.
    """

    __slots__ = ("group", "held", "taken")

    def __init__(self, group: Group):
        self.group = group

    def __enter__(self) -> None:
        while True:
            self.held = self.group.current()
            self.taken = self.held.take()
            if self.held.merged_into is None:
                return
            if self.taken:
                self.held.give()

    def __exit__(self, *exc: Any) -> None:
        if self.taken:
            self.held.give()
