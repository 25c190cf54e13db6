"""Axis specifications: ``in_axes``/``out_axes`` prefixes and state axis filters."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import jax

from .. import filter as filters
from .._state import State

__all__ = [
    "AxisSpec",
    "StateAxes",
    "normalise_state_axes",
    "string_selectors",
    "leaf_axes",
    "resolve_axis",
]

AxisSpec = Any  # int | None | a pytree prefix of ints and Nones
StateAxes = dict[int | None, filters.Filter]


def normalise_state_axes(spec: Any, what: str) -> StateAxes:
    """``{axis: selector}`` or a bare selector (meaning ``{0: selector}``) as ``{axis: Filter}``."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        out: StateAxes = {}
        for axis, selector in spec.items():
            if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
                raise TypeError(f"{what} keys must be ints or None, got {axis!r}.")
            out[axis] = filters.to_filter(selector)
        return out
    return {0: filters.to_filter(spec)}


def string_selectors(spec: Any, what: str) -> list[tuple[str, str]]:
    """The strings of a ``state_in_axes``/``state_out_axes`` spec, each with how errors name it.

    A string there selects by tag; the mapping checks, at each trace, that
    it is some State's tag (:func:`smap.filter.check_tag_string`).
    """
    if isinstance(spec, str):
        return [(what, spec)]
    if isinstance(spec, Mapping):
        return [(f"{what}[{axis!r}]", s) for axis, s in spec.items() if isinstance(s, str)]
    return []


def select_axis(
    axes: StateAxes, path: tuple[Hashable, ...], state: State, what: str = "state_in_axes"
) -> tuple[bool, int | None]:
    """Whether a state is selected by ``axes`` and on which axis (``None``: shared).

    A state that two entries select at different axes is an error: a state has one mapped axis.
    """
    if None in axes and axes[None](path, state):
        return True, None
    chosen = [axis for axis, selector in axes.items() if axis is not None and selector(path, state)]
    if len(chosen) > 1:
        raise ValueError(
            f"{what} selects {state.describe()} at axis {chosen[0]} and at axis {chosen[1]}; "
            f"a state is mapped along one axis: make the selectors exclusive."
        )
    return (True, chosen[0]) if chosen else (False, None)


def resolve_axis(axis: int, ndim: int, what: str) -> int:
    """A non-negative axis for an array of rank ``ndim``, or a clear error."""
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}: axis {axis} is out of range for an array of rank {ndim}.")
    return axis % ndim


def leaf_axes(prefix: AxisSpec, tree: Any, what: str) -> list[int | None]:
    """Broadcast an axis prefix over ``tree``: one axis (or None) per leaf."""
    axes: list[int | None] = []

    def expand(axis: Any, subtree: Any) -> None:
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise TypeError(f"{what} must consist of ints and None, got {axis!r}.")
        axes.extend([axis] * len(jax.tree_util.tree_leaves(subtree)))

    try:
        jax.tree_util.tree_map(expand, prefix, tree, is_leaf=lambda x: x is None)
    except ValueError as error:
        raise ValueError(
            f"{what} {prefix!r} does not match the structure it applies to, "
            f"{jax.tree_util.tree_structure(tree)}: {error}"
        ) from None
    return axes
