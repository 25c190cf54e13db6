"""``smap.jit``: ``jax.jit`` for functions that read and write States."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ParamSpec, TypeVar, overload

import jax

from .._dispatch import ArgSignature, Runner, StatefulFunction
from .._tracing import Program, TraceContext
from ._signature import check_callable, check_static_argnums, function_name, positional_count, resolve_argnums

__all__ = ["jit"]

P = ParamSpec("P")
R = TypeVar("R")


class JittedFunction(StatefulFunction[P, R]):
    """A compiled stateful function; see :func:`jit`."""

    def __init__(
        self,
        fun: Callable[P, R],
        static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (),
        donate_argnums: int | Sequence[int] = (),
        donate_states: bool = False,
    ):
        check_callable(fun, "smap.jit: fun")
        static_argnums, static_argnames = check_static_argnums(fun, static_argnums, static_argnames)
        donated = resolve_argnums(donate_argnums, positional_count(fun), "donate_argnums")
        if set(donated) & set(static_argnums):
            raise ValueError(
                f"smap.jit: donate_argnums and static_argnums cannot intersect, as in jax.jit: "
                f"{sorted(set(donated) & set(static_argnums))} appear in both (a static argument has no buffer)."
            )
        super().__init__(
            fun,
            name=f"smap.jit({function_name(fun)})",
            static_argnums=static_argnums,
            static_argnames=static_argnames,
            donate_argnums=donated,
            donate_states=donate_states,
        )
        functools.update_wrapper(self, fun, updated=())

    def _runner(self, program: Program, key: ArgSignature, context: TraceContext) -> Runner:
        def run(arg_leaves: list, state_values: list) -> tuple[Any, list]:
            results = program(*arg_leaves, *jax.tree_util.tree_leaves(state_values))
            outs, written = results[: program.n_outs], results[program.n_outs :]
            return jax.tree_util.tree_unflatten(program.out_tree, outs), program.unflatten_written(written)

        return run


@overload
def jit(
    fun: Callable[P, R],
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    donate_argnums: int | Sequence[int] = (),
    donate_states: bool = False,
) -> JittedFunction[P, R]: ...


@overload
def jit(
    fun: None = None,
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    donate_argnums: int | Sequence[int] = (),
    donate_states: bool = False,
) -> Callable[[Callable[P, R]], JittedFunction[P, R]]: ...


def jit(
    fun: Callable[P, R] | None = None,
    *,
    static_argnums: int | Sequence[int] = (),
    static_argnames: str | Sequence[str] = (),
    donate_argnums: int | Sequence[int] = (),
    donate_states: bool = False,
) -> JittedFunction[P, R] | Callable[[Callable[P, R]], JittedFunction[P, R]]:
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
        donate_states: donate the old values of the states the function
            writes to the compiled program, as ``donate_argnums`` donates
            arguments, so that it updates them in place. An array read from
            such a state before a call is deleted by the call. A call that
            fails before the program runs (a bad argument, an error while
            tracing) leaves every state, and every array read from one, as
            it was; one that fails while the compiled program runs may leave
            them deleted. A written state's value must not also be an
            argument of the call or another state's value (JAX refuses to
            donate a buffer used twice).

    Returns:
        A callable with ``fun``'s signature, and ``get_arg_cache_key`` and
        ``get_jaxpr_by_cache``.

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

        Donating the states it writes, the program updates them in place:

        >>> w = smap.ParamState(jnp.ones(3))
        >>> @smap.jit(donate_states=True)
        ... def decay():
        ...     w.value = 0.5 * w.value
        >>> old = w.value
        >>> decay()
        >>> w.value, old.is_deleted()
        (Array([0.5, 0.5, 0.5], dtype=float32), True)
    """

    def compile_stateful(f: Callable[P, R]) -> JittedFunction[P, R]:
        return JittedFunction(f, static_argnums, static_argnames, donate_argnums, donate_states)

    return compile_stateful if fun is None else compile_stateful(fun)
