"""Modules: plain Python classes whose attributes hold States and other Modules."""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterator
from typing import Any

from . import _compat
from . import filter as filters
from ._state import State

__all__ = ["Module"]


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
        if not name.startswith("_"):
            _adopt(self, (name,), value)

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


def _adopt(owner: Module, name: tuple[Hashable, ...], value: Any) -> None:
    """Record `owner` and `name` on the States and Modules inside `value`."""
    if _compat.is_ref(value):
        value = _ref_state(value)
    if isinstance(value, (State, Module)):
        if value is not owner:
            value._owner = weakref.ref(owner)
            value._name = name
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _adopt(owner, name + (i,), item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _adopt(owner, name + (key,), item)


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
