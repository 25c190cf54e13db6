"""Checks of a transform's arguments against the function it wraps."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["check_callable", "check_static_argnums", "function_name", "positional_count", "resolve_argnums"]


def resolve_argnums(argnums: int | Sequence[int] | None, n_args: int | None, what: str) -> tuple[int, ...]:
    """Normalise ``static_argnums``-style indices (negative allowed) against ``n_args``."""
    if argnums is None:
        return ()
    if isinstance(argnums, int):
        argnums = (argnums,)
    out = []
    for i in argnums:
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"{what} must be ints, got {i!r}.")
        if n_args is not None:
            if not -n_args <= i < n_args:
                raise ValueError(f"{what} index {i} is out of range for a function of {n_args} positional arguments.")
            i = i % n_args
        out.append(int(i))
    return tuple(out)


def check_callable(value: object, what: str) -> None:
    """Reject a non-callable where a function belongs, as JAX's transforms do, naming the argument."""
    if not callable(value):
        raise TypeError(f"{what} must be callable, got {type(value).__name__} {value!r}.")


def function_name(fun: Callable) -> str:
    return getattr(fun, "__name__", None) or type(fun).__name__


def positional_count(fun: Callable) -> int | None:
    """How many positional parameters ``fun`` takes, or None if unbounded or unknown."""
    try:
        parameters = inspect.signature(fun).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = [p.kind for p in parameters]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(kind in positional for kind in kinds)


def check_static_argnums(
    fun: Callable, static_argnums: int | Sequence[int], static_argnames: str | Sequence[str]
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Normalise static argument specs, rejecting indices the function cannot take.

    As in ``jax.jit``, a parameter that can be passed by position or by name
    is static either way: its index and its name are both returned.
    """
    nums = resolve_argnums(static_argnums, positional_count(fun), "static_argnums")
    names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"static_argnames must be strings, got {name!r}.")
    _check_names_exist(fun, names)
    both = _positional_or_keyword(fun)
    nums = tuple(dict.fromkeys(nums + tuple(i for i, n in enumerate(both) if n in names)))
    names = tuple(dict.fromkeys(names + tuple(both[i] for i in nums if 0 <= i < len(both) and both[i])))
    return nums, names


def _check_names_exist(fun: Callable, names: tuple[str, ...]) -> None:
    """As ``jax.jit``: static_argnames must name parameters (unless ``fun`` takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(fun).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    known = [n for n, p in parameters.items() if p.kind in keyword]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"{function_name(fun)} has invalid argnames {unknown} in static_argnames: it takes no such "
            f"parameters (it takes {known or 'none by name'})."
        )


def _positional_or_keyword(fun: Callable) -> list[str]:
    try:
        parameters = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        return []
    names = []
    for p in parameters:
        if p.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(p.name if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD else "")
    return names
