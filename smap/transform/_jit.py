"""``smap.jit``: ``jax.jit`` for functions that read and write States."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax

from .._tracing import ArgSignature, Program, StatefulFunction, TraceContext, resolve_argnums
from ._signature import check_callable, check_static_argnums, function_name, positional_count

__all__ = ["jit"]


class JittedFunction(StatefulFunction):
    """A compiled stateful function; see :func:`jit`."""

    def __init__(
        self,
        fun: Callable,
        static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (),
        donate_argnums: int | Sequence[int] = (),
    ):
        check_callable(fun, "smap.jit: fun")
        static_argnums, static_argnames = check_static_argnums(fun, static_argnums, static_argnames)
        super().__init__(
            fun,
            name=f"smap.jit({function_name(fun)})",
            static_argnums=static_argnums,
            static_argnames=static_argnames,
            donate_argnums=resolve_argnums(donate_argnums, positional_count(fun), "donate_argnums"),
        )
        functools.update_wrapper(self, fun, updated=())

    def _compile(self, program: Program, key: ArgSignature, context: TraceContext) -> Callable:
        def run(arg_leaves: list, state_values: list) -> tuple[Any, list]:
            results = program(*arg_leaves, *jax.tree_util.tree_leaves(state_values))
            outs, written = results[: program.n_outs], results[program.n_outs :]
            return jax.tree_util.tree_unflatten(program.out_tree, outs), program.unflatten_written(written)

        return run


def jit(
    fun: Callable | None = None,
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    donate_argnums: int | Sequence[int] = (),
) -> Any:
    """Compile a function that reads and writes States, like ``jax.jit``.

    States read inside are inputs of the compiled program and states written
    are written back after the call. The function is traced once per
    signature: argument shapes, dtypes, tree structure and static values, and
    the structure, shapes and dtypes of the states it reads. If the call
    raises, every state keeps its value.

    Arguments:
        fun: the function (or Module); omit it to use ``jit`` as a decorator
            with arguments.
        static_argnums, static_argnames: arguments that are compile-time
            constants, as in ``jax.jit``.
        donate_argnums: positional arguments whose buffers may be reused.

    Returns:
        A callable with ``get_arg_cache_key`` and ``get_jaxpr_by_cache``.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> total = smap.State(jnp.zeros(()))
        >>> @smap.jit
        ... def add(x):
        ...     total.value = total.value + x.sum()
        ...     return total.value
        >>> add(jnp.arange(4.0))
        Array(6., dtype=float32)
        >>> total.value
        Array(6., dtype=float32)
    """
    if fun is None:
        return functools.partial(
            jit, static_argnums=static_argnums, static_argnames=static_argnames, donate_argnums=donate_argnums
        )
    return JittedFunction(fun, static_argnums, static_argnames, donate_argnums)
