"""Dispatch: cache a transform's programs, run them, and write the states back.

:class:`StatefulFunction` is the life of a transform call. Calls go through
one ``jax.jit`` dispatcher per list of the states touched so far, which takes
those states' values, so JAX's C++ cache recognises a signature (arguments and
states) and a cached call's Python work is a read of each state and a write of
each written one (:func:`_compile_call`). Tracing the dispatcher for a new
signature looks up or traces the :class:`~smap._tracing.Program` and runs the
transform's function of it. States change only after the call has succeeded.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, ParamSpec, TypeVar

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr

from . import _compat, _locks
from ._aot import Lowered, Traced, signature_call
from ._state import HeldArgument, InvalidatedStateError, SealedFrame, State, this_thread, tracing
from ._tracing import (
    Program,
    PyTreeDef,
    TraceContext,
    hide_arguments,
    hold_module,
    leaf_names,
    show_arguments,
    trace_program,
)
from .nn import Module

__all__ = ["ArgSignature", "Runner", "StatefulFunction"]

P = ParamSpec("P")
R = TypeVar("R")

Runner = Callable[[list, list], tuple[Any, list]]
"""``run(arg_leaves, state_values) -> (result, written_values)``: a transform's function of a program."""


_LAYOUTS_WARNED = 8  # the layouts of one Module argument traced for, at which a trace warns


def _leaf_signature(x: Any) -> tuple | type:
    try:
        if isinstance(x, np.ndarray) and x.dtype.kind in "OUSV":  # (no JAX dtype: objects, strings, records)
            raise TypeError(f"expected an array or a Python scalar, got a NumPy array of dtype {x.dtype}")
        return (x.shape, x.dtype, getattr(x, "weak_type", False))
    except AttributeError:
        if isinstance(x, (bool, int, float, complex)):
            return type(x)
        raise TypeError(f"expected an array or a Python scalar, got {type(x).__name__!r}") from None


class ArgSignature(NamedTuple):
    """The argument part of a cache key: what a trace of the function depends on."""

    tree: PyTreeDef  # of (dynamic positional arguments, dynamic keyword arguments)
    static: tuple  # ((position or name, value), ...) of the static arguments
    n_args: int  # positional arguments in the call, static ones included
    leaves: tuple  # (shape, dtype, weak_type) of each array leaf

    def held(self) -> list[HeldArgument]:
        """Its ``HeldArgument`` nodes: the Modules and Refs it was traced with."""
        tree = (jax.tree_util.tree_unflatten(self.tree, [None] * self.tree.num_leaves), self.static)
        nodes = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, HeldArgument))
        return [x for x in nodes if isinstance(x, HeldArgument)]

    def holds_freed(self) -> bool:
        """Whether a Module or Ref it was traced with is freed: no call can match it."""
        return any(x.held is None for x in self.held())


def _tree_signature(value: Any) -> Hashable:
    leaves, tree = jax.tree_util.tree_flatten(value)
    return (tree, *map(_leaf_signature, leaves))


@dataclasses.dataclass(frozen=True)
class Entry:
    """A cached program, its states' signature when traced, and the transform's :data:`Runner` of it."""

    program: Program
    state_signature: tuple
    run: Runner


class _StateList:
    """The states a transform's calls pass to their compiled dispatcher, and that dispatcher.

    ``dispatch(*values, *args, **kwargs)`` (a ``jax.jit`` of
    :meth:`StatefulFunction._dispatch_trace` with the list bound) takes the
    value of each of ``states``, then the call's arguments, and returns
    ``(out, *slots)``: one slot per state of ``writes`` (the states some
    program of the list has written, in the order of ``states``), its new
    value (see :func:`_slot`) or None where this call's program does not
    write it (with no ``writes``, ``out`` alone). So a cached call passes JAX
    only arrays, and the write-back needs no lookup. A list is fixed: when a
    trace finds states it lacks, or writes one that has no slot, the
    transform makes a longer list, with a dispatcher of its own.

    With the owner's ``donate_states``, the values of ``writes`` are donated
    to the dispatcher (a top-level list only: inside a trace nothing runs), and
    a program that does not write one of them returns its value in its slot,
    so that no state is left holding a donated buffer. JAX pairs the donated
    inputs with the outputs of their shape in order, so the slots follow the
    order of the states: each state's new value reuses its own old buffer
    (another pairing makes XLA copy inputs).
    """

    __slots__ = ("states", "index", "writes", "group", "dispatch", "donated", "placed", "keeps_placement")

    def __init__(self, states: Sequence[State], writes: Sequence[State], group: _locks.Group, owner: StatefulFunction):
        self.states = tuple(states)
        self.index = {id(s): i for i, s in enumerate(self.states)}
        self.writes = tuple(sorted(writes, key=lambda s: self.index[id(s)]))
        # The lock group of the states (a top-level call's list joins them, holding no lock).
        self.group = group
        self.donated = owner.donate_states and group is not _UNLOCKED
        self.placed = False  # made for a call made again after a refusal: a refusal of it is raised
        # Whether its dispatcher's trace keeps each written state where its value lies (_keep_placement):
        # not inside a trace (a nested call's states are its caller's tracers, placed nowhere), nor
        # where the compiler is asked where the states go (_input_shardings).
        self.keeps_placement = group is not _UNLOCKED
        donated_states = tuple(self.index[id(s)] for s in self.writes) if self.donated else ()
        n = len(self.states)  # the arguments come after the states' values
        self.dispatch = jax.jit(
            functools.partial(owner._dispatch_trace, self),
            static_argnums=tuple(i + n for i in owner.static_argnums),
            static_argnames=owner.static_argnames,
            donate_argnums=donated_states + tuple(i + n for i in owner.donate_argnums),
        )


_UNLOCKED = _locks.Group()  # the group of a nested call's list: it runs inside its caller's call


class _MissingStates(Exception):
    """Raised while tracing the dispatcher when the program touches new states, or writes one with no slot.

    Why an exception: only the dispatcher's trace of a new signature learns
    which states the program touches, and by then ``jax.jit`` has fixed the
    dispatcher's inputs; raising is the one way to abandon that trace, and
    the call retries with the new states among the inputs. Looking the
    program up before every call instead would put Python signature work
    back on the cached path, which ``jax.jit``'s C++ cache now does.
    """

    def __init__(self, states: Sequence[State], writes: Sequence[State], placed: _StateList | None = None):
        self.states = states  # the program's states, the list lacks some
        self.writes = writes  # the states the program writes
        self.placed = placed  # or, after a refusal, the list to make the call again with (StatefulFunction._moved)


class StatefulFunction(Generic[P, R]):
    """Trace, cache, run and write back: the life of a transform call.

    A transform (``jit``, ``grad``, ``StatefulMapping``) is a subclass that
    says how a program is traced and what a call does with it. The contract
    between this core and a transform is three hooks:

    - :meth:`_trace_context` returns the :class:`~smap._tracing.TraceContext`
      of the trace of a new signature: how each state's value enters the
      trace, the abstract values of the arguments, the axis names
      collectives may use.
    - :meth:`_runner` returns the transform's :data:`Runner` of the traced
      program, ``run(arg_leaves, state_values) -> (result, written_values)``;
      the dispatcher calls it inside its ``jax.jit`` trace, so it composes
      JAX transforms rather than calling compiled code.
    - :attr:`_call_result` is None, or returns what a call gives the user
      from the ``result`` that ``run`` returned.

    Everything else (signatures, caching, reading states, writing them back
    after the call has succeeded) is the core's.
    """

    # A call is the state list's own function (see _compile_call), kept in a slot: Python finds it
    # on the instance with no frame of its own between the caller and it.
    __slots__ = ("__call__", "__dict__", "__weakref__")
    if TYPE_CHECKING:

        def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R: ...

    def __init__(
        self,
        fun: Callable[P, Any],
        *,
        name: str,
        static_argnums: Sequence[int] = (),
        static_argnames: Sequence[str] = (),
        donate_argnums: Sequence[int] = (),
        donate_states: bool = False,
    ):
        if not isinstance(donate_states, bool):
            raise TypeError(f"{name}: donate_states must be True or False, got {donate_states!r}.")
        self.fun = fun
        owner = fun if isinstance(fun, Module) else getattr(fun, "__self__", None)
        if isinstance(owner, Module):
            owner.states()  # records every state's path, for filters and errors
        self.static_argnums = tuple(static_argnums)
        self.static_argnames = tuple(static_argnames)
        self.name = name
        self._entries: dict[ArgSignature, list[Entry]] = {}
        for i in (*self.static_argnums, *donate_argnums):
            if i < 0:
                raise ValueError(
                    f"{name}: negative static_argnums/donate_argnums need a function with a fixed "
                    f"number of positional arguments."
                )
        self.donate_argnums = tuple(donate_argnums)
        self.donate_states = donate_states
        self._state_list = _StateList((), (), _locks.Group(), self)
        self.__call__ = lambda *args, **kwargs: self._write_out(args, kwargs)  # type: ignore[method-assign]
        self._nested_lists: dict[tuple[tuple[int, ...], tuple[int, ...]], _StateList] = {}

    def __repr__(self) -> str:
        return self.name  # as it was written: smap.jit(f), smap.grad(loss)

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        """As a function's: a transform defined in a class body is a method, its instance the first argument.

        Example:
            >>> import jax.numpy as jnp, smap
            >>> class Counter(smap.nn.Module):
            ...     def __init__(self):
            ...         self.n = smap.State(jnp.zeros(()))
            ...     @smap.jit
            ...     def add(self, x):
            ...         self.n.value = self.n.value + x
            ...         return self.n.value
            >>> counter = Counter()
            >>> counter.add(2.0)
            Array(2., dtype=float32)
        """
        return self if instance is None else types.MethodType(self, instance)

    # -- hooks: the contract with a transform ------------------------------------

    def _trace_context(self, key: ArgSignature, leaves: list) -> TraceContext:
        """The context of the trace of a new signature: state inputs, argument avals, axis names."""
        return TraceContext()

    def _runner(self, program: Program, key: ArgSignature, context: TraceContext) -> Runner:
        """The :data:`Runner` of ``program``: ``state_values`` follow ``program.states``, ``written_values``
        ``program.written_states``."""
        raise NotImplementedError

    # What a call returns, from the result ``run`` returned (None: that result itself).
    _call_result: Callable[[Any], Any] | None = None

    # -- signature -------------------------------------------------------------

    def signature_key(self, *args: Any, **kwargs: Any) -> tuple[ArgSignature, list, tuple, dict]:
        """The argument part of the cache key, with the leaves and the dynamic (not static) arguments."""
        args, kwargs = hide_arguments(args, kwargs)
        nums = tuple(i for i in self.static_argnums if i < len(args))
        static = tuple((i, args[i]) for i in nums) + tuple((k, kwargs[k]) for k in self.static_argnames if k in kwargs)
        for where, value in static:
            try:
                hash(value)
            except TypeError:  # (jax.jit's message names only the value)
                name = f"args[{where}]" if isinstance(where, int) else f"kwargs[{where!r}]"
                raise ValueError(
                    f"{self.name}: the static argument {name} is a {type(value).__name__}, {value!r}, which is not "
                    f"hashable; a static argument must be (a tuple for a list, say), as in jax.jit."
                ) from None
        dyn_args = tuple(a for i, a in enumerate(args) if i not in nums)
        dyn_kwargs = {k: v for k, v in kwargs.items() if k not in self.static_argnames}
        leaves, tree = jax.tree_util.tree_flatten((dyn_args, dyn_kwargs))
        try:
            signature = tuple(map(_leaf_signature, leaves))
        except TypeError:  # named as the user wrote it (positions count the static arguments)
            positions = [i for i in range(len(args)) if i not in nums]
            names = leaf_names(dict(zip(positions, dyn_args)), "args") + leaf_names(dyn_kwargs, "kwargs")
            for name, leaf in zip(names, leaves):
                try:
                    _leaf_signature(leaf)
                except TypeError as error:
                    raise TypeError(
                        f"{self.name}: {name}: {error}; "
                        f"mark non-array arguments as static (static_argnums or static_argnames)."
                    ) from None
            raise
        return ArgSignature(tree, static, len(args), signature), leaves, dyn_args, dyn_kwargs

    def _bind_static(self, static: tuple, n_args: int) -> Callable:
        if not static:
            return self.fun
        static = tuple((k, show_arguments(v)) for k, v in static)  # a static Module or Ref is itself
        positional = {k: v for k, v in static if isinstance(k, int)}
        named = {k: v for k, v in static if isinstance(k, str)}

        def bound(*dyn_args: Any, **dyn_kwargs: Any) -> Any:
            it = iter(dyn_args)
            full = [positional[i] if i in positional else next(it) for i in range(n_args)]
            return self.fun(*full, **dyn_kwargs, **named)

        return bound

    # -- cache -----------------------------------------------------------------

    def _lookup(self, key: ArgSignature) -> Entry | None:
        """The entry for ``key`` whose states have the signature they had when it was traced."""
        for entry in self._entries.get(key, ()):
            try:
                if tuple(_tree_signature(s.value) for s in entry.program.states) == entry.state_signature:
                    return entry
            except InvalidatedStateError:  # a state that can no longer be read
                continue
        return None

    def _trace(self, key: ArgSignature, leaves: list, dyn_args: tuple, dyn_kwargs: dict) -> Entry:
        context = self._trace_context(key, leaves)
        program = trace_program(
            self._bind_static(key.static, key.n_args),
            dyn_args,
            dyn_kwargs,
            make_input=context.make_input,
            check_write=context.check_write,
            name=self.name,
            arg_avals=context.arg_avals,
            axis_env=context.axis_env,
        )
        signature = tuple(_tree_signature(s.value) for s in program.states)
        entry = Entry(program, signature, self._runner(program, key, context))
        self._entries.setdefault(key, []).insert(0, entry)
        for node in key.held():  # a Module traced for ever new layouts (changed attributes): said once
            module = node.held
            if not isinstance(module, Module):
                continue
            others = {n.layout for k in self._entries if k != key for n in k.held() if n.held is module}
            if node.layout not in others and len(others) + 1 == _LAYOUTS_WARNED:
                warnings.warn(
                    f"{self.name} has been traced for {_LAYOUTS_WARNED} layouts of the same {type(module).__name__} "
                    f"argument, whose attributes changed between calls: a Python value that changes at every "
                    f"call (a step count, say) traces the function again at every call. Hold it in a State, or "
                    f"pass it as an array argument.",
                    stacklevel=2,
                )
        return entry

    def get_arg_cache_key(self, *args: Any, **kwargs: Any) -> tuple[ArgSignature, tuple | None]:
        """The cache key of a call: its argument signature and a state signature.

        The state signature is that of the program the call would run now, or,
        when the states have changed since (a mapping that made a state
        batched), that of the program traced most recently for these arguments.

        Example:
            >>> import jax.numpy as jnp, smap
            >>> f = smap.jit(lambda x: x + 1)
            >>> _ = f(jnp.ones(2))
            >>> f.get_jaxpr_by_cache(f.get_arg_cache_key(jnp.ones(2)))
            { lambda ; a:f32[2]. let b:f32[2] = add a 1.0:f32[] in (b,) }
        """
        key = self.signature_key(*args, **kwargs)[0]
        entry = self._lookup(key) or next(iter(self._entries.get(key, ())), None)
        return (key, entry.state_signature if entry is not None else None)

    def get_jaxpr_by_cache(self, cache_key: tuple[ArgSignature, tuple | None]) -> ClosedJaxpr:
        """The traced program (a closed jaxpr) cached under ``cache_key``."""
        if not (isinstance(cache_key, tuple) and len(cache_key) == 2 and isinstance(cache_key[0], ArgSignature)):
            raise TypeError(
                f"{self.name}: get_jaxpr_by_cache takes a key from get_arg_cache_key(*args), got {cache_key!r}."
            )
        key, state_signature = cache_key
        for entry in self._entries.get(key, ()):
            if entry.state_signature == state_signature:
                return entry.program.jaxpr
        raise KeyError(f"{self.name}: no program is cached under this key; call the function first.")

    # -- call ------------------------------------------------------------------

    def _dispatch_trace(self, state_list: _StateList, *values_and_args: Any, **kwargs: Any) -> Any:
        values, args = values_and_args[: len(state_list.states)], values_and_args[len(state_list.states) :]
        key, leaves, dyn_args, dyn_kwargs = self.signature_key(*args, **kwargs)
        entry = self._lookup(key) or self._trace(key, leaves, dyn_args, dyn_kwargs)
        program = entry.program
        index = state_list.index
        slots = {id(s) for s in state_list.writes}
        if any(id(s) not in index for s in program.states) or any(id(s) not in slots for s in program.written_states):
            raise _MissingStates(program.states, program.written_states)
        with SealedFrame(self.name):  # (only a custom rule of JAX's runs the user's code here)
            out, written = entry.run(leaves, [values[index[id(s)]] for s in program.states])
        # Written states keep where they live: the states' own values, which this call's lock keeps
        # as the call read them.
        keep = state_list.keeps_placement
        new = {
            id(s): _slot(_keep_placement(v, s._value) if keep else v) for s, v in zip(program.written_states, written)
        }
        if not state_list.writes:  # a program that writes no state returns its result bare, as jax.jit would
            return out
        if state_list.donated:  # a donated state this program does not write gets its value back
            new = {id(s): _slot(values[index[id(s)]]) for s in state_list.writes} | new
        return (out, *(new.get(id(s)) for s in state_list.writes))

    def _write_out(self, args: tuple, kwargs: dict) -> Any:
        """The call, once written out for calls shaped as this one and the lock group its states are in now.

        A transform's first call, and a call that found its group merged into a larger one, come here.
        """
        state_list = self._state_list
        state_list.group = state_list.group.current()
        self._use(state_list, args, kwargs)
        return self(*args, **kwargs)

    def _waited(self, group: _locks.Group, state_list: _StateList, args: tuple, kwargs: dict) -> Any:
        """The call when it found its group's token taken: wait for it, or go on inside the call that holds it.

        The call holding the token is on this thread when a host callback
        inside it called this transform: then this call runs inside that
        one, as a reentrant lock would let it (see :meth:`_locks.Group.take`).
        """
        with _locks.Holding(group):
            try:
                return self._run(state_list, args, kwargs)
            except _MissingStates as error:
                missing = error
            except ValueError as error:
                missing = self._moved(error, state_list, args, kwargs)
        return self._extend(missing, args, kwargs)

    def _run(self, state_list: _StateList, args: tuple, kwargs: dict) -> Any:
        """The dispatch and the write-back of the written-out call, in a loop: for the calls off its path.

        A state's value is what ``State.value`` reads: inside a trace (a nested call's list), its caller's.
        """
        try:
            out = state_list.dispatch(*[s.value for s in state_list.states], *args, **kwargs)
        except TypeError:  # perhaps an argument that is not an array: named by the signature's error
            self.signature_key(*args, **kwargs)
            raise
        if state_list.writes:
            out, *slots = out
            nested = state_list.group is _UNLOCKED  # (its written values are its caller's tracers)
            for state, slot in zip(state_list.writes, slots):
                if slot is not None:
                    state.write_back(_unslot(slot) if nested else self._written(state, slot))
        return out if self._call_result is None else self._call_result(out)

    def _moved(self, error: ValueError, state_list: _StateList, args: tuple, kwargs: dict) -> _MissingStates:
        """After JAX refused the call's inputs for where they lie (``_compat.refuses_placement``): the call
        made again with a new list, the states whose values another call left elsewhere moved first.

        A state follows the calls that use it: a shared state, or the default random key, that a mapping
        on one mesh wrote lives on that mesh, and a mapping on other devices, or on another mesh of the
        same devices, would otherwise be refused it.

        The refused list cannot say where its states go: its dispatcher's trace constrains each written
        state to where it lay then (:func:`_keep_placement`), and JAX reuses a trace for arrays placed
        elsewhere. New lists are asked: one compiled with the states where they lie (the user may have
        moved them, onto devices this call takes), else one compiled with their abstract values, whose
        input shardings say where each committed leaf not placed so goes. The call is made again with a
        third list, traced with the states where they then lie, and a refusal of it is raised. So is
        any other error, and a refusal with nothing to move (an argument committed elsewhere is the
        caller's to move).
        """
        if not _compat.refuses_placement(error) or state_list.placed:
            self.signature_key(*args, **kwargs)  # (a static argument that is not hashable: named)
            raise error
        states, writes = state_list.states, state_list.writes
        values = [s._value for s in states]

        def fresh() -> _StateList:  # (its dispatcher has traced nothing)
            return _StateList(states, writes, state_list.group, self)

        try:
            fresh().dispatch.lower(*values, *args, **kwargs).compile()
        except ValueError as refusal:
            if not _compat.refuses_placement(refusal):
                raise
            wanted = _input_shardings(fresh(), values, args, kwargs)
            moved = False

            def move(value: Any, sharding: Any) -> Any:
                nonlocal moved
                if (
                    isinstance(value, jax.Array)
                    and value.committed
                    and sharding is not None  # (an input the program does not read)
                    # (not is_equivalent_to: the same devices on a mesh of another shape are refused)
                    and value.sharding != sharding
                ):
                    moved = True
                    return _compat.put(value, sharding)
                return value

            new = [jax.tree_util.tree_map(move, v, w) for v, w in zip(values, wanted)]
            if not moved:
                raise error from None
            for state, value in zip(states, new):
                state._value = value
        placed = fresh()
        placed.placed = True
        return _MissingStates(states, writes, placed)

    def _extend(self, missing: _MissingStates, args: tuple, kwargs: dict, again: Callable | None = None) -> Any:
        """The call again (or ``again``), with a list that has the states a trace found and a slot for each it writes.

        The list drops the states whose storage is gone (the States of freed
        Refs). A list that would gain nothing is kept, with its dispatcher, and
        its call is written out again: another thread may have made it the
        list without its call yet, or replaced the call with an older list's,
        and a retry with that call would fail again, for ever. A call whose
        states :meth:`_moved` placed is made again with the list it made.
        Outside the lock: joining the new states' lock groups may wait for
        other calls.
        """
        if missing.placed is not None:
            self._use(missing.placed, args, kwargs)
            try:
                return (again or self)(*args, **kwargs)
            finally:
                missing.placed.placed = False  # a later refusal (the states moved again) is retried
        current = self._state_list  # (another thread may have made a longer one meanwhile)
        live = self._forget_gone_states()
        states, writes = (
            tuple({id(s): s for s in (*listed, *found) if id(s) in live and not s._gone()}.values())
            for listed, found in ((current.states, missing.states), (current.writes, missing.writes))
        )
        if list(map(id, (*states, *writes))) == list(map(id, (*current.states, *current.writes))):
            self._use(current, args, kwargs)
        else:
            self._use(_StateList(states, writes, _locks.joined(states), self), args, kwargs)
        return (again or self)(*args, **kwargs)

    def _use(self, state_list: _StateList, args: tuple, kwargs: dict) -> None:
        """Make ``state_list`` the list of the next calls, and its call, written out for calls shaped as this one."""
        self._state_list = state_list
        modules = None if kwargs else [isinstance(a.held if isinstance(a, HeldArgument) else a, Module) for a in args]
        self.__call__ = _compile_call(self, state_list, modules)  # type: ignore[method-assign]

    def _written(self, state: State, slot: Any) -> Any:
        """The value in a slot that is not a concrete array, refused if it is traced.

        Tracers come out of every written value or of none, so the first leaf decides.
        """
        value = _unslot(slot)
        leaves = jax.tree_util.tree_leaves(value)
        if leaves and isinstance(leaves[0], jax.core.Tracer):
            used, fix = _compat.transformation_of(leaves[0])
            raise TypeError(
                f"{self.name} writes {state.describe()} from inside a JAX transformation that smap does not see "
                f"({used}). To carry states through, {fix}; for the shapes of a call, use {self.name}.eval_shape(...) "
                f"(jax.eval_shape's)."
            )
        return value

    def _forget_gone_states(self) -> set[int]:
        """Drop the programs of arguments and states that are gone: a Module or Ref passed as an argument and
        freed since, the States of freed Refs. Returns the ids of the states of the programs kept (a new
        list keeps only those)."""
        for key in list(self._entries):
            if key.holds_freed():
                del self._entries[key]
                continue
            kept = [e for e in self._entries[key] if not any(s._gone() for s in e.program.states)]
            if kept:
                self._entries[key] = kept
            else:
                del self._entries[key]
        live = {id(s) for entries in self._entries.values() for entry in entries for s in entry.program.states}
        for ids, nested in list(self._nested_lists.items()):
            if any(id(s) not in live for s in nested.states):
                del self._nested_lists[ids]
        return live

    # -- ahead of time ----------------------------------------------------------

    def trace(self, *args: P.args, **kwargs: P.kwargs) -> Traced:
        """Trace the call ``self(*args, **kwargs)`` without running it, as ``jax.jit(f).trace``.

        The states' current values are the inputs; no state is written. A
        bad argument raises the error the call would raise.

        Returns:
            A :class:`~smap._aot.Traced`: ``.jaxpr`` (the states' values are
            its first inputs, then the arguments) and ``.lower()``.

        Example:
            >>> import jax.numpy as jnp, smap
            >>> total = smap.State(jnp.zeros(()))
            >>> @smap.jit
            ... def add(x):
            ...     total.value = total.value + x.sum()
            >>> add.trace(jnp.ones(3)).jaxpr.in_avals
            [ShapedArray(float32[]), ShapedArray(float32[3])]
            >>> total.value
            Array(0., dtype=float32)
        """
        return Traced(self._ahead_of_time("trace", args, kwargs), self.name, signature_call(self, args, kwargs))

    def lower(self, *args: P.args, **kwargs: P.kwargs) -> Lowered:
        """Lower the call ``self(*args, **kwargs)`` without running it, as ``jax.jit(f).lower``.

        The states' current values (with their shardings) are the inputs, so
        the program is the one a call runs; no state is written. A bad
        argument raises the error the call would raise.

        Returns:
            A :class:`~smap._aot.Lowered`: ``.as_text()``, ``.cost_analysis()``
            and ``.compile()``, whose result has ``.as_text()`` (XLA's optimised
            HLO), ``.cost_analysis()`` and ``.memory_analysis()``, and is called
            as the transform is, on arguments of the shapes lowered for.

        Example:
            >>> import jax, jax.numpy as jnp, smap
            >>> w = smap.ParamState(jnp.ones(3))
            >>> @smap.vmap(axis_name='batch')
            ... def step(x):
            ...     w.value = w.value - jax.lax.pmean(x, 'batch')
            >>> compiled = step.lower(jnp.ones((4, 3))).compile()
            >>> compiled.memory_analysis().argument_size_in_bytes  # w (3 floats) and x (12)
            60
            >>> w.value
            Array([1., 1., 1.], dtype=float32)
        """
        return Lowered(self._ahead_of_time("lower", args, kwargs), self.name, signature_call(self, args, kwargs))

    def eval_shape(self, *args: P.args, **kwargs: P.kwargs) -> Any:
        """The shapes and dtypes of what ``self(*args, **kwargs)`` returns, as ``jax.jit(f).eval_shape``.

        Nothing runs and no state is written, whatever the function writes
        (``jax.eval_shape`` refuses a function that writes a state).

        Example:
            >>> import jax.numpy as jnp, smap
            >>> total = smap.State(jnp.zeros(()))
            >>> @smap.vmap
            ... def add(x):
            ...     total.value = total.value + x.sum()
            ...     return x * 2
            >>> add.eval_shape(jnp.ones((4, 3)))
            ShapeDtypeStruct(shape=(4, 3), dtype=float32)
            >>> total.value
            Array(0., dtype=float32)
        """
        out = self._ahead_of_time("trace", args, kwargs).out_info
        if self._state_list.writes:
            out = out[0]
        return out if self._call_result is None else self._call_result(out)

    def _ahead_of_time(self, stage: str, args: tuple, kwargs: dict) -> Any:
        """``stage`` (``"trace"`` or ``"lower"``, of the dispatcher) of a call, with the states' current values."""
        if this_thread.frames:
            raise RuntimeError(
                f"{self.name}: trace() and lower() are called outside of smap transforms, not while one traces; "
                f"lower the outer transform to see the whole program."
            )
        args, kwargs = hide_arguments(args, kwargs)
        state_list = self._state_list
        with _locks.Holding(state_list.group):
            try:
                return getattr(state_list.dispatch, stage)(*[s._value for s in state_list.states], *args, **kwargs)
            except _MissingStates as error:
                missing = error
            except TypeError:  # perhaps an argument that is not an array: named by the signature's error
                self.signature_key(*args, **kwargs)
                raise
        return self._extend(missing, args, kwargs, lambda *a, **k: self._ahead_of_time(stage, a, k))

    def _call_in_trace(self, args: tuple, kwargs: dict) -> Any:
        """A call while another smap transform traces: only this program's states take part."""
        args, kwargs = hide_arguments(args, kwargs)
        key, leaves, dyn_args, dyn_kwargs = self.signature_key(*args, **kwargs)
        entry = self._lookup(key)
        if entry is None:  # a new program: those of freed arguments go
            entry = self._trace(key, leaves, dyn_args, dyn_kwargs)
            self._forget_gone_states()
        program = entry.program
        lists_key = (tuple(map(id, program.states)), tuple(map(id, program.written_states)))
        if lists_key not in self._nested_lists:
            self._nested_lists[lists_key] = _StateList(program.states, program.written_states, _UNLOCKED, self)
        return self._run(self._nested_lists[lists_key], args, kwargs)


_CALL = """
def make(owner, state_list, ArrayImpl, {states}):
    group, dispatch, finish = state_list.group, state_list.dispatch, owner._call_result
    take, give = group.tokens.pop, group.tokens.append
    def general(*args, **kwargs):
        if tracing.threads and this_thread.frames:
            return owner._call_in_trace(args, kwargs)
        if kwargs or not plain.issuperset(map(type, args)):  # a Module or Ref argument holds states: no input
            args, kwargs = hide_arguments(args, kwargs)
{body}
    def call({parameters}*rest, **kwargs):
        if rest or kwargs{odd} or (tracing.threads and this_thread.frames):
            return general(*given(({arguments})), *rest, **kwargs)
{hold}{fast_body}
    return {call}
"""

_BODY = """\
        try:
            take()
        except IndexError:  # another call holds the token (on this thread: a host callback inside it)
            return owner._waited(group, state_list, {args}, {kwargs})
        holding = group  # this call holds the group's token (see smap._locks.Group)
        if group.merged_into is not None:  # merged while this list was in use: the larger group's token
            holding = None
            group.give()
            return owner._write_out({args}, {kwargs})
        try:
            {outputs} = dispatch({values}{passed})
{write_back}
        except _MissingStates as error:
            missing = error
        except ValueError as error:  # perhaps a state left on other devices than this call's: moved, and again
            missing = owner._moved(error, state_list, {args}, {kwargs})
        except TypeError:  # perhaps an argument that is not an array: named by the signature's error
            owner.signature_key(*{args}, **{kwargs})
            raise
        else:
            return {result}
        finally:  # group.give(), written out
            holding = None
            give(TOKEN)
            if group.waiting:
                group.wake()
        return owner._extend(missing, {args}, {kwargs})
"""

_WRITE_BACK = """\
            if type(w{j}) is ArrayImpl:
                s{i}._value = w{j}
            elif w{j} is not None:
                s{i}._value = owner._written(s{i}, w{j})"""

_UNGIVEN = object()  # the default of a positional parameter of a call written out for more arguments than given


def _given(arguments: tuple) -> tuple:
    """The arguments a call gave: those before the first default of the written-out call's parameters."""
    return next((arguments[:i] for i, a in enumerate(arguments) if a is _UNGIVEN), arguments)


def _slot(value: Any) -> Any:
    """How the dispatcher returns a written value: an array as itself, any other pytree in a 1-tuple.

    So a slot is None only when its state was not written, and a cached call
    writes an array back without unpacking anything.
    """
    return value if isinstance(value, jax.Array) else (value,)


def _unslot(slot: Any) -> Any:
    return slot[0] if type(slot) is tuple else slot


def _compile_call(owner: StatefulFunction, state_list: _StateList, modules: Sequence[bool] | None) -> Callable:
    """The function a call of ``owner`` runs while ``state_list`` is its list, written out for that list.

    It is Python source made for the list (each state a local name, each
    slot a line), so the cached path has no loop, lookup or container of its
    own around JAX's dispatch; a token held by another call, a merged lock
    group, new states and a call inside a trace leave through ``owner``'s
    slower methods.

    With ``modules`` (for each positional argument of a call with no
    keyword argument, whether it was a Module), the function returned takes
    that many positional parameters and passes them on as they are: no
    tuple or dict is built for the call into ``jax.jit`` (0.3 µs of a 6 µs
    call), an argument of a plain type (``_compat.PLAIN_ARGUMENTS``; a JAX
    array, the common case, is asked first with ``is``) cannot be a Ref,
    and a Module where the call had one goes as its held node (its layout
    known until a Module's attribute is assigned: 2-3 µs less than the
    general function). A call of another shape, with another argument, or
    inside a trace goes on to the general function (``*args, **kwargs``),
    which looks for Modules and Refs anywhere in the arguments.
    """
    n = len(state_list.states)
    parts = {
        "outputs": "out" + "".join(f", w{j}" for j in range(len(state_list.writes))),
        "values": "".join(f"s{i}._value, " for i in range(n)),
        "write_back": "\n".join(
            _WRITE_BACK.format(i=state_list.index[id(s)], j=j) for j, s in enumerate(state_list.writes)
        ),
        "result": "out" if owner._call_result is None else "finish(out)",
    }
    flags = modules or ()  # (None: no written-out parameters, the general function alone)
    names = [f"a{i}" for i in range(len(flags))]
    passed = [f"h{i}" if module else a for i, (a, module) in enumerate(zip(names, flags))]  # to the dispatcher
    source = _CALL.format(
        states=", ".join(f"s{i}" for i in range(n)) or "*_",
        body=_BODY.format(args="args", kwargs="kwargs", passed="*args, **kwargs", **parts),
        parameters="".join(f"{a}=ungiven, " for a in names) + ("/, " if names else ""),
        odd="".join(
            f" or not isinstance({a}, Module)"
            if module
            else f" or (type({a}) is not ArrayImpl and type({a}) not in plain)"
            for a, module in zip(names, flags)
        ),
        arguments="".join(f"{a}, " for a in names),
        hold="".join(f"        {h} = hold_module({a})\n" for a, h, module in zip(names, passed, flags) if module),
        fast_body=_BODY.format(
            args="(" + "".join(f"{h}, " for h in passed) + ")", kwargs="{}", passed=", ".join(passed), **parts
        ),
        call="general" if modules is None else "call",
    )
    namespace: dict[str, Any] = {
        "tracing": tracing,
        "this_thread": this_thread,
        "_MissingStates": _MissingStates,
        "hide_arguments": hide_arguments,
        "hold_module": hold_module,
        "Module": Module,
        "plain": _compat.PLAIN_ARGUMENTS,
        "ungiven": _UNGIVEN,
        "given": _given,
        "TOKEN": _locks.TOKEN,
    }
    exec(compile(source, f"{_locks.CALL_FILE} of {owner.name} with {n} states>", "exec"), namespace)
    return namespace["make"](owner, state_list, _compat.ArrayImpl, *state_list.states)


def _input_shardings(state_list: _StateList, values: list, args: tuple, kwargs: dict) -> list:
    """Where ``state_list``'s dispatcher, new and compiled with the abstract of the states' ``values``, takes each.

    Its trace constrains no written state to where it lay (and no state's value changes meanwhile:
    a Ref's State cannot hold an abstract value). A state the program writes without reading it is
    taken where it is written.
    """
    abstract = jax.tree_util.tree_map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype) if isinstance(v, jax.Array) else v, values
    )
    state_list.keeps_placement = False
    compiled = state_list.dispatch.lower(*abstract, *args, **kwargs).compile()
    wanted = list(compiled.input_shardings[0][: len(values)])
    written = zip(state_list.writes, compiled.output_shardings[1:]) if state_list.writes else ()
    for state, slot in written:
        if slot is not None:  # (None: this program does not write it)
            i = state_list.index[id(state)]
            wanted[i] = jax.tree_util.tree_map(
                lambda taken, out: out if taken is None else taken,
                wanted[i],
                _unslot(slot),
                is_leaf=lambda x: x is None,
            )
    return wanted


def _keep_placement(new: Any, old: Any) -> Any:
    """A written state keeps the sharding its value had over several devices.

    Only while tracing the dispatcher: JAX keys its compiled programs on the
    inputs' shardings, so the constraint matches every call that reuses it.
    """
    if old is None:
        return new

    def keep(n: Any, o: Any) -> Any:
        sharding = getattr(o, "sharding", None)
        if (
            isinstance(sharding, jax.sharding.NamedSharding)
            and len(sharding.device_set) > 1
            and np.shape(o) == np.shape(n)
        ):
            return _compat.constrain(n, sharding)
        return n

    try:
        return jax.tree_util.tree_map(keep, new, old)
    except ValueError:  # the structure changed: nothing to keep
        return new
