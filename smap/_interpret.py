"""The one jaxpr interpreter: every pass that walks a program walks it here.

A pass says what it does to an equation (a rule); this module does the walk:
the environment of values, literals and constants, and the programs nested in
calls and control flow (``jit``, ``jax.checkpoint``, custom rules, ``scan``,
``while``, ``cond``, and any primitive that runs one program on its inputs, as
``shard_map`` does). JAX's equation layouts are read here and in
``smap._compat`` only. Two walks:

- :func:`evaluate` runs a program on values (traced or concrete):
  ``rule(eqn, ins)`` gives each equation's outputs; :func:`bind` does what the
  equation does, and :func:`nested` does it with each nested program run by the
  pass, so that a rewrite reaches inside loops and branches.
- :func:`analyse` propagates a fact per value, whether it depends on some of
  the inputs, to the outputs: an output depends on the inputs its equation
  reads, through nested programs (loops to a fixed point over their carry, a
  branch index or a loop condition to every output). ``rule(eqn, ins)`` may
  decide an equation itself, or return None.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from smap import _interpret
    >>> def f(x, y):
    ...     return jax.lax.fori_loop(0, 3, lambda i, c: c * 2.0, x) + jnp.sin(y), y
    >>> program = jax.make_jaxpr(f)(1.0, 2.0)
    >>> _interpret.analyse(program.jaxpr, [True, False])
    [True, False]
    >>> double_sin = lambda eqn, ins: [2 * jnp.sin(*ins)] if str(eqn.primitive) == "sin" else _interpret.bind(eqn, ins)
    >>> [float(v) for v in _interpret.evaluate(program, [1.0, 0.0], double_sin)]
    [8.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal

from . import _compat
from ._compat import Kind, open_jaxpr

__all__ = ["analyse", "analyse_equation", "bind", "evaluate", "inside", "nested", "opaque", "reaches", "uses_axis"]

Rule = Callable[[Any, list], list]
FactRule = Callable[[Any, list], "list[bool] | None"]

bind: Rule = _compat.bind_equation


def _identity(x: Any) -> Any:
    return x


def evaluate(jaxpr: Jaxpr | ClosedJaxpr, args: Sequence[Any], rule: Rule = bind, lift: Callable = _identity) -> list:
    """The outputs of ``jaxpr`` on ``args``, each equation's given by ``rule(eqn, ins)``.

    ``lift`` makes a pass's value of a literal or a constant (the identity for passes on JAX values).
    """
    program = open_jaxpr(jaxpr)
    env: dict[Any, Any] = {v: lift(c) for v, c in zip(program.constvars, getattr(jaxpr, "consts", ()))}
    env.update(zip(program.invars, args))
    read = lambda v: lift(v.val) if isinstance(v, Literal) else env[v]  # noqa: E731
    for eqn in program.eqns:
        env.update(zip(eqn.outvars, rule(eqn, [read(v) for v in eqn.invars])))
    return [read(v) for v in program.outvars]


def nested(eqn: Any, ins: list, run: Callable[[Any, list], list], value: Callable = _identity) -> list | None:
    """``eqn`` re-expressed with each program nested in it run by ``run(program, args)``; None
    for an equation that is not a call, a ``scan``, a ``while`` or a ``cond``.

    A call's program runs on ``ins``. A loop's or a branch's runs on the
    equation's constants (as in ``ins``) and JAX values for the rest (``value``
    of the pass's values), and gives JAX values.
    """
    kind = _compat.kind(eqn)
    if kind is Kind.CALL:
        return run(_compat.call_body(eqn), ins)
    if kind is Kind.SCAN:
        body, n_consts, n_carry = _compat.scan_parts(eqn)
        consts, rest = ins[:n_consts], [value(x) for x in ins[n_consts:]]

        def step(carry: list, xs: list) -> tuple[list, list]:
            outs = run(body, [*consts, *carry, *xs])
            return outs[:n_carry], outs[n_carry:]

        carry, ys = jax.lax.scan(step, rest[:n_carry], rest[n_carry:], **_compat.scan_options(eqn))
        return [*carry, *ys]
    if kind is Kind.WHILE:
        cond, body, n_cond, n_body = _compat.while_parts(eqn)
        cond_consts, body_consts = ins[:n_cond], ins[n_cond : n_cond + n_body]
        init = [value(x) for x in ins[n_cond + n_body :]]
        loop = jax.lax.while_loop(
            lambda c: run(cond, [*cond_consts, *c])[0], lambda c: run(body, [*body_consts, *c]), init
        )
        return list(loop)
    if kind is Kind.COND:
        branches = [lambda *ops, b=b: run(b, list(ops)) for b in _compat.cond_branches(eqn)]
        return list(jax.lax.switch(value(ins[0]), branches, *[value(x) for x in ins[1:]]))
    return None


def _body(eqn: Any) -> Jaxpr | None:
    """The one program an equation runs on its inputs for its outputs (a call's; ``shard_map``'s), or None."""
    subs = [_compat.call_body(eqn)] if _compat.kind(eqn) is Kind.CALL else list(_compat.jaxprs_in_params(eqn.params))
    if len(subs) != 1:
        return None
    sub = open_jaxpr(subs[0])
    return sub if len(sub.invars) == len(eqn.invars) and len(sub.outvars) == len(eqn.outvars) else None


def opaque(eqn: Any) -> bool:
    """Whether ``eqn`` holds programs that :func:`analyse` does not follow (it then joins the inputs)."""
    if _compat.kind(eqn) in (Kind.SCAN, Kind.WHILE, Kind.COND):
        return False
    return _body(eqn) is None and bool(_compat.jaxprs_in_params(eqn.params))


def reaches(jaxpr: Jaxpr | ClosedJaxpr, found: Callable[[Any], bool]) -> bool:
    """Whether ``found(eqn)`` holds for an equation of ``jaxpr`` or of a program nested in it."""
    return any(found(eqn) or inside(eqn, found) for eqn in open_jaxpr(jaxpr).eqns)


def inside(eqn: Any, found: Callable[[Any], bool]) -> bool:
    """Whether ``found`` holds for an equation of a program nested in ``eqn``."""
    return any(reaches(sub, found) for sub in _compat.jaxprs_in_params(eqn.params))


def uses_axis(eqn: Any, axis_name: Hashable) -> bool:
    """Whether ``eqn``, or a program nested in it, communicates over ``axis_name``."""
    names = lambda e: _compat.names_axis(e, axis_name)  # noqa: E731
    return names(eqn) or inside(eqn, names)


def analyse(jaxpr: Jaxpr, ins: Sequence[bool], rule: FactRule | None = None, record: dict | None = None) -> list[bool]:
    """For each output of ``jaxpr``, whether it depends on the inputs marked in ``ins`` (constants do not).

    ``record``, when given, receives every value's fact (nested programs' too, at the fixed point).
    """
    facts: dict[Any, bool] = {} if record is None else record
    facts.update((v, bool(d)) for v, d in zip(jaxpr.invars, ins))
    read = lambda v: False if isinstance(v, Literal) else facts.get(v, False)  # noqa: E731
    for eqn in jaxpr.eqns:
        facts.update(zip(eqn.outvars, analyse_equation(eqn, [read(v) for v in eqn.invars], rule, record)))
    return [read(v) for v in jaxpr.outvars]


def analyse_equation(eqn: Any, ins: list[bool], rule: FactRule | None = None, record: dict | None = None) -> list[bool]:
    """For each output of ``eqn``, whether it depends on the inputs marked in ``ins`` (see :func:`analyse`)."""
    decided = None if rule is None else rule(eqn, ins)
    if decided is not None:
        return decided
    sub = lambda program, facts: analyse(open_jaxpr(program), facts, rule, record)  # noqa: E731
    kind, either = _compat.kind(eqn), lambda a, b: [x or y for x, y in zip(a, b)]  # noqa: E731
    if kind is Kind.SCAN:
        body, n_consts, n_carry = _compat.scan_parts(eqn)
        consts, carry, xs = ins[:n_consts], ins[n_consts : n_consts + n_carry], ins[n_consts + n_carry :]
        while True:
            outs = sub(body, consts + carry + xs)
            if either(carry, outs) == carry:
                return carry + outs[n_carry:]
            carry = either(carry, outs)
    if kind is Kind.WHILE:
        cond, body, n_cond, n_body = _compat.while_parts(eqn)
        cond_consts, body_consts, carry = ins[:n_cond], ins[n_cond : n_cond + n_body], ins[n_cond + n_body :]
        while True:  # a condition that depends on the inputs makes every carry do so
            decides = sub(cond, cond_consts + carry)[0]
            new = [decides or c for c in either(carry, sub(body, body_consts + carry))]
            if new == carry:
                return carry
            carry = new
    if kind is Kind.COND:
        outs = [ins[0]] * len(eqn.outvars)
        for branch in _compat.cond_branches(eqn):
            outs = either(outs, sub(branch, ins[1:]))
        return outs
    program = _body(eqn)
    return [any(ins)] * len(eqn.outvars) if program is None else sub(program, ins)
