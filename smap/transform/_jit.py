"""``smap.jit``: ``jax.jit`` for functions that read and write States."""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax

from .._tracing import Program, StatefulFunction, TraceContext, resolve_argnums
from ._signature import check_static_argnums, function_name

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
        static_argnums, static_argnames = check_static_argnums(fun, static_argnums, static_argnames)
        super().__init__(
            fun,
            static_argnums=static_argnums,
            static_argnames=static_argnames,
            name=f"smap.jit({function_name(fun)})",
        )
        self.donate_argnums = resolve_argnums(donate_argnums, None, "donate_argnums")
        functools.update_wrapper(self, fun, updated=())

    def _compile(self, program: Program, key: Hashable, context: TraceContext) -> tuple[Callable, Any, bool]:
        donated = self._donated_leaves(key)

        def run(donated_leaves: list, kept_leaves: list, state_values: list) -> tuple[list, list]:
            it_d, it_k = iter(donated_leaves), iter(kept_leaves)
            arg_leaves = [next(it_d) if i in donated else next(it_k) for i in range(program.n_args)]
            state_leaves = jax.tree_util.tree_leaves(state_values)
            results = program(*arg_leaves, *state_leaves)
            outs, written = results[: program.n_outs], results[program.n_outs :]
            return jax.tree_util.tree_unflatten(program.out_tree, outs), program.unflatten_written(written)

        compiled = jax.jit(run, donate_argnums=(0,) if donated else ())

        def call(arg_leaves: list, state_values: list) -> tuple[list, list]:
            d = [x for i, x in enumerate(arg_leaves) if i in donated]
            k = [x for i, x in enumerate(arg_leaves) if i not in donated]
            return compiled(d, k, state_values)

        plain = lambda arg_leaves, state_values: compiled([], arg_leaves, state_values)
        return (call if donated else plain), None, program.changes_structure()

    def _donated_leaves(self, key: Hashable) -> frozenset[int]:
        if not self.donate_argnums:
            return frozenset()
        tree, static = key[0], key[1]
        static_positions = {k for k, _ in static if isinstance(k, int)}
        n_args = key[2]
        dyn_positions = [i for i in range(n_args) if i not in static_positions]
        donate = {i % n_args for i in self.donate_argnums if -n_args <= i < n_args}
        arg_trees = tree.children()[0].children()
        leaves, start = set(), 0
        for position, sub in zip(dyn_positions, arg_trees):
            if position in donate:
                leaves.update(range(start, start + sub.num_leaves))
            start += sub.num_leaves
        return frozenset(leaves)


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
