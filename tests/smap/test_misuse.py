"""Bad input to smap's transforms: an error naming the argument and what was
expected, raised where the mistake is made, and every State unchanged."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap


def values(*states):
    return [np.asarray(s.value) for s in states]


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: smap.jit(42), r"smap\.jit: fun must be callable, got int 42"),
        (lambda: smap.grad(42), r"smap\.grad: fun must be callable, got int 42"),
        (lambda: smap.vmap(42), r"smap\.vmap: fn must be callable, got int 42"),
        (lambda: smap.StatefulMapping(42), r"fun must be callable, got int 42"),
        (lambda: smap.StatefulMapping(lambda x: x, mapping_fn=42), r"mapping_fn must be callable, got int 42"),
    ],
)
def test_non_callables_are_rejected_at_construction(make, words):
    with pytest.raises(TypeError, match="Expected a callable"):
        jax.jit(42)  # as JAX does
    with pytest.raises(TypeError, match=words):
        make()


@pytest.mark.parametrize("argnums", ["x", 1.5, (0, "y")])
def test_grad_argnums_must_be_ints(argnums):
    words = r"smap\.grad: argnums must be an int, a sequence of ints or None, got " + re.escape(repr(argnums))
    with pytest.raises(TypeError, match=words):
        smap.grad(lambda x, y: x.sum(), argnums=argnums)


def test_grad_with_aux_that_is_not_arrays_names_the_leaf(close):
    w = smap.ParamState(jnp.ones(2))
    calls = smap.LongTermState(jnp.zeros(()))

    def loss(x):
        calls.value = calls.value + 1
        return (w.value * x).sum(), {"x": x, "label": "hello"}

    before = values(w, calls)
    with pytest.raises(TypeError, match=r"has_aux=True, aux must be a pytree of arrays, but aux\['label'\] is a str"):
        smap.grad(loss, grad_states=w, has_aux=True)(jnp.ones(2))
    for state, old in zip((w, calls), before):
        np.testing.assert_array_equal(np.asarray(state.value), old)
    # Arrays and Python numbers are fine as aux, as in jax.grad.
    fine = lambda x: ((w.value * x).sum(), {"x": x, "n": 3})  # noqa: E731
    grads, aux = smap.grad(fine, grad_states=w, has_aux=True)(jnp.ones(2))
    ref_grads, ref_aux = jax.grad(lambda v, x: ((v * x).sum(), {"x": x, "n": 3}), has_aux=True)(w.value, jnp.ones(2))
    close((grads, aux), (ref_grads, ref_aux))


@pytest.mark.parametrize("key", ["nope", ("a", "b"), None])
def test_get_jaxpr_by_cache_with_something_that_is_not_a_key(key):
    f = smap.jit(lambda x: x + 1)
    f(jnp.ones(2))
    with pytest.raises(TypeError, match=r"get_jaxpr_by_cache takes a key from get_arg_cache_key"):
        f.get_jaxpr_by_cache(key)
    assert f.get_jaxpr_by_cache(f.get_arg_cache_key(jnp.ones(2))) is not None
