"""Sharding annotations inside lanes: with_sharding_constraint, out_sharding= and reshard under jax.set_mesh.

The per-lane code below is JAX code annotated for a mesh of ``data`` x
``model``: an entry naming the lane axis ``data`` (or a dimension of size 1,
the lane's slice of a batch) is dropped in the lane, the others are kept.
Every mapping must give plain ``jax.vmap``'s values (computed without any
annotation), for FSDP and tensor-parallel layouts on meshes of Auto and of
Explicit axes; an annotation naming an axis the mesh lacks is an error that
names it, and leaves every state as it was.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
import smap

B, D, H = 8, 4, 8


def _close(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


@functools.cache
def _mesh(kind: str):
    axis_type = AxisType.Auto if kind == "auto" else AxisType.Explicit
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type, axis_type))


def _layout(x, spec, kind):
    """The annotation a JAX user writes on each kind of mesh."""
    if kind == "auto":
        return jax.lax.with_sharding_constraint(x, spec)
    return jax.sharding.reshard(x, spec)


def _values():
    k = jax.random.split(jax.random.key(0), 3)
    return (
        jax.random.normal(k[0], (D, H)) / 2,
        jax.random.normal(k[1], (H, D)) / 2,
        jax.random.normal(k[2], (B, D)),
    )


def _tensor_parallel(kind):
    """Megatron MLP, per example: hidden units over 'model'; the example's row annotated over 'data'."""
    w1_0, w2_0, xs = _values()
    w1, w2 = smap.ParamState(w1_0), smap.ParamState(w2_0)
    trace = smap.HiddenState(jnp.zeros((B, H)))

    def lane(x):
        # The lane's slice of a batch, size 1 along 'data', annotated as the batch is: the entry is dropped in
        # the lane, on Auto and on Explicit axes (where JAX would refuse to split a dimension of size 1).
        row = _layout(x[None], P("data", None), kind)
        if kind == "auto":
            h = jax.lax.with_sharding_constraint(jnp.tanh(row @ w1.value), P("data", "model"))
        else:
            h = jnp.tanh(jnp.matmul(row, w1.value, out_sharding=P("data", "model")))
        trace.value = 0.5 * trace.value + h[0]
        return jnp.sum((h @ w2.value - row) ** 2)

    def reference(x, t):
        h = jnp.tanh(x @ w1_0)
        return jnp.sum((h @ w2_0 - x) ** 2), 0.5 * t + h

    return lane, xs, trace, reference, (w1, w2)


def _fsdp(kind):
    """FSDP: each weight split over 'data' between calls, annotated so in the lane; per-example gradients averaged."""
    w1_0, w2_0, xs = _values()
    w1, w2 = smap.ParamState(w1_0), smap.ParamState(w2_0)
    trace = smap.HiddenState(jnp.zeros((B, H)))

    def loss(x):
        x = _layout(x[None], P("data", None), kind)[0]  # the example as a batch of one, annotated as the batch
        # gathered for use, as FSDP code does
        h = jnp.tanh(x @ _layout(w1.value, P(), kind))
        return jnp.sum((h @ _layout(w2.value, P(), kind) - x) ** 2), h

    grads = smap.grad(loss, grad_states=[w1, w2], has_aux=True)

    def lane(x):
        (g1, g2), h = grads(x)
        trace.value = 0.5 * trace.value + h
        g1, g2 = jax.lax.pmean(g1, "batch"), jax.lax.pmean(g2, "batch")
        # scattered back over 'data' (the lanes' axis under shard_map: dropped in the lane there)
        return _layout(g1, P("data", "model"), kind).sum() + _layout(g2, P("data", None), kind).sum()

    def reference(x, t):
        def pure(a, b, x):
            h = jnp.tanh(x @ a)
            return jnp.sum((h @ b - x) ** 2), h

        (g1, g2), h = jax.vmap(jax.grad(pure, argnums=(0, 1), has_aux=True), in_axes=(None, None, 0))(w1_0, w2_0, xs)
        return jnp.broadcast_to(g1.mean(0).sum() + g2.mean(0).sum(), (B,)), 0.5 * t + h

    return lane, xs, trace, reference, (w1, w2)


LAYOUTS = {"tensor-parallel": _tensor_parallel, "fsdp": _fsdp}
MAPPINGS = ["vmap", "shard_map", "jax.shard_map", "pmap"]


def _mapping_fn(name, mesh):
    if name == "vmap":
        return jax.vmap, None
    if name == "shard_map":
        return sharding.shard_map(mesh, axis="data"), None
    if name == "jax.shard_map":
        return jax.shard_map, {"axis_names": {"data"}}
    return sharding.pmap(list(mesh.devices.flat)), None


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_annotated_lanes_give_plain_vmap_values(kind, layout, mapping):
    lane, xs, trace, reference, params = LAYOUTS[layout](kind)
    mesh = _mesh(kind)
    mapping_fn, kwargs = _mapping_fn(mapping, mesh)
    step = smap.StatefulMapping(
        lane, state_in_axes=smap.HiddenState, axis_name="batch", mapping_fn=mapping_fn, mapping_kwargs=kwargs
    )
    t0 = trace.value
    with jax.set_mesh(mesh):
        if mapping in ("shard_map", "jax.shard_map"):
            rules = {smap.ParamState: P("data", None)} if layout == "fsdp" else {}
            sharding.place(trace, step)
            sharding.place(list(params), mesh=mesh, rules=rules)
        out = step(xs)
    expected_out, expected_trace = reference(xs, t0)
    if layout == "tensor-parallel":
        expected_out = jax.vmap(lambda x, t: reference(x, t)[0])(xs, t0)
        expected_trace = jax.vmap(lambda x, t: reference(x, t)[1])(xs, t0)
    _close(out, expected_out)
    _close(trace.value, expected_trace)


def test_the_model_axis_is_kept_in_the_lane_and_the_data_axis_dropped():
    """The lane's constraint on a hybrid (Auto) mesh keeps 'model' and drops 'data' (the lanes' axis).

    Read on the lowered program (the dispatcher's, until the transforms have a public ``lower``).
    """
    mesh = _mesh("auto")
    w = smap.ParamState(_values()[0])

    def lane(x):
        return jax.lax.with_sharding_constraint(jnp.tanh(x @ w.value)[None], P("data", "model"))[0] * 2

    step = smap.StatefulMapping(lane, mapping_fn=sharding.shard_map(mesh, axis="data"))
    xs = _values()[2]
    with jax.set_mesh(mesh):
        _close(step(xs), 2 * jnp.tanh(xs @ w.value))
        text = step.lower(xs).as_text()
    # the lane's constraint (local lanes x 1 x hidden) keeps 'model'; no constraint names 'data' (the lanes' axis)
    constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
    assert any('{}, {"model"}]' in line for line in constraints), constraints
    assert not any('"data"' in line for line in constraints), constraints


def test_annotations_in_smap_jit_follow_the_global_mesh():
    mesh = _mesh("auto")
    w = smap.ParamState(_values()[0])

    @smap.jit
    def f(x):
        h = jax.lax.with_sharding_constraint(x @ w.value, P("data", "model"))
        w.value = w.value * 0.5
        return h

    xs = _values()[2]
    with jax.set_mesh(mesh):
        out = f(xs)
    _close(out, xs @ _values()[0])
    assert out.sharding.spec == P("data", "model")
    _close(w.value, _values()[0] * 0.5)


@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.parametrize("mapping", ["vmap", "shard_map"])
def test_an_axis_the_mesh_lacks_is_named_and_nothing_changes(kind, mapping):
    mesh = _mesh(kind)
    count = smap.ShortTermState(jnp.zeros((B, D)))

    def lane(x):
        count.value = count.value + x
        return _layout(x, P("expert"), kind)

    step = smap.StatefulMapping(
        lane, state_in_axes=smap.ShortTermState, mapping_fn=_mapping_fn(mapping, mesh)[0], mapping_kwargs=None
    )
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="'expert'|expert"):
        step(jnp.ones((B, D)))
    _close(count.value, jnp.zeros((B, D)))


@pytest.mark.parametrize("mapping", ["vmap", "shard_map"])
def test_an_axis_that_does_not_divide_a_lane_dimension_larger_than_1_keeps_jax_s_error(mapping):
    """Only a dimension of size 1 (a lane's slice) is let through: 3 hidden units over 'model' (2) are refused."""
    mesh = _mesh("explicit")
    count = smap.ShortTermState(jnp.zeros((B, 3)))

    def lane(x):
        count.value = count.value + x
        return jax.sharding.reshard(x[None], P("data", "model"))

    step = smap.StatefulMapping(lane, state_in_axes=smap.ShortTermState, mapping_fn=_mapping_fn(mapping, mesh)[0])
    with (
        jax.set_mesh(mesh),
        pytest.raises(ValueError, match=r"\('model',\) \(2 parts\) do not evenly divide dimension 1 \(size 3\)"),
    ):
        step(jnp.ones((B, 3)))
    _close(count.value, jnp.zeros((B, 3)))


def test_without_a_global_mesh_annotations_keep_jax_s_error():
    def lane(x):
        return jax.lax.with_sharding_constraint(x, P("model"))

    with pytest.raises(RuntimeError, match="mesh"):
        smap.vmap(lane)(jnp.ones((B, 2)))


def test_a_named_sharding_on_the_mesh_works_too():
    mesh = _mesh("auto")

    def lane(x):
        return jax.lax.with_sharding_constraint(x * 2, NamedSharding(mesh, P("model")))

    xs = jnp.ones((B, 2))
    with jax.set_mesh(mesh):
        _close(smap.StatefulMapping(lane, mapping_fn=sharding.shard_map(mesh, axis="data"))(xs), 2 * xs)
