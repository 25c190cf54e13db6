"""``smap.vmap`` where a library takes a ``vmap_fn`` "with the same signature as ``jax.vmap``".

optax's ``micro_vmap`` calls ``vmap_fn(fun, in_axes, out_axes)`` inside a
``lax.fori_loop`` over microbatches. ``smap.vmap`` takes ``jax.vmap``'s
arguments in ``jax.vmap``'s order (``spmd_axis_name`` included), so a
function that reads States can be mapped there; the values are checked
against the same computation with ``jax.vmap`` and the state passed
explicitly, and the compiled program against ``jax.vmap``'s. A function that
writes a State cannot write it from inside optax's loop: a clear error, and
the state unchanged.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import smap

micro_vmap = optax.microbatching.micro_vmap
SUM = optax.microbatching.AccumulationType.SUM
CONCAT = optax.microbatching.AccumulationType.CONCAT


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=jnp.float32)


def grad_of(w, x, y):
    """One example's gradient, with the weight passed explicitly (the reference)."""
    return jax.grad(lambda w: jnp.sum((jnp.tanh(x @ w) - y) ** 2))(w)


@pytest.mark.parametrize("microbatch_size", [None, 2, 4])
@pytest.mark.parametrize("accumulator", [SUM, CONCAT], ids=["sum", "concat"])
def test_micro_vmap_with_smap_vmap_gives_jax_vmaps_values(microbatch_size, accumulator):
    w = smap.ParamState(rand(3, 2, seed=1))

    def per_example_grad(x, y):
        return grad_of(w.value, x, y)

    x, y = rand(8, 3, seed=2), rand(8, 2, seed=3)
    ours = micro_vmap(
        per_example_grad, in_axes=(0, 0), microbatch_size=microbatch_size, accumulator=accumulator, vmap_fn=smap.vmap
    )(x, y)
    per_example = jax.vmap(grad_of, in_axes=(None, 0, 0))(w.value, x, y)
    expected = per_example.sum(0) if accumulator == SUM else per_example
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_smap_vmap_takes_jax_vmaps_positional_arguments():
    w = smap.ParamState(rand(3, seed=1))
    mapped = smap.vmap(lambda x, s: (x * w.value * s).sum(), (0, None), 0, "i", 4, "data")
    assert (mapped.in_axes, mapped.out_axes, mapped.axis_name, mapped.axis_size) == ((0, None), 0, "i", 4)
    assert mapped.mapping_fn is jax.vmap and mapped.mapping_kwargs == {"spmd_axis_name": "data"}
    x = rand(4, 3, seed=2)
    np.testing.assert_allclose(mapped(x, 2.0), (x * w.value * 2.0).sum(1), rtol=1e-6)


def test_spmd_axis_name_under_a_global_mesh_matches_jax_vmap():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    w = smap.ParamState(rand(3, 2, seed=1))

    def per_example_grad(x, y):
        return grad_of(w.value, x, y)

    x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (rand(16, 3, seed=2), rand(16, 2, seed=3)))
    ours = functools.partial(smap.vmap, spmd_axis_name="data")
    theirs = functools.partial(jax.vmap, spmd_axis_name="data")

    def with_smap(x, y):
        return micro_vmap(per_example_grad, in_axes=(0, 0), microbatch_size=8, accumulator=SUM, vmap_fn=ours)(x, y)

    def with_jax(w, x, y):
        fun = functools.partial(grad_of, w)
        return micro_vmap(fun, in_axes=(0, 0), microbatch_size=8, accumulator=SUM, vmap_fn=theirs)(x, y)

    with jax.set_mesh(mesh):
        got = jax.jit(with_smap)(x, y)
        expected = jax.jit(with_jax)(w.value, x, y)
        hlo_ours = jax.jit(with_smap).lower(x, y).compile().as_text()
        hlo_theirs = jax.jit(with_jax).lower(w.value, x, y).compile().as_text()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all"):
        pattern = rf"\b{op}(-start)?\("
        assert len(re.findall(pattern, hlo_ours)) == len(re.findall(pattern, hlo_theirs)), op


def test_a_state_written_inside_micro_vmap_is_a_clear_error_and_stays_unchanged():
    seen = smap.LongTermState(jnp.zeros(()))

    def counting(x):
        seen.value = seen.value + 1
        return 2 * x

    with pytest.raises(TypeError, match=r"writes LongTermState float32\[\] from inside a JAX transformation"):
        micro_vmap(counting, microbatch_size=2, vmap_fn=smap.vmap)(jnp.ones((4, 2)))
    assert seen.value == 0


needs_refs = pytest.mark.skipif(not smap._compat.HAS_REFS, reason="this JAX has no jax.Ref")


@needs_refs
@pytest.mark.parametrize("microbatch_size", [2, 8])
def test_micro_vmap_reads_refs_as_states(microbatch_size):
    w0 = rand(3, 2, seed=1)
    w = jax.new_ref(w0)
    x, y = rand(8, 3, seed=2), rand(8, 2, seed=3)
    ours = micro_vmap(
        lambda x, y: grad_of(w[...], x, y), in_axes=(0, 0), microbatch_size=microbatch_size, vmap_fn=smap.vmap
    )(x, y)
    np.testing.assert_allclose(ours, jax.vmap(grad_of, in_axes=(None, 0, 0))(w0, x, y), rtol=1e-5, atol=1e-5)


@needs_refs
def test_a_ref_written_inside_micro_vmap_is_a_clear_error_and_stays_unchanged():
    seen = jax.new_ref(jnp.zeros(()))

    def counting(x):
        seen[...] = seen[...] + 1
        return 2 * x

    with pytest.raises(TypeError, match=r"writes Ref float32\[\] \(State\) from inside a JAX transformation"):
        micro_vmap(counting, microbatch_size=2, vmap_fn=smap.vmap)(jnp.ones((4, 2)))
    assert seen[...] == 0


def test_on_explicit_axes_micro_vmap_splits_a_split_batch_as_it_does_with_jax_vmap():
    """docs/from-jax.md's claim: on a batch split over an Explicit axis, ``smap.vmap`` as
    ``vmap_fn`` does what ``jax.vmap`` does. JAX 0.10 and later refuse optax's own reshape
    into microbatches whichever ``vmap_fn`` (so not smap's to fix); JAX 0.9 accepts it, and
    both give the per-example gradients' sum."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    w = smap.ParamState(rand(3, 2, seed=1))

    def microbatched(vmap_fn):
        return jax.jit(
            micro_vmap(
                lambda x, y: grad_of(w.value, x, y), in_axes=(0, 0), microbatch_size=8, vmap_fn=vmap_fn, accumulator=SUM
            )
        )

    with jax.set_mesh(mesh):
        x, y = (jax.device_put(a, P("data")) for a in (rand(16, 3, seed=2), rand(16, 2, seed=3)))
        errors = []
        for vmap_fn in (smap.vmap, jax.vmap):
            if jax.__version_info__ >= (0, 10):
                with pytest.raises(Exception, match="reshape is not supported") as error:
                    microbatched(vmap_fn)(x, y)
                errors.append(type(error.value))
            else:
                expected = jax.vmap(grad_of, in_axes=(None, 0, 0))(w.value, x, y).sum(0)
                np.testing.assert_allclose(microbatched(vmap_fn)(x, y), expected, rtol=1e-5, atol=1e-5)
        assert len(set(errors)) <= 1  # the same error, whichever vmap_fn
