"""``smap.grad``: gradients with respect to States and arguments."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec, overload

import jax
import jax.numpy as jnp
import numpy as np

from .. import _compat
from .._dispatch import ArgSignature, Runner, StatefulFunction
from .._state import HeldArgument, State
from .._tracing import Program, TraceContext, leaf_names
from ..nn import Module
from ._signature import check_callable, function_name

__all__ = ["grad"]

GradStates = Any  # a State or jax.Ref, a sequence or a dict of them, or None
P = ParamSpec("P")


def _grad_state_list(grad_states: GradStates) -> tuple[list[State], Callable[[list], Any], bool]:
    """The states to differentiate, how to rebuild the user's structure, and whether the program may
    rebuild it: ``jax.jit``'s output tree keeps it as built (not a dict, whose keys a pytree sorts, nor a
    container of the user's type, which is no pytree)."""
    if grad_states is None:
        return [], lambda grads: None, True
    if isinstance(grad_states, State) or _compat.is_ref(grad_states):
        return [_as_state(grad_states)], lambda grads: grads[0], True
    container: Any = type(grad_states)  # a dict, list or tuple type, or a user's subclass of one
    rebuild: Callable[[list], Any]
    if isinstance(grad_states, Mapping):
        keys, states = list(grad_states.keys()), list(grad_states.values())
        rebuild = lambda grads: container(zip(keys, grads))  # noqa: E731
    elif isinstance(grad_states, Sequence):
        states = list(grad_states)
        rebuild = lambda grads: container(grads)  # noqa: E731
    else:
        raise TypeError(
            f"grad_states must be a State or jax.Ref, a sequence or a dict of them, got {type(grad_states).__name__}."
        )
    for s in states:
        if not isinstance(s, State) and not _compat.is_ref(s):
            raise TypeError(f"grad_states must hold States or jax.Refs, got {type(s).__name__}.")
    return [_as_state(s) for s in states], rebuild, container in (list, tuple)


def _as_state(s: Any) -> State:
    """A State, or the State backed by a jax.Ref (see smap._refs)."""
    if isinstance(s, State):
        return s
    from .._refs import state_of

    return state_of(s)


def _check_argnums(argnums: Any) -> None:
    positions = (argnums,) if isinstance(argnums, int) else argnums
    if argnums is None or (
        isinstance(positions, Sequence) and all(isinstance(p, int) and not isinstance(p, bool) for p in positions)
    ):
        return
    raise TypeError(f"smap.grad: argnums must be an int, a sequence of ints or None, got {argnums!r}.")


class GradFunction(StatefulFunction[P, Any]):
    """A function returning gradients; see :func:`grad`."""

    def __init__(
        self,
        fun: Callable[P, Any],
        grad_states: GradStates,
        argnums: int | Sequence[int] | None,
        has_aux: bool,
        return_value: bool,
    ):
        check_callable(fun, "smap.grad: fun")
        _check_argnums(argnums)
        states, self._rebuild_state_grads, in_program = _grad_state_list(grad_states)
        self.grad_states = list({id(s): s for s in states}.values())
        if len(self.grad_states) != len(states):
            raise ValueError("grad_states lists a State more than once.")
        if argnums is None and grad_states is None:
            argnums = 0
        self.argnums = argnums
        self._arg_positions = () if argnums is None else ((argnums,) if isinstance(argnums, int) else tuple(argnums))
        self.has_aux = has_aux
        self.return_value = return_value

        def touching_grad_states(*args: P.args, **kwargs: P.kwargs) -> Any:
            # Touch every differentiated state first: they become the first
            # inputs of the program, and an unused one gets a zero gradient.
            for state in self.grad_states:
                _ = state.value
            out = fun(*args, **kwargs)
            if has_aux:
                self._check_aux(out)
            return out

        super().__init__(touching_grad_states, name=f"smap.grad({function_name(fun)})")
        # The result is assembled inside the program where it can be, at no cost to a cached call (jax.jit's
        # output tree unflattens it); otherwise after the call.
        assemble = self._result()
        self._assemble: Callable[[tuple], Any] | None = assemble if in_program else None
        self._call_result = None if in_program else assemble
        functools.update_wrapper(self, fun, updated=())

    def _runner(self, program: Program, key: ArgSignature, context: TraceContext) -> Runner:
        self._check_loss(program)
        tree = key.tree
        positions = tuple(self._argnum(p, key.n_args) for p in self._arg_positions)
        self._check_no_states_at(positions, tree)
        n_grad = len(self.grad_states)

        def run(arg_leaves: list, state_values: list) -> tuple[tuple, list]:
            other_values = state_values[n_grad:]

            def loss(grad_values: list, *args: Any, kwargs: dict) -> tuple[Any, tuple]:
                state_leaves = jax.tree_util.tree_leaves(list(grad_values) + list(other_values))
                results = program(*jax.tree_util.tree_leaves((args, kwargs)), *state_leaves)
                outs, written = results[: program.n_outs], results[program.n_outs :]
                out = jax.tree_util.tree_unflatten(program.out_tree, outs)
                value, aux = out if self.has_aux else (out, None)
                return value, (aux, program.unflatten_written(written))

            args, kwargs = jax.tree_util.tree_unflatten(tree, arg_leaves)
            self._check_differentiable(state_values[:n_grad], [args[p] for p in positions], positions)
            argnums = (0, *(p + 1 for p in positions))
            (value, (aux, written)), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(
                state_values[:n_grad], *args, kwargs=kwargs
            )
            # The value leaves the program only when asked for: an output more costs a cached call 3-5 µs.
            parts = (value if self.return_value else None, aux, grads[0], grads[1:])
            return (parts if self._assemble is None else self._assemble(parts)), written

        return run

    def _check_aux(self, out: Any) -> None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"{self.name}: with has_aux=True the function must return a pair (loss, aux).")
        for path, leaf in jax.tree_util.tree_flatten_with_path(out[1])[0]:
            if not isinstance(leaf, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)):
                raise TypeError(
                    f"{self.name}: with has_aux=True, aux must be a pytree of arrays, but "
                    f"aux{jax.tree_util.keystr(path)} is a {type(leaf).__name__}: {leaf!r}."
                )

    def _check_differentiable(self, state_values: list, args: list, positions: tuple[int, ...]) -> None:
        """Every differentiated leaf is a float or complex array, or the error names its state or argument."""
        named = [
            (state.describe() + (f", leaf {key}," if key else ""), leaf)
            for state, value in zip(self.grad_states, state_values)
            for key, leaf in zip(leaf_names(value, ""), jax.tree_util.tree_leaves(value))
        ]
        named += [
            (name, leaf)
            for p, arg in zip(positions, args)
            for name, leaf in zip(leaf_names(arg, f"args[{p}]"), jax.tree_util.tree_leaves(arg))
        ]
        for what, leaf in named:
            dtype = jnp.result_type(leaf)
            if not jnp.issubdtype(dtype, jnp.inexact):
                raise TypeError(
                    f"{self.name}: {what} has dtype {dtype}; only float and complex values can be differentiated."
                )

    def _check_no_states_at(self, positions: tuple[int, ...], tree: Any) -> None:
        """A differentiated argument holds no Module or jax.Ref: their states are differentiated as states."""
        args = jax.tree_util.tree_unflatten(tree, [None] * tree.num_leaves)[0]
        for p in positions:
            for node in jax.tree_util.tree_leaves(args[p], is_leaf=lambda x: isinstance(x, HeldArgument)):
                if not isinstance(node, HeldArgument):
                    continue
                if isinstance(node.held, Module):
                    raise TypeError(
                        f"{self.name}: argnums selects args[{p}], which holds a Module; a Module is no array: "
                        f"differentiate its states with grad_states=module.states(smap.ParamState), and select "
                        f"the array arguments with argnums."
                    )
                raise TypeError(
                    f"{self.name}: argnums selects args[{p}], which holds a jax.Ref; a Ref is a state, not an "
                    f"array argument: differentiate it with grad_states=smap.ParamState(ref) (a State backed "
                    f"by the Ref), or pass its value ref[...] instead."
                )

    def _argnum(self, p: int, n_args: int) -> int:
        if not -n_args <= p < n_args:
            raise ValueError(f"{self.name}: argnums {p} is out of range for a call with {n_args} positional arguments.")
        return p % n_args

    def _check_loss(self, program: Program) -> None:
        out_avals = program.jaxpr.out_avals[: program.n_outs]
        if self.has_aux:
            children = program.out_tree.children()  # (loss, aux): checked by _check_aux
            out_avals = out_avals[: children[0].num_leaves]
        if len(out_avals) != 1 or out_avals[0].shape != () or not jnp.issubdtype(out_avals[0].dtype, jnp.inexact):
            shapes = ", ".join(f"{a.dtype}{list(a.shape)}" for a in out_avals)
            raise TypeError(
                f"{self.name}: the function must return a real scalar loss to differentiate, "
                f"got {shapes or 'no array'}."
            )

    def _result(self) -> Callable[[tuple], Any]:
        """What a call returns, from the program's ``(value, aux, state_grads, arg_grads)``, for the options
        given: applied in the program, or after the call for a dict or a container of the user's type."""
        rebuild = self._rebuild_state_grads
        arg_grads: Callable[[tuple], Any] = (lambda a: a[0]) if isinstance(self.argnums, int) else tuple
        grads: Callable[[list, tuple], Any]
        if not self.grad_states:
            grads = lambda s, a: arg_grads(a)  # noqa: E731
        elif self.argnums is None:
            grads = lambda s, a: rebuild(s)  # noqa: E731
        else:
            grads = lambda s, a: (rebuild(s), arg_grads(a))  # noqa: E731
        return_value, has_aux = self.return_value, self.has_aux
        if not (return_value or has_aux):
            return lambda out: grads(out[2], out[3])

        def result(out: tuple) -> tuple:
            value, aux, state_grads, argument_grads = out
            outputs = (grads(state_grads, argument_grads),) + ((value,) if return_value else ())
            return outputs + (aux,) if has_aux else outputs

        return result


@overload
def grad(
    fun: Callable[P, Any],
    grad_states: GradStates = None,
    argnums: int | Sequence[int] | None = None,
    has_aux: bool = False,
    return_value: bool = False,
) -> GradFunction[P]: ...


@overload
def grad(
    fun: None = None,
    grad_states: GradStates = None,
    argnums: int | Sequence[int] | None = None,
    has_aux: bool = False,
    return_value: bool = False,
) -> Callable[[Callable[P, Any]], GradFunction[P]]: ...


def grad(
    fun: Callable[P, Any] | None = None,
    grad_states: GradStates = None,
    argnums: int | Sequence[int] | None = None,
    has_aux: bool = False,
    return_value: bool = False,
) -> GradFunction[P] | Callable[[Callable[P, Any]], GradFunction[P]]:
    """Gradients of a scalar loss with respect to States and/or arguments.

    States read by ``fun`` are inputs, states it writes are written back
    after the call (for running statistics updated in a forward pass).

    Arguments:
        fun: the loss function; omit it to get a decorator.
        grad_states: a State, a sequence of States or a dict of States (as
            ``module.states(filter)`` returns); the state gradients have the
            same structure. A state the loss does not use gets a zero gradient.
            A ``jax.Ref`` stands for its State (see docs/refs.md).
        argnums: the positional arguments to differentiate; with
            ``grad_states=None`` it defaults to ``0``.
        has_aux: ``fun`` returns ``(loss, aux)``.
        return_value: also return the loss.

    Returns:
        The state gradients, the argument gradients, or
        ``(state_grads, arg_grads)`` when both are asked for; then
        ``(grads, loss)`` with ``return_value=True``; ``aux`` comes last with
        ``has_aux=True``.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> w = smap.ParamState(jnp.array([1.0, 2.0]))
        >>> loss = lambda x: jnp.sum(w.value * x) ** 2
        >>> smap.grad(loss, grad_states=w)(jnp.array([1.0, 1.0]))
        Array([6., 6.], dtype=float32)
        >>> smap.grad(loss, grad_states={'w': w}, argnums=0, return_value=True)(jnp.array([1.0, 1.0]))
        (({'w': Array([6., 6.], dtype=float32)}, Array([ 6., 12.], dtype=float32)), Array(9., dtype=float32))
    """

    def differentiate(f: Callable[P, Any]) -> GradFunction[P]:
        return GradFunction(f, grad_states, argnums, has_aux, return_value)

    return differentiate if fun is None else differentiate(fun)
