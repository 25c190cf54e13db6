"""Collectives that span devices and the lanes each device holds.

When a device holds several lanes, the per-lane program runs under a local
``jax.vmap`` inside ``shard_map`` (or ``pmap``). A collective the user wrote on
the mapping's ``axis_name`` must then reduce over both the local lanes and
the devices, and ``axis_index`` must give the global lane index
``device_index * lanes_per_device + local_index``. :func:`spanning_lane`
re-interprets the traced per-lane program with those collectives rewritten;
everything else is bound unchanged.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from smap.transform._fuse import is_lane_sum, sum_over_lanes

from . import _compat
from ._compat import jaxprs_in_params

__all__ = ["Span", "spanning_lane"]

_REDUCTIONS = ("psum", "pmax", "pmin", "psum_invariant")
_INLINED = ("pjit", "jit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call", "custom_vjp_call")
_fresh = itertools.count()


@dataclasses.dataclass(frozen=True)
class Span:
    """How the user's axis is laid out: devices (major) times local lanes (minor)."""

    axis_name: Hashable
    device_axes: tuple[Hashable, ...]
    device_sizes: tuple[int, ...]
    local_name: str
    local_size: int
    adapter: str

    @staticmethod
    def fresh_name(kind: str = "lanes") -> str:
        """A new axis name that no user program can mention."""
        return f"_smap_{kind}_{next(_fresh)}"

    def device_index(self) -> jax.Array:
        index = jnp.zeros((), jnp.int32)
        for name, size in zip(self.device_axes, self.device_sizes):
            index = index * size + jax.lax.axis_index(name)
        return index

    def lane_index(self) -> jax.Array:
        return self.device_index() * self.local_size + jax.lax.axis_index(self.local_name)


def _axes_param(params: dict) -> tuple[str, tuple] | None:
    for key in ("axes", "axis_name"):
        if key in params:
            value = params[key]
            return key, (tuple(value) if isinstance(value, (tuple, list)) else (value,))
    return None


def _mentions(jaxpr: Jaxpr, name: Hashable) -> bool:
    for eqn in jaxpr.eqns:
        found = _axes_param(eqn.params)
        if found and name in found[1]:
            return True
        if any(_mentions(_open(s), name) for s in jaxprs_in_params(eqn.params)):
            return True
    return False


def _open(jaxpr: Jaxpr | ClosedJaxpr) -> Jaxpr:
    return jaxpr.jaxpr if isinstance(jaxpr, ClosedJaxpr) else jaxpr


def _consts(jaxpr: Jaxpr | ClosedJaxpr) -> Sequence[Any]:
    return jaxpr.consts if isinstance(jaxpr, ClosedJaxpr) else ()


def spanning_lane(f: Callable, lane_avals: Sequence[Any], span: Span) -> Callable:
    """``f`` (a per-lane function) with collectives on ``span.axis_name`` spanning devices and lanes."""
    axis_size = span.local_size * math.prod(span.device_sizes)
    closed = jax.make_jaxpr(f, axis_env=[(span.axis_name, axis_size)])(*lane_avals)
    if not _mentions(closed.jaxpr, span.axis_name):
        return f

    def lane(*args: Any) -> list:
        return _evaluate(closed.jaxpr, closed.consts, args, span)

    return lane


def _evaluate(jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any], span: Span) -> list:
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, Literal) else env[v]

    for var, value in zip(jaxpr.constvars, consts):
        env[var] = value
    for var, value in zip(jaxpr.invars, args):
        env[var] = value
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        found = _axes_param(eqn.params)
        if found and span.axis_name in found[1]:
            outs = _collective(eqn, ins, found, span)
        elif is_lane_sum(eqn):
            # A sum over every lane written as products: over the device's own lanes, then over devices.
            outs = sum_over_lanes(eqn, ins, span.local_name, span.local_size)
            outs = [jax.lax.psum(y, span.device_axes) for y in outs]
        elif any(_mentions(_open(s), span.axis_name) for s in jaxprs_in_params(eqn.params)):
            outs = _structured(eqn, ins, span)
        else:
            outs = _compat.bind_equation(eqn, ins)
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    return [read(v) for v in jaxpr.outvars]


def _collective(eqn: Any, ins: list, found: tuple[str, tuple], span: Span) -> list:
    name = eqn.primitive.name
    key, axes = found
    others = tuple(a for a in axes if a != span.axis_name)
    if name in _REDUCTIONS:
        new_axes = others + (span.local_name, *span.device_axes)
        outs = eqn.primitive.bind(*ins, **{**eqn.params, key: new_axes})
        return list(outs) if eqn.primitive.multiple_results else [outs]
    if name == "axis_index":
        return [span.lane_index()]
    if name == "all_gather" and not others:
        return [_all_gather(ins[0], eqn.params, span)]
    if span.local_size == 1:
        # One lane per device: the device axes are the mapped axis, lane for lane.
        outs = eqn.primitive.bind(*ins, **{**eqn.params, key: others + span.device_axes})
        return list(outs) if eqn.primitive.multiple_results else [outs]
    raise NotImplementedError(
        f"{span.adapter}: the collective {name!r} on the mapped axis {span.axis_name!r} is not "
        f"supported when a device holds several lanes; psum, pmean, pmax, pmin, all_gather and "
        f"axis_index are. Use one lane per device, or jax.vmap."
    )


def _all_gather(x: jax.Array, params: dict, span: Span) -> jax.Array:
    gathered = jax.lax.all_gather(x, span.local_name)
    gathered = jax.lax.all_gather(gathered, span.device_axes if len(span.device_axes) > 1 else span.device_axes[0])
    lanes = gathered.reshape((-1, *x.shape))
    dim = params["all_gather_dimension"]
    lanes = jnp.moveaxis(lanes, 0, dim)
    if params["tiled"]:
        shape = x.shape[:dim] + (lanes.shape[dim] * x.shape[dim],) + x.shape[dim + 1 :]
        lanes = lanes.reshape(shape)
    return lanes


def _structured(eqn: Any, ins: list, span: Span) -> list:
    """Re-express a primitive with nested programs so its collectives can be rewritten."""
    name, params = eqn.primitive.name, eqn.params
    run = lambda sub, args: _evaluate(_open(sub), _consts(sub), args, span)  # noqa: E731
    if name in _INLINED:
        (sub,) = [params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in params][:1]
        return run(sub, ins)
    if name == "scan":
        n_consts, n_carry = params["num_consts"], params["num_carry"]
        consts, init, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[n_consts + n_carry :]

        def body(carry: list, x: list) -> tuple[list, list]:
            outs = run(params["jaxpr"], [*consts, *carry, *x])
            return outs[:n_carry], outs[n_carry:]

        carry, ys = jax.lax.scan(
            body, init, xs, length=params["length"], reverse=params["reverse"], unroll=params["unroll"]
        )
        return [*carry, *ys]
    if name == "while":
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        cond_consts, body_consts, init = ins[:n_cond], ins[n_cond : n_cond + n_body], ins[n_cond + n_body :]
        return list(
            jax.lax.while_loop(
                lambda carry: run(params["cond_jaxpr"], [*cond_consts, *carry])[0],
                lambda carry: run(params["body_jaxpr"], [*body_consts, *carry]),
                list(init),
            )
        )
    if name == "cond":
        index, operands = ins[0], ins[1:]
        branches = [lambda *ops, b=b: run(b, list(ops)) for b in params["branches"]]
        return list(jax.lax.switch(index, branches, *operands))
    raise NotImplementedError(
        f"{span.adapter}: {name!r} holds a collective on the mapped axis {span.axis_name!r}, "
        f"which cannot be spread over devices holding several lanes."
    )
