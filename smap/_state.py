"""States: mutable boxes around pytrees of arrays, and the record of their use.

A transform traces a function inside a :class:`TraceFrame`. While a frame is
active, every read and write of a :class:`State` goes through it: the frame
hands out traced values for the states it has touched, records which states
were touched (in first-touch order) and which were written, and never changes
the state itself. The state's own value changes only when a transform writes
its results back, after the whole call has succeeded, so a failed call leaves
every state as it was.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from . import _compat, _locks

__all__ = [
    "State",
    "ShortTermState",
    "LongTermState",
    "ParamState",
    "HiddenState",
    "TraceFrame",
]


class _ThisThread(threading.local):
    """What smap keeps per thread: the trace frames, innermost last."""

    def __init__(self) -> None:
        self.frames: list[TraceFrame] = []


this_thread = _ThisThread()  # ``this_thread.frames``: the trace frames of the thread that reads it


class _Tracing:
    """How many threads have a trace frame open: while none has, no call needs ``this_thread``."""

    __slots__ = ("threads", "_lock")

    def __init__(self) -> None:
        self.threads = 0
        self._lock = threading.Lock()

    def count(self, change: int) -> None:
        with self._lock:
            self.threads += change


tracing = _Tracing()  # a call's cached path reads ``tracing.threads`` (a global), then only if set this_thread
_TAGS: set[str] = set()
# The subclass of a State class whose storage is a jax.Ref: set by smap._refs, which smap
# imports where JAX has Refs (so this module imports no module above it).
ref_backed_class: Callable[[type[State]], type[State]] | None = (
    None  # every tag any State was created with: what a string selector can mean
)


def known_tags() -> frozenset[str]:
    """The tags of every State created so far (a string selector that is none of them is a mistake)."""
    return frozenset(_TAGS)


def active_frames() -> list[TraceFrame]:
    """The trace frames of this thread, innermost last."""
    return this_thread.frames


class InvalidatedStateError(RuntimeError):
    """Reading a state whose value was traced inside a transform that has returned."""


class _Invalidated:
    """Stands in for the value of a state whose value escaped a trace."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _leaf_repr(x: Any) -> str:
    dtype = getattr(x, "dtype", None)
    shape = getattr(x, "shape", None)
    if dtype is None or shape is None:
        return type(x).__name__
    dims = ",".join(str(d) for d in shape)
    name = jnp.dtype(dtype).name if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else str(dtype)
    return f"{name}[{dims}]"


def _canonical_leaf(x: Any, what: Callable[[], str]) -> Any:
    if isinstance(x, (jax.Array, jax.core.Tracer)):
        return x
    if isinstance(x, (np.ndarray, np.generic, bool, int, float, complex)):
        return jnp.asarray(x)
    if isinstance(x, State):
        raise TypeError(f"{what()}: a State cannot hold another State; assign `.value` instead.")
    raise TypeError(f"{what()}: expected a pytree of arrays, got a leaf of type {type(x).__name__!r}.")


def canonical_value(value: Any, what: Callable[[], str]) -> Any:
    """The value with every leaf an array; a clear error for anything else."""
    if isinstance(value, State):
        raise TypeError(f"{what()}: a State cannot hold another State; assign `.value` instead.")
    return jax.tree_util.tree_map(lambda x: _canonical_leaf(x, what), value)


def check_same_structure(state: State, old: Any, new: Any, *, batched_axis: int | None = None) -> None:
    """Raise if `new` differs from `old` in tree structure, a shape or a dtype."""
    old_tree: Any  # jaxlib's PyTreeDef has no type information
    old_leaves, old_tree = jax.tree_util.tree_flatten(old)
    new_leaves, new_tree = jax.tree_util.tree_flatten(new)

    def fix(what: str) -> str:
        if state.fixed_shape:
            return "A jax.Ref's shape and dtype are fixed."
        return f"Use `state.reset(value)` to change a state's {what}."

    if old_tree != new_tree:
        raise ValueError(
            f"{state.describe()}: the new value has tree structure {new_tree}, expected {old_tree}. {fix('structure')}"
        )
    for o, n in zip(old_leaves, new_leaves):
        if jnp.shape(o) != jnp.shape(n):
            raise ValueError(
                f"{state.describe()}: the new value has shape {jnp.shape(n)}, expected {jnp.shape(o)}. {fix('shape')}"
            )
        if _dtype(o) != _dtype(n):
            raise TypeError(
                f"{state.describe()}: the new value has dtype {_dtype(n)}, expected {_dtype(o)}. {fix('dtype')}"
            )


def _has_tracer(value: Any) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(value))


def check_not_traced(state: State, new: Any, frame: TraceFrame | None) -> None:
    """Refuse to store a value traced by a JAX transformation that smap does not see.

    Outside smap's transforms (``frame`` None) a state may not take a tracer;
    inside one, only tracers of the trace the frame opened. Such a value would
    outlive its trace, and the state would fail later without saying why. A
    state whose value is itself traced (it was created inside the trace) may.
    """
    if not _has_tracer(new) or (frame is not None and _compat.current_trace() is frame.trace):
        return
    if frame is None and _has_tracer(state._value):
        return
    where = "a JAX transformation" if frame is None else f"a JAX transformation inside {frame.name}"
    used, fix = _compat.transformation_of(new)
    raise TypeError(
        f"{state.describe()} is written with a value traced by {where} that smap does not see ({used}); "
        f"the state would hold a tracer after it returns. To carry states through, {fix}, or return the value."
    )


def _dtype(x: Any) -> Any:
    dtype = getattr(x, "dtype", None)
    return dtype if dtype is not None else jnp.result_type(x)


def _types(value: Any) -> list[tuple[tuple[int, ...], Any]]:
    """The shape and dtype of each leaf of ``value``."""
    return [(np.shape(x), _dtype(x)) for x in jax.tree_util.tree_leaves(value)]


class State:
    """A mutable box around a pytree of arrays.

    Read with ``state.value`` and write with ``state.value = x``. A write must
    keep the tree structure, every shape and every dtype; :meth:`reset` changes
    them deliberately. Transforms discover the states a function reads and
    writes by tracing it, so a state needs no registration.

    Arguments:
        value: a pytree of arrays (Python and NumPy scalars are converted).
        tag: an optional string, or tuple of strings, for :class:`smap.filter.WithTag`.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> count = smap.State(jnp.zeros(3))
        >>> count.value = count.value + 1
        >>> count.value
        Array([1., 1., 1.], dtype=float32)
    """

    __slots__ = ("_value", "_tags", "_owner", "_name", "_lock", "__weakref__")

    # Whether the value's shape and dtype can never change (a state backed by a jax.Ref).
    fixed_shape: ClassVar[bool] = False

    def __new__(cls, value: Any = None, *args: Any, **kwargs: Any) -> State:
        if ref_backed_class is not None and _compat.is_ref(value):  # a State backed by a jax.Ref
            cls = ref_backed_class(cls)
        return super().__new__(cls)

    def __init__(self, value: Any, tag: str | Sequence[str] | None = None):
        self._lock = _locks.Group()
        self._owner = None
        self._name = None
        self._tags = _normalise_tags(tag)
        if self._tags:
            _TAGS.update(self._tags)
        self._value = self._canonical(value)
        frames = active_frames()
        if frames:
            frames[-1].created(self)

    # -- value -------------------------------------------------------------

    def _canonical(self, value: Any) -> Any:
        return canonical_value(value, self.describe)

    def _gone(self) -> bool:
        """Whether the state's storage is gone (a Ref smap made it for was freed): no call can use it again."""
        return False

    def _stored(self) -> Any:
        value = self._value
        if type(value) is _Invalidated:
            raise InvalidatedStateError(f"{self.describe()}: {value.reason}")
        return value

    @property
    def value(self) -> Any:
        frames = active_frames()
        if frames:
            return frames[-1].read(self)
        return self._stored()

    @value.setter
    def value(self, new: Any) -> None:
        frames = active_frames()
        new = self._canonical(new)
        if frames:
            frames[-1].write(self, new, check=True)
        else:
            check_same_structure(self, self._stored(), new)
            check_not_traced(self, new, None)
            self._value = new

    def reset(self, value: Any) -> None:
        """Replace the value, allowing a new structure, shape or dtype.

        Example:
            >>> import jax.numpy as jnp, smap
            >>> hidden = smap.HiddenState(jnp.zeros(3))
            >>> hidden.reset(jnp.zeros((8, 3)))
            >>> hidden.value.shape
            (8, 3)
        """
        value = self._canonical(value)
        frames = active_frames()
        if frames:
            frames[-1].write(self, value, check=False)
        else:
            check_not_traced(self, value, None)
            self._value = value

    def __reduce__(self) -> tuple:
        """Pickling and ``copy.deepcopy`` carry the value and the tags: the copy has its own lock, and a
        Module restored around it records where it lives (a jax.Array comes back on the default device).

        Example:
            >>> import pickle, jax.numpy as jnp, smap
            >>> pickle.loads(pickle.dumps(smap.ParamState(jnp.ones(2), tag="w")))
            ParamState(float32[2], tag='w')
        """
        return _restored, (type(self), self.value, self._tags), getattr(self, "__dict__", None) or None

    def write_back(self, value: Any) -> None:
        """Write a value computed by a transform (already validated by it): no check of its structure, shape or dtype.

        For transforms and tools that check the value themselves; user code writes ``.value``.

        Example:
            >>> import jax.numpy as jnp, smap
            >>> count = smap.State(jnp.zeros(()))
            >>> count.write_back(jnp.ones(()))
            >>> count.value
            Array(1., dtype=float32)
        """
        frames = active_frames()
        if frames:
            frames[-1].write(self, value, check=False)
        else:
            self._value = value

    def lane_values(self, value: Any, axis_size: int) -> tuple[Any, Any] | None:
        """How a value of this type is split over the lanes of a mapping: None to leave it to ``state_in_axes``.

        A mapping asks every state it touches, before ``state_in_axes``. A
        type that gives each lane its own value (as
        :class:`smap.random.RandomState` gives each lane its own key) returns
        ``(lanes, next)``: ``lanes`` stacks one value per lane along a new
        axis 0, and ``next`` is the value the state takes after a call whose
        lanes wrote it with values that differ between lanes (the lanes' own
        values are then dropped); each lane's value and ``next`` have the
        structure, shapes and dtypes of ``value``. A call whose lanes write a
        lane-independent value writes that value, and one that does not
        write the state leaves it as it was. The method runs under tracing:
        it must be a pure function of ``value`` (a pytree of arrays) and
        ``axis_size``.

        Arguments:
            value: the state's value before the call.
            axis_size: the number of lanes.

        Example:
            >>> import jax.numpy as jnp, smap
            >>> class Ticket(smap.State):
            ...     # lane i gets the number value + i; the next call starts after the last lane's
            ...     def lane_values(self, value, axis_size):
            ...         return value + jnp.arange(axis_size), value + axis_size
            >>> ticket = Ticket(jnp.zeros((), jnp.int32))
            >>> def serve(x):
            ...     number = ticket.value
            ...     ticket.value = number + 1
            ...     return number
            >>> smap.vmap(serve)(jnp.zeros(3))
            Array([0, 1, 2], dtype=int32)
            >>> ticket.value
            Array(3, dtype=int32)
        """
        return None

    def peek(self) -> Any:
        """The stored value, without recording a read (for reprs and tools).

        Example:
            >>> import jax.numpy as jnp, smap
            >>> w = smap.ParamState(jnp.ones(2))
            >>> @smap.jit
            ... def shape_of_w():
            ...     return jnp.zeros(w.peek().shape)  # w is not an input of the program
            >>> shape_of_w.trace().jaxpr.in_avals
            []
        """
        return self._stored()

    # -- identity ------------------------------------------------------------

    @property
    def tags(self) -> tuple[str, ...]:
        return self._tags

    @property
    def path(self) -> tuple[Hashable, ...]:
        """The key path of this state in the Module that owns it, or ``()``."""
        parts: list[Hashable] = []
        node: Any = self
        seen = set()
        while node._owner is not None and id(node) not in seen:
            seen.add(id(node))
            owner = node._owner()
            if owner is None:
                break
            parts[:0] = node._name
            node = owner
        return tuple(parts)

    def describe(self) -> str:
        """How errors name this state: its dotted path, or its type, shape and dtype.

        Example:
            >>> import jax.numpy as jnp, smap
            >>> class Layer(smap.nn.Module):
            ...     def __init__(self):
            ...         self.weight = smap.ParamState(jnp.ones((2, 3)))
            >>> layer = Layer()
            >>> _ = layer.states()  # records each state's path
            >>> layer.weight.describe()
            "state 'weight' (ParamState)"
            >>> smap.State(jnp.zeros(3)).describe()
            'State float32[3]'
        """
        path = self.path
        if path:
            return f"state '{'.'.join(map(str, path))}' ({type(self).__name__})"
        if not hasattr(self, "_value"):
            return type(self).__name__
        return f"{type(self).__name__} {_value_repr(self._value)}"

    def __repr__(self) -> str:
        parts = [_value_repr(self._value)]
        sharding = _sharding_repr(self._value)
        if sharding:
            parts.append(f"sharding={sharding}")
        if self._tags:
            parts.append(f"tag={self._tags if len(self._tags) > 1 else self._tags[0]!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _value_repr(value: Any) -> str:
    if value is None:
        return "<unset>"
    if type(value) is _Invalidated:
        return "<invalidated>"
    tree: Any  # jaxlib's PyTreeDef has no type information
    leaves, tree = jax.tree_util.tree_flatten(value)
    if tree.num_leaves == 1 and tree.num_nodes == 1:
        return _leaf_repr(leaves[0])
    return str(jax.tree_util.tree_unflatten(tree, [_LeafRepr(x) for x in leaves]))


class _LeafRepr:
    def __init__(self, x: Any):
        self.text = _leaf_repr(x)

    def __repr__(self) -> str:
        return self.text


def _sharding_repr(value: Any) -> str:
    if type(value) is _Invalidated:
        return ""
    leaves = jax.tree_util.tree_leaves(value)
    specs = set()
    for x in leaves:
        sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        spec = getattr(sharding, "spec", None)
        if spec is not None and len(getattr(sharding, "device_set", ())) > 1:
            specs.add(str(spec))
    return ", ".join(sorted(specs))


def _restored(cls: type[State], value: Any, tags: tuple[str, ...]) -> State:
    """A pickled State made again (see :meth:`State.__reduce__`); a subclass's own ``__init__`` is not run."""
    state = cls.__new__(cls)
    State.__init__(state, value, tag=tags)
    return state


def _normalise_tags(tag: str | Sequence[str] | None) -> tuple[str, ...]:
    if tag is None:
        return ()
    if isinstance(tag, str):
        return (tag,)
    tags = tuple(tag) if isinstance(tag, (tuple, list)) else (tag,)
    if not all(isinstance(t, str) for t in tags):
        raise TypeError(f"tag must be a string or a tuple of strings, got {tag!r}.")
    return tags


class ShortTermState(State):
    """A per-step buffer (activations, temporary values).

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.ShortTermState(jnp.zeros(4))
        ShortTermState(float32[4])
    """

    __slots__ = ()


class LongTermState(State):
    """A value kept across steps (running statistics, optimizer moments).

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.LongTermState(jnp.zeros(()))
        LongTermState(float32[])
    """

    __slots__ = ()


class ParamState(LongTermState):
    """A trainable parameter.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.ParamState(jnp.ones((3, 2)))
        ParamState(float32[3,2])
    """

    __slots__ = ()


class HiddenState(ShortTermState):
    """A recurrent or neuron state.

    Example:
        >>> import jax.numpy as jnp, smap
        >>> smap.HiddenState(jnp.zeros(5))
        HiddenState(float32[5])
    """

    __slots__ = ()


for _cls in (State, ShortTermState, LongTermState, ParamState, HiddenState):
    _cls.__module__ = "smap"


MISSING = object()


class WrittenInside(Exception):
    """A frame's state written inside a JAX transformation of the traced function (a ``scan``, a
    ``cond``, ``jax.checkpoint``, ...): the frame's trace starts again with the state held in a Ref."""

    def __init__(self, frame: TraceFrame, state: State):
        super().__init__(f"{state.describe()} is written inside a JAX transformation inside {frame.name}")
        self.frame, self.state = frame, state


class TraceFrame:
    """Records and serves state reads and writes while a function is traced.

    ``make_input(state, value)`` turns the value a state has outside the frame
    into the value the traced function sees (typically fresh tracers that
    become inputs of the traced program); ``check_write(state, current, new)``
    checks a write against the state's current value in the frame (by default
    the same structure, shapes and dtypes). States created while the frame is
    active belong to it: they are plain Python objects to the frame, and
    their values must not escape it (see :meth:`invalidate_created`).
    """

    def __init__(
        self,
        make_input: Callable[[State, Any], Any],
        name: str,
        check_write: Callable[[State, Any, Any], None] = check_same_structure,
        in_refs: Collection[int] = (),
    ):
        self.make_input = make_input
        self.check_write = check_write
        self.name = name
        self.in_refs = in_refs  # ids of the states held in Refs: those written inside a JAX transformation
        self.states: list[State] = []
        self.written: dict[int, State] = {}
        self._values: dict[int, Any] = {}
        self._refs: dict[int, Any] = {}
        self._created: dict[int, State] = {}
        self.trace: Any = None

    def __enter__(self) -> TraceFrame:
        self.trace = _compat.current_trace()
        frames = active_frames()
        if not frames:
            tracing.count(+1)
        frames.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        frames = active_frames()
        assert frames and frames[-1] is self
        frames.pop()
        if not frames:
            tracing.count(-1)
        self.invalidate_created()

    def _outer_value(self, state: State) -> Any:
        frames = active_frames()
        index = frames.index(self)
        if index > 0:
            return frames[index - 1].peek(state)
        return state._stored()

    def _touch(self, state: State) -> Any:
        outer = self._outer_value(state)
        # While its input is made, the state reads as its value outside: a filter of state_in_axes
        # that looks at state.value (its shape, say) would otherwise make the input again, for ever.
        self._values[id(state)] = outer
        try:
            value = self.make_input(state, outer)
        except BaseException:
            del self._values[id(state)]
            raise
        self._values[id(state)] = value
        if id(state) in self.in_refs:
            self._refs[id(state)] = _compat.new_refs(self.trace, value)
        self.states.append(state)
        return value

    def peek(self, state: State) -> Any:
        """The state's value at this frame's own level, without reading its Refs (a nested frame asks it
        only for the value's type)."""
        key = id(state)
        if key in self._created:
            return state._stored()
        value = self._values.get(key, MISSING)
        return self._touch(state) if value is MISSING else value

    def read(self, state: State) -> Any:
        value = self.peek(state)
        refs = self._refs.get(id(state))
        return value if refs is None else _compat.read_refs(refs)

    def write(self, state: State, value: Any, *, check: bool) -> None:
        key = id(state)
        if key in self._created:
            state._value = value
            return
        current = self.peek(state)
        if check:
            self.check_write(state, current, value)
        inside = _compat.current_trace() is not self.trace  # inside a JAX transformation (scan, cond, ...)
        if inside and key in self._refs:
            if _types(value) != _types(current):  # (the Refs hold values of current's types)
                raise TypeError(
                    f"{state.describe()} is written inside a JAX transformation of {self.name} (a scan, cond, "
                    f"loop, ...) with another shape or dtype than it holds there; inside one a state keeps them. "
                    f"Write it outside, or, in a mapping, select it in state_in_axes so that each lane holds "
                    f"its own row."
                )
            _compat.write_refs(self._refs[key], value)
        elif inside:
            raise WrittenInside(self, state)  # the trace starts again with the state in a Ref
        else:
            check_not_traced(state, value, self)
            self._values[key] = value
            if key in self._refs:
                self._refs[key] = _compat.new_refs(self.trace, value)
        self.written[key] = state

    def created(self, state: State) -> None:
        self._created[id(state)] = state

    def value_of(self, state: State) -> Any:
        return self._values[id(state)]

    def invalidate_created(self) -> None:
        """Give states created during the trace a clear error instead of tracers."""
        for state in self._created.values():
            if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(state._value)):
                state._value = _Invalidated(
                    f"this state was created inside {self.name} and its value was traced "
                    f"there; it has no value outside. Create states before calling the "
                    f"transform, or return the value instead."
                )


class SealedFrame(TraceFrame):
    """The frame while a transform runs its traced program: a state used there is refused.

    Nothing of the user's runs there but the custom rules JAX calls only when
    it differentiates or maps the program, after the function's trace: the jvp
    of a ``jax.custom_jvp`` function, the fwd and bwd of a ``jax.custom_vjp``, a
    ``custom_vmap`` rule. A state such a rule read would give it a value of no
    moment of the trace, baked into the compiled program, and no gradient. (Plain
    JAX refuses the same program: the rule would close over a tracer of a
    finished trace.) States the rule creates are its own, as in any frame.
    """

    def __init__(self, name: str):
        super().__init__(lambda state, value: value, name)

    def _touch(self, state: State) -> Any:
        raise TypeError(
            f"{state.describe()} is used inside a custom rule (the jvp of a jax.custom_jvp function, the fwd "
            f"or bwd of a jax.custom_vjp, a custom_vmap rule), which JAX calls while {self.name} runs the "
            f"traced program, after the function was traced: there the state has no value of the trace, and "
            f"no gradient. Pass the state's value to the custom function as an argument, f(x, state.value), "
            f"and use that argument in the rule."
        )


class HeldArgument:
    """An argument that holds states, not arrays, as smap's dispatcher carries it: a pytree node with no leaves.

    A Module (whose States the function reads and writes, found by tracing)
    or a ``jax.Ref`` (itself a State, see :mod:`smap._refs`). The
    dispatcher's ``jax.jit`` sees no leaf for it, and its tree structure (so
    the cache key) tells one from another by identity and by ``layout``
    (a Module's: :func:`smap.nn.layout_key`), as a static argument would; the
    function receives the object itself (``smap._tracing.show_arguments``).
    """

    __slots__ = ("_held", "layout", "_hash")

    def __init__(self, held: Any, layout: Hashable = None):
        self._held = weakref.ref(held)  # a cache key must not keep it alive
        self.layout = layout
        self._hash = hash((id(held), layout))

    @property
    def held(self) -> Any:
        return self._held()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeldArgument):
            return NotImplemented
        if self is other:
            return True
        mine = self._held()
        return mine is not None and mine is other._held() and self.layout == other.layout

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"HeldArgument({self._held()!r})"


jax.tree_util.register_pytree_node(HeldArgument, lambda node: ((), node), lambda node, _: node)
