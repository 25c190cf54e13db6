"""Tests of per-leaf placement rules (``sharding._placement``): a rule on a pytree-valued state.

A rule places each leaf of at least its rank; a leaf of lower rank (optax's
scalar ``count``) is replicated, and ``describe`` shows one row per leaf. The
optax test trains with one ``optax.adam`` state in one State placed FSDP-style
and checks values against the same step in plain JAX, and every leaf's
sharding against the sharding worked out by hand.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
import smap

B = 8


@functools.cache
def mesh_2d():
    return sharding.make_mesh(data=4, model=2)


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=jnp.float32)


def init_params():
    return {"w": rand(8, 4, seed=1), "b": rand(4, seed=2)}


def loss_fn(params, x, y):
    return jnp.sum((jnp.tanh(x @ params["w"] + params["b"]) - y) ** 2)


OPTIMIZER = optax.adam(1e-2)


def adam_step_on_smap(mesh):
    """A data-parallel step on smap: per-example gradients, pmean, one optax.adam State."""
    params = smap.ParamState(init_params())
    opt = smap.State(OPTIMIZER.init(params.value), tag="optimizer")

    def step(x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params.value, x, y)
        grads = jax.lax.pmean(grads, "batch")
        updates, opt.value = OPTIMIZER.update(grads, opt.value, params.value)
        params.value = optax.apply_updates(params.value, updates)
        return loss

    mapping = smap.StatefulMapping(step, axis_name="batch", mapping_fn=sharding.shard_map(mesh, axis="data"))
    return params, opt, mapping


def adam_step_in_plain_jax(params, opt_state, x, y):
    """The same step in plain JAX: the mean of the per-example gradients, then optax."""
    losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, 0))(params, x, y)
    grads = jax.tree_util.tree_map(lambda g: g.mean(0), grads)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return losses, optax.apply_updates(params, updates), opt_state


def expected_sharding(mesh, leaf, spec):
    """The rule's sharding for a leaf of at least the rule's rank, replicated for a lower rank."""
    return NamedSharding(mesh, spec if np.ndim(leaf) >= len(spec) else P())


@pytest.mark.parametrize("spec", [P("data"), P("model")], ids=["over-lanes", "over-model"])
def test_an_optax_adam_state_in_one_state_is_placed_per_leaf(spec):
    mesh = mesh_2d()
    params, opt, mapping = adam_step_on_smap(mesh)
    rules = {smap.ParamState: spec, "optimizer": spec}
    sharding.place([params, opt], mapping, rules=rules)

    def check_placed():
        for state in (params, opt):
            for leaf in jax.tree_util.tree_leaves(state.value):
                assert leaf.sharding.is_equivalent_to(expected_sharding(mesh, leaf, spec), np.ndim(leaf))

    check_placed()
    specs = sharding.spec_for(mapping, opt, rules)
    assert specs[0].count == P() and specs[0].mu == {"w": spec, "b": spec}

    x, y = rand(B, 8, seed=3), rand(B, 4, seed=4)
    p_ref, o_ref = init_params(), OPTIMIZER.init(init_params())
    for _ in range(3):
        losses = mapping(x, y)
        losses_ref, p_ref, o_ref = adam_step_in_plain_jax(p_ref, o_ref, x, y)
        np.testing.assert_allclose(losses, losses_ref, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), params.value, p_ref)
    jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), opt.value, o_ref)
    assert int(opt.value[0].count) == 3
    check_placed()  # the written states keep their placement, leaf by leaf

    rows = {row.path: row for row in sharding.describe({"params": params, "opt": opt})}
    assert rows["opt[0].count"].spec == "P()" and rows["opt[0].count"].shape == ()
    assert rows["opt[0].mu['w']"].spec == f"P({spec[0]!r},)"
    assert rows["opt[0].mu['w']"].bytes_per_device == 8 * 4 * 4 // mesh.shape[spec[0]]
    assert rows["params['b']"].spec == f"P({spec[0]!r},)"


def test_a_rule_on_a_dict_of_buffers_places_each_leaf_it_fits():
    mesh = mesh_2d()
    buffers = smap.LongTermState({"steps": jnp.zeros((), jnp.int32), "mean": rand(4), "cov": rand(4, 6)})
    sharding.place([buffers], mesh=mesh, rules={smap.LongTermState: P("data", "model")})
    value = buffers.value
    assert value["steps"].sharding.is_equivalent_to(NamedSharding(mesh, P()), 0)
    assert value["mean"].sharding.is_equivalent_to(NamedSharding(mesh, P()), 1)  # rank 1 < 2: replicated
    assert value["cov"].sharding.is_equivalent_to(NamedSharding(mesh, P("data", "model")), 2)
    table = str(sharding.describe(buffers))
    assert "['steps']" in table and "['cov']" in table and "P('data', 'model')" in table


def test_a_rule_that_fits_no_leaf_or_a_leaf_it_does_not_divide_is_refused_and_nothing_moves():
    mesh = mesh_2d()
    buffers = smap.LongTermState({"steps": jnp.zeros((), jnp.int32), "mean": rand(4)})
    other = smap.State(rand(8))  # not selected by the rules
    before = [buffers.value, other.value]
    with pytest.raises(ValueError, match=r"names 2 dimensions, but its leaves have at most 1"):
        sharding.place([other, buffers], mesh=mesh, rules={smap.LongTermState: P("data", "model")})
    odd = smap.LongTermState({"steps": jnp.zeros((), jnp.int32), "mean": rand(6)})
    with pytest.raises(ValueError, match=r"\(leaf \['mean'\]\) has size 6 in dimension 0, which the mesh axis 'data'"):
        sharding.place([other, odd], mesh=mesh, rules={smap.LongTermState: P("data")})
    for state, value in zip([buffers, other], before):
        jax.tree_util.tree_map(lambda a, e: np.testing.assert_array_equal(a, e), state.value, value)
        assert all(len(x.sharding.device_set) == 1 for x in jax.tree_util.tree_leaves(state.value))
