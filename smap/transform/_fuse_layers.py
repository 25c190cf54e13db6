"""Sums over the lanes of the weight gradients of embeddings, convolutions and slices, as one op.

The lane-sum fusion (:mod:`smap.transform._fuse`) computes a ``psum`` over
the lanes of per-lane products as one product over the lanes. Two more
layers differentiate to per-lane ops that are linear in per-lane values:

- An embedding ``table[tokens]`` differentiates to a scatter-add of the
  output's cotangent into zeros of the table's shape. Summed over the lanes,
  the per-lane scatter-adds are one scatter-add of every lane's rows:
  ``sum_l scatter_add(0, i_l, u_l) == scatter_add(0, [i_1..i_L], [u_1..u_L])``
  (the lanes become one more scatter dimension of the indices and the
  updates; indices that are the same in every lane are repeated), so no
  (lanes, vocabulary, width) array is made.
- A convolution's kernel gradient is a convolution of the input with the
  output's cotangent that sums over the (per-lane) batch dimension, which
  plays the input features' part. Summed over the lanes it is the same
  convolution over all lanes' examples, the batch step's form: the lanes are
  folded into that summed dimension of both operands (lane-major in both, so
  the pairs stay aligned). This holds where the input features are not
  grouped (``feature_group_count == 1``, which is how ``jax.grad`` writes the
  kernel gradient of a grouped or depthwise convolution: it groups the
  batch dimension instead, which the fold leaves alone).

A weight used in slices (``w[:, :k]``) has a gradient padded with zeros
around each slice's; the sum over the lanes of a zero-padded value is the
padded sum, so the fusion goes on through such ``pad``s.

Each recogniser returns a plan (a function of no arguments that computes the
sum over the lanes with ``all_gather`` over the mapped axis, as the fusion's
plans do) or None, and then the psum is computed as written. A per-lane
scalar factor moves onto the updates or the input, where it keeps their
dtype (otherwise the pattern is not recognised).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp

from .. import _compat

__all__ = ["layer_sum"]

Plan = Callable[[], Any]


def layer_sum(node: Any, scale: Any, axis_name: Hashable, summed: Callable[[Any, Any], Plan | None]) -> Plan | None:
    """How to sum ``scale * node`` over the lanes when ``node`` is an embedding's or a
    convolution's per-lane weight gradient, or a zero-padded one, or None.

    Arguments:
        node: a value of the re-evaluated program (``value``, ``dependent``,
            the ``eqn`` that computed it and its ``inputs``, nodes too).
        scale: a per-lane scalar, or None.
        axis_name: the mapped axis.
        summed: the fusion's own rule, ``summed(node, scale)``, for operands
            that are themselves sums of per-lane products.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import smap
        >>> table = smap.ParamState(jnp.ones((5, 2)))
        >>> def lane(tokens):
        ...     grad = smap.grad(lambda: jnp.sum(table.value[tokens] ** 2), grad_states=table)()
        ...     return jax.lax.psum(grad, "batch")
        >>> tokens = jnp.array([[0, 1], [1, 4]])
        >>> summed = smap.StatefulMapping(lane, axis_name="batch", out_axes=None)(tokens)
        >>> summed[:, 0].tolist()
        [2.0, 4.0, 0.0, 0.0, 2.0]
    """
    name = _compat.primitive_name(node.eqn)
    if name == _compat.SCATTER_ADD:
        return _scatter_add(node, scale, axis_name, summed)
    if name == _compat.CONV:
        return _convolution(node, scale, axis_name)
    if name == _compat.PAD and _compat.pads_with_zeros(node.eqn):
        inner = summed(node.inputs[0], scale)
        return None if inner is None else lambda: _compat.bind_equation(node.eqn, [inner(), node.inputs[1].value])[0]
    return None


def _keeps_dtype(x: Any, scale: Any) -> bool:
    """Whether ``scale * x`` has ``x``'s dtype (a complex or wider factor would change it)."""
    return scale is None or jnp.result_type(x.value, scale) == x.value.dtype


def _scaled(x: jax.Array, scale: Any) -> jax.Array:
    return x if scale is None else x * scale


def _scatter_add(node: Any, scale: Any, axis_name: Hashable, summed: Callable) -> Plan | None:
    operand, indices, updates = node.inputs
    if not updates.dependent or not _keeps_dtype(updates, scale):
        return None
    if operand.dependent:
        into = summed(operand, scale)
        if into is None:
            return None
    elif operand.eqn is not None and _compat.is_zeros(operand.eqn):
        into = lambda: operand.value  # noqa: E731  (a sum of zeros)
    else:
        return None

    def scatter() -> Any:
        lanes_updates = jax.lax.all_gather(_scaled(updates.value, scale), axis_name)
        lanes_indices = jax.lax.all_gather(indices.value, axis_name)
        return _compat.scatter_over_leading_axis(node.eqn, into(), lanes_indices, lanes_updates)

    return scatter


def _convolution(node: Any, scale: Any, axis_name: Hashable) -> Plan | None:
    lhs, rhs = node.inputs
    dims = _compat.conv_contracted_dims(node.eqn)
    if dims is None or not (lhs.dependent and rhs.dependent) or not _keeps_dtype(lhs, scale):
        return None
    lhs_dim, rhs_dim = dims

    def convolution() -> Any:
        # Lane-major along the summed dimension of both operands: all_gather tiled there.
        a = jax.lax.all_gather(_scaled(lhs.value, scale), axis_name, axis=lhs_dim, tiled=True)
        b = jax.lax.all_gather(rhs.value, axis_name, axis=rhs_dim, tiled=True)
        return _compat.bind_equation(node.eqn, [a, b])[0]

    return convolution
