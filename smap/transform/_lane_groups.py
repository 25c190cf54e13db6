"""How the lane-sum fusion writes its product over the lanes: one GEMM, or one per group of lanes.

The fusion (:mod:`smap.transform._fuse`) computes ``sum_l dot(a_l, b_l)`` as
a product that contracts the lanes too. Where each lane's product contracts
dimensions of its own (a sequence's tokens: ``x_l`` of shape (tokens, in),
the gradient ``x_l.T @ g_l``), the one product over all lanes is a GEMM with
a long contraction and a small output, and XLA:CPU runs it slower than the
same sum written per lane, a batched GEMM then a sum (measured on the
transformer step of ``scripts/bench_fusion.py``: the fused step took 1.22x
the unfused one on JAX 0.12; ``docs/performance.md``, section Fusion). The
per-lane form holds one weight-shaped array per lane. Between the two, the
lanes split into ``groups``: a batched GEMM over the groups, each
contracting its lanes' tokens, then a sum over the groups, which holds
``groups`` (at most :data:`MAX_GROUPS`) weight-shaped arrays, never one per
lane; on XLA:CPU it ran as fast as the per-lane form on JAX 0.10 and 0.12.

The rule (:func:`lane_groups`), per product, from its shapes and the backend:

- not on CPU (the measurements are CPU's), or a lane's product contracts
  nothing of its own (``x_l`` a vector: the lanes are the whole
  contraction, one GEMM is best): one group;
- otherwise the most groups, up to :data:`MAX_GROUPS` and fewer than the
  lanes, that divide the lanes and leave each group a contraction of at
  least :data:`MIN_GROUP_CONTRACTION` (lanes per group times a lane's own
  contraction): a shorter one is too small a GEMM to pay for its batch entry.

The groups change the order of the sum only (float round-off).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .. import _compat

__all__ = [
    "lane_groups",
    "grouped_contraction",
    "is_lane_product",
    "rebind_lane_product",
    "LANE_PRODUCT",
    "MAX_GROUPS",
    "MIN_GROUP_CONTRACTION",
]

MAX_GROUPS = 8
MIN_GROUP_CONTRACTION = 96


def lane_groups(lanes: int, lane_contraction: int, backend: str) -> int:
    """How many groups of lanes the fused product over ``lanes`` lanes is split into.

    Arguments:
        lanes: the lanes the product sums over (on a device, its own).
        lane_contraction: the size of the dimensions one lane's product contracts (1 if none).
        backend: ``jax.default_backend()``.

    Example:
        >>> from smap.transform._lane_groups import lane_groups
        >>> lane_groups(32, 24, "cpu"), lane_groups(64, 1, "cpu"), lane_groups(32, 24, "gpu")
        (8, 1, 1)
    """
    if backend != "cpu" or lane_contraction < 2:
        return 1
    fits = [
        groups
        for groups in range(2, min(MAX_GROUPS, lanes - 1) + 1)
        if lanes % groups == 0 and lanes // groups * lane_contraction >= MIN_GROUP_CONTRACTION
    ]
    return max(fits, default=1)


def grouped_contraction(a: Any, b: Any, dims: tuple, options: dict, axis_name: Hashable) -> jax.Array:
    """``sum`` over the lanes of ``axis_name`` of ``dot_general(a, b, dims)``: a product that also
    contracts the lanes, in :func:`lane_groups` groups summed in the product's dtype.

    The product of the gathered lanes is a call named after :data:`LANE_PRODUCT`
    and its ``dims`` and ``options``: a layer that evaluates it over other
    lanes (a device's own, :func:`smap.transform._fuse.sum_over_lanes`) makes it
    again for those (:func:`rebind_lane_product`), with their groups.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from smap.transform._lane_groups import grouped_contraction
        >>> x, g = jnp.ones((32, 24, 3)), jnp.ones((32, 24, 2))
        >>> dims, options = (((0,), (0,)), ((), ())), {"precision": None, "preferred_element_type": None}
        >>> total = jax.vmap(lambda a, b: grouped_contraction(a, b, dims, options, "i"), axis_name="i", out_axes=None)
        >>> total(x, g).tolist()
        [[768.0, 768.0], [768.0, 768.0], [768.0, 768.0]]
    """

    def call(every_a: jax.Array, every_b: jax.Array) -> jax.Array:
        return _over_lanes(every_a, every_b, dims, options)

    call.__name__ = call.__qualname__ = _product_name(dims, options)
    return jax.jit(call)(jax.lax.all_gather(a, axis_name), jax.lax.all_gather(b, axis_name))


LANE_PRODUCT = "_smap_lane_product"

# The (dims, options) of the lane products: a call is named LANE_PRODUCT, "_", its number here.
_PRODUCTS: list[tuple[tuple, dict]] = []
_PRODUCTS_LOCK = threading.Lock()


def _product_name(dims: tuple, options: dict) -> str:
    with _PRODUCTS_LOCK:
        if (dims, options) not in _PRODUCTS:
            _PRODUCTS.append((dims, options))
        return f"{LANE_PRODUCT}_{_PRODUCTS.index((dims, options))}"


def is_lane_product(eqn: Any) -> bool:
    """Whether ``eqn`` is the product over gathered lanes that :func:`grouped_contraction` wrote."""
    name = _compat.plain_call_name(eqn)
    return name is not None and name.startswith(LANE_PRODUCT + "_")


def rebind_lane_product(eqn: Any, ins: Sequence[Any]) -> list:
    """An ``is_lane_product`` equation applied to other lanes ``ins`` (gathered a, gathered b)."""
    name = _compat.plain_call_name(eqn)
    assert name is not None and is_lane_product(eqn), f"{eqn.primitive.name} is not a lane product"
    every_a, every_b = ins
    dims, options = _PRODUCTS[int(name.rsplit("_", 1)[1])]
    return [_over_lanes(every_a, every_b, dims, options)]


def _over_lanes(every_a: jax.Array, every_b: jax.Array, dims: tuple, options: dict) -> jax.Array:
    """The product of every lane's a and b (lanes first), contracting the lanes too."""
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dims
    lanes = every_a.shape[0]
    own = math.prod(every_a.shape[1 + d] for d in lhs_c)
    groups = lane_groups(lanes, own, jax.default_backend())
    leading = tuple(range(len(lhs_c)))
    if groups == 1:  # one product, the lanes contracted with each lane's own dims
        shift = lambda axes: tuple(d + 1 for d in axes)  # noqa: E731
        gathered = (((0, *shift(lhs_c)), (0, *shift(rhs_c))), (shift(lhs_b), shift(rhs_b)))
        return jax.lax.dot_general(every_a, every_b, gathered, **options)
    if lhs_c == rhs_c == leading and not lhs_b and not rhs_b:
        # Each lane contracts its leading dims (tokens): with the lanes of a group they are one
        # dim, contracted as the per-lane product contracts its own (no transposed operand).
        merge = lambda x: x.reshape(groups, lanes // groups * own, *x.shape[1 + len(leading) :])  # noqa: E731
        every_a, every_b = merge(every_a), merge(every_b)
        contracted, batch = ((1,), (1,)), ((0,), (0,))
    else:
        split = lambda x: x.reshape(groups, lanes // groups, *x.shape[1:])  # noqa: E731
        every_a, every_b = split(every_a), split(every_b)
        shift = lambda axes: tuple(d + 2 for d in axes)  # noqa: E731
        contracted, batch = ((1, *shift(lhs_c)), (1, *shift(rhs_c))), ((0, *shift(lhs_b)), (0, *shift(rhs_b)))
    per_group = jax.lax.dot_general(every_a, every_b, (contracted, batch), **options)
    return jnp.sum(per_group, axis=0, dtype=per_group.dtype)
