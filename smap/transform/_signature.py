"""Checks of a transform's arguments against the function it wraps."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["check_callable", "check_static_argnums", "function_name", "positional_count", "resolve_argnums"]

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _parameters(fun: Callable) -> list[inspect.Parameter] | None:
    """``fun``'s parameters, or None when Python cannot tell."""
    try:
        return list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        return None


def resolve_argnums(argnums: int | Sequence[int] | None, n_args: int | None, what: str) -> tuple[int, ...]:
    """Normalise ``static_argnums``-style indices (negative allowed) against ``n_args``."""
    out = []
    for i in () if argnums is None else (argnums,) if isinstance(argnums, int) else argnums:
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
    parameters = _parameters(fun)
    if parameters is None or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return None
    return sum(p.kind in _POSITIONAL for p in parameters)


def check_static_argnums(
    fun: Callable, static_argnums: int | Sequence[int], static_argnames: str | Sequence[str]
) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Normalise static argument specs, rejecting indices and names the function cannot take.

    As in ``jax.jit``, a parameter that can be passed by position or by name
    is static either way: its index and its name are both returned; and
    ``static_argnames`` must name parameters unless ``fun`` takes ``**kwargs``.
    """
    nums = resolve_argnums(static_argnums, positional_count(fun), "static_argnums")
    names = (static_argnames,) if isinstance(static_argnames, str) else tuple(static_argnames)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"static_argnames must be strings, got {name!r}.")
    parameters = _parameters(fun)
    if parameters is not None and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        known = [p.name for p in parameters if p.kind in (_POSITIONAL[1], inspect.Parameter.KEYWORD_ONLY)]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"{function_name(fun)} has invalid argnames {unknown} in static_argnames: it takes no such "
                f"parameters (it takes {known or 'none by name'})."
            )
    # The leading positional parameters' names ("" for a positional-only one).
    leading = itertools.takewhile(lambda p: p.kind in _POSITIONAL, parameters or ())
    both = [p.name if p.kind is _POSITIONAL[1] else "" for p in leading]
    nums = tuple(dict.fromkeys(nums + tuple(i for i, n in enumerate(both) if n in names)))
    names = tuple(dict.fromkeys(names + tuple(both[i] for i in nums if 0 <= i < len(both) and both[i])))
    return nums, names
