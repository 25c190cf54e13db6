"""Per-lane squared norms of per-lane weight gradients, computed without the gradients.

Differentially private training clips each example's gradient to a norm
bound: each lane computes ``sum(g ** 2)`` of its own weight gradient ``g``.
Written literally, that materialises one gradient per lane (``f32[lanes, in,
out]``) only to square and sum it. A dense layer's weight gradient is a
product summed over the lane's tokens, ``g = sum_t a_t d_t^T`` (``a`` the
layer's input, ``d`` its output's cotangent), and its squared norm is

    ||g||^2 = sum_{t,s} (a_t . a_s) (d_t . d_s)

(the Gram matrices of the inputs and of the cotangents, multiplied entry by
entry and summed; for one token, ``|a|^2 |d|^2``). That costs
``T^2 (p + d)`` per lane instead of ``T p d`` for the product, and memory
``T^2`` instead of ``p d``: :func:`squared_norm` uses it for a layer where
``T (p + d) <= p d``. Elsewhere the product is made as written, one per lane,
and is *materialised*: :func:`squared_norm` names it, so that the fusion sums
it over the lanes as it is (a weighted sum, ``p d`` per lane) instead of
making the product again over the lanes (``T p d`` per lane); holding it
costs ``p d`` per lane, less than its operands' ``T (p + d)``.

A convolution ``conv(x, k)`` is the same kind of product, summed over tokens
that are pairs of an input feature of ``x`` and a window position of ``k``:
``a_t`` is the strided slice of the padded ``x`` at that window position,
``d_t`` the entries of ``k`` there. For a layer's kernel gradient, which JAX
writes as the convolution of the layer's input with its output's cotangent,
the tokens are the layer's (example, output position) pairs, ``p`` its
kernel offsets times its input features and ``d`` its output features. The
slices are taken per window position or per output position, whichever are
fewer (at most :data:`MAX_CONV_SLICES`).

An embedding's gradient is a scatter-add of the cotangent's rows at the token
ids: its squared norm is that of the rows summed per distinct id, which a
sort and a segment sum over the lane's ``T`` rows give without the table's
``(vocabulary, width)`` shape.

What is recognised (everything else is computed as written, one summand at
a time):

- the squared norm: a ``reduce_sum`` over every axis of a sum of squares
  (``x ** 2``, ``jnp.square(x)``, ``x * x``; ``optax.global_norm``,
  ``jnp.linalg.norm``), or ``jnp.vdot(g, g)``;
- the squared value: a per-lane ``dot_general`` of real floating operands
  (dense, einsum, attention projections; batch dimensions allowed), a
  ``conv_general_dilated`` without grouped features or batches (a
  convolution's kernel gradient; a grouped or depthwise one is computed as
  written) or a scatter-add of rows into zeros (an embedding's gradient), reached through
  steps that keep the entries up to order and sign (transposes, reshapes,
  negation, widening float converts, zero padding) and scalings by a scalar
  (lane-dependent or not), whose square scales the norm.

The norm is accumulated in the squared value's dtype or wider, never
narrower. A NaN in a lane's operands gives that lane a NaN norm, as the
materialised gradient does; a float16 product, which may overflow to inf as
written, is made as written.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .. import _compat, _interpret

__all__ = ["squared_norm", "has_squares", "overflows_sooner", "conv_in_its_order"]

Plan = Callable[[Any], Any]  # the squared norm, accumulated in the dtype given

# Slices of a convolution's input per output or window position: more are not unrolled.
MAX_CONV_SLICES = 64


@dataclasses.dataclass(frozen=True, eq=False)
class _Materialised:
    """A recognised per-lane product that is cheaper made as written: its node, and the plan
    that squares it where that is not the value as written."""

    product: Any
    plan: Plan | None = None


def has_squares(jaxpr: Any) -> bool:
    """Whether ``jaxpr`` (nested programs included) squares a value or takes a scalar ``dot_general``:
    a squared norm that :func:`squared_norm` might compute.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from smap.transform._lane_norms import has_squares
        >>> has_squares(jax.make_jaxpr(lambda g: jnp.sum(g**2))(jnp.ones(3)).jaxpr)
        True
        >>> has_squares(jax.make_jaxpr(lambda g: jnp.sum(g * 2))(jnp.ones(3)).jaxpr)
        False
    """
    return _interpret.reaches(jaxpr, lambda eqn: _compat.squares(eqn) or _is_vdot(eqn))


def squared_norm(eqn: Any, ins: list, materialised: set | None = None) -> list | None:
    """The outputs of ``eqn`` when it is a squared norm of per-lane products, computed without
    them; None when it is not recognised (then the equation runs as written).

    Arguments:
        eqn: an equation of the per-lane program.
        ins: its inputs as nodes of the re-evaluated program (``value``,
            ``dependent``, the ``eqn`` that computed it and its ``inputs``).
        materialised: where to add the nodes of the per-lane products whose
            norm is computed from the products as written (the cost rule chose
            them): their per-lane values exist in the program.

    Example:
        >>> import jax, jax.numpy as jnp, smap
        >>> w = smap.ParamState(jnp.ones((3, 2)))
        >>> def lane(x):
        ...     g = smap.grad(lambda: jnp.sum(x @ w.value), grad_states=w)()
        ...     return jnp.sum(g**2), jax.lax.psum(g, "batch")
        >>> norms, _ = smap.StatefulMapping(lane, axis_name="batch", out_axes=(0, None))(jnp.ones((4, 3)))
        >>> norms.tolist()  # |x|^2 |1|^2 = 3 * 2
        [6.0, 6.0, 6.0, 6.0]
    """
    name = _compat.primitive_name(eqn)
    found: list = []
    if name == _compat.REDUCE_SUM and _compat.sums_every_axis(eqn):
        parts = _addends(ins[0])
        plans = [_planned(_square_of(part), found) for part in parts]
        _record(found, materialised)
        if all(plan is None for plan in plans):
            return None
        dtype = jnp.result_type(ins[0].value)
        total = functools.reduce(
            jnp.add,
            [
                _compat.bind_equation(eqn, [part.value])[0] if plan is None else plan(dtype)
                for part, plan in zip(parts, plans)
            ],
        )
        return [total.astype(eqn.outvars[0].aval.dtype)]
    if _is_vdot(eqn):
        out_dtype = eqn.outvars[0].aval.dtype
        x, y = (_reshaped_from(n) for n in ins)
        plan = _planned(_norm(x), found) if x is y else None
        _record(found, materialised)
        return (
            None if plan is None else [plan(jnp.promote_types(jnp.result_type(x.value), out_dtype)).astype(out_dtype)]
        )
    return None


def _planned(plan: Plan | _Materialised | None, found: list) -> Plan | None:
    """``plan``; for a materialised product (noted in ``found``), the plan that squares it where
    it is not squared as written, or None."""
    if isinstance(plan, _Materialised):
        found.append(plan.product)
        return plan.plan
    return plan


def _record(found: list, materialised: set | None) -> None:
    if materialised is not None:
        materialised.update(found)


def _is_vdot(eqn: Any) -> bool:
    """A ``dot_general`` of two equal-shaped operands over all their axes, in order (``jnp.vdot``)."""
    if _compat.primitive_name(eqn) != _compat.DOT_GENERAL:
        return False
    (lhs_c, rhs_c), (lhs_b, _) = _compat.dot_layout(eqn)[0]
    x, y = (v.aval for v in eqn.invars)
    every = tuple(range(len(x.shape)))
    return x.shape == y.shape and not lhs_b and tuple(lhs_c) == every and tuple(rhs_c) == every


def _reshaped_from(node: Any) -> Any:
    """The value that ``node`` reshapes (reshapes keep the row-major order: ``ravel`` twice is the same)."""
    while node.eqn is not None and _compat.primitive_name(node.eqn) == _compat.RESHAPE:
        node = node.inputs[0]
    return node


def _addends(node: Any) -> list:
    """The summands of ``node`` (through ``add``s of equal shapes), each summed over every axis alone."""
    eqn = node.eqn
    if eqn is not None and _compat.primitive_name(eqn) in _compat.ADDS:
        if all(jnp.shape(n.value) == jnp.shape(node.value) for n in node.inputs):
            return [part for n in node.inputs for part in _addends(n)]
    return [node]


def _square_of(node: Any) -> Plan | _Materialised | None:
    if node.eqn is None or not _compat.squares(node.eqn):
        return None
    return _norm(node.inputs[0])


def _real_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def overflows_sooner(x: Any) -> bool:
    """Whether ``x``'s dtype overflows at a smaller magnitude than float32 (float16, the float8s).

    A per-lane product rounded to such a dtype is ±inf in a lane where it is
    too large (what dynamic loss scaling watches for), while a sum or a norm
    computed without the product stays finite: neither rewrite looks through one.
    """
    dtype = jnp.result_type(x)
    return jnp.issubdtype(dtype, jnp.inexact) and jnp.finfo(dtype).maxexp < jnp.finfo(jnp.float32).maxexp


def _norm(node: Any) -> Plan | _Materialised | None:
    """How to compute the squared norm of ``node`` without its value, the product to make as
    written where that is cheaper, or None."""
    if not _real_float(node.value):
        return None
    scales: list[tuple[Any, bool]] = []  # (scalar, divides)
    while node.eqn is not None:
        if overflows_sooner(node.value):
            return None
        eqn, name = node.eqn, _compat.primitive_name(node.eqn)
        if name in _compat.ENTRY_KEEPING or _compat.adds_entries(eqn) or _widens(eqn):
            node = node.inputs[0]
            continue
        if name in (_compat.MUL, _compat.DIV):
            x, y = node.inputs
            if jnp.ndim(y.value) == 0 and _real_float(y.value):
                scales.append((y.value, name == _compat.DIV))
                node = x
                continue
            if name == _compat.MUL and jnp.ndim(x.value) == 0 and _real_float(x.value):
                scales.append((x.value, False))
                node = y
                continue
        break
    rule = _RULES.get(_compat.primitive_name(node.eqn)) if node.eqn is not None else None
    found = rule(node) if rule is not None and node.dependent and _real_float(node.value) else None
    if found is None:
        return None
    if isinstance(found, _Materialised):
        made = getattr(node, "made", None)
        if made is None:
            return found  # squared as written
        # A convolution made in its own order (conv_in_its_order): squared there, not after a copy.
        plan: Plan = functools.partial(_square_sum, made[0])
    else:
        plan = found

    def scaled(dtype: Any) -> Any:
        value = plan(dtype)
        for scale, divides in scales:
            square = jnp.square(jnp.asarray(scale).astype(jnp.result_type(value)))
            value = value / square if divides else value * square
        return value

    return _Materialised(node, scaled) if isinstance(found, _Materialised) else scaled


def _square_sum(value: Any, dtype: Any) -> Any:
    """The sum of the squares of ``value``'s entries, in ``dtype`` or its own, whichever is wider."""
    return jnp.sum(jnp.square(value.astype(jnp.promote_types(value.dtype, dtype))))


def _widens(eqn: Any) -> bool:
    """A float convert to a dtype at least as wide (a narrowing one rounds the entries)."""
    if _compat.primitive_name(eqn) != _compat.CONVERT or not _compat.converts_floats(eqn):
        return False
    source, target = _compat.convert_source(eqn), _compat.convert_target(eqn)
    return jnp.promote_types(source, target) == target and not jnp.issubdtype(target, jnp.complexfloating)


# -- rules: the squared norm of a per-lane product ------------------------------------------


def _grouped(x: Any, batch: tuple, contract: tuple) -> Any:
    """``x`` as (batch, contracted, free): the product's batch, token and output axes."""
    free = tuple(d for d in range(jnp.ndim(x)) if d not in batch and d not in contract)
    x = jnp.transpose(x, (*batch, *contract, *free))
    size = lambda axes: math.prod(jnp.shape(x)[i] for i in axes)  # noqa: E731  (in the new order)
    n_b, n_c = len(batch), len(contract)
    return x.reshape(size(range(n_b)), size(range(n_b, n_b + n_c)), -1)


def _gram(node: Any) -> Plan | _Materialised | None:
    """``dot_general(a, b)`` contracting tokens: sum of the Gram matrices' product, when cheaper."""
    a, b = node.inputs
    if not (_real_float(a.value) and _real_float(b.value)):
        return None
    ((lhs_c, rhs_c), (lhs_b, rhs_b)), options = _compat.dot_layout(node.eqn)
    tokens = math.prod(jnp.shape(a.value)[i] for i in lhs_c)
    rows = math.prod(jnp.shape(a.value)) // max(1, tokens * math.prod(jnp.shape(a.value)[i] for i in lhs_b))
    cols = math.prod(jnp.shape(b.value)) // max(1, tokens * math.prod(jnp.shape(b.value)[i] for i in rhs_b))
    if _product_is_cheaper(tokens, rows, cols):
        return _Materialised(node)

    def plan(dtype: Any) -> Any:
        grams = []
        for x, batch, contract in ((a.value, lhs_b, lhs_c), (b.value, rhs_b, rhs_c)):
            # Widened before the product (exact): the Gram accumulates in no narrower a dtype.
            x = _grouped(x, tuple(batch), tuple(contract)).astype(jnp.promote_types(x.dtype, dtype))
            grams.append(jax.lax.dot_general(x, x, (((2,), (2,)), ((0,), (0,))), precision=options["precision"]))
        return jnp.sum(grams[0] * grams[1])

    return plan


def _conv_gram(node: Any) -> Plan | _Materialised | None:
    """``conv_general_dilated(x, k)``: the Gram matrices of its tokens (an input feature and a
    window position: the strided slice of the padded input there, and ``k``'s entries there)."""
    x, k = node.inputs
    geometry = _compat.conv_geometry(node.eqn)
    if geometry is None or not (_real_float(x.value) and _real_float(k.value)):
        return None
    lhs_spec, rhs_spec = geometry["lhs_spec"], geometry["rhs_spec"]
    window = tuple(jnp.shape(k.value)[d] for d in rhs_spec[2:])
    outputs = tuple(jnp.shape(node.value)[d] for d in geometry["out_spec"][2:])
    tokens, rows, out_features = _conv_sizes(jnp.shape(x.value), jnp.shape(k.value), jnp.shape(node.value), geometry)
    if _product_is_cheaper(tokens, rows, out_features):
        return _Materialised(node)
    if min(math.prod(window), math.prod(outputs)) > MAX_CONV_SLICES:
        return None

    def plan(dtype: Any) -> Any:
        lhs = jnp.transpose(x.value, lhs_spec)  # (batch, feature, spatial...)
        lhs = lhs.astype(jnp.promote_types(lhs.dtype, dtype))
        dilated = [(0, 0, 0), (0, 0, 0)]
        dilated += [(lo, hi, d - 1) for (lo, hi), d in zip(geometry["padding"], geometry["lhs_dilation"])]
        lhs = jax.lax.pad(lhs, jnp.zeros((), lhs.dtype), dilated)
        strides, dilation = geometry["strides"], geometry["rhs_dilation"]
        n = len(window)
        if math.prod(window) <= math.prod(outputs):  # a slice per window position: (batch, feature, outputs...)
            a = _strided_slices(lhs, window, dilation, outputs, strides)  # (window, batch, feature, outputs...)
            a = jnp.transpose(a, (2, 0, 1, *range(3, 3 + n)))
        else:  # a slice per output position: (batch, feature, window...)
            a = _strided_slices(lhs, outputs, strides, window, dilation)  # (outputs, batch, feature, window...)
            a = jnp.transpose(a, (2, *range(3, 3 + n), 1, 0))
        a = a.reshape(tokens, rows)  # tokens (feature, window position), row-major as k's
        b = jnp.transpose(k.value, (rhs_spec[1], *rhs_spec[2:], rhs_spec[0])).reshape(tokens, out_features)
        b = b.astype(jnp.promote_types(b.dtype, dtype))
        grams = [jax.lax.dot_general(v, v, (((1,), (1,)), ((), ())), precision=geometry["precision"]) for v in (a, b)]
        return jnp.sum(grams[0] * grams[1])

    return plan


def _product_is_cheaper(tokens: int, rows: int, cols: int) -> bool:
    """The cost rule: a (rows, cols) product of ``tokens`` contracted costs less than its two Gram
    matrices (``T (p + d) > p d``)."""
    return tokens * (rows + cols) > rows * cols


def _conv_sizes(lhs: Sequence[int], rhs: Sequence[int], out: Sequence[int], geometry: dict) -> tuple[int, int, int]:
    """A convolution's kernel gradient as a product: its tokens (input features times window
    positions), rows (batch times output positions) and columns (output features)."""
    tokens = lhs[geometry["lhs_spec"][1]] * math.prod(rhs[d] for d in geometry["rhs_spec"][2:])
    rows = lhs[geometry["lhs_spec"][0]] * math.prod(out[d] for d in geometry["out_spec"][2:])
    return tokens, rows, rhs[geometry["rhs_spec"][0]]


def conv_in_its_order(eqn: Any, ins: list) -> tuple[Any, tuple[Any, tuple[int, ...]]] | None:
    """A per-lane convolution of two per-lane operands (a kernel gradient) whose product the cost
    rule keeps for its norm: its output, and the same values as the convolution makes them,
    ``(made, order)`` with ``output == jnp.transpose(made, order)``; None for any other equation.

    ``made`` has the dims (batch, spatial..., feature). Mapped over the lanes, a convolution of
    two per-lane operands holds the lanes next to its output features, and XLA writes its output
    (batch, spatial..., lanes, features): the norms and the weighted sum over the lanes read it
    there, where the equation's own order (a kernel's, HWIO) would have it copied first.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from smap.transform._lane_norms import conv_in_its_order
        >>> from smap.transform._fuse import _Node
        >>> conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1,), "SAME")
        >>> x, k = jnp.ones((1, 2, 9)), jnp.ones((4, 2, 9))
        >>> (eqn,) = jax.make_jaxpr(conv)(x, k).eqns
        >>> value, (made, order) = conv_in_its_order(eqn, [_Node(x, True), _Node(k, True)])
        >>> made.shape, order, bool(jnp.all(value == conv(x, k)))
        ((1, 9, 4), (0, 2, 1), True)
    """
    if _compat.primitive_name(eqn) != _compat.CONV:
        return None
    x, k = ins
    geometry = _compat.conv_geometry(eqn)
    if geometry is None or not (x.dependent and k.dependent and _real_float(x.value) and _real_float(k.value)):
        return None
    out_shape = eqn.outvars[0].aval.shape
    if not _product_is_cheaper(*_conv_sizes(jnp.shape(x.value), jnp.shape(k.value), out_shape, geometry)):
        return None
    n, out_spec = len(out_shape) - 2, geometry["out_spec"]
    made = jax.lax.conv_general_dilated(
        x.value,
        k.value,
        geometry["strides"],
        [tuple(p) for p in geometry["padding"]],
        geometry["lhs_dilation"],
        geometry["rhs_dilation"],
        jax.lax.ConvDimensionNumbers(geometry["lhs_spec"], geometry["rhs_spec"], (0, n + 1, *range(1, n + 1))),
        precision=geometry["precision"],
        preferred_element_type=geometry["preferred_element_type"],
    )
    order = [0] * (n + 2)
    for made_dim, dim in zip((0, n + 1, *range(1, n + 1)), out_spec):
        order[dim] = made_dim
    return jnp.transpose(made, order).astype(eqn.outvars[0].aval.dtype), (made, tuple(order))


def _rows_per_id(node: Any) -> Plan | _Materialised | None:
    """An embedding's gradient ``scatter_add(zeros, ids, rows)``: the rows summed per distinct id."""
    operand, indices, updates = node.inputs
    mode = _compat.embedding_scatter(node.eqn)
    if mode is None or operand.eqn is None or not _compat.is_zeros(operand.eqn):
        return None
    vocabulary = jnp.shape(operand.value)[0]
    n = math.prod(jnp.shape(indices.value))
    if n == 0:
        return None
    if n > vocabulary:
        return _Materialised(node)  # more rows than the table: the table's shape is cheaper

    def plan(dtype: Any) -> Any:
        ids = indices.value.reshape(n)
        rows = updates.value.reshape(n, -1)
        rows = rows.astype(jnp.promote_types(rows.dtype, dtype))
        if mode == "clip":
            ids = jnp.clip(ids, 0, vocabulary - 1)
        else:  # out-of-range rows are dropped, as the scatter drops them
            rows = jnp.where(((ids >= 0) & (ids < vocabulary))[:, None], rows, 0)
        order = jnp.argsort(ids)
        ids, rows = ids[order], rows[order]
        first = jnp.concatenate([jnp.ones(1, bool), ids[1:] != ids[:-1]])
        summed = jax.ops.segment_sum(rows, jnp.cumsum(first) - 1, num_segments=n)
        return jnp.sum(summed * summed)

    return plan


def _strided_slices(
    lhs: Any, grid: Sequence[int], unit: Sequence[int], count: Sequence[int], step: Sequence[int]
) -> Any:
    """For each position ``at`` of ``grid`` (row-major), the slice of ``lhs``'s spatial dimensions
    (after batch and feature) from ``at * unit`` of ``count`` elements ``step`` apart, stacked first."""
    starts = [tuple(i * u for i, u in zip(at, unit)) for at in itertools.product(*map(range, grid))]
    return jnp.stack(
        [
            jax.lax.slice(
                lhs,
                (0, 0, *start),
                (*lhs.shape[:2], *(b + (c - 1) * s + 1 for b, c, s in zip(start, count, step))),
                (1, 1, *step),
            )
            for start in starts
        ]
    )


_RULES: dict[str, Callable[[Any], Plan | _Materialised | None]] = {
    _compat.DOT_GENERAL: _gram,
    _compat.CONV: _conv_gram,
    _compat.SCATTER_ADD: _rows_per_id,
}
