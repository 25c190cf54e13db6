"""Equal forms of a lane program's products and sums that XLA:CPU runs in its fused kernels.

The adapters run a device's lanes by re-evaluating the traced per-lane program
(:mod:`smap.transform._spanning`). Two forms that JAX writes come out of XLA:CPU
(JAX 0.10) several times slower than an equal form that XLA's partitioned
programs take, so the re-evaluation writes the equal form instead:

- **A product read only by a transpose that swaps its operands**
  (``dot_general(g, x)`` then ``.T``: JAX's transpose rule writes a weight
  gradient so) becomes ``dot_general(x, g)``. XLA:CPU runs the pair as a
  product of two transposed operands outside its fused kernels. Only where a
  device runs its lane without ``jax.vmap`` (under the local ``jax.vmap`` the
  product is batched and another form is the slow one), and for float32 and
  float64 products (a bfloat16 product may round otherwise in another kernel).
- **A sum that keeps an axis of size 1** (a lane's ``(1, length)`` block of
  one sequence) sums over that axis too and puts it back: the same elements,
  summed without an axis of size 1, which XLA:CPU's reductions run several
  times slower with.

Both are the same sums of the same products (float round-off apart: the
order XLA adds in), and each applies only where its pattern is found; a call
that holds one (``smap.grad``'s) is run inline so that it is found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Jaxpr, Literal

from .. import _compat, _interpret

__all__ = ["CpuForms"]


class CpuForms:
    """The rewrites of one lane program ``jaxpr`` (and the programs nested in it)."""

    def __init__(self, jaxpr: Jaxpr, swap_products: bool):
        self._swapped = _swapped_products(jaxpr) if swap_products else set()

    def _found(self, eqn: Any) -> bool:
        return (bool(eqn.outvars) and eqn.outvars[0] in self._swapped) or _keeps_unit_axes(eqn)

    def rewrite(self, eqn: Any, ins: list, rule: Callable[[Any, list], list]) -> list | None:
        """The outputs of ``eqn`` in the equal form, or None where it is not one of the patterns.

        ``rule`` evaluates the equations of a call run inline.
        """
        if eqn.outvars and eqn.outvars[0] in self._swapped:
            return [_Operands(eqn, ins)]  # read only by the transpose, which makes the product swapped
        if ins and isinstance(ins[0], _Operands):
            return [_swapped_product(ins[0])]
        if _keeps_unit_axes(eqn):
            return [_sum_without_unit_axes(eqn, ins[0])]
        if _interpret.inside(eqn, self._found):
            return _interpret.nested(eqn, ins, lambda program, args: _interpret.evaluate(program, args, rule))
        return None


_WIDE = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


@dataclasses.dataclass(frozen=True)
class _Operands:
    """A ``dot_general`` not made yet: the transpose that alone reads it makes the product swapped."""

    eqn: Any
    ins: list


def _swap_order(eqn: Any) -> tuple[int, ...] | None:
    """The permutation that turns ``dot_general(a, b)``'s result into ``dot_general(b, a)``'s (batch
    axes, then ``b``'s free ones, then ``a``'s); None for another equation or where it is the identity."""
    if _compat.primitive_name(eqn) != _compat.DOT_GENERAL or _compat.lays_out_result(eqn):
        return None
    if not all(v.aval.dtype in _WIDE for v in (*eqn.invars, *eqn.outvars)):
        return None  # a narrower product may round its result otherwise in another kernel
    (lhs_contract, _), (lhs_batch, _) = _compat.dot_layout(eqn)[0]
    n_batch = len(lhs_batch)
    n_lhs = len(eqn.invars[0].aval.shape) - n_batch - len(lhs_contract)
    n_rhs = len(eqn.outvars[0].aval.shape) - n_batch - n_lhs
    if not n_lhs or not n_rhs:
        return None
    return (*range(n_batch), *range(n_batch + n_lhs, n_batch + n_lhs + n_rhs), *range(n_batch, n_batch + n_lhs))


def _swapped_products(jaxpr: Jaxpr) -> set[Any]:
    """The results of products in ``jaxpr`` (and nested programs) read only by a transpose that swaps the operands."""
    uses: dict[Any, int] = {}
    producer: dict[Any, Any] = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, Literal):
                uses[v] = uses.get(v, 0) + 1
        producer.update((v, eqn) for v in eqn.outvars)
    for v in jaxpr.outvars:
        if not isinstance(v, Literal):
            uses[v] = uses.get(v, 0) + 2  # an output is read outside
    found = set()
    for eqn in jaxpr.eqns:
        permutation = _compat.transpose_permutation(eqn)
        source = eqn.invars[0] if permutation is not None else None
        product = None if source is None or isinstance(source, Literal) else producer.get(source)
        if product is not None and uses[source] == 1 and _swap_order(product) == permutation:
            found.add(source)
        for program in _compat.nested_programs(eqn):
            found |= _swapped_products(program)
    return found


def _swapped_product(operands: _Operands) -> jax.Array:
    """``dot_general(b, a)``: the transpose of the product that ``operands`` describes."""
    (contract, batch), options = _compat.dot_layout(operands.eqn)
    precision = options["precision"]
    if isinstance(precision, tuple):
        precision = precision[::-1]
    lhs, rhs = operands.ins
    return jax.lax.dot_general(
        rhs,
        lhs,
        (contract[::-1], batch[::-1]),
        precision=precision,
        preferred_element_type=options["preferred_element_type"],
    )


def _unit_axes(eqn: Any) -> tuple[int, ...]:
    axes = _compat.summed_axes(eqn) or ()
    return tuple(i for i, n in enumerate(eqn.invars[0].aval.shape) if n == 1 and i not in axes)


def _keeps_unit_axes(eqn: Any) -> bool:
    """Whether ``eqn`` is a sum over some axes of an operand with an axis of size 1 that it keeps."""
    if _compat.lays_out_result(eqn):
        return False
    return bool(_compat.summed_axes(eqn)) and bool(_unit_axes(eqn))


def _sum_without_unit_axes(eqn: Any, x: jax.Array) -> jax.Array:
    """The sum ``eqn`` makes, taken over its axes and the operand's kept axes of size 1, which are put back."""
    axes, units = _compat.summed_axes(eqn) or (), _unit_axes(eqn)
    (total,) = _compat.bind_equation(eqn, [x], axes=tuple(sorted((*axes, *units))))
    return jax.lax.expand_dims(total, [u - sum(a < u for a in axes) for u in units])
