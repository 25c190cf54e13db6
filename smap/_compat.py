"""Everything smap knows about JAX's internals (JAX 0.9 to 0.12), in one place.

Three kinds of knowledge live here and nowhere else:

- Private imports and methods. Tracing discovers states while the function
  runs, so a state's value must become an input of the jaxpr under
  construction when it is first read; JAX has no public API for that, the
  jaxpr trace object has one (``new_arg``). Also: the concrete array type,
  the mesh ``jax.set_mesh`` set (read inside a trace), whether the backends
  have started.
- The primitives smap interprets, in one table (:data:`PRIMITIVES`), and the
  layouts of their equations' parameters (:func:`collective_axes`,
  :func:`scan_parts`, ...). The jaxpr interpreter (``smap._interpret``) walks
  programs with them; the passes give it rules.
- Differences between JAX series: ``scan``'s parameters (JAX 0.11 replaced
  ``num_consts``/``num_carry`` by flat trees), where ``jaxprs_in_params``
  lives, the SPMD maps and mesh axis types the sharding layer uses.

``tests/smap/test_jax_internals.py`` checks every item against the installed
JAX by name, so a JAX release that moves one fails there first.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import numpy as np
from jax._src import mesh as mesh_lib
from jax._src import source_info_util, xla_bridge
from jax._src.array import ArrayImpl
from jax._src.sharding import IndivisibleError
from jax.extend.core import ClosedJaxpr, Jaxpr, take_current_trace
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

try:  # public since JAX 0.10
    from jax.extend.core import jaxprs_in_params
except ImportError:
    from jax._src.core import jaxprs_in_params

__all__ = [
    "constrain",
    "is_single_device_sharding",
    "PLAIN_ARGUMENTS",
    "put",
    "refuses_placement",
    "primitive_name",
    "lane_sum_axes",
    "is_scan",
    "is_plain_call",
    "plain_call_name",
    "convert_target",
    "convert_source",
    "scatter_layout",
    "dot_layout",
    "lays_out_result",
    "transpose_permutation",
    "summed_axes",
    "nested_programs",
    "converts_floats",
    "conv_contracted_dims",
    "conv_geometry",
    "is_zeros",
    "pads_with_zeros",
    "PAD",
    "scatter_over_leading_axis",
    "CONV",
    "SCATTER_ADD",
    "REDUCE_SUM",
    "RESHAPE",
    "ADDS",
    "ENTRY_KEEPING",
    "squares",
    "sums_every_axis",
    "adds_entries",
    "embedding_scatter",
    "bind_gathering_over",
    "SUM_PRIMITIVES",
    "CONVERT",
    "DIV",
    "DOT_GENERAL",
    "MUL",
    "LINEAR_PRIMITIVES",
    "ArrayImpl",
    "Kind",
    "PRIMITIVES",
    "ambient_mesh",
    "backend_started",
    "bind_equation",
    "call_body",
    "collective_axes",
    "cond_branches",
    "current_trace",
    "gather_layout",
    "is_shard_map",
    "is_smap",
    "jaxprs_in_params",
    "kind",
    "names_axis",
    "new_input",
    "onto_mesh",
    "outside_explicit_mesh",
    "open_jaxpr",
    "rebind_on_axes",
    "scan_options",
    "scan_parts",
    "shard_map",
    "while_parts",
    "without_ambient_mesh",
]

# -- tracing -----------------------------------------------------------------------

# The concrete type of a jax.Array: comparing `type(x) is ArrayImpl` keeps the
# per-call path of a cached transform free of abstract-base-class checks.
ArrayImpl = ArrayImpl


def current_trace() -> Any:
    """The trace that is building the current jaxpr."""
    with take_current_trace() as trace:
        return trace


# A tracer's JAX transformation as a user calls it (a scan's, cond's or while_loop's body traces as
# jax.jit does), and the smap transform that carries states through instead.
_TRANSFORMATIONS = {
    "BatchTracer": ("jax.vmap", "map the function with smap.vmap (a StatefulMapping)"),
    "JVPTracer": ("jax.grad, jax.jvp or jax.vjp", "differentiate with smap.grad"),
    "LinearizeTracer": ("jax.grad, jax.jvp or jax.vjp", "differentiate with smap.grad"),
    "DynamicJaxprTracer": (
        "jax.jit, jax.checkpoint, or the body of a jax.lax.scan, cond or while_loop",
        "put smap.jit around it (a scan inside smap.jit carries states too)",
    ),
}


def transformation_of(value: Any) -> tuple[str, str]:
    """The JAX transformation whose tracer ``value`` (a pytree) holds, as a user names it, and the way to
    carry states through it: ``(used, fix)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from smap._compat import transformation_of
        >>> jax.vmap(lambda x: print(transformation_of(x)[0]) or x)(jnp.ones(2))
        jax.vmap
        Array([1., 1.], dtype=float32)
    """
    for leaf in jax.tree_util.tree_leaves(value):
        if isinstance(leaf, jax.core.Tracer):
            found = _TRANSFORMATIONS.get(type(leaf).__name__)
            if found is not None:
                return found
    return ("jax.jit, jax.vmap, jax.grad, ...", "use smap.jit, smap.grad or smap.vmap")


def new_input(trace: Any, aval: jax.core.AbstractValue) -> Any:
    """Append an input of type ``aval`` to the jaxpr that ``trace`` builds."""
    return trace.new_arg(aval, source_info_util.current())


def without_ambient_mesh() -> Any:
    """A context in which no mesh is set (``jax.set_mesh`` records its mesh in avals).

    A per-lane program must not depend on the mesh it is later run on.
    """
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))


# -- the primitives smap interprets ------------------------------------------------------


class Kind(enum.Enum):
    """What a primitive means to the lanes of a mapping."""

    REDUCTION = "reduction"  # every lane gets the reduction over all lanes (psum, pmax, ...)
    GATHER = "gather"  # every lane gets all lanes' values, stacked (all_gather)
    SCATTER = "scatter"  # each lane gets its block of the sum over all lanes (psum_scatter)
    INDEX = "index"  # each lane gets its own index (axis_index)
    CALL = "call"  # runs one program on the equation's inputs (jit, checkpoint, custom rules)
    SCAN = "scan"
    WHILE = "while"
    COND = "cond"


PRIMITIVES: dict[str, Kind] = {
    "psum": Kind.REDUCTION,
    "pmax": Kind.REDUCTION,
    "pmin": Kind.REDUCTION,
    "psum_invariant": Kind.REDUCTION,  # psum under shard_map's replication checks
    "all_gather": Kind.GATHER,
    "reduce_scatter": Kind.SCATTER,  # psum_scatter, and the transpose of all_gather
    "axis_index": Kind.INDEX,
    "jit": Kind.CALL,
    "remat2": Kind.CALL,  # jax.checkpoint
    "custom_jvp_call": Kind.CALL,
    "custom_vjp_call": Kind.CALL,
    # a scan's body once its Refs are discharged (discharge_refs), as JAX names the call
    ("eval_jaxpr" if jax.__version_info__ >= (0, 11) else "closed_call"): Kind.CALL,
    "scan": Kind.SCAN,
    "while": Kind.WHILE,
    "cond": Kind.COND,
}
"""The primitives whose meaning smap relies on, by name. Any other equation
that names the mapped axis is treated as giving each lane its own value."""

# Where an equation names the axes it communicates over.
AXIS_PARAMS = ("axes", "axis_name")
# Where a CALL equation keeps its program.
CALL_PARAMS = ("jaxpr", "call_jaxpr")


def kind(eqn: Any) -> Kind | None:
    """The :class:`Kind` of an equation's primitive, or None for one smap does not interpret."""
    return PRIMITIVES.get(eqn.primitive.name)


def collective_axes(eqn: Any) -> tuple[str, tuple] | None:
    """The parameter that holds the axes an equation communicates over, and those axes."""
    for key in AXIS_PARAMS:
        if key in eqn.params:
            value = eqn.params[key]
            return key, (tuple(value) if isinstance(value, (tuple, list)) else (value,))
    return None


def names_axis(eqn: Any, axis_name: Any) -> bool:
    """Whether an equation communicates over ``axis_name``."""
    found = collective_axes(eqn)
    return found is not None and axis_name in found[1]


# How a sharding annotation binds inside lanes (a list of outputs), or None to bind it as
# traced: set by smap._annotations when it is imported, so this module imports no other.
annotation_binder: Callable[[Any, Sequence[Any]], list | None] | None = None


def bind_equation(eqn: Any, ins: Sequence[Any], **params: Any) -> list:
    """Apply an equation's primitive to ``ins``, with ``params`` replacing some of its parameters.

    A sharding annotation is bound for the mesh context it runs in (see ``smap._annotations``).
    """
    if not params and annotation_binder is not None and annotation_spec(eqn) is not None:
        outs = annotation_binder(eqn, ins)
        if outs is not None:
            return outs
    if params:
        outs = eqn.primitive.bind(*ins, **{**eqn.params, **params})
    else:
        outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    return list(outs) if eqn.primitive.multiple_results else [outs]


def rebind_on_axes(eqn: Any, ins: Sequence[Any], axes: tuple) -> list:
    """Apply a collective equation to ``ins`` over ``axes`` instead of its own."""
    found = collective_axes(eqn)
    assert found is not None, f"{eqn.primitive.name} communicates over no axes"
    return bind_equation(eqn, ins, **{found[0]: axes})


def open_jaxpr(jaxpr: Jaxpr | ClosedJaxpr) -> Jaxpr:
    """The open jaxpr of a (possibly closed) jaxpr."""
    return jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr


def sub_jaxpr(jaxpr: Jaxpr, invars: Sequence[Any], outvars: Sequence[Any], eqns: Sequence[Any]) -> Jaxpr:
    """A jaxpr of some of ``jaxpr``'s equations, with other inputs and outputs.

    Given ``jaxpr``'s own inputs it keeps its constants and effects (the
    per-lane head of ``smap.transform._hoist``); given others it has neither
    (the tail, whose equations have no effects). JAX warns about a jaxpr
    without debug info; its names no longer fit, so they are dropped
    (``DebugInfo.with_unknown_names``).
    """
    constvars = jaxpr.constvars if list(invars) == list(jaxpr.invars) else []
    effects = jaxpr.effects if constvars else frozenset()
    debug_info = jaxpr.debug_info.with_unknown_names()
    return Jaxpr(constvars, invars, outvars, eqns, effects, debug_info)


def call_body(eqn: Any) -> Jaxpr | ClosedJaxpr:
    """The program a CALL equation runs on its inputs."""
    return next(eqn.params[k] for k in CALL_PARAMS if k in eqn.params)


def scan_parts(eqn: Any) -> tuple[Jaxpr | ClosedJaxpr, int, int]:
    """A scan's body and how many of its inputs are constants and carries (the rest: xs)."""
    params = eqn.params
    if "ft_in" in params:  # JAX >= 0.11: the inputs' flat tree is (consts, carry, xs)
        consts, carry, _ = params["ft_in"].unpack()
        return params["jaxpr"], len(consts), len(carry)
    return params["jaxpr"], params["num_consts"], params["num_carry"]


def scan_options(eqn: Any) -> dict:
    """The keyword arguments that make ``jax.lax.scan`` loop as the equation does."""
    return {k: eqn.params[k] for k in ("length", "reverse", "unroll")}


def while_parts(eqn: Any) -> tuple[Jaxpr | ClosedJaxpr, Jaxpr | ClosedJaxpr, int, int]:
    """A while loop's condition and body, and how many constants each takes before the carry."""
    p = eqn.params
    return p["cond_jaxpr"], p["body_jaxpr"], p["cond_nconsts"], p["body_nconsts"]


def cond_branches(eqn: Any) -> tuple:
    """A cond's branches; the equation's first input is the branch index, the rest their operands."""
    return tuple(eqn.params["branches"])


def gather_layout(eqn: Any) -> tuple[int, bool]:
    """Where an all_gather stacks the lanes' values, and whether it concatenates them (``tiled``)."""
    return eqn.params["all_gather_dimension"], eqn.params["tiled"]


def scatter_layout(eqn: Any) -> tuple[int, bool]:
    """Along which dimension a reduce_scatter hands each lane its block, and whether the
    block keeps that dimension (``tiled``) or the lanes' blocks are its entries."""
    return eqn.params["scatter_dimension"], eqn.params["tiled"]


# -- sums of per-lane products (smap.transform._fuse) ------------------------------

# psum(f(x)) == f(psum(x)) for these primitives, f applied with the same parameters.
LINEAR_PRIMITIVES = frozenset(
    {"transpose", "reshape", "squeeze", "broadcast_in_dim", "neg", "copy", "reduce_sum", "convert_element_type"}
)
SUM_PRIMITIVES = frozenset({"add", "add_any", "sub"})
DOT_GENERAL, MUL, DIV, CONVERT = "dot_general", "mul", "div", "convert_element_type"


def primitive_name(eqn: Any) -> str:
    """The name of an equation's primitive."""
    return eqn.primitive.name


def lane_sum_axes(eqn: Any) -> tuple | None:
    """The axes a ``psum`` over all lanes sums over; None for other equations and sums over groups."""
    if eqn.primitive.name != "psum" or eqn.params.get("axis_index_groups") is not None:
        return None
    found = collective_axes(eqn)
    return None if found is None else found[1]


def is_plain_call(eqn: Any, name: str | None = None) -> bool:
    """Whether ``eqn`` is a ``jax.jit`` call (of a function named ``name``, when given)."""
    return eqn.primitive.name == "jit" and (name is None or eqn.params.get("name") == name)


def plain_call_name(eqn: Any) -> str | None:
    """The name of the function a ``jax.jit`` call equation calls; None for other equations."""
    return eqn.params.get("name") if is_plain_call(eqn) else None


def convert_target(eqn: Any) -> Any:
    """The dtype a ``convert_element_type`` converts to."""
    return eqn.params["new_dtype"]


def convert_source(eqn: Any) -> Any:
    """The dtype a ``convert_element_type`` converts from."""
    return eqn.invars[0].aval.dtype


def dot_layout(eqn: Any) -> tuple[tuple, dict]:
    """A ``dot_general``'s dimension numbers and the options it passes on (precision, result type)."""
    return eqn.params["dimension_numbers"], {k: eqn.params.get(k) for k in ("precision", "preferred_element_type")}


def lays_out_result(eqn: Any) -> bool:
    """Whether ``eqn`` names its result's sharding (``out_sharding``, on Explicit meshes)."""
    return eqn.params.get("out_sharding") is not None


def transpose_permutation(eqn: Any) -> tuple[int, ...] | None:
    """The permutation of a ``transpose``; None for other equations."""
    return tuple(eqn.params["permutation"]) if eqn.primitive.name == "transpose" else None


def summed_axes(eqn: Any) -> tuple[int, ...] | None:
    """The axes a ``reduce_sum`` sums over; None for other equations."""
    return tuple(eqn.params["axes"]) if eqn.primitive.name == "reduce_sum" else None


def nested_programs(eqn: Any) -> list:
    """The programs ``eqn`` holds (a call's body, a scan's, a cond's branches, ...), opened."""
    return [open_jaxpr(program) for program in jaxprs_in_params(eqn.params)]


def converts_floats(eqn: Any) -> bool:
    """Whether a ``convert_element_type`` goes from a floating type to a floating type."""
    floating = lambda dtype: jax.numpy.issubdtype(dtype, jax.numpy.inexact)  # noqa: E731
    return floating(eqn.params["new_dtype"]) and floating(eqn.invars[0].aval.dtype)


def is_scan(eqn: Any) -> bool:
    return eqn.primitive.name == "scan"


# Sums over the lanes of per-lane layers' weight gradients (smap.transform._fuse_layers).
SCATTER_ADD, CONV, PAD = "scatter-add", "conv_general_dilated", "pad"


def _is_literal_zero(var: Any) -> bool:
    value = getattr(var, "val", None)
    return value is not None and jax.numpy.ndim(value) == 0 and value == 0


def is_zeros(eqn: Any) -> bool:
    """Whether ``eqn`` broadcasts the literal 0 (how ``jax.grad`` starts a gradient it scatters into)."""
    return eqn.primitive.name == "broadcast_in_dim" and bool(eqn.invars) and _is_literal_zero(eqn.invars[0])


def pads_with_zeros(eqn: Any) -> bool:
    """Whether a ``pad`` equation pads with the literal 0 (the gradient of a slice)."""
    return _is_literal_zero(eqn.invars[1])


def scatter_over_leading_axis(eqn: Any, operand: Any, indices: Any, updates: Any) -> Any:
    """A scatter equation applied to ``indices`` and ``updates`` that each have one more
    leading axis (one more scatter dimension), into ``operand``."""
    dims = eqn.params["dimension_numbers"]
    shift = lambda axes: tuple(d + 1 for d in axes)  # noqa: E731
    dims = dims._replace(
        update_window_dims=shift(dims.update_window_dims),
        scatter_indices_batching_dims=shift(dims.scatter_indices_batching_dims),
    )
    return bind_equation(
        eqn, [operand, indices, updates], dimension_numbers=dims, indices_are_sorted=False, unique_indices=False
    )[0]


def conv_contracted_dims(eqn: Any) -> tuple[int, int] | None:
    """The input-feature dimensions of a convolution's two operands (summed over, with the
    window), or None where features are grouped (``feature_group_count`` > 1)."""
    if eqn.params["feature_group_count"] != 1:
        return None
    specs = eqn.params["dimension_numbers"]
    return specs.lhs_spec[1], specs.rhs_spec[1]


def conv_geometry(eqn: Any) -> dict | None:
    """A convolution's layout and window: ``lhs_spec`` and ``rhs_spec`` (the operands' dims as
    (batch, feature, spatial...) and (out feature, in feature, spatial...)), ``out_spec``,
    ``strides``, ``padding``, ``lhs_dilation``, ``rhs_dilation``, ``precision`` and
    ``preferred_element_type``; None where
    features or batches are grouped."""
    params = eqn.params
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return None
    specs = params["dimension_numbers"]
    return {
        "lhs_spec": tuple(specs.lhs_spec),
        "rhs_spec": tuple(specs.rhs_spec),
        "out_spec": tuple(specs.out_spec),
        "strides": tuple(params["window_strides"]),
        "padding": tuple(tuple(p) for p in params["padding"]),
        "lhs_dilation": tuple(params["lhs_dilation"]),
        "rhs_dilation": tuple(params["rhs_dilation"]),
        "precision": params["precision"],
        "preferred_element_type": params.get("preferred_element_type"),
    }


# Per-lane squared norms of per-lane products (smap.transform._lane_norms).
REDUCE_SUM, RESHAPE = "reduce_sum", "reshape"
ADDS = frozenset({"add", "add_any"})
# Steps that keep a value's entries up to their order and sign: its squared norm is theirs.
ENTRY_KEEPING = frozenset({"transpose", "reshape", "squeeze", "copy", "neg"})


def squares(eqn: Any) -> bool:
    """Whether ``eqn`` squares its one input elementwise (``x ** 2``, ``jnp.square(x)``, ``x * x``)."""
    name = eqn.primitive.name
    if name == "square":
        return True
    if name == "integer_pow":
        return eqn.params["y"] == 2
    return (
        name == "mul" and len(eqn.invars) == 2 and eqn.invars[0] is eqn.invars[1] and not hasattr(eqn.invars[0], "val")
    )


def sums_every_axis(eqn: Any) -> bool:
    """Whether ``eqn`` is a ``reduce_sum`` over all the axes of its operand."""
    return eqn.primitive.name == "reduce_sum" and len(eqn.params["axes"]) == len(eqn.invars[0].aval.shape)


def adds_entries(eqn: Any) -> bool:
    """Whether ``eqn`` adds entries of no other value: a size-1 axis added by ``broadcast_in_dim``
    (``expand_dims``), or zeros around a value by ``pad`` (a slice's gradient), no entry dropped."""
    name = eqn.primitive.name
    if name == "broadcast_in_dim":
        return eqn.invars[0].aval.size == eqn.outvars[0].aval.size
    return (
        name == "pad"
        and pads_with_zeros(eqn)
        and all(lo >= 0 and hi >= 0 for lo, hi, _ in eqn.params["padding_config"])
    )


def embedding_scatter(eqn: Any) -> str | None:
    """How out-of-range rows are treated (``'clip'`` or ``'drop'``) when a ``scatter-add``
    adds rows ``updates[..., :]`` at ``indices[..., 0]`` along the operand's first axis
    (the gradient of ``table[ids]``); None for other scatters."""
    operand, indices, updates = (v.aval for v in eqn.invars)
    dims = eqn.params["dimension_numbers"]
    rows = operand.ndim - 1
    simple = (
        indices.shape[-1:] == (1,)
        and tuple(dims.inserted_window_dims) == (0,)
        and tuple(dims.scatter_dims_to_operand_dims) == (0,)
        and not tuple(dims.operand_batching_dims)
        and tuple(dims.update_window_dims) == tuple(range(updates.ndim - rows, updates.ndim))
        and updates.shape[updates.ndim - rows :] == operand.shape[1:]
        and updates.shape[: updates.ndim - rows] == indices.shape[:-1]
    )
    if not simple:
        return None
    return "clip" if eqn.params["mode"] == jax.lax.GatherScatterMode.CLIP else "drop"


def bind_gathering_over(eqn: Any, ins: Sequence[Any], axis_name: Any, axis_size: int) -> list:
    """Apply an equation to ``ins``; an ``all_gather`` gathers over ``axis_name`` of ``axis_size`` instead."""
    if eqn.primitive.name == "all_gather":
        return bind_equation(eqn, ins, axis_name=axis_name, axis_size=axis_size)
    return bind_equation(eqn, ins)


# -- SPMD maps and meshes ------------------------------------------------------------------


def is_shard_map(fn: Any) -> bool:
    """Whether ``fn`` is JAX's shard_map (``jax.shard_map`` or the deprecated experimental one)."""
    return fn is jax.shard_map or (
        getattr(fn, "__name__", None) == "shard_map" and getattr(fn, "__module__", "").startswith("jax.")
    )


def is_smap(fn: Any) -> bool:
    """Whether ``fn`` is ``jax.smap``, the single-axis shard_map with ``in_axes``/``out_axes``."""
    smap = getattr(jax, "smap", None)
    return smap is not None and fn is smap


def shard_map(f: Callable, mesh: Mesh, in_specs: Any, out_specs: Any, manual_axes: Sequence[str]) -> Callable:
    """``jax.shard_map`` without replication checks, manual over ``manual_axes`` only.

    The lanes decide what varies between devices. The other mesh axes are
    left to the compiler (``axis_names``, the same keyword in JAX 0.9 to
    0.12): values keep their shardings over them inside the mapped program.
    """
    # Explicit axes are manual too: onto_mesh replicates the values over those the lanes do not use.
    manual = frozenset(manual_axes) | frozenset(_explicit(mesh))
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=manual, check_vma=False)


PLAIN_ARGUMENTS = frozenset({ArrayImpl, np.ndarray, float, int, bool})
"""Types of call arguments that neither are nor hold a Ref: a call of only these skips the search for Refs."""


def put(x: Any, sharding: Any) -> jax.Array:
    """``x`` (the same value on every process) placed with ``sharding``."""
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    # Across processes, each builds its own shards from its copy of the value
    # (jax.device_put of a single-device array fails there with one device per process).
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def refuses_placement(error: ValueError) -> bool:
    """Whether ``error`` is JAX refusing an input for where it lies, against where the program runs.

    - ``jax.jit`` refuses an input committed to other devices than the program's
      (jax._src.pjit: "Received incompatible devices for jitted computation");
    - an operation in the trace, inputs on two meshes of Explicit axes, whose types carry
      their mesh (jax._src.lax.utils: "Mesh for all inputs should be equal");
    - compiling, JAX writes the program's input shardings on the input's own mesh, which
      fails where that mesh has the program's devices in another shape (a state left on
      a 1-D mesh of 8 devices, a program on a 4 x 2 mesh of the same devices: an
      ``IndivisibleError``).

    JAX 0.9 to 0.12.
    """
    message = str(error)
    return (
        isinstance(error, IndivisibleError)
        or "incompatible devices" in message
        or "Mesh for all inputs should be equal" in message
    )


def is_single_device_sharding(sharding: Any) -> bool:
    """Whether ``sharding`` puts its array whole on one device (JAX 0.12.1 deprecates the class's name)."""
    if hasattr(jax.sharding, "is_single_device_sharding"):
        return jax.sharding.is_single_device_sharding(sharding)
    return isinstance(sharding, jax.sharding.SingleDeviceSharding)


def ambient_mesh() -> Mesh | None:
    """The mesh set by ``jax.set_mesh``, or None; readable inside a trace.

    The concrete mesh is read (``jax.set_mesh`` records it beside the abstract
    one): smap traces per-lane programs with the abstract mesh cleared (see
    :func:`without_ambient_mesh`).
    """
    mesh = mesh_lib.get_concrete_mesh()
    return None if mesh is None or mesh.empty else mesh


def backend_started() -> bool:
    """Whether JAX has already created its backends (device count is then fixed)."""
    return xla_bridge.backends_are_initialized()


def _explicit(mesh: Any) -> tuple[str, ...]:
    return tuple(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit)


def explicit_axes(mesh: Any) -> tuple[str, ...]:
    """The names of ``mesh``'s Explicit axes."""
    return _explicit(mesh)


def spec_on(x: Any, mesh: Mesh) -> PartitionSpec | None:
    """The PartitionSpec in ``x``'s type (traced or not) when that type is on ``mesh``'s axes, else None."""
    sharding = jax.typeof(x).sharding
    if sharding.mesh.empty or sharding.mesh.axis_names != mesh.axis_names:
        return None
    return sharding.spec


def with_auto_axes(f: Callable, mesh: Mesh, out_specs: Sequence[PartitionSpec]) -> Callable:
    """``f`` run with ``mesh``'s Explicit axes made Auto; its outputs typed as ``out_specs`` on ``mesh``."""
    shardings = tuple(NamedSharding(mesh, spec) for spec in out_specs)
    auto = jax.sharding.auto_axes(lambda *xs: tuple(f(*xs)), axes=_explicit(mesh), out_sharding=shardings)
    return lambda *xs: list(auto(*xs))


def in_context_types(mesh: Mesh) -> Mesh:
    """``mesh`` with the axis types of the context (inside ``jax.sharding.auto_axes`` its Explicit axes are Auto)."""
    context = jax.sharding.get_abstract_mesh()
    if context.empty or tuple(context.axis_names) != tuple(mesh.axis_names) or context.axis_types == mesh.axis_types:
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=context.axis_types)


def onto_mesh(values: Sequence[Any], mesh: Mesh, specs: Sequence[PartitionSpec]) -> list:
    """Traced ``values`` resharded onto ``mesh`` as ``specs`` say, where the mesh has Explicit axes.

    ``jax.shard_map`` on a mesh of Explicit axes (``jax.make_mesh``'s default)
    takes only values already typed with its ``in_specs``. The reshard happens
    on the devices, in the compiled program; a value already placed so moves
    nothing. On a mesh of Auto axes the values are returned as they are.

    A value split over an Explicit axis the lanes do not use is gathered over
    it here: the per-lane program is traced without a mesh, and JAX's
    Explicit sharding types would ask it to say how each product over such an
    axis is laid out. A ``StatefulMapping`` avoids this by running its lanes
    under :func:`with_auto_axes` (the axes are Auto there, and no value is
    resharded here).
    """
    if not _explicit(mesh):
        return list(values)
    return [jax.sharding.reshard(x, NamedSharding(mesh, spec)) for x, spec in zip(values, specs)]


def constrain(x: Any, sharding: NamedSharding) -> Any:
    """``x`` (traced) laid out as ``sharding``: a reshard on a mesh of Explicit axes, else a constraint."""
    if _explicit(sharding.mesh):
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def outside_explicit_mesh(f: Callable, values: Sequence[Any], n_outs: int) -> Callable:
    """``f`` run with the Explicit axes of the mesh ``values`` (or the ambient mesh) are typed on made Auto.

    ``jax.pmap`` inside ``jax.jit`` cannot take values whose types name the
    Explicit axes of another mesh; ``jax.sharding.auto_axes`` lifts them, and
    ``f``'s ``n_outs`` outputs come back replicated on that mesh.
    """
    meshes = [jax.typeof(x).sharding.mesh for x in values] + [jax.sharding.get_abstract_mesh()]
    mesh = next((m for m in meshes if not m.empty and _explicit(m)), None)
    if mesh is None:
        return f
    replicated = [NamedSharding(mesh, PartitionSpec())] * n_outs
    return jax.sharding.auto_axes(lambda *xs: list(f(*xs)), axes=_explicit(mesh), out_sharding=replicated)


# -- jax.Ref ----------------------------------------------------------------------------

# JAX's mutable arrays (``jax.new_ref``, public as ``jax.Ref`` in JAX 0.10 to 0.12).
HAS_REFS = hasattr(jax, "Ref") and hasattr(jax, "new_ref")
RefType: Any = jax.Ref if HAS_REFS else None


def is_ref(x: Any) -> bool:
    """Whether ``x`` is a concrete ``jax.Ref`` (not a traced one)."""
    return HAS_REFS and type(x) is RefType


def ref_value(ref: Any) -> Any:
    """The array a concrete Ref holds now (no copy: JAX replaces its buffer in place on a write)."""
    return ref._refs._buf


def set_ref_value(ref: Any, value: Any) -> None:
    """Make a concrete Ref hold ``value`` (of its shape and dtype), as JAX's own writes do.

    JAX replaces a Ref's buffer in place, which keeps its placement (and JAX's
    own writes need it committed to its devices): a value not committed
    anywhere is put where the buffer is. A value committed elsewhere
    (``sharding.place``) takes the buffer's place instead, as a copy that
    nothing else holds.
    """
    buf = ref._refs._buf
    if value is buf:  # (a state written with what it holds: JAX refuses to replace an array with itself)
        return
    if value.weak_type:  # a Ref's type is never weak
        value = jax.lax.convert_element_type(value, buf.dtype)
    if not value.committed:
        value = jax.device_put(value, buf.sharding)
    if buf.sharding == value.sharding:
        buf._replace_with(value)
    else:
        ref._refs._buf = jax.numpy.copy(value)


def route_ref_access(active: Callable[[], bool], get: Callable, set_: Callable, addupdate: Callable) -> None:
    """Send ``ref[idx]``, ``ref[idx] = x`` and ``ref.addupdate(x, idx)`` of concrete Refs to smap while ``active()``.

    JAX has no hook for a Ref read while a jaxpr is built: a concrete Ref
    becomes a constant of the jaxpr, whatever the shape a lane should see.
    Refs index through their class's methods, so the routing wraps them;
    outside smap's traces (``active()`` false) every call is JAX's own.
    """
    cls = RefType
    jax_get, jax_set, jax_addupdate = cls.__getitem__, cls.__setitem__, cls.addupdate

    def __getitem__(self: Any, idx: Any) -> Any:
        return get(self, idx) if active() else jax_get(self, idx)

    def __setitem__(self: Any, idx: Any, x: Any) -> None:
        if active():
            set_(self, idx, x)
        else:
            jax_set(self, idx, x)

    def addupdate_(self: Any, x: Any, idx: Any = ()) -> None:
        if active():
            addupdate(self, idx, x)
        else:
            jax_addupdate(self, x, idx)

    cls.__getitem__, cls.__setitem__, cls.addupdate = __getitem__, __setitem__, addupdate_


def new_refs(trace: Any, value: Any) -> Any:
    """A Ref for each leaf of ``value``, made in ``trace`` (so the jaxprs nested in it close over them)."""
    from jax._src.core import set_current_trace

    with set_current_trace(trace):
        return jax.tree_util.tree_map(jax.new_ref, value)


def read_refs(refs: Any) -> Any:
    """The values the traced Refs ``refs`` hold, read in the current trace."""
    return jax.tree_util.tree_map(lambda ref: ref[...], refs)


def write_refs(refs: Any, value: Any) -> None:
    """Write the leaves of ``value`` into the traced Refs ``refs``, in the current trace."""
    for ref, leaf in zip(jax.tree_util.tree_leaves(refs), jax.tree_util.tree_leaves(value), strict=True):
        ref[...] = leaf


def refuses_ref_write(error: Exception) -> bool:
    """Whether JAX refused a write into a Ref inside one of its transformations (a per-example value
    under ``jax.vmap``, a differentiated one under ``jax.grad``)."""
    return "array reference" in str(error)


def discharge_refs(closed: ClosedJaxpr, axis_env: Sequence[tuple[Hashable, int]]) -> ClosedJaxpr:
    """``closed`` without the Refs it makes: each Ref's reads and writes become the values it holds.

    The nested programs are traced again, with the axes of ``axis_env`` bound as when ``closed`` was.
    """
    from jax._src.core import extend_axis_env_nd
    from jax._src.state.discharge import discharge_state

    discharge: Any = discharge_state  # (its signature differs between JAX series)
    with extend_axis_env_nd(axis_env):
        if "consts" in inspect.signature(discharge).parameters:  # JAX 0.9
            jaxpr, consts = discharge(closed.jaxpr, closed.consts)
            return ClosedJaxpr(jaxpr, consts)
        return discharge(closed)


def ref_constants(jaxpr: ClosedJaxpr) -> list:
    """The concrete Refs a traced program captured as constants (used in a way smap does not route)."""
    return [c for c in jaxpr.consts if is_ref(c)]


# -- sharding annotations --------------------------------------------------------------

# Primitives that only lay out their operand, and the parameter holding the layout.
ANNOTATIONS = {"sharding_constraint": "sharding", "reshard": "dst_sharding"}
# Parameters of other primitives that lay out their result (jnp's ``out_sharding=``).
OUT_SHARDING_PARAMS = ("out_sharding", "sharding")


def annotation_spec(eqn: Any) -> tuple[PartitionSpec, str] | None:
    """The PartitionSpec a sharding annotation asks of an equation's (first) result, and its parameter; else None.

    ``with_sharding_constraint`` and ``jax.sharding.reshard`` are annotations;
    so is an operation given ``out_sharding=`` (``dot_general``, ``broadcast_in_dim``, ...).
    """
    name = ANNOTATIONS.get(eqn.primitive.name)
    if name is None:
        name = next((p for p in OUT_SHARDING_PARAMS if isinstance(eqn.params.get(p), NamedSharding)), None)
        if name is None:
            return None
    sharding = eqn.params.get(name)
    spec = getattr(sharding, "spec", None)
    return (spec, name) if isinstance(spec, PartitionSpec) else None


def lays_out_operand(eqn: Any) -> bool:
    """Whether an annotation equation only lays out its operand (a constraint or a reshard)."""
    return eqn.primitive.name in ANNOTATIONS


def bind_unannotated(eqn: Any, ins: Sequence[Any]) -> Any:
    """An annotation equation's result without its layout: the operand, or the operation with no out_sharding."""
    spec_param = annotation_spec(eqn)
    assert spec_param is not None
    if lays_out_operand(eqn):
        return ins[0]
    outs = bind_equation(eqn, ins, **{spec_param[1]: None})
    return outs[0]


def context_mesh() -> Any:
    """The abstract mesh of the context a value is computed in (inside shard_map: its manual axes too)."""
    return jax.sharding.get_abstract_mesh()


def manual_axes(mesh: Any) -> frozenset:
    """The axes of an abstract mesh that a shard_map around the current code has made manual."""
    if mesh.empty:
        return frozenset()
    return frozenset(n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Manual)


def axis_kinds(mesh: Any) -> dict:
    """Each axis of an abstract mesh: 'auto', 'explicit' or 'manual'."""
    if mesh.empty:
        return {}
    return {n: t.name.lower() for n, t in zip(mesh.axis_names, mesh.axis_types)}


def ambient_abstract_mesh(unit_axes: bool = False) -> Any:
    """A context with the ambient mesh's abstract mesh, for tracing a lane whose annotations need a mesh.

    Entered inside :func:`without_ambient_mesh`: the lane is traced for the
    axes of the mesh, and each annotation is laid out where the lane then
    runs (``smap._annotations``). With ``unit_axes`` every axis has size 1, so
    that JAX's check that an axis divides a dimension waits for that place
    (a lane's slice of a batch, of size 1, annotated for the whole batch).
    """
    mesh = ambient_mesh()
    assert mesh is not None
    abstract = mesh.abstract_mesh
    if unit_axes:
        abstract = abstract.update(axis_sizes=(1,) * len(abstract.axis_names))
    return jax.sharding.use_abstract_mesh(abstract)


def indivisible(error: Exception) -> bool:
    """Whether JAX refused a layout because a mesh axis does not divide an array's dimension."""
    return isinstance(error, ValueError) and "evenly divide" in str(error)
