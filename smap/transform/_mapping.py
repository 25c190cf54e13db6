"""The mapped program: ``StatefulMapping`` and ``vmap2`` map a stateful function over a batch.

A call traces one lane (:class:`_LaneTrace` decides how each state enters it),
plans it (:func:`~smap.transform._plan.plan`), and runs the plan with
``mapping_fn`` (:func:`_mapped_program`): a :class:`MappingFn`, or a device
mapping of :mod:`smap.devices`, which takes the lane program and its plan as
one :class:`~smap.transform._plan.Lanes` value.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload

import jax
import numpy as np
from jax.extend.core import Literal

from .. import _compat
from .. import filter as filters
from .._dispatch import ArgSignature, Entry, Runner, StatefulFunction
from .._state import State, check_same_structure
from .._tracing import Program, TraceContext, abstract, leaf_names
from ._adapters import _Adapter, adapt
from ._axes import AxisSpec, leaf_axes, normalise_state_axes, select_axis, string_selectors
from ._fuse import fused_lanes
from ._hoist import Tail, split_tail
from ._plan import BatchAxisError, LaneInputs, LanePlan, Lanes, plan
from ._signature import check_callable, check_static_argnums, function_name

__all__ = ["StatefulMapping", "vmap2", "MappingFn"]

_POLICIES = ("ignore", "warn", "raise")
P = ParamSpec("P")
R = TypeVar("R")


class MappingFn(Protocol):
    """What runs a per-lane program over the lanes: ``jax.vmap``'s calling convention.

    ``mapping_fn(f, in_axes=..., out_axes=..., axis_name=..., axis_size=...)``
    returns a function of the mapped arguments. ``StatefulMapping`` calls it
    with ``in_axes`` and ``out_axes`` flat tuples of ints and Nones (one per
    array leaf), ``axis_size`` always given, and the mapping's
    ``mapping_kwargs``. ``jax.vmap`` and the device mappings of
    :mod:`smap.devices` follow it (those also take the lane program and its
    plan as one value); JAX's SPMD maps (``jax.pmap``, ``jax.shard_map``) do
    not, and the mapping adapts them (:func:`smap.devices.adapt`, the one
    place that says which functions need adapting).

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> def loop(f, in_axes, out_axes, axis_name=None, axis_size=None):
        ...     # a MappingFn that runs the lanes one by one (no axis_name support)
        ...     def run(*args):
        ...         lanes = [f(*[a if ax is None else jnp.take(a, i, ax) for a, ax in zip(args, in_axes)])
        ...                  for i in range(axis_size)]
        ...         return tuple(jnp.stack(outs, ax) if ax is not None else outs[0]
        ...                      for outs, ax in zip(zip(*lanes), out_axes))
        ...     return run
        >>> double = smap.StatefulMapping(lambda x: 2 * x, mapping_fn=loop)
        >>> double(jnp.arange(3.0))
        Array([0., 2., 4.], dtype=float32)
    """

    def __call__(
        self,
        f: Callable,
        /,
        *,
        in_axes: Any,
        out_axes: Any,
        axis_name: Hashable | None,
        axis_size: int | None,
    ) -> Callable: ...


class _LaneTrace(TraceContext):
    """One trace of a mapping: decides how each touched state enters the lanes."""

    def __init__(self, mapping: StatefulMapping, found: int | None):
        """``found``: the size a batched state gave an earlier trace of this signature (see ``_SizeFoundInTrace``)."""
        self.mapping = mapping
        self.arg_axes: list[int | None] = []
        self.arg_avals: list[jax.core.ShapedArray] = []
        given = mapping.axis_size is not None
        self.axis_size, self.size_source = (mapping.axis_size, "axis_size") if given else (found, "a batched state")
        self.state_axes: dict[State, tuple[int, ...]] = {}
        # The states of the jax.Refs passed as arguments: state -> (its in_axes entry, the argument's name).
        self.ref_axes: dict[State, tuple[int | None, str]] = {}
        self.own_lanes: set[State] = set()
        # Shared states written with a lane's slice: state -> (out axis, the state's sizes along it).
        self.lane_shaped: dict[State, tuple[int, frozenset[int]]] = {}

    def make_input(self, state: State, value: Any) -> Any:
        own = _own_lane_input(state, value, self.mapping.name)
        if own is not None:
            self.own_lanes.add(state)
            return own
        leaves, tree = jax.tree_util.tree_flatten(value)
        if state in self.ref_axes:
            axis, what = self._ref_argument_axis(state, leaves[0].ndim), "in_axes"
        else:
            axis, what = self.mapping._state_in_axis(state, leaves), "state_in_axes"
        if axis is None:
            return jax.tree_util.tree_map(abstract, value)
        earlier = state not in self.ref_axes and self.mapping.state_axis(state) is None
        written = ", written per lane by an earlier call" if earlier else ""
        axes = [self.map_along(axis, leaf.shape, what, "its value has", state.describe(), written) for leaf in leaves]
        self.state_axes[state] = tuple(axes)
        return jax.tree_util.tree_unflatten(tree, [_drop_axis(abstract(x), a) for x, a in zip(leaves, axes)])

    def _ref_argument_axis(self, state: State, ndim: int) -> int | None:
        """The axis of a Ref argument: its in_axes entry, or else the one ``state_in_axes`` selects it at.

        As ``jax.vmap`` reads it, a Ref argument's in_axes entry is the axis its
        lanes' slices lie along (None: shared); ``state_in_axes`` may select it
        too, and where both say something they must agree.
        """
        axis, name = self.ref_axes[state]
        selected, chosen = select_axis(self.mapping.state_in_axes, state.path, state)
        if axis is None or not selected:
            return chosen if axis is None else axis
        if chosen is None or not (-ndim <= chosen < ndim and -ndim <= axis < ndim) or chosen % ndim != axis % ndim:
            said = "marks it shared" if chosen is None else f"selects it at axis {chosen}"
            raise ValueError(
                f"{self.mapping.name}: in_axes maps {name}, a jax.Ref, along axis {axis}, but state_in_axes {said}. "
                f"A Ref argument is a state whose in_axes entry is its axis (None: shared by the lanes); "
                f"give it one axis."
            )
        return axis

    def findings(self) -> LaneInputs:
        """What this trace found, for :func:`~smap.transform._plan.plan`."""
        return LaneInputs(
            tuple(self.arg_axes), self.state_axes, frozenset(self.own_lanes), self.axis_size, self.lane_shaped
        )

    def check_write(self, state: State, current: Any, new: Any) -> None:
        """A shared state that ``state_out_axes`` selects may be written with a lane's slice of it.

        Then the value written back, the lanes' values stacked along the
        selected axis, has the state's shape (checked in ``_written_axes``).
        """
        try:
            check_same_structure(state, current, new)
            return
        except ValueError:
            selected, axis = select_axis(self.mapping.state_out_axes, state.path, state, "state_out_axes")
            if state in self.state_axes or state in self.own_lanes or not selected or axis is None:
                raise
            leaves = jax.tree_util.tree_leaves(current)
            if not leaves or not all(-x.ndim <= axis < x.ndim for x in leaves):
                raise
        lane = jax.tree_util.tree_map(lambda x: _drop_axis(abstract(x), axis % x.ndim), current)
        check_same_structure(state, lane, new)
        self.lane_shaped[state] = (axis, frozenset(x.shape[axis % x.ndim] for x in leaves))

    def add_ref_argument(self, ref: Any, axis: int | None, name: str) -> None:
        """A jax.Ref passed as an argument: a state of the lanes, split along ``axis`` (its in_axes entry) or shared."""
        from .._refs import state_of

        state = state_of(ref)
        previous = self.ref_axes.get(state)
        if previous is not None and previous[0] != axis:
            raise ValueError(
                f"{self.mapping.name}: the same jax.Ref is passed as {previous[1]} with in_axes {previous[0]} "
                f"and as {name} with in_axes {axis}; a Ref is one state, with one axis."
            )
        self.ref_axes.setdefault(state, (axis, name))

    def map_along(self, axis: int, shape: tuple, what: str, whose: str, label: str, note: str = "") -> int:
        """``axis`` of ``label``'s ``shape`` (which ``what`` maps) as a non-negative axis; its size is the lanes'."""
        if not -len(shape) <= axis < len(shape):
            raise ValueError(
                f"{self.mapping.name}: {what} maps {label} along axis {axis}, but {whose} shape {tuple(shape)}."
            )
        axis %= len(shape)
        size, source = shape[axis], f"{label} (axis {axis}{note})"
        if self.axis_size is None:
            if self.axis_env and self.axis_env[0][1] != size:  # traced with a provisional size: trace again
                raise _SizeFoundInTrace(size)
            self.axis_size, self.size_source = size, source
        elif size != self.axis_size:
            raise ValueError(
                f"{self.mapping.name}: mapped sizes differ: {self.size_source} has size "
                f"{self.axis_size}, {source} has size {size}."
            )
        return axis


def _own_lane_input(state: State, value: Any, name: str) -> Any | None:
    """What one lane sees of a state whose type gives each lane its own value; None for other states."""
    if type(state).lane_values is State.lane_values:
        return None
    found = jax.eval_shape(lambda v: state.lane_values(v, 1), value)
    if found is None:
        return None
    lanes, after = found
    like = jax.eval_shape(lambda v: v, value)
    lane_axis = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype), like)
    if _shapes(lanes) != _shapes(lane_axis) or _shapes(after) != _shapes(like):
        raise TypeError(
            f"{name}: {type(state).__name__}.lane_values must return (the lanes' values stacked along a new "
            f"axis 0, the next value), each value with the structure, shapes and dtypes of the state's value "
            f"{like}; got {lanes} and {after} for {state.describe()}."
        )
    return jax.tree_util.tree_map(lambda x: jax.core.ShapedArray(x.shape, x.dtype, x.weak_type), like)


def _shapes(tree: Any) -> tuple:
    """A pytree's structure, and its leaves' shapes and dtypes."""
    leaves, structure = jax.tree_util.tree_flatten(tree)
    return structure, [(x.shape, x.dtype) for x in leaves]


def _drop_axis(aval: jax.core.ShapedArray, axis: int) -> jax.core.ShapedArray:
    return aval.update(shape=aval.shape[:axis] + aval.shape[axis + 1 :])


class StatefulMapping(StatefulFunction[P, R]):
    """Map a function that reads and writes States over a batch.

    ``mapping_fn`` (``jax.vmap`` by default) runs the traced per-lane program
    over the lanes; any function with ``jax.vmap``'s calling convention works,
    and ``jax.pmap``, ``jax.shard_map`` and the device mappings of
    ``smap.devices`` give the same results on any number of devices.

    Arguments:
        fun: the function or Module to map.
        in_axes, out_axes: as in ``jax.vmap`` (ints, None, pytree prefixes,
            negative axes). Keyword arguments are mapped along axis 0. A
            ``jax.Ref`` argument is a state, whose entry is read as ``jax.vmap``
            reads it: an axis splits it into one slice per lane, None shares it.
        state_in_axes: ``{axis: selector}`` or a bare selector (``{0: selector}``):
            the selected states are split along ``axis``, one slice per lane,
            and written back along the same axis. ``{None: selector}`` marks
            states as shared, over any other entry. Other states are shared.
            A string selector is a tag: one that no State has is a
            ``ValueError`` at the call, naming the tags, types and paths it
            could have meant (:func:`smap.filter.check_tag_string`); other
            selectors may select nothing.
        state_out_axes: ``{axis: selector}``: where the mapped axis goes for
            shared states that the function writes with a per-lane value.
        unexpected_out_state_mapping: what happens to a shared state written
            with a per-lane value that ``state_out_axes`` does not select:
            ``'ignore'`` and ``'warn'`` write it back with the mapped axis at
            0 (``'warn'`` also warns), ``'raise'`` raises :class:`BatchAxisError`.
            The state then holds one value per lane, and the mapping's later
            calls map it along axis 0 (as if ``state_in_axes`` selected it)
            while it has the shape the mapping wrote, so a second identical
            call succeeds as the first did and keeps the state's shape.
        static_argnums, static_argnames: compile-time constant arguments.
        axis_size: the number of lanes, needed when nothing mapped gives it.
            With ``axis_name`` set and only a batched state giving the size,
            the trace restarts once at that state's first read (so the
            function starts twice on its first call); pass ``axis_size`` to
            avoid it.
        axis_name: the name collectives (``psum``, ``axis_index``, ...) use.
        name: a name for errors and reprs.
        mapping_fn, mapping_kwargs: what maps the per-lane program (a :class:`MappingFn`,
            or ``jax.pmap``/``jax.shard_map``, which ``smap.devices.adapt`` routes), and
            extra keyword arguments for it.
        fuse_lane_sums: compute a ``psum``/``pmean`` over ``axis_name`` of
            per-lane products (per-example weight gradients) as one product
            over the lanes, without a per-lane array of the product's size
            (see docs/vectorization.md). ``False`` keeps the per-lane
            products, for debugging; results agree to float round-off.
        donate_states: donate the old values of the states the function
            writes to the compiled program (as ``smap.jit``'s
            ``donate_states``): it updates them in place, an array read from
            such a state before a call is deleted by the call, and a call
            that fails before the program runs leaves every state as it was.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> count = smap.ShortTermState(jnp.zeros(3))
        >>> def step(x):
        ...     count.value = count.value + x
        ...     return count.value * 2
        >>> step_all = smap.StatefulMapping(step, state_in_axes=smap.ShortTermState)
        >>> step_all(jnp.array([1.0, 2.0, 3.0]))
        Array([2., 4., 6.], dtype=float32)
        >>> count.value
        Array([1., 2., 3.], dtype=float32)
    """

    def __init__(
        self,
        fun: Callable[P, R],
        *,
        in_axes: AxisSpec = 0,
        out_axes: AxisSpec = 0,
        state_in_axes: Any = None,
        state_out_axes: Any = None,
        unexpected_out_state_mapping: str = "ignore",
        static_argnums: int | Sequence[int] = (),
        static_argnames: str | Sequence[str] = (),
        axis_size: int | None = None,
        axis_name: Hashable | None = None,
        name: str | None = None,
        mapping_fn: MappingFn | Callable[..., Any] = jax.vmap,
        mapping_kwargs: dict | None = None,
        fuse_lane_sums: bool = True,
        donate_states: bool = False,
    ):
        check_callable(fun, f"{name or 'StatefulMapping'}: fun")
        check_callable(mapping_fn, f"{name or function_name(fun)}: mapping_fn")
        if unexpected_out_state_mapping not in _POLICIES:
            raise ValueError(
                f"unexpected_out_state_mapping must be one of {_POLICIES}, got {unexpected_out_state_mapping!r}."
            )
        if not isinstance(fuse_lane_sums, bool):
            raise TypeError(f"fuse_lane_sums must be True or False, got {fuse_lane_sums!r}.")
        if axis_size is not None:  # an int, a NumPy integer too (as jax.vmap takes it), not a bool
            if not isinstance(axis_size, (int, np.integer)) or isinstance(axis_size, bool) or axis_size < 0:
                raise ValueError(f"axis_size must be a non-negative int, got {axis_size!r}.")
            axis_size = int(axis_size)
        if mapping_kwargs is not None and not isinstance(mapping_kwargs, Mapping):
            raise TypeError(
                f"mapping_kwargs must be a dict of keyword arguments for mapping_fn, "
                f"got {type(mapping_kwargs).__name__} {mapping_kwargs!r}."
            )
        try:
            hash(axis_name)
        except TypeError:
            raise TypeError(
                f"axis_name must be hashable (a string, say), got {type(axis_name).__name__} {axis_name!r}."
            ) from None
        static_argnums, static_argnames = check_static_argnums(fun, static_argnums, static_argnames)
        super().__init__(
            fun,
            name=name or function_name(fun),
            static_argnums=static_argnums,
            static_argnames=static_argnames,
            donate_states=donate_states,
        )
        self.origin_fun = fun
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.state_in_axes = normalise_state_axes(state_in_axes, "state_in_axes")
        self.state_out_axes = normalise_state_axes(state_out_axes, "state_out_axes")
        self._tag_strings = string_selectors(state_in_axes, "state_in_axes") + string_selectors(
            state_out_axes, "state_out_axes"
        )
        self.unexpected_out_state_mapping = unexpected_out_state_mapping
        self.axis_size = axis_size
        self.axis_name = axis_name
        self.mapping_fn = mapping_fn
        self.mapping_kwargs = dict(mapping_kwargs or {})
        self.fuse_lane_sums = fuse_lane_sums
        self._sizes_found_in_trace: dict[ArgSignature, int] = {}
        # Shared states this mapping wrote back per lane (unexpected writes), with the leaf
        # shapes written: while a state has them, later calls map it along axis 0.
        self._written_per_lane: weakref.WeakKeyDictionary[State, tuple[tuple[int, ...], ...]] = (
            weakref.WeakKeyDictionary()
        )
        # Per state, whether the lanes of the program traced last read it (a state that only the
        # lane-invariant tail reads is read where its shards live; see _hoist).
        self._read_in_lanes: weakref.WeakKeyDictionary[State, bool] = weakref.WeakKeyDictionary()
        functools.update_wrapper(self, fun, updated=())

    def state_axis(self, state: State) -> int | None:
        """The axis along which ``state_in_axes`` splits ``state``, or None when it is shared.

        Example:
            >>> import jax.numpy as jnp, smap
            >>> h = smap.HiddenState(jnp.zeros((4, 2)))
            >>> smap.vmap(lambda x: x, state_in_axes={1: smap.HiddenState}).state_axis(h)
            1
        """
        return select_axis(self.state_in_axes, state.path, state)[1]

    def read_in_lanes(self, state: State) -> bool | None:
        """Whether the lanes of this mapping's last traced program read ``state``; None before a trace.

        A state that only the lane-invariant tail reads (an optimizer's
        moments, after the ``pmean`` of the gradients) is read after the
        lanes, where its shards live (see ``smap.transform._hoist``).

        Example:
            >>> import jax, jax.numpy as jnp, smap
            >>> w, m = smap.ParamState(jnp.ones(3)), smap.LongTermState(jnp.zeros(3))
            >>> @smap.vmap(axis_name="b")
            ... def step(x):
            ...     g = jax.lax.pmean(x * w.value, "b")
            ...     m.value = 0.9 * m.value + g
            ...     w.value = w.value - m.value
            >>> step.read_in_lanes(w) is None
            True
            >>> _ = step(jnp.ones((2, 3)))
            >>> step.read_in_lanes(w), step.read_in_lanes(m)
            (True, False)
        """
        return self._read_in_lanes.get(state)

    def _state_in_axis(self, state: State, leaves: list) -> int | None:
        """The axis a call maps ``state`` along: ``state_in_axes``'s, or 0 for a state this mapping wrote per lane.

        A shared state that an earlier call wrote back with the mapped axis at 0
        (an unexpected per-lane write) holds one value per lane; while it has
        the shapes written then, it is mapped along that axis, so the next
        call reads lane ``i``'s value and writes the state back in its shape.
        """
        selected, axis = select_axis(self.state_in_axes, state.path, state)
        if not selected and self._written_per_lane.get(state) == tuple(tuple(x.shape) for x in leaves):
            return 0
        return axis

    def __repr__(self) -> str:
        return f"StatefulMapping({self.name}, axis_name={self.axis_name!r}, axis_size={self.axis_size!r})"

    # -- before the trace: arguments --------------------------------------------

    def _trace_context(self, key: ArgSignature, leaves: list) -> _LaneTrace:
        args, kwargs = jax.tree_util.tree_unflatten(key.tree, leaves)
        if _compat.HAS_REFS:  # a Ref argument is a leaf of in_axes, and a state of the lanes
            from .._refs import show_refs

            args, kwargs = show_refs(args), show_refs(kwargs)
        names = leaf_names(args, "args") + leaf_names(kwargs, "kwargs")
        context = _LaneTrace(self, self._sizes_found_in_trace.get(key))
        arg_axes = self._arg_axes(key, args, kwargs)
        for leaf, axis, leaf_name in zip(jax.tree_util.tree_leaves((args, kwargs)), arg_axes, names):
            if _compat.is_ref(leaf):
                context.add_ref_argument(leaf, axis, leaf_name)
                continue
            aval = abstract(leaf)
            if axis is not None:
                axis = context.map_along(axis, aval.shape, "in_axes", "it has", leaf_name)
                aval = _drop_axis(aval, axis)
            context.arg_axes.append(axis)
            context.arg_avals.append(aval)
        if self.axis_name is not None:  # with a provisional size until a batched state gives it (_SizeFoundInTrace)
            context.axis_env = ((self.axis_name, context.axis_size or 1),)
        return context

    def _arg_axes(self, key: ArgSignature, args: tuple, kwargs: dict) -> list[int | None]:
        """The in_axes entry of each leaf of the (dynamic) arguments; keyword arguments' are 0."""
        in_axes = tuple(self.in_axes) if isinstance(self.in_axes, list) else self.in_axes
        if isinstance(in_axes, tuple):
            if len(in_axes) != key.n_args:
                raise ValueError(
                    f"{self.name}: in_axes has {len(in_axes)} entries but the function was called with "
                    f"{key.n_args} positional arguments."
                )
            static = {k for k, _ in key.static}
            positions = [i for i in range(key.n_args) if i not in static]
            # One argument at a time, so that an error names the argument whose structure differs.
            axes = [
                axis
                for i, arg in zip(positions, args)
                for axis in leaf_axes(in_axes[i], arg, f"{self.name}: in_axes[{i}], for args[{i}],")
            ]
        else:
            axes = leaf_axes(in_axes, args, f"{self.name}: in_axes")
        return axes + [0] * len(jax.tree_util.tree_leaves(kwargs))

    # -- after the trace: the plan ---------------------------------------------

    def _runner(self, program: Program, key: ArgSignature, context: TraceContext) -> Runner:
        for where, tag in self._tag_strings:
            filters.check_tag_string(tag, f"{self.name}: {where}", program.states)
        lane_plan = plan(
            program,
            cast(_LaneTrace, context).findings(),  # the context _trace_context made
            out_axes=self.out_axes,
            state_out_axes=self.state_out_axes,
            axis_name=self.axis_name,
            name=self.name,
        )
        self._unexpected_writes(program, lane_plan)
        batched = [a is not None for a in lane_plan.in_axes]
        # A program whose sharding annotations are laid out where its lanes run is run whole, as laid out.
        tail = None if program.annotated else split_tail(program.jaxpr, batched, lane_plan.out_axes, self.axis_name)
        if tail is None:
            lanes = Lanes(program.jaxpr, lane_plan, run=program if program.annotated else None)
        else:
            lanes = Lanes(tail.head, dataclasses.replace(lane_plan, out_axes=tail.head_out_axes(lane_plan.out_axes)))
        self._remember_lane_reads(program, lanes.program)
        # A lane traced for mesh axes of size 1 runs only as its annotations are laid out, unfused.
        if self.fuse_lane_sums and self.axis_name is not None and not program.unit_axes:
            lanes = dataclasses.replace(lanes, fused=fused_lanes(lanes.program, batched, self.axis_name))
        adapted, kwargs = adapt(
            self.mapping_fn, self.mapping_kwargs, self.axis_name
        )  # the one rule of which functions need adapting
        mapping_fn = functools.partial(adapted, **kwargs) if kwargs else adapted
        return _mapped_program(program, lanes, mapping_fn, tail, lane_plan.out_axes)

    def _remember_lane_reads(self, program: Program, head: Any) -> None:
        """Record which states the lanes (``head``, the per-lane part of ``program``) read."""
        read = [v for eqn in head.jaxpr.eqns for v in eqn.invars] + list(head.jaxpr.outvars)
        used = {v for v in read if not isinstance(v, Literal)}
        states = range(len(program.states))
        for state, invars in zip(program.states, program.per_state(head.jaxpr.invars[program.n_args :], states)):
            self._read_in_lanes[state] = any(v in used for v in invars)

    def _unexpected_writes(self, program: Program, lane_plan: LanePlan) -> None:
        """Apply ``unexpected_out_state_mapping`` to the unexpected per-lane writes; then record the shapes
        they give their states (see :meth:`_state_in_axis`)."""
        for i in lane_plan.unexpected_writes:
            state = program.states[i]
            if select_axis(self.state_in_axes, state.path, state) == (True, None):
                raise BatchAxisError(
                    f"{self.name}: {state.describe()} is marked shared ({{None: ...}} in state_in_axes) but "
                    f"written with a per-lane value; a shared state keeps its shape on every call, so it cannot "
                    f"take one value per lane. Write it a lane-independent value (after a pmean, say), or select it "
                    f"in state_in_axes or state_out_axes instead."
                )
            message = (
                f"{self.name}: {state.describe()} is shared by the lanes but written with a per-lane value, "
                f"and state_out_axes does not select it"
            )
            if self.unexpected_out_state_mapping == "raise":
                raise BatchAxisError(message + "; select it in state_in_axes or state_out_axes.")
            if self.unexpected_out_state_mapping == "warn":
                warnings.warn(
                    message + "; it is written back with the mapped axis at 0, and later calls map it along that axis.",
                    UserWarning,
                    stacklevel=4,
                )
        written = program.per_state(program.jaxpr.out_avals[program.n_outs :], program.written)
        for i, avals in zip(program.written, written):
            if i in lane_plan.unexpected_writes:
                self._written_per_lane[program.states[i]] = tuple((lane_plan.axis_size, *a.shape) for a in avals)

    def _trace(self, key: ArgSignature, leaves: list, dyn_args: tuple, dyn_kwargs: dict) -> Entry:
        try:
            try:
                return super()._trace(key, leaves, dyn_args, dyn_kwargs)
            except _SizeFoundInTrace as found:
                self._sizes_found_in_trace[key] = found.size
                return super()._trace(key, leaves, dyn_args, dyn_kwargs)
        except NameError as error:
            unbound = re.search(r"unbound axis name: (.+?)(?:\. |\.?$)", str(error))
            if unbound is None:
                raise
            raise NameError(
                f"{self.name}: the program uses a collective over the axis {unbound.group(1)!r}, which is not "
                f"bound in it. A collective in the mapped program names the mapping's axis_name "
                f"({self.axis_name!r}) or an axis that a jax.shard_map inside the program makes manual "
                f"(jax.shard_map(..., axis_names={{{unbound.group(1)!r}}})); a mesh axis that the mapping_fn "
                f"leaves to the compiler (such as 'model' under sharding.shard_map(mesh, axis='data')) is not."
            ) from None


class _SizeFoundInTrace(Exception):
    """A batched state gave the mapped size after collectives were traced with a provisional one.

    Why an exception: the size is learned at the state's first read, in the
    middle of the user's function, and the rest of that function must not
    run with the wrong size (``axis_size`` or an ``all_gather`` shape would
    be wrong); raising stops it, and :meth:`StatefulMapping._trace` traces
    again with the size, which it remembers for the signature.
    """

    def __init__(self, size: int):
        self.size = size


def _mapped_program(
    program: Program, lanes: Lanes, mapping_fn: MappingFn, tail: Tail | None, out_axes: Sequence[int | None]
) -> Runner:
    """The :data:`~smap._dispatch.Runner` of ``program``: ``mapping_fn`` runs ``lanes`` (see the module's
    docstring), and ``tail``, the program's lane-invariant part (``smap.transform._hoist``), runs after them.

    ``out_axes`` are the program's (its plan's; the tail's outputs leave the lanes once, with None)."""
    lane_plan = lanes.plan
    if isinstance(mapping_fn, _Adapter):
        mapped = mapping_fn.map_lanes(lanes)
    else:
        mapped = mapping_fn(
            lambda *leaves: tuple(lanes(*leaves)),
            in_axes=lane_plan.in_axes,
            out_axes=lane_plan.out_axes,
            axis_name=lane_plan.axis_name,
            axis_size=lane_plan.axis_size,
        )

    def compute(*leaves: Any) -> list:
        results = mapped(*leaves)
        if tail is not None:
            results = tail.finish(results, list(leaves), program.jaxpr.consts)
        return list(results)

    def run(arg_leaves: list, state_values: list) -> tuple[Any, list]:
        next_values: dict[int, Any] = {}
        leaves = list(arg_leaves)
        for i, value in enumerate(state_values):
            if i in lane_plan.own_lanes:
                value, next_values[i] = cast(tuple, program.states[i].lane_values(value, lane_plan.axis_size))
            leaves.extend(jax.tree_util.tree_leaves(value))
        if isinstance(mapping_fn, _Adapter):
            # A written state's new value is laid out as its value was (the input leaf it was read from).
            read_at = program.per_state(range(len(arg_leaves), len(leaves)), range(len(program.states)))
            like = [None] * program.n_outs + [k for i in program.written for k in read_at[i]]
            results = mapping_fn.enclose(compute, leaves, lane_plan.in_axes, out_axes, like)
        else:
            results = compute(*leaves)
        written = program.unflatten_written(results[program.n_outs :])
        written = [next_values[i] if i in lane_plan.take_next else w for i, w in zip(program.written, written)]
        return jax.tree_util.tree_unflatten(program.out_tree, results[: program.n_outs]), written

    return run


@overload
def vmap2(
    fn: Callable[P, R],
    in_axes: AxisSpec = 0,
    out_axes: AxisSpec = 0,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    spmd_axis_name: Hashable | tuple[Hashable, ...] | None = None,
    *,
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: str = "ignore",
    fuse_lane_sums: bool = True,
    donate_states: bool = False,
) -> StatefulMapping[P, R]: ...


@overload
def vmap2(
    fn: None = None,
    in_axes: AxisSpec = 0,
    out_axes: AxisSpec = 0,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    spmd_axis_name: Hashable | tuple[Hashable, ...] | None = None,
    *,
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: str = "ignore",
    fuse_lane_sums: bool = True,
    donate_states: bool = False,
) -> Callable[[Callable[P, R]], StatefulMapping[P, R]]: ...


def vmap2(
    fn: Callable[P, R] | None = None,
    in_axes: AxisSpec = 0,
    out_axes: AxisSpec = 0,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    spmd_axis_name: Hashable | tuple[Hashable, ...] | None = None,
    *,
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: str = "ignore",
    fuse_lane_sums: bool = True,
    donate_states: bool = False,
) -> StatefulMapping[P, R] | Callable[[Callable[P, R]], StatefulMapping[P, R]]:
    """A :class:`StatefulMapping` with ``mapping_fn=jax.vmap``; also a decorator.

    Its first arguments are ``jax.vmap``'s, in ``jax.vmap``'s order, so it
    can be passed wherever a library takes a function "with the same
    signature as ``jax.vmap``" (``optax.microbatching.micro_vmap``'s
    ``vmap_fn``); ``spmd_axis_name`` is handed to ``jax.vmap``. The state
    arguments, ``fuse_lane_sums`` and ``donate_states`` (:class:`StatefulMapping`'s)
    are keyword-only.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> @smap.vmap(in_axes=(0, None))
        ... def scale(x, w):
        ...     return x * w
        >>> scale(jnp.array([1.0, 2.0]), 3.0)
        Array([3., 6.], dtype=float32)
        >>> w = smap.ParamState(jnp.array(2.0))
        >>> smap.vmap(lambda x: x * w.value, 0, 0)(jnp.array([1.0, 2.0]))  # jax.vmap's positional order
        Array([2., 4.], dtype=float32)
    """

    def mapping(f: Callable[P, R]) -> StatefulMapping[P, R]:
        return StatefulMapping(
            f,
            in_axes=in_axes,
            out_axes=out_axes,
            axis_name=axis_name,
            axis_size=axis_size,
            state_in_axes=state_in_axes,
            state_out_axes=state_out_axes,
            unexpected_out_state_mapping=unexpected_out_state_mapping,
            mapping_fn=jax.vmap,
            mapping_kwargs=None if spmd_axis_name is None else {"spmd_axis_name": spmd_axis_name},
            fuse_lane_sums=fuse_lane_sums,
            donate_states=donate_states,
        )

    if fn is None:
        return mapping
    check_callable(fn, "smap.vmap: fn")
    return mapping(fn)


StatefulMapping.__module__ = "smap.transform"
