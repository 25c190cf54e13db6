"""Modules: plain Python classes whose attributes hold States and other Modules."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

import jax
import numpy as np

from . import _compat
from . import filter as filters
from ._state import State

__all__ = ["Module", "layout_key"]


class Module:
    """A container of States, Modules, and lists, tuples or dicts of them.

    Assigning an attribute records where a State lives, so errors and filters
    can name it by its dotted path; :meth:`states` records it again for
    containers changed after assignment (transforms of a Module call it). Modules are callable objects that every
    smap transform accepts like a function.

    An attribute whose name starts with an underscore is private: :meth:`states`
    does not list the States it holds, so ``smap.checkpoint`` does not save them
    and ``sharding.place`` does not place them (a cache to rebuild, say).
    Transforms still find every State a function touches, private or not.

    A Module passed to a transform as an argument is traced again when its
    attributes have changed since (see :func:`layout_key`).

    Example:
        >>> import jax.numpy as jnp, smap
        >>> class Linear(smap.nn.Module):
        ...     def __init__(self, n_in, n_out):
        ...         super().__init__()
        ...         self.weight = smap.ParamState(jnp.ones((n_in, n_out)))
        ...         self.bias = smap.ParamState(jnp.zeros(n_out))
        ...     def __call__(self, x):
        ...         return x @ self.weight.value + self.bias.value
        >>> class MLP(smap.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layers = [Linear(2, 3), Linear(3, 1)]
        >>> list(MLP().states())
        ['layers.0.weight', 'layers.0.bias', 'layers.1.weight', 'layers.1.bias']
    """

    _owner: weakref.ref | None = None
    _name: tuple[Hashable, ...] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name not in _BOOKKEEPING:
            _LAST_EDIT[0] = object()
            if not name.startswith("_"):
                _adopt(self, (name,), value)

    def __delattr__(self, name: str) -> None:
        object.__delattr__(self, name)
        _LAST_EDIT[0] = object()

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy.deepcopy`` carry the attributes, not smap's records of where things live."""
        return {k: v for k, v in self.__dict__.items() if k not in _BOOKKEEPING}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for name, value in state.items():
            if not name.startswith("_"):  # (a shallow copy's States and Modules stay their owner's)
                _adopt(self, (name,), value, orphans_only=True)

    def states(self, filter: filters.FilterLike | None = None) -> dict[str, State]:
        """The states of this module and its submodules, by dotted path.

        Arguments:
            filter: keep only the states it selects (any selector that
                :func:`smap.filter.to_filter` accepts); ``None`` keeps all.
                A string that is no State's tag is a ``ValueError``
                (:func:`smap.filter.check_tag_string`).

        Returns:
            A dict, in attribute order, from ``"sub.attr"`` to State. A state
            reachable twice appears once, under its first path.

        Example:
            >>> import jax.numpy as jnp, smap
            >>> class Counter(smap.nn.Module):
            ...     def __init__(self):
            ...         self.count = smap.ShortTermState(jnp.zeros(4))
            ...         self.scale = smap.ParamState(jnp.ones(()))
            >>> Counter().states(smap.ParamState)
            {'scale': ParamState(float32[])}
        """
        # A string is a tag: one that no State has selects nothing, a mistake the error explains.
        filters.check_tag_string(
            filter, f"{type(self).__name__}.states(filter)", (s for _, s in _walk(self, (), set()))
        )
        keep = None if filter is None else filters.to_filter(filter)
        found: dict[str, State] = {}
        for path, state in _walk(self, (), set()):
            if keep is None or keep(path, state):
                found[".".join(map(str, path))] = state
        return found

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.states())} states)"


Module.__module__ = "smap.nn"


# smap's own attributes of a Module; every other attribute is the Module's layout (see `layout_key`).
_BOOKKEEPING = frozenset({"_owner", "_name", "_layout", "_held"})
# A new object at each attribute assignment to any Module: a Module's layout is computed again only after
# one. (A fresh object, not a count, so that two threads' assignments cannot leave it as it was.)
_LAST_EDIT = [object()]


def layout_key(module: Module) -> Hashable:
    """What a program traced with ``module`` as an argument depends on besides its States' values.

    Its attributes, its submodules' and their containers' contents, by value
    for Python and NumPy scalars and strings and by identity for anything else
    (a State, an array, a function): a program traced before an attribute changed (a
    flag set, a State or a layer replaced) is not reused after. It is computed
    again only after some Module's attribute was assigned or deleted; a list
    or dict changed in place is not seen until then.

    Example:
        >>> import smap
        >>> from smap.nn import layout_key
        >>> net = smap.nn.Module()
        >>> net.training = True
        >>> before = layout_key(net)
        >>> net.training = False
        >>> layout_key(net) == before
        False
    """
    edit = _LAST_EDIT[0]
    known = module.__dict__.get("_layout")
    if known is not None and known[0] is edit:
        return known[1]
    found = _Layout(_layout_of(module, {}))
    object.__setattr__(module, "_layout", (edit, found))
    return found


class _Layout:
    """A Module's layout with its hash computed once: a call hashes it, and a model's is long."""

    __slots__ = ("key", "_hash")

    def __init__(self, key: Hashable):
        self.key = key
        self._hash = hash(key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Layout):
            return NotImplemented
        return self is other or (self._hash == other._hash and self.key == other.key)

    def __hash__(self) -> int:
        return self._hash


_SCALARS = (bool, int, float, complex, str, bytes, type(None))


class _Same:
    """An object in a layout, compared by identity, held weakly where it can be (a layout sits in caches'
    keys, which must not keep States or arrays alive)."""

    __slots__ = ("_ref", "_id")

    def __init__(self, obj: Any):
        self._ref: Callable[[], Any]
        try:
            self._ref = weakref.ref(obj)
        except TypeError:  # (no weak reference to it: held)
            self._ref = functools.partial(_itself, obj)
        self._id = id(obj)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Same):
            return NotImplemented
        mine = self._ref()
        return self is other or (mine is not None and mine is other._ref())

    def __hash__(self) -> int:
        return self._id


def _itself(obj: Any) -> Any:
    return obj


def _layout_of(node: Any, seen: dict[int, int]) -> Hashable:
    if type(node) in _SCALARS or isinstance(node, np.generic):
        return type(node), node
    if isinstance(node, State):
        return _Same(node)
    if isinstance(node, jax.core.Tracer):  # one a trace left behind: no later program can use it
        return "tracer"
    if _compat.is_ref(node):
        return _Same(_ref_state(node))
    if isinstance(node, (Module, list, tuple, dict)):
        if id(node) in seen:  # a cycle, or an object reached twice
            return "seen", seen[id(node)]
        seen[id(node)] = len(seen)
        items: Iterable[tuple[Hashable, Any]]
        if isinstance(node, Module):
            items = ((k, v) for k, v in vars(node).items() if k not in _BOOKKEEPING)
        elif isinstance(node, dict):
            items = ((_layout_of(k, seen), v) for k, v in node.items())
        else:
            items = enumerate(node)
        return type(node), tuple((k, _layout_of(v, seen)) for k, v in items)
    return _Same(node)


def _adopt(owner: Module, name: tuple[Hashable, ...], value: Any, orphans_only: bool = False) -> None:
    """Record `owner` and `name` on the States and Modules inside `value` (only on those with no live owner)."""
    if _compat.is_ref(value):
        value = _ref_state(value)
    if isinstance(value, (State, Module)):
        if value is not owner and not (orphans_only and value._owner is not None and value._owner() is not None):
            value._owner = weakref.ref(owner)
            value._name = name
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _adopt(owner, name + (i,), item, orphans_only)
    elif isinstance(value, dict):
        for key, item in value.items():
            _adopt(owner, name + (key,), item, orphans_only)


def _walk(node: Any, path: tuple[Hashable, ...], seen: set[int]) -> Iterator[tuple[tuple, State]]:
    if _compat.is_ref(node):
        node = _ref_state(node)
    if id(node) in seen:
        return
    if isinstance(node, State):
        seen.add(id(node))
        yield path, node
        return
    if isinstance(node, Module):
        seen.add(id(node))
        for name, value in vars(node).items():
            if not name.startswith("_"):
                # Containers may have changed since assignment: record owners again.
                _adopt(node, (name,), value)
                yield from _walk(value, path + (name,), seen)
    elif isinstance(node, (list, tuple)):
        seen.add(id(node))
        for i, item in enumerate(node):
            yield from _walk(item, path + (i,), seen)
    elif isinstance(node, dict):
        seen.add(id(node))
        for key, item in node.items():
            yield from _walk(item, path + (key,), seen)


def _ref_state(ref: Any) -> State:
    """The State backed by a jax.Ref a Module holds (see smap._refs)."""
    from ._refs import state_of

    return state_of(ref)
