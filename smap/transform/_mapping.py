"""``StatefulMapping`` and ``vmap2``: map a stateful function over a batch.

A call reads as a short story. The function is traced once per signature
into a per-lane program whose inputs are its arguments and the states it
touches; a state selected by ``state_in_axes`` enters with its mapped axis
removed, a random state enters as one key. The plan then says, for every
input, whether it is split over the lanes, and for every output, where its
mapped axis goes: states written with a per-lane value follow
``state_out_axes`` (or the unexpected-write policy), states written with a
lane-independent value are written back as they are. ``mapping_fn`` runs the
program over the lanes with ``jax.vmap``'s calling convention, and the
results are written back once the call has succeeded.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax

from .._state import State
from .._tracing import ArgSignature, Program, StatefulFunction, TraceContext, abstract
from ..random import RandomState
from ._axes import AxisSpec, leaf_axes, leaf_names, normalise_state_axes, resolve_axis, select_axis
from ._fuse import fused_lanes
from ._lanes import lane_dependent
from ._signature import check_static_argnums, function_name

__all__ = ["StatefulMapping", "vmap2", "BatchAxisError"]

_POLICIES = ("ignore", "warn", "raise")


class BatchAxisError(ValueError):
    """A state's mapped axis is not what the mapping was told it would be."""


BatchAxisError.__module__ = "smap"


class _LaneTrace(TraceContext):
    """One trace of a mapping: decides how each touched state enters the lanes."""

    def __init__(self, mapping: StatefulMapping, arg_axes: list[int | None], axis_size: int | None, size_source: str | None):
        self.mapping = mapping
        self.arg_axes = arg_axes
        self.axis_size = axis_size
        self.size_source = size_source
        self.state_axes: dict[int, list[int]] = {}
        self.split_keys: set[int] = set()
        self.axis_env: tuple = ()

    def make_input(self, state: State, value: Any) -> Any:
        leaves, tree = jax.tree_util.tree_flatten(value)
        axis = select_axis(self.mapping.state_in_axes, state.path, state)[1]
        if isinstance(state, RandomState) and len(leaves) == 1 and leaves[0].ndim == 1:
            # One key for the whole batch: every lane gets its own key, split from it.
            self.split_keys.add(id(state))
            return jax.tree_util.tree_map(abstract, value)
        if axis is None:
            return jax.tree_util.tree_map(abstract, value)
        axes = []
        for leaf in leaves:
            if leaf.ndim == 0 or not -leaf.ndim <= axis < leaf.ndim:
                raise ValueError(
                    f"{self.mapping.name}: state_in_axes maps {state.describe()} along axis {axis}, "
                    f"but its value has shape {tuple(leaf.shape)}."
                )
            ax = axis % leaf.ndim
            self._check_size(leaf.shape[ax], f"{state.describe()} (axis {ax})")
            axes.append(ax)
        self.state_axes[id(state)] = axes
        return jax.tree_util.tree_unflatten(tree, [_drop_axis(abstract(x), a) for x, a in zip(leaves, axes)])

    def _check_size(self, size: int, source: str) -> None:
        if self.axis_size is None:
            if self.axis_env and self.axis_env[0][1] != size:
                # Collectives were traced with a provisional size: stop here and
                # trace again with the size this batched state gives.
                raise _SizeFoundInTrace(size)
            self.axis_size, self.size_source = size, source
        elif size != self.axis_size:
            raise ValueError(
                f"{self.mapping.name}: mapped sizes differ: {self.size_source} has size "
                f"{self.axis_size}, {source} has size {size}."
            )


def _drop_axis(aval: jax.core.ShapedArray, axis: int) -> jax.core.ShapedArray:
    return aval.update(shape=aval.shape[:axis] + aval.shape[axis + 1 :])


class StatefulMapping(StatefulFunction):
    """Map a function that reads and writes States over a batch.

    ``mapping_fn`` (``jax.vmap`` by default) runs the traced per-lane program
    over the lanes; any function with ``jax.vmap``'s calling convention works,
    and ``jax.pmap``, ``jax.shard_map`` and the adapters of the ``sharding``
    package give the same results on any number of devices.

    Arguments:
        fun: the function or Module to map.
        in_axes, out_axes: as in ``jax.vmap`` (ints, None, pytree prefixes,
            negative axes). Keyword arguments are mapped along axis 0.
        state_in_axes: ``{axis: selector}`` or a bare selector (``{0: selector}``):
            the selected states are split along ``axis``, one slice per lane,
            and written back along the same axis. ``{None: selector}`` marks
            states as shared, over any other entry. Other states are shared.
        state_out_axes: ``{axis: selector}``: where the mapped axis goes for
            shared states that the function writes with a per-lane value.
        unexpected_out_state_mapping: what happens to a shared state written
            with a per-lane value that ``state_out_axes`` does not select:
            ``'ignore'`` and ``'warn'`` write it back with the mapped axis at
            0 (``'warn'`` also warns), ``'raise'`` raises :class:`BatchAxisError`.
        static_argnums, static_argnames: compile-time constant arguments.
        axis_size: the number of lanes, needed when nothing mapped gives it.
            With ``axis_name`` set and only a batched state giving the size,
            the trace restarts once at that state's first read (so the
            function starts twice on its first call); pass ``axis_size`` to
            avoid it.
        axis_name: the name collectives (``psum``, ``axis_index``, ...) use.
        name: a name for errors and reprs.
        mapping_fn, mapping_kwargs: what maps the per-lane program, and
            extra keyword arguments for it.
        fuse_lane_sums: compute a ``psum``/``pmean`` over ``axis_name`` of
            per-lane products (per-example weight gradients) as one product
            over the lanes, without a per-lane array of the product's size
            (see docs/vectorization.md). ``False`` keeps the per-lane
            products, for debugging; results agree to float round-off.

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
        fun: Callable,
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
        mapping_fn: Callable = jax.vmap,
        mapping_kwargs: dict | None = None,
        fuse_lane_sums: bool = True,
    ):
        if unexpected_out_state_mapping not in _POLICIES:
            raise ValueError(
                f"unexpected_out_state_mapping must be one of {_POLICIES}, got {unexpected_out_state_mapping!r}."
            )
        if not isinstance(fuse_lane_sums, bool):
            raise TypeError(f"fuse_lane_sums must be True or False, got {fuse_lane_sums!r}.")
        if axis_size is not None and (not isinstance(axis_size, int) or axis_size < 1):
            raise ValueError(f"axis_size must be a positive int, got {axis_size!r}.")
        static_argnums, static_argnames = check_static_argnums(fun, static_argnums, static_argnames)
        super().__init__(
            fun,
            name=name or function_name(fun),
            static_argnums=static_argnums,
            static_argnames=static_argnames,
        )
        self.origin_fun = fun
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.state_in_axes = normalise_state_axes(state_in_axes, "state_in_axes")
        self.state_out_axes = normalise_state_axes(state_out_axes, "state_out_axes")
        self.unexpected_out_state_mapping = unexpected_out_state_mapping
        self.axis_size = axis_size
        self.axis_name = axis_name
        self.mapping_fn = mapping_fn
        self.mapping_kwargs = dict(mapping_kwargs or {})
        self.fuse_lane_sums = fuse_lane_sums
        self._sizes_found_in_trace: dict[Hashable, int] = {}
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

    def __repr__(self) -> str:
        return f"StatefulMapping({self.name}, axis_name={self.axis_name!r}, axis_size={self.axis_size!r})"

    # -- before the trace: arguments --------------------------------------------

    def _begin_trace(self, key: ArgSignature, leaves: list) -> _LaneTrace:
        args, kwargs = jax.tree_util.tree_unflatten(key.tree, leaves)
        static_positions = {k for k, _ in key.static if isinstance(k, int)}
        arg_axes = self._arg_axes(args, kwargs, key.n_args, static_positions)
        names = leaf_names(args, "args") + leaf_names(kwargs, "kwargs")
        found = self._sizes_found_in_trace.get(key)
        if self.axis_size is not None:
            context = _LaneTrace(self, [], self.axis_size, "axis_size")
        else:
            context = _LaneTrace(self, [], found, "a batched state" if found else None)
        for leaf, axis, leaf_name in zip(leaves, arg_axes, names):
            if axis is None:
                context.arg_axes.append(None)
                continue
            ndim = jax.numpy.ndim(leaf)
            if not -ndim <= axis < ndim:
                raise ValueError(
                    f"{self.name}: in_axes maps {leaf_name} along axis {axis}, but it has shape {jax.numpy.shape(leaf)}."
                )
            axis %= ndim
            context._check_size(jax.numpy.shape(leaf)[axis], f"{leaf_name} (axis {axis})")
            context.arg_axes.append(axis)
        context.arg_avals = [
            abstract(x) if a is None else _drop_axis(abstract(x), a) for x, a in zip(leaves, context.arg_axes)
        ]
        if self.axis_name is not None:
            # Until a batched state gives the size, trace with a provisional one;
            # the state's first read then restarts the trace (see _check_size).
            context.axis_env = ((self.axis_name, context.axis_size or 1),)
        return context

    def _arg_axes(self, args: tuple, kwargs: dict, n_args: int, static_positions: set[int]) -> list[int | None]:
        in_axes = self.in_axes
        if isinstance(in_axes, list):
            in_axes = tuple(in_axes)
        if isinstance(in_axes, tuple):
            if len(in_axes) != n_args:
                raise ValueError(
                    f"{self.name}: in_axes has {len(in_axes)} entries but the function was called with "
                    f"{n_args} positional arguments."
                )
            in_axes = tuple(a for i, a in enumerate(in_axes) if i not in static_positions)
        axes = leaf_axes(in_axes, args, f"{self.name}: in_axes")
        return axes + [0] * len(jax.tree_util.tree_leaves(kwargs))

    # -- after the trace: the plan ---------------------------------------------

    def _compile(self, program: Program, key: ArgSignature, context: _LaneTrace) -> Callable:
        if context.axis_size is None:
            raise ValueError(
                f"{self.name}: axis_size is required when no argument is mapped and no state is batched."
            )
        in_axes = list(context.arg_axes)
        split = []
        for state, tree in zip(program.states, program.state_trees):
            axes = context.state_axes.get(id(state))
            is_key = id(state) in context.split_keys
            split.append(is_key)
            in_axes.extend(axes if axes is not None else [0 if is_key else None] * tree.num_leaves)
        dependent = lane_dependent(program.jaxpr.jaxpr, [a is not None for a in in_axes], self.axis_name)
        out_axes = self._output_axes(program, dependent[: program.n_outs])
        state_axes, advance = self._written_axes(program, context, dependent[program.n_outs :])
        mapping_fn, mapping_kwargs = _device_mapping(self.mapping_fn, self.mapping_kwargs)
        return _mapped_program(
            program,
            mapping_fn=mapping_fn,
            mapping_kwargs=mapping_kwargs,
            in_axes=tuple(in_axes),
            out_axes=tuple(out_axes + state_axes),
            axis_name=self.axis_name,
            axis_size=context.axis_size,
            split=tuple(split),
            advance=tuple(advance),
            fused=fused_lanes(program.jaxpr, [a is not None for a in in_axes], self.axis_name)
            if self.fuse_lane_sums and self.axis_name is not None
            else None,
        )

    def _output_axes(self, program: Program, dependent: list[bool]) -> list[int | None]:
        avals = program.jaxpr.out_avals[: program.n_outs]
        outs = jax.tree_util.tree_unflatten(program.out_tree, avals)
        axes = leaf_axes(self.out_axes, outs, f"{self.name}: out_axes")
        names = leaf_names(outs, "output")
        resolved = []
        for axis, aval, dep, name in zip(axes, avals, dependent, names):
            if axis is None:
                if dep:
                    raise ValueError(
                        f"{self.name}: out_axes is None for {name}, but it differs between lanes; "
                        f"give it an axis."
                    )
                resolved.append(None)
            else:
                resolved.append(resolve_axis(axis, aval.ndim + 1, f"{self.name}: out_axes for {name}"))
        return resolved

    def _written_axes(
        self, program: Program, context: _LaneTrace, dependent: list[bool]
    ) -> tuple[list[int | None], list[bool]]:
        out_avals = program.jaxpr.out_avals[program.n_outs :]
        axes: list[int | None] = []
        advance: list[bool] = []
        start = 0
        for i in program.written:
            state, n = program.states[i], program.state_trees[i].num_leaves
            avals, deps = out_avals[start : start + n], dependent[start : start + n]
            start += n
            per_lane = any(deps)
            in_axes = context.state_axes.get(id(state))
            selected, out_axis = select_axis(self.state_out_axes, state.path, state)
            if id(state) in context.split_keys:
                advance.append(per_lane)
                axes.extend([0 if per_lane else None] * n)
                continue
            advance.append(False)
            if in_axes is not None:
                if selected and out_axis is not None and any(out_axis % (a.ndim + 1) != ax for a, ax in zip(avals, in_axes)):
                    raise BatchAxisError(
                        f"{self.name}: {state.describe()} is mapped along axis {in_axes[0]} by state_in_axes "
                        f"but along axis {out_axis} by state_out_axes; a state keeps one mapped axis."
                    )
                axes.extend(in_axes)
                continue
            if not per_lane:
                axes.extend([None] * n)
                continue
            if not (selected and out_axis is not None):
                out_axis = self._unexpected_write(state)
            axes.extend(resolve_axis(out_axis, a.ndim + 1, f"{self.name}: state_out_axes for {state.describe()}") for a in avals)
        return axes, advance

    def _unexpected_write(self, state: State) -> int:
        message = (
            f"{self.name}: {state.describe()} is shared by the lanes but written with a per-lane value, "
            f"and state_out_axes does not select it"
        )
        if self.unexpected_out_state_mapping == "raise":
            raise BatchAxisError(message + "; select it in state_in_axes or state_out_axes.")
        if self.unexpected_out_state_mapping == "warn":
            warnings.warn(message + "; it is written back with the mapped axis at 0.", UserWarning, stacklevel=4)
        return 0

    def _trace(self, key: Hashable, leaves: list, dyn_args: tuple, dyn_kwargs: dict) -> Any:
        try:
            return super()._trace(key, leaves, dyn_args, dyn_kwargs)
        except _SizeFoundInTrace as found:
            self._sizes_found_in_trace[key] = found.size
            return super()._trace(key, leaves, dyn_args, dyn_kwargs)


class _SizeFoundInTrace(Exception):
    def __init__(self, size: int):
        self.size = size


def _device_mapping(mapping_fn: Callable, mapping_kwargs: dict) -> tuple[Callable, dict]:
    """JAX's SPMD maps (``jax.pmap``, ``jax.shard_map``) do not take ``jax.vmap``'s
    calling convention; the sharding layer (imported only for them) adapts them
    and returns any other function unchanged."""
    target = mapping_fn.func if isinstance(mapping_fn, functools.partial) else mapping_fn
    module = getattr(target, "__module__", None) or ""
    if target is jax.vmap or not (module == "jax" or module.startswith("jax.")):
        return mapping_fn, mapping_kwargs
    import sharding

    return sharding.adapt(mapping_fn, mapping_kwargs)


def _lane_keys(key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """Lane ``i``'s key is ``split(key, n)[i]``; the state's next key is ``split(key, n + 1)[n]``."""
    if jax.config.jax_threefry_partitionable and jax.config.jax_default_prng_impl == "threefry2x32":
        # Then split(key, n + 1)[:n] == split(key, n): one split gives both.
        keys = jax.random.split(key, n + 1)
        return keys[:n], keys[n]
    return jax.random.split(key, n), jax.random.split(key, n + 1)[n]


def _mapped_program(
    program: Program,
    *,
    mapping_fn: Callable,
    mapping_kwargs: dict,
    in_axes: tuple,
    out_axes: tuple,
    axis_name: Hashable | None,
    axis_size: int,
    split: tuple[bool, ...],
    advance: tuple[bool, ...],
    fused: Callable | None = None,
) -> Callable:
    """The function of (argument leaves, state values) that runs every lane
    (``fused``, when given, evaluates the program in its place)."""

    def lane(*leaves: Any) -> tuple:
        return tuple((fused or program)(*leaves))

    def run(arg_leaves: list, state_values: list) -> tuple[Any, list]:
        state_leaves, advanced = [], {}
        for i, (value, is_key) in enumerate(zip(state_values, split)):
            if is_key:
                value, advanced[i] = _lane_keys(value, axis_size)
            state_leaves.extend(jax.tree_util.tree_leaves(value))
        mapped = mapping_fn(lane, in_axes=in_axes, out_axes=out_axes, axis_name=axis_name, axis_size=axis_size, **mapping_kwargs)
        results = mapped(*arg_leaves, *state_leaves)
        outs, written = results[: program.n_outs], results[program.n_outs :]
        written = program.unflatten_written(written)
        for j, (i, step) in enumerate(zip(program.written, advance)):
            if step:
                written[j] = advanced[i]
        return jax.tree_util.tree_unflatten(program.out_tree, outs), written

    return run


def vmap2(
    fn: Callable | None = None,
    *,
    in_axes: AxisSpec = 0,
    out_axes: AxisSpec = 0,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
    state_in_axes: Any = None,
    state_out_axes: Any = None,
    unexpected_out_state_mapping: str = "ignore",
    fuse_lane_sums: bool = True,
) -> Any:
    """A :class:`StatefulMapping` with ``mapping_fn=jax.vmap``; also a decorator.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> @smap.vmap(in_axes=(0, None))
        ... def scale(x, w):
        ...     return x * w
        >>> scale(jnp.array([1.0, 2.0]), 3.0)
        Array([3., 6.], dtype=float32)
    """
    options = dict(
        in_axes=in_axes,
        out_axes=out_axes,
        axis_name=axis_name,
        axis_size=axis_size,
        state_in_axes=state_in_axes,
        state_out_axes=state_out_axes,
        unexpected_out_state_mapping=unexpected_out_state_mapping,
        fuse_lane_sums=fuse_lane_sums,
    )
    if fn is None:
        return functools.partial(vmap2, **options)
    return StatefulMapping(fn, mapping_fn=jax.vmap, **options)


StatefulMapping.__module__ = "smap.transform"
