"""Tests of mappings composed with ``jit`` and ``grad`` (both ways round), and of ``mapping_fn``.

Every result is checked against an independent reference: the same
computation written with plain ``jax.vmap`` and explicit state passing, or
values worked out by hand.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mapping_helpers import assert_unchanged, rand, snapshot

import smap
from smap.filter import OfType
from smap.transform import StatefulMapping, vmap2


def _power(x, n):
    out = x
    for _ in range(n - 1):  # Python control flow on n: it must be static
        out = out * x
    return out


# -- jit and grad around and inside a mapping ------------------------------------


def test_jit_of_vmap2(close):
    calls = []
    state = smap.ShortTermState(jnp.zeros((4, 2)))
    w = smap.ParamState(rand(2, 2))
    w0 = w.value

    def step(x):
        calls.append(1)
        state.value = state.value @ w.value + x
        return state.value.sum()

    def pure(s, x):
        new = s @ w0 + x
        return new.sum(), new

    compiled = smap.jit(vmap2(step, state_in_axes=state))
    s, xs = jnp.zeros((4, 2)), rand(4, 2, seed=1)
    for _ in range(3):
        ref_out, s = jax.vmap(pure)(s, xs)
        close(compiled(xs), ref_out)
        close(state.value, s)
    assert len(calls) == 1
    close(w.value, w0)


def test_jit_of_vmap2_where_a_shared_state_becomes_batched(close):
    total = smap.State(jnp.zeros(2))

    def step(x):
        total.value = total.value + x
        return x

    compiled = smap.jit(vmap2(step))
    close(compiled(jnp.arange(3.0)), jnp.arange(3.0))
    close(total.value, jnp.broadcast_to(jnp.arange(3.0)[:, None], (3, 2)))


def test_jit_of_vmap2_raise_policy_keeps_states():
    total = smap.State(jnp.zeros(2))

    def step(x):
        total.value = total.value + x
        return x

    before = snapshot(total)
    with pytest.raises(smap.BatchAxisError, match=r"State float32\[2\]"):
        smap.jit(vmap2(step, unexpected_out_state_mapping="raise"))(jnp.arange(3.0))
    assert_unchanged([total], before)


def test_jit_of_vmap2_with_static_argument(close):
    mapped = StatefulMapping(_power, static_argnums=1)
    compiled = smap.jit(mapped, static_argnums=1)
    xs = jnp.array([1.0, 2.0, 3.0])
    close(compiled(xs, 3), xs**3)
    close(compiled(xs, 2), xs**2)


def test_vmap2_of_jit(close):
    state = smap.ShortTermState(jnp.zeros(3))

    @smap.jit
    def step(x):
        state.value = state.value + x
        return state.value * 2

    out = vmap2(step, state_in_axes=state)(jnp.arange(3.0))
    close(out, jnp.arange(3.0) * 2)
    close(state.value, jnp.arange(3.0))


def test_jax_jit_around_a_pure_vmap2(close):
    w = smap.ParamState(jnp.array([1.0, 2.0]))
    mapped = vmap2(lambda x: x * w.value.sum())
    close(jax.jit(mapped)(jnp.arange(3.0)), jnp.arange(3.0) * 3)


def test_per_example_gradients_of_arguments(close):
    def loss_fn(x, target):
        return jnp.sum((x**2 - target) ** 2)

    xs, ts = rand(5, 3), rand(5, 3, seed=1)
    expected = jax.vmap(jax.grad(loss_fn))(xs, ts)
    close(vmap2(smap.grad(loss_fn, argnums=0))(xs, ts), expected)
    close(smap.jit(vmap2(smap.grad(loss_fn, argnums=0)))(xs, ts), expected)


def test_per_example_gradients_of_a_shared_parameter(close):
    w = smap.ParamState(jnp.array([1.0, -2.0]))
    w0 = w.value

    def loss(x, y):
        return (jnp.dot(w.value, x) - y) ** 2

    xs, ys = rand(4, 2), rand(4, seed=1)
    expected = jax.vmap(jax.grad(lambda w, x, y: (jnp.dot(w, x) - y) ** 2), in_axes=(None, 0, 0))(w0, xs, ys)
    close(vmap2(smap.grad(loss, grad_states=w))(xs, ys), expected)
    np.testing.assert_array_equal(w.value, w0)


def test_per_example_gradients_with_value(close):
    w = smap.ParamState(jnp.array([0.5, 1.5]))
    w0 = w.value

    def loss(x):
        return jnp.dot(w.value, x) ** 2

    xs = rand(3, 2)
    grads, value = vmap2(smap.grad(loss, grad_states=w, return_value=True))(xs)
    close(grads, jax.vmap(jax.grad(lambda w, x: jnp.dot(w, x) ** 2), in_axes=(None, 0))(w0, xs))
    close(value, (xs @ w0) ** 2)


def test_per_example_gradients_with_value_and_aux(close):
    w = smap.ParamState(jnp.array([0.5, 1.5]))
    w0 = w.value

    def loss(x):
        pred = jnp.dot(w.value, x)
        return pred**2, pred

    xs = rand(3, 2)
    (grads, value, aux) = vmap2(smap.grad(loss, grad_states=w, return_value=True, has_aux=True))(xs)
    close(grads, jax.vmap(jax.grad(lambda w, x: jnp.dot(w, x) ** 2), in_axes=(None, 0))(w0, xs))
    close(value, (xs @ w0) ** 2)
    close(aux, xs @ w0)


def test_grad_of_a_loss_that_uses_vmap2(close):
    w = smap.ParamState(jnp.array([1.0, -2.0]))
    w0 = w.value
    xs, ys = rand(4, 2), rand(4, seed=1)

    def per_example(x, y):
        return (jnp.dot(w.value, x) - y) ** 2

    grads = smap.grad(lambda: vmap2(per_example)(xs, ys).mean(), grad_states=w)()
    expected = jax.grad(lambda w: jax.vmap(lambda x, y: (jnp.dot(w, x) - y) ** 2)(xs, ys).mean())(w0)
    close(grads, expected)


def test_grad_of_a_loss_that_uses_vmap2_writing_a_state(close):
    w = smap.ParamState(jnp.ones(2))
    seen = smap.LongTermState(jnp.zeros(()))

    def per_example(x):
        seen.value = seen.value + jax.lax.psum(1.0, "b")
        return jnp.dot(w.value, x) ** 2

    xs = rand(3, 2)
    grads = smap.grad(lambda xs: vmap2(per_example, axis_name="b")(xs).sum(), grad_states=w)(xs)
    close(grads, jax.grad(lambda w: jnp.sum((xs @ w) ** 2))(jnp.ones(2)))
    close(seen.value, jnp.array(3.0))


def test_state_created_inside_the_mapped_function_does_not_leak_a_tracer(close):
    kept = []

    def fn(x):
        temp = smap.State(x * 2)
        temp.value = temp.value + 1
        kept.append(temp)
        return temp.value

    close(vmap2(fn)(jnp.arange(3.0)), jnp.arange(3.0) * 2 + 1)
    assert len(kept) == 1
    with pytest.raises(RuntimeError, match="inside"):
        kept[0].value  # noqa: B018
    assert "Tracer" not in repr(kept[0])


def test_state_created_inside_jit_of_vmap2_does_not_leak_a_tracer():
    kept = []

    def fn(x):
        temp = smap.ShortTermState(jnp.sin(x))
        kept.append(temp)
        return temp.value

    smap.jit(vmap2(fn))(jnp.arange(3.0))
    for temp in kept:
        try:
            value = temp.value
        except RuntimeError as error:
            assert "inside" in str(error)
        else:
            assert not any(isinstance(v, jax.core.Tracer) for v in jax.tree_util.tree_leaves(value))


def test_a_state_created_inside_an_outer_transform_does_not_poison_the_mapping(close):
    holder = {}
    inner = vmap2(lambda x: x + holder["s"].value)

    def outer(x):
        holder["s"] = smap.State(jnp.zeros(()) + 1.0)
        return inner(x)

    close(smap.jit(outer)(jnp.arange(3.0)), jnp.arange(3.0) + 1)
    holder["s"] = smap.State(jnp.full((), 5.0))
    close(inner(jnp.arange(3.0)), jnp.arange(3.0) + 5)


def test_an_outer_mapping_sees_only_the_states_the_inner_call_reads(close):
    scalar = smap.ShortTermState(jnp.zeros(()))

    def fn(x):
        if x.ndim == 0:
            return x + scalar.value
        return x * 2

    inner = vmap2(fn)
    close(inner(jnp.arange(3.0)), jnp.arange(3.0))  # this signature reads the scalar state
    outer = vmap2(inner, state_in_axes=smap.ShortTermState)
    xs = rand(3, 4, 2)
    close(outer(xs), xs * 2)  # this one does not: nothing should try to split the scalar
    key = outer.get_arg_cache_key(xs)
    assert len(outer.get_jaxpr_by_cache(key).jaxpr.invars) == 1


# -- mapping_fn ------------------------------------------------------------------


def test_mapping_fn_partial_jax_vmap(close):
    counter = smap.ShortTermState(jnp.zeros(3))

    def increment(delta):
        counter.value = counter.value + delta
        return counter.value

    custom = StatefulMapping(
        increment,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
        name="custom_increment",
        mapping_fn=functools.partial(jax.vmap, spmd_axis_name=None),
    )
    close(custom(jnp.array([1.0, 2.0, 3.0])), jnp.array([1.0, 2.0, 3.0]))
    close(counter.value, jnp.array([1.0, 2.0, 3.0]))
    close(custom(jnp.array([1.0, 1.0, 1.0])), jnp.array([2.0, 3.0, 4.0]))
    assert custom.name == "custom_increment"


def test_a_user_mapping_fn_is_called_once_per_signature_with_identical_results():
    calls = []

    def my_vmap(fun, **kwargs):
        calls.append(kwargs)
        return jax.vmap(fun, **kwargs)

    def make(mapping_fn):
        state = smap.ShortTermState(jnp.zeros((4, 2)))
        shared = smap.LongTermState(jnp.ones(2))

        def step(x):
            state.value = state.value * shared.value + x + smap.random.normal(size=2)
            shared.value = shared.value + jax.lax.pmean(x, "b")
            return state.value.sum(), jax.lax.axis_index("b")

        mapped = StatefulMapping(
            step, state_in_axes=state, axis_name="b", mapping_fn=mapping_fn, unexpected_out_state_mapping="raise"
        )
        return mapped, state, shared

    results = {}
    for label, fn in [("default", jax.vmap), ("custom", my_vmap)]:
        smap.random.seed(4)
        mapped, state, shared = make(fn)
        outs = [mapped(rand(4, 2, seed=i)) for i in range(3)]
        results[label] = (outs, state.value, shared.value, smap.random.DEFAULT.value)
    assert len(calls) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, results["custom"], results["default"])
    assert calls[0].get("axis_name") == "b"


def test_mapping_fn_receives_a_new_call_for_a_new_signature():
    calls = []

    def my_vmap(fun, **kwargs):
        calls.append(1)
        return jax.vmap(fun, **kwargs)

    mapped = StatefulMapping(lambda x: x + 1, mapping_fn=my_vmap)
    mapped(jnp.ones(3))
    mapped(jnp.ones(3))
    assert len(calls) == 1
    mapped(jnp.ones(5))
    assert len(calls) == 2


def test_mapping_kwargs_are_passed_to_the_mapping_fn(close):
    seen = []

    def my_vmap(fun, *, extra, **kwargs):
        seen.append(extra)
        return jax.vmap(fun, **kwargs)

    mapped = StatefulMapping(lambda x: x * 3, mapping_fn=my_vmap, mapping_kwargs={"extra": "hello"})
    close(mapped(jnp.arange(3.0)), jnp.arange(3.0) * 3)
    assert seen == ["hello"]
