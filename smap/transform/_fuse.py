"""Sums over the lanes of per-lane products, computed as one product over the lanes.

A lane's weight gradient is a product of two per-lane values (for ``x @ w``,
the outer product of the lane's input and its output's cotangent); a ``psum``
of it over the lanes, vectorized, holds one product per lane and then sums
them. The same sum is one ``dot_general`` that also contracts over the
lanes: ``psum_L(dot(a, b)) == dot(all_gather_L(a), all_gather_L(b))``, and
under ``jax.vmap`` the ``all_gather`` of a batched value is the batched
array itself. Where a lane's product contracts dimensions of its own
(tokens), the product may be one per group of lanes, summed over the groups
(:mod:`smap.transform._lane_groups`): never one per lane.

:func:`fused_lanes` re-evaluates a per-lane program with every ``psum`` over
the mapping's axis whose operand is linear in such products (through
transposes, reshapes, float converts, negations, sums, scalings by
lane-independent values or by per-lane scalars) computed that way. Each
fused psum is a call named after :data:`LANE_SUM` and its lane axis, so a
layer where a device holds a block of lanes rewrites the lane sums over its
own axis (:func:`is_lane_sum`) to sum over the device's lanes, then over
devices (:func:`sum_over_lanes`).

The fused sum never works in a narrower or a real dtype where the program
did not: the product accumulates in the wider of its dtype and the psum's, a
per-lane factor is applied in the wider of its dtype and the operand's, and
a float convert between the product and the psum converts to no narrower
than the psum's dtype. A per-lane value in float16 is not looked through: a
lane's product may overflow to inf as written, and the fused sum would not.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr

from .. import _compat, _interpret
from ._fuse_layers import layer_sum
from ._lane_groups import grouped_contraction, is_lane_product, rebind_lane_product
from ._lane_norms import conv_in_its_order, has_squares, overflows_sooner, squared_norm
from ._lanes import lanes_rule

__all__ = ["fused_lanes", "is_lane_sum", "sum_over_lanes", "LANE_SUM"]

LANE_SUM = "_smap_lane_sum"

# The axes lane sums sum over: a lane sum's call is named LANE_SUM, "_", the axis's number here.
_LANE_AXES: dict[Hashable, int] = {}
_LANE_AXES_LOCK = threading.Lock()


def _lane_sum(compute: Callable[[], Any], axis_name: Hashable) -> Any:
    """``compute()`` as a lane sum's call: a psum over the lanes of ``axis_name``, which its name records."""
    with _LANE_AXES_LOCK:
        number = _LANE_AXES.setdefault(axis_name, len(_LANE_AXES))

    def call() -> Any:
        return compute()

    call.__name__ = call.__qualname__ = f"{LANE_SUM}_{number}"
    return jax.jit(call)()


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

    def rule(e: Any, e_ins: list) -> list:
        if is_lane_product(e):  # made again for this device's lanes (its groups)
            return rebind_lane_product(e, e_ins)
        if _compat.names_axis(e, lane_axis):
            return _compat.bind_gathering_over(e, e_ins, axis_name, axis_size)
        return _interpret.bind(e, e_ins)

    return _interpret.evaluate(_compat.call_body(eqn), ins, rule)


@dataclasses.dataclass(frozen=True, eq=False)
class _Node:
    """A value of the re-evaluated program, with the equation that computed it."""

    value: Any
    dependent: bool
    eqn: Any = None
    inputs: tuple[_Node, ...] = ()
    made: tuple[Any, tuple[int, ...]] | None = None  # (value in the order it is made, the order to ``value``)


def _reduces_over(eqn: Any, axis_name: Hashable) -> bool:
    """Whether ``eqn`` sums over all the lanes of ``axis_name`` (not over groups of them)."""
    axes = _compat.lane_sum_axes(eqn)
    return axes is not None and axis_name in axes


def fused_lanes(jaxpr: ClosedJaxpr, inputs: Sequence[bool], axis_name: Hashable) -> Callable[..., list] | None:
    """The per-lane program ``jaxpr`` with sums over the lanes of per-lane products fused.

    Squared norms of per-lane products (per-example gradient norms) are
    computed without the products (:mod:`smap.transform._lane_norms`) on the
    way. ``inputs`` says which inputs differ between lanes. Returns a function
    of the program's inputs, to be mapped over ``axis_name`` (``jax.vmap`` or
    any mapping that implements ``all_gather``), or None when the program has
    neither a ``psum`` over ``axis_name`` nor a square.

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
    squares = has_squares(jaxpr)
    if not (squares or _interpret.reaches(jaxpr, lambda eqn: _reduces_over(eqn, axis_name))):
        return None
    lanes = lanes_rule(axis_name)
    materialised: set[_Node] = set()  # per-lane products made as written for their norms

    # The interpreter's rule, on nodes: psums over the lanes fused, plain calls and scans that hold one
    # followed, anything else bound as it is.
    def rule(eqn: Any, ins: list[_Node]) -> list[_Node]:
        if _reduces_over(eqn, axis_name):
            return _psum(eqn, ins, axis_name, materialised)
        if _compat.is_plain_call(eqn) and not is_lane_sum(eqn):
            return _interpret.evaluate(_compat.call_body(eqn), ins, rule, _leaf)
        deps = [n.dependent for n in ins]
        if _compat.is_scan(eqn) and _interpret.inside(eqn, lambda e: _reduces_over(e, axis_name)):
            # The body's inputs are per lane as the analysis finds them at its fixed point.
            facts: dict[Any, bool] = {}
            outs = _interpret.analyse_equation(eqn, deps, lanes, record=facts)

            def run(body: Any, args: list) -> list:
                invars = _compat.open_jaxpr(body).invars
                nodes = [a if isinstance(a, _Node) else _Node(a, facts[v]) for a, v in zip(args, invars)]
                return [n.value for n in _interpret.evaluate(body, nodes, rule, _leaf)]

            values = _interpret.nested(eqn, ins, run, lambda n: n.value)
            assert values is not None
            return [_Node(v, d) for v, d in zip(values, outs)]
        norm = squared_norm(eqn, ins, materialised)
        made = conv_in_its_order(eqn, ins) if squares and norm is None else None
        if made is not None:  # a kernel gradient whose product the norms keep, made in its own order
            (dependent,) = _interpret.analyse_equation(eqn, deps, lanes)
            return [_Node(made[0], dependent, eqn, tuple(ins), made[1])]
        values = norm if norm is not None else _interpret.bind(eqn, [n.value for n in ins])
        made_by = eqn if norm is None and len(values) == 1 else None  # what the fusion may look through
        return [_Node(v, d, made_by, tuple(ins)) for v, d in zip(values, _interpret.analyse_equation(eqn, deps, lanes))]

    def lane(*args: Any) -> list:
        nodes = [_Node(a, bool(d)) for a, d in zip(args, inputs)]
        return [n.value for n in _interpret.evaluate(jaxpr, nodes, rule, _leaf)]

    return lane


def _leaf(value: Any) -> _Node:
    """A literal's or a constant's node: the same in every lane."""
    return _Node(value, False)


def _psum(eqn: Any, ins: list[_Node], axis_name: Hashable, materialised: set[_Node]) -> list[_Node]:
    others = tuple(a for a in _compat.lane_sum_axes(eqn) or () if a != axis_name)
    outs = []
    for node in ins:
        dtype = jnp.result_type(node.value)
        plan = _summed(node, None, axis_name, dtype, materialised) if node.dependent else None
        if plan is None:
            value = _compat.bind_equation(eqn, [node.value])[0]
        else:
            value = _lane_sum(plan, axis_name)
            value = jax.lax.psum(value, others) if others else value
            value = value.astype(dtype)  # the psum's own dtype, which the fused sum never narrowed
        outs.append(_Node(value, False))
    return outs


def _summed(
    node: _Node, scale: Any, axis_name: Hashable, dtype: Any, materialised: set[_Node]
) -> Callable[[], Any] | None:
    """How to compute ``psum`` over the lanes of ``scale * node`` (``scale`` a per-lane
    scalar or None) without per-lane products, or None when ``node`` is not recognised
    as linear in them. ``dtype`` is the psum's: the sum accumulates in no narrower one.
    A product in ``materialised`` exists per lane already: the psum is computed as written
    (a weighted sum of the products over the lanes, where they are)."""
    eqn = node.eqn
    if node in materialised and node.made is not None:  # a product made per lane, in its own order: summed there
        return functools.partial(_made_sum, node.made, scale, axis_name, dtype)
    if eqn is None or not node.dependent or node in materialised:
        return None  # no equation to look through, the same in every lane, or a product made per lane
    if not jnp.issubdtype(jnp.result_type(node.value), jnp.inexact) or overflows_sooner(node.value):
        return None  # an integer sum, or a float16 lane's product that may be inf as written
    summed = functools.partial(_summed, axis_name=axis_name, dtype=dtype, materialised=materialised)
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
    if (linear and len(ins) == 1) or name in _compat.SUM_PRIMITIVES:
        return _rebound(eqn, [summed(n, scale) for n in ins], dtype)
    if name in (_compat.MUL, _compat.DIV):
        x, y = ins
        if not y.dependent:
            return _rebound(eqn, [summed(x, scale), y.value], dtype)
        if name == _compat.MUL and not x.dependent:
            return _rebound(eqn, [x.value, summed(y, scale)], dtype)
        if name == _compat.MUL:
            for factor, other in ((y, x), (x, y)):
                if jnp.ndim(factor.value) == 0:
                    plan = summed(other, factor.value if scale is None else scale * factor.value)
                    if plan is not None:
                        return plan
    if jnp.promote_types(jnp.result_type(node.value), dtype) != jnp.result_type(node.value):
        return None  # the layer rules sum in the gradient's own dtype: only where the psum's is no wider
    return layer_sum(node, scale, axis_name, summed)


def _rebound(eqn: Any, ins: list, dtype: Any) -> Callable[[], Any] | None:
    """The plan that applies ``eqn`` to ``ins`` (values, or plans of them); None when a plan is missing."""
    return None if any(x is None for x in ins) else functools.partial(_rebind_of, eqn, ins, dtype)


def _product(a: Any, b: Any, scale: Any, dims: tuple, options: dict, axis_name: Hashable, dtype: Any) -> Any:
    """The sum over the lanes of ``scale * dot_general(a, b)``, accumulated in no narrower
    dtype than the product's and the psum's ``dtype``; ``scale`` (a per-lane scalar or None)
    is applied in the wider of its dtype and the operands'."""
    out = jnp.promote_types(options["preferred_element_type"] or jnp.result_type(a, b), dtype)
    if scale is not None:
        operands = jnp.promote_types(jnp.result_type(a, b), jnp.result_type(scale))
        a, b = a.astype(operands) * scale.astype(operands), b.astype(operands)
        out = jnp.promote_types(out, operands)
    return grouped_contraction(a, b, dims, {**options, "preferred_element_type": out}, axis_name)


def _made_sum(made: tuple[Any, tuple[int, ...]], scale: Any, axis_name: Hashable, dtype: Any) -> Any:
    """The sum over the lanes of ``scale * transpose(value, order)`` for ``made = (value, order)``
    (``scale`` a per-lane scalar or None): summed in ``value``'s order with the lanes gathered before
    its last dim, where a mapped convolution holds them (no copy into another order), then reordered.
    Accumulated in no narrower a dtype than the value's and the psum's ``dtype``, the factor applied
    in the wider of its dtype and the value's."""
    value, order = made
    out = jnp.promote_types(jnp.result_type(value), dtype)
    lane = jnp.ndim(value) - 1
    values = jax.lax.all_gather(value, axis_name, axis=lane)
    if scale is not None:
        out = jnp.promote_types(out, jnp.result_type(scale))
        # The factors as (1, ..., lanes, 1): a product broadcast over the size-1 dims, whatever the lanes.
        weights = jax.lax.all_gather(jnp.reshape(scale, (1,) * jnp.ndim(value)).astype(out), axis_name, axis=lane)
        values = jax.lax.mul(values.astype(out), weights)
    return jnp.transpose(jnp.sum(values, lane, dtype=out), order)


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
