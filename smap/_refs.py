"""Refs are states: a ``jax.Ref`` that a traced function reads or writes is a State backed by it.

The design is *a State backed by a Ref*. Every concrete ``jax.Ref`` that smap
meets has one State whose storage is the Ref's buffer: the State the user
made from it (``smap.ParamState(ref)``), or else a plain :class:`smap.State`
made when a trace first reads or writes the Ref. Inside smap's traces
``ref[idx]``, ``ref[idx] = x`` and ``ref.addupdate(x, idx)`` go through the
trace frame as reads and writes of that State (see ``_compat.route_ref_access``),
so discovery, ``state_in_axes``, write-back after success and the rollback
of a failed call are the States' own. Outside smap's traces a Ref is JAX's.
A Ref passed as an argument is the same State: the dispatcher carries it as
a ``HeldArgument`` (no array input, its identity part of the cache key, as a
Module argument's; see ``smap._tracing.hide_arguments``)
and the function receives the Ref itself.

Where it differs from a State: a Ref's shape and dtype are fixed, so
``reset`` is refused and a shared Ref cannot gain the mapped axis (a
per-lane write of a shared Ref is a :class:`smap.BatchAxisError`, whatever
``unexpected_out_state_mapping`` says).

Imported only where JAX has Refs (``_compat.HAS_REFS``).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from . import _compat, _locks, _state
from ._state import HeldArgument, State, _leaf_repr, _normalise_tags, active_frames

__all__ = ["RefBacked", "state_of", "backed_class", "describe_ref", "show_refs"]

# Each Ref's State: the user's, held weakly (it holds its Ref), or smap's own, held here while its Ref lives.
_states: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_classes: dict[type, type] = {}


class RefBacked(State):
    """A State whose value lives in a ``jax.Ref``: reads and writes of either are reads and writes of both.

    Made by ``cls(ref)`` for any State class ``cls`` (``smap.ParamState(ref)``),
    or by smap for a Ref a traced function uses without one.

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> ref = jax.new_ref(jnp.zeros(2))
        >>> w = smap.ParamState(ref)
        >>> w.value = jnp.ones(2)
        >>> ref[...]
        Array([1., 1.], dtype=float32)
    """

    __slots__ = ("_ref", "_argument")
    fixed_shape = True

    def __reduce__(self) -> tuple:
        raise TypeError(
            f"{self.describe()} is backed by a jax.Ref, which is not pickled or copied: pickle its value "
            f"(state.value), or save it with smap.checkpoint."
        )

    def __init__(self, value: Any, tag: str | Sequence[str] | None = None):
        self._lock = _locks.Group()
        self._owner = None
        self._name = None
        self._tags = _normalise_tags(tag)
        self._ref = value
        self._argument: str | None = None  # how the call that passed its Ref as an argument names it
        previous = _state_in_table(value)
        if previous is not None and not isinstance(previous, _ImplicitState):
            raise ValueError(
                f"{describe_ref(value)} already backs {previous!r}; a Ref backs one State. "
                f"Use that State, or give its Ref to one State only."
            )
        _states[value] = weakref.ref(self)

    @property
    def ref(self) -> Any:
        """The ``jax.Ref`` that holds this state's value."""
        return self._ref

    @property
    def _value(self) -> Any:
        return _compat.ref_value(self.ref)

    @_value.setter
    def _value(self, value: Any) -> None:
        _compat.set_ref_value(self.ref, value)

    def _stored(self) -> Any:
        # A copy: JAX's own writes to the Ref replace its buffer's contents in place. Made now, even
        # when a trace reads the state: staged, it would make the Ref's buffer a constant of the
        # program, typed with the mesh it lay on (which shard_map refuses on another mesh).
        with jax.ensure_compile_time_eval():
            return jnp.copy(_compat.ref_value(self.ref))

    def reset(self, value: Any) -> None:
        raise TypeError(
            f"{self.describe()}: a jax.Ref's shape and dtype are fixed, so a Ref-backed state cannot be reset; "
            f"make a new Ref (jax.new_ref(value)) and a new State from it."
        )

    def describe(self) -> str:
        path = self.path
        kind = type(self).__name__
        if path:
            return f"Ref '{'.'.join(map(str, path))}' ({kind})"
        if self._argument is not None:
            return f"Ref {self._argument} ({kind}, {_leaf_repr(self.ref)})"
        return f"Ref {_leaf_repr(self.ref)} ({kind})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ref={_leaf_repr(self.ref)})"


class _ImplicitState(RefBacked, State):
    """The State smap makes for a Ref used without one; it holds its Ref weakly (the table holds it)."""

    __slots__ = ()

    def __init__(self, ref: Any):
        super().__init__(ref)
        self._ref = weakref.ref(ref)
        _states[ref] = self

    @property
    def ref(self) -> Any:
        return self._ref()

    @property
    def _value(self) -> Any:
        ref = self._ref()
        return None if ref is None else _compat.ref_value(ref)  # None: a transform's list drops it

    @_value.setter
    def _value(self, value: Any) -> None:
        _compat.set_ref_value(self.ref, value)

    def _gone(self) -> bool:
        return self._ref() is None


_ImplicitState.__name__ = _ImplicitState.__qualname__ = "State"
_ImplicitState.__module__ = "smap"


def backed_class(cls: type[State]) -> type[State]:
    """The class of ``cls``'s states backed by a Ref: a subclass of ``cls`` with its name."""
    backed = _classes.get(cls)
    if backed is None:
        if issubclass(cls, RefBacked):
            return cls
        namespace = {"__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        backed = _classes[cls] = type(cls.__name__, (RefBacked, cls), namespace)
    return backed


def _state_in_table(ref: Any) -> State | None:
    found = _states.get(ref)
    return found() if isinstance(found, weakref.ref) else found


def state_of(ref: Any) -> State:
    """The State backed by ``ref``; a plain :class:`smap.State` is made for a Ref that has none."""
    state = _state_in_table(ref)
    return _ImplicitState(ref) if state is None else state


def describe_ref(ref: Any) -> str:
    """How errors name a Ref: its State's path, or its shape and dtype."""
    state = _state_in_table(ref)
    return state.describe() if state is not None else f"jax.Ref {_leaf_repr(ref)}"


# -- Refs passed as arguments ---------------------------------------------------------------


def show_refs(tree: Any, root: str | None = None) -> Any:
    """``tree`` with each Ref held as a ``HeldArgument`` (see :func:`smap._tracing.hide_arguments`) the Ref
    again; with ``root``, each Ref's State is named by its path.

    The name (``args[0]['w']``) is how errors about the State then name it,
    unless a Module holding the Ref gives it a path.
    """

    def show(path: Any, x: Any) -> Any:
        if not isinstance(x, HeldArgument) or not _compat.is_ref(x.held):
            return x
        if root is not None:
            state = state_of(x.held)
            if isinstance(state, RefBacked):
                state._argument = root + jax.tree_util.keystr(path)
        return x.held

    return jax.tree_util.tree_map_with_path(show, tree, is_leaf=lambda x: isinstance(x, HeldArgument))


# -- Ref access inside smap's traces -----------------------------------------------------


def _whole(idx: Any) -> bool:
    if isinstance(idx, tuple):
        return len(idx) == 0 or (len(idx) == 1 and idx[0] is Ellipsis)
    return idx is Ellipsis or idx is None


def _checked(state: State, target: Any, x: Any, what: str) -> Any:
    """``x`` as the value written into ``target`` (a Ref's value or part of it): same shape and dtype."""
    x = jnp.asarray(x)
    if x.dtype != target.dtype:
        if not getattr(x, "weak_type", False):
            raise TypeError(f"{state.describe()} is {what} a value of dtype {x.dtype}, expected {target.dtype}.")
        x = x.astype(target.dtype)
    if x.shape != target.shape:
        raise ValueError(f"{state.describe()} is {what} a value of shape {x.shape}, expected {target.shape}.")
    return x


def _get(ref: Any, idx: Any) -> Any:
    value = active_frames()[-1].read(state_of(ref))
    return value if _whole(idx) else value[idx]


def _set(ref: Any, idx: Any, x: Any) -> None:
    frame, state = active_frames()[-1], state_of(ref)
    current = frame.read(state)
    if _whole(idx):
        # The frame's own check: a mapping allows a lane's slice of a state that state_out_axes selects.
        x = jnp.asarray(x)
        new = x.astype(current.dtype) if getattr(x, "weak_type", False) and x.shape == current.shape else x
    else:
        new = current.at[idx].set(_checked(state, current[idx], x, f"written at {idx!r} with"))
    frame.write(state, new, check=True)


def _addupdate(ref: Any, idx: Any, x: Any) -> None:
    frame, state = active_frames()[-1], state_of(ref)
    current = frame.read(state)
    if _whole(idx):
        new = current + _checked(state, current, x, "added")
    else:
        new = current.at[idx].add(_checked(state, current[idx], x, f"added at {idx!r}"))
    frame.write(state, new, check=True)


def _in_trace() -> bool:
    return bool(active_frames())


_compat.route_ref_access(_in_trace, _get, _set, _addupdate)


def unrouted_message(name: str, refs: Sequence[Any]) -> str:
    """The error for Refs a program captured as constants: used in a way smap does not see."""
    names = ", ".join(describe_ref(r) for r in refs)
    return (
        f"{name} uses {names} in a way smap does not see: inside smap's transforms read a Ref with "
        f"ref[...] (or ref[idx]) and write it with ref[...] = x or ref.addupdate(x); jax.ref.get/set/swap, "
        f"ref.at[...], jax.ref.freeze, jax.free_ref, and a Ref passed to a JAX transformation inside the "
        f"function are not supported there. Nothing was written."
    )


_state.ref_backed_class = backed_class
