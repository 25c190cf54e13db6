"""Filters select states: ``filter(path, state) -> bool``.

``path`` is the state's key path in the Module that owns it (a tuple), or
``()`` when it has none. Any callable with that signature is a filter; the
classes here give the common ones readable reprs. :func:`to_filter` turns the
shorthands that transforms accept into filters: a State subclass, a tag
string, a State instance or an iterable of instances.

Example:
    >>> import jax.numpy as jnp, smap
    >>> from smap.filter import OfType, Not, WithTag
    >>> f = OfType(smap.LongTermState) & Not(WithTag('frozen'))
    >>> f((), smap.ParamState(jnp.zeros(2)))
    True
    >>> f
    All(OfType(<class 'smap.LongTermState'>), Not(WithTag('frozen')))
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Hashable, Iterable
from typing import Union

import jax

from . import _compat
from ._state import State, known_tags

__all__ = [
    "Filter",
    "OfType",
    "Not",
    "All",
    "Any",
    "Everything",
    "Nothing",
    "WithTag",
    "AtPath",
    "StateSet",
    "to_filter",
    "check_tag_string",
    "FilterLike",
]

Path = tuple[Hashable, ...]
FilterLike = Union["Filter", Callable[[Path, State], bool], type, str, State, Iterable[State], bool]


class Filter:
    """Base class of the filters with a readable repr; combine with ``&``, ``|``, ``~``."""

    def __call__(self, path: Path, state: State) -> bool:
        raise NotImplementedError

    def __and__(self, other: FilterLike) -> Filter:
        return All(self, other)

    def __or__(self, other: FilterLike) -> Filter:
        return Any(self, other)

    def __invert__(self) -> Filter:
        return Not(self)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash((type(self), self._key()))

    def _key(self) -> tuple:
        return ()


class OfType(Filter):
    """Selects states that are instances of ``cls`` (subclasses included).

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.filter.OfType(smap.LongTermState)((), smap.ParamState(jnp.zeros(1)))
        True
    """

    def __init__(self, cls: type):
        if not isinstance(cls, type):
            raise TypeError(f"OfType expects a class, got {cls!r}.")
        self.type = cls

    def __call__(self, path: Path, state: State) -> bool:
        # OfType(jax.Ref) selects the states backed by a jax.Ref (see smap._refs).
        return isinstance(state, self.type) or (
            state.fixed_shape and isinstance(getattr(state, "ref", None), self.type)
        )

    def _key(self) -> tuple:
        return (self.type,)

    def __repr__(self) -> str:
        return f"OfType({self.type!r})"


class WithTag(Filter):
    """Selects states created with ``tag`` among their tags.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.filter.WithTag('optimizer')((), smap.State(jnp.zeros(1), tag='optimizer'))
        True
    """

    def __init__(self, tag: str):
        if not isinstance(tag, str):
            raise TypeError(f"WithTag expects a string, got {tag!r}.")
        self.tag = tag

    def __call__(self, path: Path, state: State) -> bool:
        return self.tag in state.tags

    def _key(self) -> tuple:
        return (self.tag,)

    def __repr__(self) -> str:
        return f"WithTag({self.tag!r})"


class AtPath(Filter):
    """Selects states whose dotted path in their Module matches ``pattern``.

    ``pattern`` is a shell-style glob over the dotted path (``fnmatch``):
    ``'mlp.w1'`` selects one state, ``'layers.*.w'`` the ``w`` of every layer
    (``*`` also crosses dots). A state outside any Module has the empty path
    and is never selected.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> class Net(smap.nn.Module):
        ...     def __init__(self):
        ...         self.layers = [smap.ParamState(jnp.zeros(2)), smap.ParamState(jnp.zeros(3))]
        >>> list(Net().states(smap.filter.AtPath('layers.1')))
        ['layers.1']
    """

    def __init__(self, pattern: str):
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"AtPath expects a non-empty string such as 'mlp.w1' or 'layers.*.w', got {pattern!r}.")
        self.pattern = pattern

    def __call__(self, path: Path, state: State) -> bool:
        return bool(path) and fnmatch.fnmatchcase(".".join(map(str, path)), self.pattern)

    def _key(self) -> tuple:
        return (self.pattern,)

    def __repr__(self) -> str:
        return f"AtPath({self.pattern!r})"


class StateSet(Filter):
    """Selects exactly the given State instances.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> a, b = smap.State(jnp.zeros(1)), smap.State(jnp.zeros(1))
        >>> f = smap.filter.to_filter([a])
        >>> f((), a), f((), b)
        (True, False)
    """

    def __init__(self, states: Iterable[State]):
        if isinstance(states, (dict, list, tuple)):  # a pytree of States and jax.Refs
            states = jax.tree_util.tree_leaves(states, is_leaf=lambda x: isinstance(x, State))
        self.states = tuple(states)
        for s in self.states:
            if not isinstance(s, State) and not _compat.is_ref(s):
                hint = (
                    " To select by several types, write smap.filter.Any(OfType(...), ...)."
                    if isinstance(s, type)
                    else ""
                )
                raise TypeError(f"a state selector must hold State instances or jax.Refs, got {s!r}.{hint}")
        self._ids = frozenset(id(s) for s in self.states)

    def __call__(self, path: Path, state: State) -> bool:
        # A jax.Ref selects the State backed by it (see smap._refs), whichever State that is at the call.
        return id(state) in self._ids or (state.fixed_shape and id(getattr(state, "ref", None)) in self._ids)

    def _key(self) -> tuple:
        return (self._ids,)

    def __repr__(self) -> str:
        return f"StateSet({list(self.states)!r})"


class Not(Filter):
    """Selects the states that ``filter`` does not select.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.filter.Not(smap.ParamState)((), smap.State(jnp.zeros(1)))
        True
    """

    def __init__(self, filter: FilterLike):
        self.filter = to_filter(filter)

    def __call__(self, path: Path, state: State) -> bool:
        return not self.filter(path, state)

    def _key(self) -> tuple:
        return (self.filter,)

    def __repr__(self) -> str:
        return f"Not({self.filter!r})"


class All(Filter):
    """Selects the states that every filter selects.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> f = smap.filter.All(smap.ParamState, 'frozen')
        >>> f((), smap.ParamState(jnp.zeros(1), tag='frozen'))
        True
    """

    def __init__(self, *filters: FilterLike):
        self.filters = tuple(to_filter(f) for f in filters)

    def __call__(self, path: Path, state: State) -> bool:
        return all(f(path, state) for f in self.filters)

    def _key(self) -> tuple:
        return self.filters

    def __repr__(self) -> str:
        return f"All({', '.join(map(repr, self.filters))})"


class Any(Filter):
    """Selects the states that at least one filter selects.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> f = smap.filter.Any(smap.ParamState, smap.HiddenState)
        >>> f((), smap.HiddenState(jnp.zeros(1)))
        True
    """

    def __init__(self, *filters: FilterLike):
        self.filters = tuple(to_filter(f) for f in filters)

    def __call__(self, path: Path, state: State) -> bool:
        return any(f(path, state) for f in self.filters)

    def _key(self) -> tuple:
        return self.filters

    def __repr__(self) -> str:
        return f"Any({', '.join(map(repr, self.filters))})"


class Everything(Filter):
    """Selects every state.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.filter.Everything()((), smap.State(jnp.zeros(1)))
        True
    """

    def __call__(self, path: Path, state: State) -> bool:
        return True

    def __repr__(self) -> str:
        return "Everything()"


class Nothing(Filter):
    """Selects no state.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.filter.Nothing()((), smap.State(jnp.zeros(1)))
        False
    """

    def __call__(self, path: Path, state: State) -> bool:
        return False

    def __repr__(self) -> str:
        return "Nothing()"


class _Callable(Filter):
    def __init__(self, fn: Callable[[Path, State], bool]):
        self.fn = fn

    def __call__(self, path: Path, state: State) -> bool:
        return bool(self.fn(path, state))

    def _key(self) -> tuple:
        return (self.fn,)

    def __repr__(self) -> str:
        return repr(self.fn)


def to_filter(selector: FilterLike) -> Filter:
    """Turn a selector into a :class:`Filter`.

    Accepted: a Filter; a State subclass or ``jax.Ref`` (:class:`OfType`); a string
    (:class:`WithTag`: the transforms, ``Module.states`` and placement rules
    refuse a string that is no State's tag, see :func:`check_tag_string`); a
    State or ``jax.Ref`` instance, an iterable of them, or a dict, list or tuple
    holding them (:class:`StateSet`); ``True``/``False`` (:class:`Everything`/:class:`Nothing`);
    any other callable ``(path, state) -> bool``.

    Example:
        >>> import smap
        >>> smap.filter.to_filter(smap.ParamState)
        OfType(<class 'smap.ParamState'>)
    """
    if isinstance(selector, Filter):
        return selector
    if isinstance(selector, bool):
        return Everything() if selector else Nothing()
    if isinstance(selector, type):
        if selector is _compat.RefType:
            return OfType(selector)
        if not issubclass(selector, State):
            raise TypeError(f"a filter class must be a State subclass, got {selector!r}.")
        return OfType(selector)
    if isinstance(selector, str):
        return WithTag(selector)
    if isinstance(selector, State):
        return StateSet([selector])
    if _compat.is_ref(selector):
        return StateSet([selector])  # type: ignore[list-item]  # jax.Ref: its State
    if callable(selector):
        return _Callable(selector)
    if isinstance(selector, Iterable):
        return StateSet(selector)
    raise TypeError(
        f"cannot use {selector!r} as a state filter: expected a Filter, a State subclass, "
        f"a tag string, a State, an iterable of States, or a callable (path, state) -> bool."
    )


def check_tag_string(selector: object, where: str, states: Iterable[State]) -> None:
    """Refuse a string selector that is no State's tag, naming what it could have meant.

    A string selects the states created with it as a tag. A string that no
    State was ever given as a tag selects nothing anywhere, which is almost
    always a mistake (``'hidden'`` for :class:`smap.HiddenState`, or a
    dotted path): the ``ValueError`` names it, the tags in use, and the
    State types and paths of ``states`` it may have meant. A string that is
    some State's tag passes, even where it selects none of ``states``; so do
    selectors that are not strings, which may rightly select nothing in a
    given function (``OfType(ShortTermState)`` where there is none).

    Arguments:
        selector: what the user gave where a filter is expected.
        where: how the error names it, such as ``"state_in_axes[0]"``.
        states: the states it was meant to select from (for the error).

    Example:
        >>> import jax.numpy as jnp, smap
        >>> h = smap.HiddenState(jnp.zeros(2), tag='rnn')
        >>> smap.filter.check_tag_string('rnn', 'state_in_axes', [h])
        >>> try:
        ...     smap.filter.check_tag_string('hidden', 'state_in_axes', [h])
        ... except ValueError as e:
        ...     print(str(e).splitlines()[0])
        state_in_axes is the string 'hidden', which selects the States tagged 'hidden', and no State has that tag.
    """
    if not isinstance(selector, str) or selector in known_tags():
        return
    states = list(states)
    lines = [
        f"{where} is the string {selector!r}, which selects the States tagged {selector!r}, and no State has that tag."
    ]
    wanted = selector.lower().replace("_", "").removesuffix("state")
    for cls in _state_types():
        if cls.__name__.lower().removesuffix("state") == wanted:
            lines.append(
                f"To select the states of type {cls.__name__}, pass the class {cls.__module__}.{cls.__name__}."
            )
    if any(AtPath(selector)(s.path, s) for s in states if selector):
        lines.append(f"To select the states at path {selector!r}, pass smap.filter.AtPath({selector!r}).")
    tags = sorted(known_tags())
    lines.append(f"Tags in use: {_listed(tags)}." if tags else "No State has a tag.")
    paths = [".".join(map(str, s.path)) for s in states if s.path]
    if paths:
        lines.append(f"Paths of the states here: {_listed(paths)}.")
    lines.append("A string selects by tag; a State subclass selects by type, smap.filter.AtPath('a.b') by dotted path.")
    raise ValueError("\n".join(lines))


def _listed(names: list[str], most: int = 12) -> str:
    shown = ", ".join(map(repr, names[:most]))
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _state_types() -> list[type]:
    """State and all its subclasses, breadth first."""
    found: list[type] = [State]
    for cls in found:
        subclasses: list[type] = cls.__subclasses__()
        found.extend(sub for sub in subclasses if sub not in found)
    return found


for _cls in (Filter, OfType, WithTag, AtPath, StateSet, Not, All, Any, Everything, Nothing):
    _cls.__module__ = "smap.filter"
