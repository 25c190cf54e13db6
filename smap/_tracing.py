"""Tracing: a Python function that reads and writes States, as one pure program.

:func:`trace_program` runs a Python function once, under ``jax.make_jaxpr``,
inside a :class:`~smap._state.TraceFrame`, into a :class:`Program`: a closed
jaxpr and the states it touches. A :class:`TraceContext` says how each
state's value enters the trace (a mapping removes a batched state's mapped
axis) and which axis names collectives may use. Caching and running programs
is :mod:`smap._dispatch`'s business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr

from . import _annotations, _compat, _interpret
from ._state import HeldArgument, State, TraceFrame, WrittenInside, check_same_structure
from .nn import _LAST_EDIT, Module, layout_key

__all__ = [
    "Program",
    "TraceContext",
    "trace_program",
    "abstract",
    "leaf_names",
    "hide_arguments",
    "hold",
    "hold_module",
    "show_arguments",
]

PyTreeDef = Any


def leaf_names(tree: Any, root: str) -> list[str]:
    """A readable name per leaf, such as ``args[0]['w']``: how errors name an argument or an output."""
    return [root + jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def abstract(x: Any) -> jax.core.ShapedArray:
    """The abstract value of an array leaf."""
    return jax.core.ShapedArray(np.shape(x), jax.numpy.result_type(x), weak_type=getattr(x, "weak_type", False))


@dataclasses.dataclass(frozen=True)
class Program:
    """A traced function: a closed jaxpr and the states it touches.

    Inputs of ``jaxpr``: the argument leaves, then the leaves of ``states``.
    Outputs: the output leaves, then the leaves of the written states.
    """

    jaxpr: ClosedJaxpr
    states: tuple[State, ...]
    state_trees: tuple[PyTreeDef, ...]
    written: tuple[int, ...]
    out_tree: PyTreeDef
    n_args: int
    annotated: bool = False  # traced under the global mesh for its sharding annotations (see smap._annotations)
    unit_axes: bool = False  # traced for mesh axes of size 1: only smap._annotations' layout runs it

    @property
    def n_outs(self) -> int:
        return self.out_tree.num_leaves

    @property
    def written_states(self) -> tuple[State, ...]:
        return tuple(self.states[i] for i in self.written)

    def per_state(self, leaves: Sequence[Any], states: Sequence[int]) -> list[list[Any]]:
        """``leaves``, those of the states ``states`` (indices) in turn, cut into one list per state."""
        it = iter(leaves)
        return [list(itertools.islice(it, self.state_trees[i].num_leaves)) for i in states]

    def unflatten_written(self, leaves: Sequence[Any]) -> list[Any]:
        """The written states' values, from the program's written-state outputs."""
        parts = self.per_state(leaves, self.written)
        return [jax.tree_util.tree_unflatten(self.state_trees[i], part) for i, part in zip(self.written, parts)]

    def __call__(self, *leaves: Any) -> list[Any]:
        """Evaluate the program on argument leaves followed by state leaves."""
        if self.annotated:
            return _annotations.evaluate(self.jaxpr, *leaves)
        return jax.core.eval_jaxpr(self.jaxpr.jaxpr, self.jaxpr.consts, *leaves)


def trace_program(
    fun: Callable,
    args: tuple,
    kwargs: dict,
    *,
    make_input: Callable[[State, Any], Any],
    name: str,
    check_write: Callable[[State, Any, Any], None] = check_same_structure,
    arg_avals: Sequence[jax.core.ShapedArray] | None = None,
    axis_env: Sequence[tuple[Hashable, int]] = (),
) -> Program:
    """Trace ``fun(*args, **kwargs)`` into a :class:`Program`.

    ``make_input(state, value)`` receives each state's value outside the
    trace, when the state is first touched, and returns the abstract values
    (a pytree of ShapedArrays like ``value``) its input takes in the program.
    Array leaves of ``args`` and ``kwargs`` become inputs, with the abstract
    values ``arg_avals`` when given (a mapping traces one lane); static
    arguments are bound into ``fun`` by the caller. A ``jax.Ref`` among the
    arguments is no input: ``fun`` receives it, and its reads and writes are
    those of its State (see :mod:`smap._refs`). ``check_write(state,
    current, new)`` checks each write of a state inside the trace.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> from smap._tracing import TraceContext, trace_program
        >>> total = smap.State(jnp.zeros(()))
        >>> def add(x):
        ...     total.value = total.value + x
        ...     return 2 * x
        >>> program = trace_program(add, (jnp.ones(()),), {}, make_input=TraceContext().make_input, name="add")
        >>> program.jaxpr  # inputs: x, then total; outputs: 2 * x, then total's new value
        { lambda ; a:f32[] b:f32[]. let
            c:f32[] = add b a
            d:f32[] = mul 2.0:f32[] a
          in (d, c) }
        >>> program.states == (total,), program.written
        (True, (0,))
    """
    args, kwargs = hide_arguments(args, kwargs)
    leaves, in_tree = jax.tree_util.tree_flatten((args, kwargs))
    # Per attempt: its frame, its trace (where states' inputs are made, not a nested transform's), its out_tree.
    frames: list[TraceFrame] = []
    traces: list[Any] = []
    out_tree: list[PyTreeDef] = []

    def state_input(state: State, value: Any) -> Any:
        return jax.tree_util.tree_map(lambda aval: _compat.new_input(traces[-1], aval), make_input(state, value))

    def traced(*arg_leaves: Any) -> tuple[list, list]:
        traces.append(_compat.current_trace())
        call_args, call_kwargs = jax.tree_util.tree_unflatten(in_tree, arg_leaves)
        call_args, call_kwargs = show_arguments(call_args, "args"), show_arguments(call_kwargs, "kwargs")
        with frames[-1]:
            out = fun(*call_args, **call_kwargs)
        _check_outputs(out, name)
        out_leaves, tree = jax.tree_util.tree_flatten(out)
        out_tree.append(tree)
        return out_leaves, jax.tree_util.tree_leaves([frames[-1].read(s) for s in frames[-1].written.values()])

    specs = [
        jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
        for a in (arg_avals if arg_avals is not None else map(abstract, leaves))
    ]
    trace = jax.make_jaxpr(traced, axis_env=list(axis_env) or None)

    in_refs: dict[int, State] = {}  # the states written inside a JAX transformation of fun: held in Refs

    def attempt(mesh: Any) -> ClosedJaxpr:
        """A trace with a new frame, outside the ambient mesh but inside ``mesh``."""
        frames.append(TraceFrame(state_input, name, check_write, in_refs))
        with _compat.without_ambient_mesh(), mesh:
            return trace(*specs)

    def attempts() -> tuple[ClosedJaxpr, bool, bool]:
        """The trace, and again under the ambient mesh where its annotations need it: (jaxpr, annotated, unit_axes)."""
        try:
            return attempt(contextlib.nullcontext()), False, False
        except (ValueError, RuntimeError) as error:
            # Sharding annotations (with_sharding_constraint, out_sharding=, reshard) need the
            # ambient mesh: trace again under it (smap._annotations binds them per lane).
            if _compat.ambient_mesh() is None or "mesh" not in str(error):
                raise
        try:
            jaxpr, unit_axes = attempt(_compat.ambient_abstract_mesh()), False
        except ValueError as indivisible:
            # A lane's slice of a batch (a dimension of size 1) annotated as the batch is: trace for axes
            # of size 1, and let each annotation be checked where it runs (smap._annotations drops the
            # entries of dimensions of size 1 there; the others must divide as JAX requires).
            if not _compat.indivisible(indivisible):
                raise
            jaxpr, unit_axes = attempt(_compat.ambient_abstract_mesh(unit_axes=True)), True
            sizes = dict(getattr(_compat.ambient_mesh(), "shape", {}))
            _interpret.reaches(jaxpr, lambda eqn: _check_divisible(eqn, sizes, name))
        return jaxpr, _interpret.reaches(jaxpr, lambda eqn: _compat.annotation_spec(eqn) is not None), unit_axes

    # A state written inside a scan, cond, jax.checkpoint, ... of fun: traced again with it in a
    # Ref made where its input is, so the write leaves the transformation as JAX's Refs do, and
    # the Refs are then discharged (the program is pure again).
    while True:
        try:
            jaxpr, annotated, unit_axes = attempts()
            break
        except WrittenInside as inside:
            if inside.frame is not frames[-1] or id(inside.state) in in_refs:
                raise
            in_refs[id(inside.state)] = inside.state
        except Exception as error:
            if not in_refs or not _compat.refuses_ref_write(error):
                raise
            states = " or ".join(state.describe() for state in in_refs.values())
            raise TypeError(
                f"{states} is written with a value traced by a JAX transformation inside {name} that cannot "
                f"carry the write out ({str(error).splitlines()[0]}). Use smap.jit, smap.grad or smap.vmap, "
                f"which carry states through, or return the value instead."
            ) from error
    if in_refs:
        jaxpr = _compat.discharge_refs(jaxpr, axis_env)
    if _compat.HAS_REFS and _compat.ref_constants(jaxpr):
        from ._refs import unrouted_message

        raise TypeError(unrouted_message(name, _compat.ref_constants(jaxpr)))
    frame = frames[-1]
    index = {id(s): i for i, s in enumerate(frame.states)}
    return Program(
        jaxpr=jaxpr,
        states=tuple(frame.states),
        state_trees=tuple(jax.tree_util.tree_structure(frame.value_of(s)) for s in frame.states),
        written=tuple(index[k] for k in frame.written),
        out_tree=out_tree[-1],
        n_args=len(leaves),
        annotated=annotated,
        unit_axes=unit_axes,
    )


def _check_divisible(eqn: Any, sizes: dict, name: str) -> bool:
    """Refuse an annotation on a dimension above 1 that its mesh axes do not divide; else False (walk on)."""
    found = _compat.annotation_spec(eqn)
    if found is None:
        return False
    spec, shape = found[0], getattr(eqn.outvars[0].aval, "shape", ())
    for dim, (size, entry) in enumerate(zip(shape, spec)):
        names = () if entry is None or entry is jax.sharding.PartitionSpec.UNCONSTRAINED else entry
        names = (names,) if isinstance(names, str) else tuple(names)
        parts = int(np.prod([sizes[n] for n in names]))
        if size != 1 and size % parts:
            raise ValueError(
                f"{name}: a sharding annotation lays out a value of shape {tuple(shape)} as {spec}, but "
                f"the mesh axes {names} ({parts} parts) do not evenly divide dimension {dim} (size {size}). "
                f"Only a dimension of size 1 (a lane's slice of a batch) may name axes that do not divide it."
            )
    return False


class TraceContext:
    """How states enter one trace: by default each keeps its shape and dtype."""

    axis_env: Sequence[tuple[Hashable, int]] = ()
    arg_avals: Sequence[jax.core.ShapedArray] | None = None

    def make_input(self, state: State, value: Any) -> Any:
        return jax.tree_util.tree_map(abstract, value)

    def check_write(self, state: State, current: Any, new: Any) -> None:
        """Check a write inside the trace against the state's value there."""
        check_same_structure(state, current, new)


def _check_outputs(out: Any, name: str) -> None:
    """Every output leaf is an array or a Python scalar, or the error names it (a State: its value)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(out)[0]:
        if not isinstance(leaf, (jax.Array, jax.core.Tracer, np.ndarray, np.generic, bool, int, float, complex)):
            where = f"as output{jax.tree_util.keystr(path)}" if path else "as its output"
            hint = (
                " Return its value, state.value, instead."
                if isinstance(leaf, State)
                else " Return its value, ref[...], instead (as jax.jit, which returns no Ref)."
                if _compat.is_ref(leaf)
                else " To make a Module per lane (an ensemble), write its States from one made in each lane: "
                "docs/from-jax.md, 'An ensemble of models'."
                if isinstance(leaf, Module)
                else ""
            )
            raise TypeError(
                f"{name} returned a {type(leaf).__name__} {where}: a transformed function returns arrays "
                f"and Python scalars.{hint}"
            )


# -- arguments that hold states, not arrays ------------------------------------------------


def hide_arguments(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with each Module and each concrete ``jax.Ref`` a :class:`~smap._state.HeldArgument`:
    arguments that hold states are no inputs of a program.

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> from smap._tracing import hide_arguments
        >>> net = smap.nn.Module()
        >>> args, _ = hide_arguments((net, jnp.ones(2)), {})
        >>> jax.tree_util.tree_leaves(args)  # the Module is no leaf
        [Array([1., 1.], dtype=float32)]
    """
    if not kwargs and _compat.PLAIN_ARGUMENTS.issuperset(map(type, args)):  # the usual call: no tree to walk
        return args, kwargs
    plain = _compat.PLAIN_ARGUMENTS
    if not kwargs and all(type(a) in plain or isinstance(a, Module) for a in args):  # a method's call, say
        return tuple(hold(a) if isinstance(a, Module) else a for a in args), kwargs
    held = lambda x: isinstance(x, Module) or _compat.is_ref(x)  # noqa: E731
    if not any(map(held, jax.tree_util.tree_leaves((args, kwargs)))):
        return args, kwargs
    return jax.tree_util.tree_map(lambda x: hold(x) if held(x) else x, (args, kwargs))


def hold(x: Any) -> HeldArgument:
    """A Module (keyed on its layout too) or a Ref as the dispatcher carries it.

    A Module's node is kept on it while its layout holds: the dispatcher's
    ``jax.jit`` then finds its cached program by the node's identity (a new
    node each call cost 3 µs: hashing, comparing and flattening it).
    """
    return hold_module(x) if isinstance(x, Module) else HeldArgument(x)


def hold_module(x: Module) -> HeldArgument:
    """:func:`hold` of a Module (the written-out call has asked ``isinstance`` already)."""
    known = x.__dict__.get("_held")  # (the last edit before it was made, the node)
    if known is not None and known[0] is _LAST_EDIT[0] and known[1].held is x:
        return known[1]
    edit = _LAST_EDIT[0]  # (read first: an edit meanwhile makes the node stale, never wrongly current)
    node = HeldArgument(x, layout_key(x))
    object.__setattr__(x, "_held", (edit, node))  # (bookkeeping: no edit of the layout)
    return node


def show_arguments(tree: Any, root: str | None = None) -> Any:
    """``tree`` with each ``HeldArgument`` what it holds again (a Ref's State named by its path under
    ``root``: see :func:`smap._refs.show_refs`)."""
    if _compat.HAS_REFS:
        from ._refs import show_refs

        tree = show_refs(tree, root)
    return jax.tree_util.tree_map(
        lambda x: x.held if isinstance(x, HeldArgument) else x, tree, is_leaf=lambda x: isinstance(x, HeldArgument)
    )
