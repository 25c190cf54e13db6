"""Sums over the lanes of per-lane products, computed as one product over the lanes.

A lane's weight gradient is a product of two per-lane values (for ``x @ w``,
the outer product of the lane's input and its output's cotangent). Summed
over the lanes with ``psum`` (or ``pmean``) and vectorized by ``jax.vmap``,
the program holds one product per lane (``f32[lanes, in, out]``) and then
sums them. The same sum is one ``dot_general`` that also contracts over the
lanes: ``psum_L(dot(a, b)) == dot(all_gather_L(a), all_gather_L(b))`` with
the gathered axis contracted, and under ``jax.vmap`` the ``all_gather`` of a
batched value over the mapped axis is the batched array itself.

:func:`fused_lanes` re-evaluates a per-lane program with every ``psum`` over
the mapping's axis whose operand is linear in such products (through
transposes, reshapes, float converts, negations, sums, and scalings by
lane-independent values or by per-lane scalars, which move into one factor)
computed that way; anything it does not recognise is evaluated as it is.
The value of each such psum is computed in a call named after :data:`LANE_SUM`
and the lane axis it sums over, so an ``axis_name``-rewriting layer
(``sharding``, where a device holds a block of lanes) can sum over the
device's own lanes and then over devices instead of gathering over devices
(:func:`sum_over_lanes`), at the place of the psum (the linear steps after
the product stay before the sum over devices). Such a layer rewrites only the
lane sums over its own axis (:func:`is_lane_sum` with the axis): a lane sum of
a nested mapping, over that mapping's axis, stays as it is. A psum over
several axes has only the mapping's axis folded; it is then summed over the
others.

The fused sum never works in a narrower or a real dtype where the program
did not: the product over the lanes accumulates in the wider of the
product's dtype and the psum's, a per-lane factor is applied in the wider of
its dtype and the operand's (a complex factor keeps the product complex),
and a float convert between the product and the psum converts to no
narrower than the psum's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from .. import _compat
from .._compat import jaxprs_in_params
from ._fuse_layers import layer_sum
from ._lane_norms import has_squares, squared_norm
from ._lanes import _equation as _lane_dependent_outputs
from ._lanes import lane_dependent

__all__ = ["fused_lanes", "is_lane_sum", "sum_over_lanes", "LANE_SUM"]

LANE_SUM = "_smap_lane_sum"

# The axes lane sums sum over: a lane sum's call is named LANE_SUM, "_", the axis's number here.
_LANE_AXES: dict[Hashable, int] = {}
_LANE_AXES_LOCK = threading.Lock()


def _lane_sum_name(axis_name: Hashable) -> str:
    """The name of a lane sum's call over ``axis_name``: it records the axis."""
    with _LANE_AXES_LOCK:
        number = _LANE_AXES.setdefault(axis_name, len(_LANE_AXES))
    return f"{LANE_SUM}_{number}"


def _lane_sum(compute: Callable[[], Any], axis_name: Hashable) -> Any:
    """``compute()`` as a lane sum's call: the value of a psum over the lanes of ``axis_name``."""

    def call() -> Any:
        return compute()

    call.__name__ = call.__qualname__ = _lane_sum_name(axis_name)
    return jax.jit(call)()


def _contraction(a: jax.Array, b: jax.Array, dims: tuple, options: dict, axis_name: Hashable) -> jax.Array:
    """Sum over the lanes of ``dot_general(a, b, dims)``: one product that contracts the lanes too."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dims
    shift = lambda axes: tuple(d + 1 for d in axes)  # noqa: E731
    gathered = (((0, *shift(lhs_c)), (0, *shift(rhs_c))), (shift(lhs_b), shift(rhs_b)))
    return jax.lax.dot_general(jax.lax.all_gather(a, axis_name), jax.lax.all_gather(b, axis_name), gathered, **options)


def is_lane_sum(eqn: Any, lane_axis: Hashable | None = None) -> bool:
    """Whether ``eqn`` is a sum over the lanes that :func:`fused_lanes` wrote as products
    (over the lanes of ``lane_axis``, when given)."""
    name = _compat.plain_call_name(eqn)
    if name is None or not name.startswith(LANE_SUM + "_"):
        return False
    return lane_axis is None or name == f"{LANE_SUM}_{_LANE_AXES.get(lane_axis)}"


def sum_over_lanes(eqn: Any, ins: Sequence[Any], lane_axis: Hashable, axis_name: Hashable, axis_size: int) -> list:
    """Evaluate an ``is_lane_sum(eqn, lane_axis)`` equation over the lanes of ``axis_name`` instead.

    A device that holds a block of lanes sums over its own block (``axis_name``
    its local lane axis); the caller then sums the result over devices.
    """
    assert is_lane_sum(eqn, lane_axis), f"{eqn.primitive.name} is not a sum over the lanes of {lane_axis!r}"
    sub, sub_consts = _open(_compat.call_body(eqn))
    env: dict[Any, Any] = dict(zip(sub.constvars, sub_consts))
    env.update(zip(sub.invars, ins))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]  # noqa: E731
    for e in sub.eqns:
        e_ins = [read(v) for v in e.invars]
        if _compat.names_axis(e, lane_axis):
            outs = _compat.bind_gathering_over(e, e_ins, axis_name, axis_size)
        else:
            outs = _compat.bind_equation(e, e_ins)
        env.update(zip(e.outvars, outs))
    return [read(v) for v in sub.outvars]


@dataclasses.dataclass(frozen=True, eq=False)
class _Node:
    """A value of the re-evaluated program, with the equation that computed it."""

    value: Any
    dependent: bool
    eqn: Any = None
    inputs: tuple[_Node, ...] = ()


def _open(jaxpr: Jaxpr | ClosedJaxpr) -> tuple[Jaxpr, Sequence[Any]]:
    return (jaxpr.jaxpr, jaxpr.consts) if isinstance(jaxpr, ClosedJaxpr) else (jaxpr, ())


def _reduces_over(eqn: Any, axis_name: Hashable) -> bool:
    """Whether ``eqn`` sums over all the lanes of ``axis_name`` (not over groups of them)."""
    axes = _compat.lane_sum_axes(eqn)
    return axes is not None and axis_name in axes


def _sums_over_lanes(jaxpr: Jaxpr, axis_name: Hashable) -> bool:
    """Whether ``jaxpr`` (nested programs included) has a psum over ``axis_name``."""
    for eqn in jaxpr.eqns:
        if _reduces_over(eqn, axis_name):
            return True
        if any(_sums_over_lanes(_open(sub)[0], axis_name) for sub in jaxprs_in_params(eqn.params)):
            return True
    return False


def fused_lanes(jaxpr: ClosedJaxpr, inputs: Sequence[bool], axis_name: Hashable) -> Callable[..., list] | None:
    """The per-lane program ``jaxpr`` with sums over the lanes of per-lane products fused.

    Squared norms of per-lane products (per-example gradient norms) are
    computed without the products (:mod:`smap.transform._lane_norms`) on the
    way. Returns a function of the program's inputs, to be mapped over
    ``axis_name`` (``jax.vmap`` or any mapping that implements ``all_gather``),
    or None when the program has neither a ``psum`` over ``axis_name`` nor a
    square.

    Arguments:
        jaxpr: the per-lane program.
        inputs: for each input, whether it differs between lanes.
        axis_name: the mapped axis.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from smap.transform._fuse import fused_lanes
        >>> def lane(x, g):
        ...     return jax.lax.psum(jnp.outer(x, g), "i")
        >>> x, g = jnp.ones((8, 3)), jnp.ones((8, 2))
        >>> program = jax.make_jaxpr(lane, axis_env=[("i", 8)])(x[0], g[0])
        >>> fused = fused_lanes(program, [True, True], "i")
        >>> summed = jax.vmap(lambda *a: fused(*a)[0], axis_name="i", out_axes=None)(x, g)
        >>> bool(jnp.all(summed == x.T @ g))
        True
    """
    if not (_sums_over_lanes(jaxpr.jaxpr, axis_name) or has_squares(jaxpr.jaxpr)):
        return None

    def lane(*args: Any) -> list:
        nodes = [_Node(a, bool(d)) for a, d in zip(args, inputs)]
        return [n.value for n in _evaluate(jaxpr.jaxpr, jaxpr.consts, nodes, axis_name)]

    return lane


def _evaluate(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[_Node], axis_name: Hashable) -> list[_Node]:
    env: dict[Any, _Node] = {v: _Node(c, False) for v, c in zip(jaxpr.constvars, consts)}
    env.update(zip(jaxpr.invars, args))
    read = lambda v: _Node(v.val, False) if isinstance(v, Literal) else env[v]  # noqa: E731
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        if _reduces_over(eqn, axis_name):
            outs = _psum(eqn, ins, axis_name)
        elif _compat.is_plain_call(eqn) and not is_lane_sum(eqn):
            sub, sub_consts = _open(_compat.call_body(eqn))
            outs = _evaluate(sub, sub_consts, ins, axis_name)
        elif _scan_sums_over_lanes(eqn, axis_name):
            outs = _scan(eqn, ins, axis_name)
        elif (norm := squared_norm(eqn, ins)) is not None:
            deps = _lane_dependent_outputs(eqn, [n.dependent for n in ins], axis_name)
            outs = [_Node(v, d) for v, d in zip(norm, deps)]
        else:
            values = _compat.bind_equation(eqn, [n.value for n in ins])
            deps = _lane_dependent_outputs(eqn, [n.dependent for n in ins], axis_name)
            single = len(values) == 1
            outs = [_Node(v, d, eqn if single else None, tuple(ins)) for v, d in zip(values, deps)]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _psum(eqn: Any, ins: list[_Node], axis_name: Hashable) -> list[_Node]:
    others = tuple(a for a in _compat.lane_sum_axes(eqn) or () if a != axis_name)
    outs = []
    for node in ins:
        dtype = jnp.result_type(node.value)
        plan = _summed(node, None, axis_name, dtype) if node.dependent else None
        if plan is None:
            value = _compat.bind_equation(eqn, [node.value])[0]
        else:
            value = _lane_sum(plan, axis_name)
            value = jax.lax.psum(value, others) if others else value
            value = value.astype(dtype)  # the psum's own dtype, which the fused sum never narrowed
        outs.append(_Node(value, False))
    return outs


def _inexact(dtype: Any) -> bool:
    return jnp.issubdtype(dtype, jnp.inexact)


def _summed(node: _Node, scale: Any, axis_name: Hashable, dtype: Any) -> Callable[[], Any] | None:
    """How to compute ``psum`` over the lanes of ``scale * node`` (``scale`` a per-lane
    scalar or None) without per-lane products, or None when ``node`` is not recognised
    as linear in them. ``dtype`` is the psum's: the sum accumulates in no narrower one."""
    eqn = node.eqn
    if eqn is None or not node.dependent or not _inexact(jnp.result_type(node.value)):
        return None
    name, ins = _compat.primitive_name(eqn), node.inputs
    if name == _compat.DOT_GENERAL:
        a, b = ins
        if not (a.dependent and b.dependent):
            return None
        dims, options = _compat.dot_layout(eqn)
        return functools.partial(_product, a.value, b.value, scale, dims, options, axis_name, dtype)
    linear = name in _compat.LINEAR_PRIMITIVES and (name != _compat.CONVERT or _compat.converts_floats(eqn))
    if linear and name == _compat.CONVERT and scale is not None and _complex_to_real(eqn):
        return None  # taking the real part does not commute with a (complex) per-lane factor
    if linear and len(ins) == 1:
        inner = _summed(ins[0], scale, axis_name, dtype)
        return None if inner is None else functools.partial(_rebind_of, eqn, [inner], dtype)
    if name in _compat.SUM_PRIMITIVES:
        parts = [_summed(n, scale, axis_name, dtype) for n in ins]
        return None if any(p is None for p in parts) else functools.partial(_rebind_of, eqn, parts, dtype)
    if name in (_compat.MUL, _compat.DIV):
        x, y = ins
        if not y.dependent:
            inner = _summed(x, scale, axis_name, dtype)
            return None if inner is None else functools.partial(_rebind_of, eqn, [inner, y.value], dtype)
        if name == _compat.MUL and not x.dependent:
            inner = _summed(y, scale, axis_name, dtype)
            return None if inner is None else functools.partial(_rebind_of, eqn, [x.value, inner], dtype)
        if name == _compat.MUL:
            for factor, other in ((y, x), (x, y)):
                if jnp.ndim(factor.value) == 0:
                    plan = _summed(other, factor.value if scale is None else scale * factor.value, axis_name, dtype)
                    if plan is not None:
                        return plan
    if jnp.promote_types(jnp.result_type(node.value), dtype) != jnp.result_type(node.value):
        return None  # the layer rules sum in the gradient's own dtype: only where the psum's is no wider
    return layer_sum(node, scale, axis_name, lambda n, s: _summed(n, s, axis_name, dtype))


def _product(a: Any, b: Any, scale: Any, dims: tuple, options: dict, axis_name: Hashable, dtype: Any) -> Any:
    """The sum over the lanes of ``scale * dot_general(a, b)``, accumulated in no narrower
    dtype than the product's and the psum's ``dtype``; ``scale`` (a per-lane scalar or None)
    is applied in the wider of its dtype and the operands'."""
    out = jnp.promote_types(options["preferred_element_type"] or jnp.result_type(a, b), dtype)
    if scale is not None:
        operands = jnp.promote_types(jnp.result_type(a, b), jnp.result_type(scale))
        a, b = a.astype(operands) * scale.astype(operands), b.astype(operands)
        out = jnp.promote_types(out, operands)
    return _contraction(a, b, dims, {**options, "preferred_element_type": out}, axis_name)


def _complex_to_real(eqn: Any) -> bool:
    complex_ = lambda dtype: jnp.issubdtype(dtype, jnp.complexfloating)  # noqa: E731
    return complex_(_compat.convert_source(eqn)) and not complex_(_compat.convert_target(eqn))


def _widened(dtype: Any, floor: Any) -> Any:
    """``dtype``, widened to ``floor``'s precision (complex only where ``dtype`` is complex)."""
    if jnp.issubdtype(floor, jnp.complexfloating) and not jnp.issubdtype(dtype, jnp.complexfloating):
        floor = jnp.finfo(floor).dtype
    return jnp.promote_types(dtype, floor)


def _rebind_of(eqn: Any, ins: list, dtype: Any) -> Any:
    """``eqn`` applied to ``ins``, each a value or a plan (a function of no arguments) to compute it.

    A plan's value may be wider than the equation's input (see :func:`_product`):
    the other inputs are widened to it, and a float convert converts to no
    narrower than the psum's ``dtype``.
    """
    values = [x() if callable(x) else x for x in ins]
    if _compat.primitive_name(eqn) == _compat.CONVERT:
        (value,) = values
        new_dtype = _compat.convert_target(eqn)
        if _complex_to_real(eqn):  # the program's own real part
            target = _widened(new_dtype, _widened(jnp.result_type(value), dtype))
        else:  # a value made complex by a per-lane factor stays complex
            target = jnp.promote_types(new_dtype, jnp.promote_types(jnp.result_type(value), dtype))
        if target == new_dtype:
            return _compat.bind_equation(eqn, values)[0]
        return jax.lax.convert_element_type(value, target)
    wide = functools.reduce(jnp.promote_types, [jnp.result_type(v) for v in values])
    return _compat.bind_equation(eqn, [v if jnp.result_type(v) == wide else v.astype(wide) for v in values])[0]


def _scan_sums_over_lanes(eqn: Any, axis_name: Hashable) -> bool:
    """A scan whose body has a psum over ``axis_name``."""
    return _compat.is_scan(eqn) and _sums_over_lanes(_open(_compat.scan_parts(eqn)[0])[0], axis_name)


def _scan(eqn: Any, ins: list[_Node], axis_name: Hashable) -> list[_Node]:
    """A scan whose body sums over the lanes: its body is evaluated by this pass too."""
    body, n_consts, n_carry = _compat.scan_parts(eqn)
    body_jaxpr, body_consts = _open(body)
    deps = [n.dependent for n in ins]
    carry_deps = deps[n_consts : n_consts + n_carry]
    while True:  # the carry is per lane once any iteration makes it so (as in _lanes)
        outs = lane_dependent(body_jaxpr, deps[:n_consts] + carry_deps + deps[n_consts + n_carry :], axis_name)
        new = [a or b for a, b in zip(carry_deps, outs[:n_carry])]
        if new == carry_deps:
            break
        carry_deps = new
    consts = ins[:n_consts]
    xs_deps = deps[n_consts + n_carry :]

    def step(carry: list, xs: list) -> tuple[list, list]:
        nodes = [*consts, *map(_Node, carry, carry_deps), *map(_Node, xs, xs_deps)]
        out = [n.value for n in _evaluate(body_jaxpr, body_consts, nodes, axis_name)]
        return out[:n_carry], out[n_carry:]

    init = [n.value for n in ins[n_consts : n_consts + n_carry]]
    xs = [n.value for n in ins[n_consts + n_carry :]]
    carry, ys = jax.lax.scan(step, init, xs, **_compat.scan_options(eqn))
    return [_Node(v, d) for v, d in zip([*carry, *ys], carry_deps + outs[n_carry:])]
