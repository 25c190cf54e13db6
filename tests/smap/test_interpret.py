"""The jaxpr interpreter (``smap._interpret``) against JAX's own evaluation and ``jax.vmap``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smap import _interpret


@jax.custom_jvp
def _soft(x):
    return jnp.log1p(jnp.exp(x))


_soft.defjvp(lambda p, t: (_soft(p[0]), t[0] * jax.nn.sigmoid(p[0])))


@jax.custom_vjp
def _clip(x):
    return jnp.clip(x, -1.0, 1.0)


_clip.defvjp(lambda x: (_clip(x), None), lambda _, g: (g,))


def _program(x, y):
    """A program that nests every kind of equation the interpreter follows."""
    s, ys = jax.lax.scan(lambda c, t: (c * 0.9 + t * y, jnp.sin(c)), x, jnp.arange(3.0))
    w = jax.lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, c[1] * 1.1 + y), (0, s))[1]
    b = jax.lax.cond(y > 0, lambda a: a * 2.0, lambda a: a - 1.0, w)
    j = jax.jit(lambda a: jnp.cos(a) + y)(b)
    r = jax.checkpoint(lambda a: jnp.tanh(a) * a)(j)
    return _soft(r) + _clip(r), ys, y * 2.0


ARGS = (jnp.float32(0.3), jnp.float32(0.7))


def test_evaluate_with_bind_is_jax_evaluation():
    closed = jax.make_jaxpr(_program)(*ARGS)
    expected = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *ARGS)
    for got, want in zip(_interpret.evaluate(closed, ARGS), expected):
        np.testing.assert_array_equal(got, want)


def test_nested_rewrite_reaches_inside_every_program():
    """A rule that doubles every sin, applied through nested: ys doubled, the rest unchanged; the rule
    saw the equations of the loops' bodies and condition, the calls and the custom rules."""
    seen = set()

    def rule(eqn, ins):
        seen.add(str(eqn.primitive))
        if str(eqn.primitive) == "sin":
            return [2.0 * jnp.sin(*ins)]
        outs = _interpret.nested(eqn, ins, lambda program, args: _interpret.evaluate(program, args, rule))
        return _interpret.bind(eqn, ins) if outs is None else outs

    closed = jax.make_jaxpr(_program)(*ARGS)
    got = jax.jit(lambda *a: _interpret.evaluate(closed, a, rule))(*ARGS)
    want = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *ARGS)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], 2.0 * want[1], rtol=1e-6)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6)
    assert {"sin", "lt", "cos", "tanh", "log1p", "min"} <= seen


@pytest.mark.parametrize("inputs", [(True, False), (False, True), (False, False)])
def test_analyse_is_sound_under_vmap(inputs):
    """An output called independent of the marked inputs is the same when they vary (under jax.vmap)."""
    closed = jax.make_jaxpr(_program)(*ARGS)
    facts = _interpret.analyse(closed.jaxpr, list(inputs))
    batched = [jnp.stack([a, a + 0.25, a - 0.5]) if d else a for a, d in zip(ARGS, inputs)]
    outs = jax.vmap(_program, in_axes=[0 if d else None for d in inputs], axis_size=3)(*batched)
    for out, dependent in zip(outs, facts):
        if not dependent:
            np.testing.assert_array_equal(out[1], out[0])
            np.testing.assert_array_equal(out[2], out[0])
    assert facts == [any(inputs), any(inputs), inputs[1]]
