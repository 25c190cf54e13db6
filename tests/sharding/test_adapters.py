"""Tests of the device mappings (``sharding.shard_map``, ``sharding.pmap``): routing, calling convention, bad input.

Every value is checked against ``jax.vmap`` or worked out by hand. Bad input
must give a clear error and leave every State (the default random key
included) exactly as it was, value and placement.
"""

from __future__ import annotations

import contextlib
import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
import smap


@functools.cache
def mesh_1d(n):
    return sharding.make_mesh(data=n, devices=jax.devices()[:n])


@functools.cache
def mesh_2d():
    return sharding.make_mesh(data=4, model=2)


@functools.cache
def explicit_mesh(n):
    """A mesh of Explicit axes, jax.make_mesh's default."""
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=jnp.float32)


def snapshot(*states):
    """Host copies and shardings of the states' values, and of the default random key."""
    out = []
    for s in (*states, smap.random.DEFAULT):
        leaves = jax.tree_util.tree_leaves(s.value)
        out.append([(np.array(x), x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves])
    return out


def assert_unchanged(states, before):
    now = snapshot(*states)
    assert len(now) == len(before)
    for state, a, b in zip((*states, smap.random.DEFAULT), now, before):
        assert len(a) == len(b), state
        for (va, sa, da, sha), (vb, sb, db, shb) in zip(a, b):
            assert sa == sb and da == db, (state, sa, sb)
            np.testing.assert_array_equal(va, vb)
            assert sha == shb, (state, sha, shb)


# -- routing of jax.pmap / jax.shard_map ---------------------------------------------


def test_adapt_routes_jax_pmap_and_jax_shard_map():
    devices = jax.devices()[:2]
    mesh = mesh_1d(4)

    adapter, kwargs = sharding.adapt(jax.pmap, {})
    assert isinstance(adapter, sharding.Pmap) and adapter.devices is None and kwargs == {}

    adapter, kwargs = sharding.adapt(functools.partial(jax.pmap, devices=devices), {})
    assert isinstance(adapter, sharding.Pmap) and adapter.devices == devices and kwargs == {}

    adapter, kwargs = sharding.adapt(jax.shard_map, {"mesh": mesh})
    assert isinstance(adapter, sharding.ShardMap) and adapter.mesh is mesh and adapter.axes == ("data",)

    adapter, _ = sharding.adapt(functools.partial(jax.shard_map, mesh=mesh_2d()), {})
    assert adapter.mesh is mesh_2d() and adapter.axes == ("data", "model")

    adapter, _ = sharding.adapt(jax.shard_map, {"mesh": mesh_2d(), "axis_names": {"data"}})
    assert adapter.axes == ("data",)


def test_adapt_routes_jax_smap_over_the_mesh_axis_it_names():
    mesh = mesh_2d()
    adapter, kwargs = sharding.adapt(jax.smap, {"mesh": mesh, "axis_name": "model"})
    assert isinstance(adapter, sharding.ShardMap) and adapter.name == "jax.smap" and kwargs == {}
    assert adapter.mesh is mesh and adapter.axes == ("model",)

    adapter, _ = sharding.adapt(functools.partial(jax.smap, axis_name="data"), {"mesh": mesh})
    assert adapter.mesh is mesh and adapter.axes == ("data",)

    adapter, _ = sharding.adapt(functools.partial(jax.smap, axis_name="data"), {})
    with jax.set_mesh(mesh_1d(4)):  # the ambient mesh, read at call time
        assert adapter.mesh is mesh_1d(4) and adapter.axes == ("data",)


@pytest.mark.parametrize("make_mesh", [mesh_1d, explicit_mesh], ids=["auto", "explicit"])
@pytest.mark.parametrize("spelling", ["mapping_kwargs", "partial+set_mesh"])
def test_jax_smap_gives_jax_vmap_results(make_mesh, spelling):
    h = smap.HiddenState(jnp.zeros((8, 3)))

    def step(x):
        h.value = h.value + x * jax.lax.axis_index("i")
        return x - jax.lax.pmean(x, "i")

    x = rand(8, 3)
    mesh = make_mesh(4)
    if spelling == "mapping_kwargs":
        mapping_fn, kwargs, context = jax.smap, {"mesh": mesh, "axis_name": "data"}, contextlib.nullcontext()
    else:
        mapping_fn, kwargs, context = functools.partial(jax.smap, axis_name="data"), {}, jax.set_mesh(mesh)
    m = smap.StatefulMapping(
        step, axis_name="i", state_in_axes=smap.HiddenState, mapping_fn=mapping_fn, mapping_kwargs=kwargs
    )
    with context:
        out = m(x)
    xs = np.asarray(x)
    np.testing.assert_allclose(out, xs - xs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.value, xs * np.arange(8)[:, None], rtol=1e-6)
    assert h.value.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)


@pytest.mark.parametrize(
    "mapping_fn, kwargs, axis_name, error, match",
    [
        (jax.smap, {"mesh": None}, "b", ValueError, r"the mesh has axes \('data',\), not 'b'"),
        (functools.partial(jax.smap, in_axes=0, axis_name="data"), {}, "b", TypeError, "in_axes"),
        (jax.smap, {"axis_name": "data", "out_axes": 0}, "b", TypeError, "out_axes"),
    ],
    ids=["axis_name-not-on-mesh", "partial-in_axes", "out_axes"],
)
def test_jax_smap_options_rejected(mapping_fn, kwargs, axis_name, error, match):
    net = _placed_net(8)
    before = snapshot(net.h, net.w)
    kwargs = {**kwargs, "mesh": mesh_1d(4)} if "mesh" in kwargs else kwargs
    with pytest.raises(error, match=match):
        mapped(net, mapping_fn, kwargs, axis_name)(jnp.ones((8, 2)))
    assert_unchanged([net.h, net.w], before)


def test_jax_smap_splits_over_the_mappings_axis_name_when_given_none():
    """``jax.smap``'s one ``axis_name`` names the collectives' axis and the mesh axis: the mapping's serves."""
    h = smap.HiddenState(jnp.zeros((8, 3)))

    def step(x):
        h.value = h.value + x * jax.lax.axis_index("data")
        return x - jax.lax.pmean(x, "data")

    x = rand(8, 3)
    mesh = mesh_1d(4)
    m = smap.StatefulMapping(step, axis_name="data", state_in_axes=smap.HiddenState, mapping_fn=jax.smap)
    with jax.set_mesh(mesh):
        out = m(x)
        assert sharding.adapt(jax.smap, {}, "data")[0].axes == ("data",)
        with pytest.raises(TypeError, match="needs the mesh axis to split the lanes over: the mapping's axis_name"):
            smap.StatefulMapping(lambda v: 2 * v, mapping_fn=jax.smap)(x)
    xs = np.asarray(x)
    np.testing.assert_allclose(out, xs - xs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.value, xs * np.arange(8)[:, None], rtol=1e-6)
    assert h.value.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)


def test_adapt_leaves_other_mapping_fns_alone():
    custom = functools.partial(jax.vmap, spmd_axis_name=None)
    assert sharding.adapt(jax.vmap, {}) == (jax.vmap, {})
    assert sharding.adapt(custom, {"a": 1}) == (custom, {"a": 1})


@pytest.mark.parametrize(
    "mapping_fn, kwargs, bad",
    [
        (jax.shard_map, {"mesh": None, "in_specs": P()}, "in_specs"),
        (jax.shard_map, {"out_specs": P()}, "out_specs"),
        (jax.pmap, {"axis_name": "i"}, "axis_name"),
        (functools.partial(jax.pmap, in_axes=0), {}, "in_axes"),
    ],
    ids=["shard_map-in_specs", "shard_map-out_specs", "pmap-axis_name", "pmap-in_axes"],
)
def test_options_the_lanes_decide_are_rejected(mapping_fn, kwargs, bad):
    h = smap.HiddenState(jnp.zeros((8, 2)))

    def step(x):
        h.value = h.value + x
        return x

    m = smap.StatefulMapping(step, state_in_axes=smap.HiddenState, mapping_fn=mapping_fn, mapping_kwargs=kwargs)
    before = snapshot(h)
    with pytest.raises(TypeError, match=bad):
        m(jnp.ones((8, 2)))
    assert_unchanged([h], before)


def test_experimental_shard_map_is_routed_too():
    experimental = pytest.importorskip("jax.experimental.shard_map")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        fn = getattr(experimental, "shard_map", None)
    if fn is None:
        pytest.skip("no jax.experimental.shard_map.shard_map in this JAX")
    x = rand(8, 3)
    m = smap.StatefulMapping(
        lambda v: jax.lax.psum(v, "i") * v, axis_name="i", mapping_fn=fn, mapping_kwargs={"mesh": mesh_1d(4)}
    )
    np.testing.assert_allclose(m(x), np.asarray(x).sum(0) * np.asarray(x), rtol=1e-5)


# -- the adapters with jax.vmap's calling convention, without smap ---------------------


def _lane(x, y, z):
    return {"a": x * y["w"] + z, "b": jax.lax.psum(x.sum(), "i"), "c": y["v"]}


CONVENTIONS = [
    # in_axes, out_axes, args
    (0, 0, (rand(8, 3), {"w": rand(8, 3, seed=1), "v": rand(8, seed=2)}, rand(8, 3, seed=3))),
    (
        (1, {"w": None, "v": 0}, -1),
        {"a": 1, "b": 0, "c": -1},
        (rand(3, 8), {"w": rand(3, seed=1), "v": rand(8, 2, seed=2)}, rand(3, 8, seed=3)),
    ),
    (
        [0, None, None],
        {"a": 0, "b": None, "c": None},
        (rand(8, 3), {"w": rand(3, seed=1), "v": rand(2, seed=2)}, rand(3, seed=3)),
    ),
]


@pytest.mark.parametrize("convention", CONVENTIONS, ids=["all-0", "axes-1-None-negative", "list-in_axes-unmapped-out"])
@pytest.mark.parametrize(
    "adapter",
    [
        lambda: sharding.shard_map(mesh_1d(4)),
        lambda: sharding.shard_map(mesh_2d(), axis=("data", "model")),
        lambda: sharding.pmap(jax.devices()[:2]),
    ],
    ids=["shard_map-4dev", "shard_map-4x2", "pmap-2dev"],
)
def test_adapter_is_a_drop_in_for_jax_vmap(adapter, convention):
    in_axes, out_axes, args = convention
    expected = jax.vmap(_lane, in_axes=in_axes, out_axes=out_axes, axis_name="i")(*args)
    actual = adapter()(_lane, in_axes=in_axes, out_axes=out_axes, axis_name="i", axis_size=8)(*args)
    jax.tree_util.tree_map(lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6), actual, expected)
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)


def test_adapter_infers_axis_size_from_arguments():
    x = rand(8, 2)
    out = sharding.shard_map(mesh_1d(2))(lambda v: jax.lax.axis_index("i") + 0 * v[0], axis_name="i")(x)
    np.testing.assert_array_equal(out, np.arange(8))


# -- lane layout: contiguous blocks of lanes per device -------------------------------


@pytest.mark.parametrize("n", [2, 4, 8])
def test_each_device_holds_a_contiguous_block_of_lanes(n):
    mesh = mesh_1d(n)
    h = smap.HiddenState(jnp.zeros((8, 3)))

    def step(x):
        h.value = h.value + x * (1 + jax.lax.axis_index("i"))
        return h.value

    m = smap.StatefulMapping(step, state_in_axes=smap.HiddenState, axis_name="i", mapping_fn=sharding.shard_map(mesh))
    x = rand(8, 3)
    out = m(x)
    expected = np.asarray(x) * np.arange(1, 9)[:, None]
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    for value in (out, h.value):
        assert isinstance(value.sharding, NamedSharding) and value.sharding.mesh == mesh
        assert len(value.addressable_shards) == n
        for shard in value.addressable_shards:
            k = list(mesh.devices.flat).index(shard.device)
            rows = slice(k * 8 // n, (k + 1) * 8 // n)
            assert shard.index[0] == rows
            np.testing.assert_allclose(shard.data, expected[rows], rtol=1e-6)


def test_pmap_with_fewer_lanes_than_devices_uses_the_first_devices():
    h = smap.HiddenState(jnp.zeros((4, 2)))

    def step(x):
        h.value = h.value + jax.lax.psum(x, "i")
        return jax.lax.axis_index("i")

    m = smap.StatefulMapping(step, state_in_axes=smap.HiddenState, axis_name="i", mapping_fn=jax.pmap)
    x = rand(4, 2)
    np.testing.assert_array_equal(m(x), np.arange(4))
    np.testing.assert_allclose(h.value, np.broadcast_to(np.asarray(x).sum(0), (4, 2)), rtol=1e-6)
    assert h.value.sharding.device_set <= set(jax.devices()[:4])


# -- bad input: a clear error and every State unchanged -----------------------------------


class Net(smap.nn.Module):
    """Batched hidden state, shared parameter written with a mean, and random draws."""

    def __init__(self, lanes):
        self.h = smap.HiddenState(jnp.zeros((lanes, 2)))
        self.w = smap.ParamState(jnp.ones(2))

    def __call__(self, x):
        self.h.value = self.h.value + x + smap.random.normal(size=2)
        self.w.value = self.w.value - 0.1 * jax.lax.pmean(x, "b")
        return x.sum()


def mapped(net, mapping_fn, mapping_kwargs=None, axis_name="b"):
    return smap.StatefulMapping(
        net, state_in_axes=smap.HiddenState, axis_name=axis_name, mapping_fn=mapping_fn, mapping_kwargs=mapping_kwargs
    )


def _placed_net(lanes):
    """A net after one good call on 2 devices: its states live on a mesh."""
    net = Net(lanes)
    mapped(net, sharding.shard_map(mesh_1d(2)))(jnp.ones((lanes, 2)))
    return net


def _net_on(mesh):
    """A net after one good call on ``mesh`` under jax.set_mesh: its states live there."""
    net = Net(8)
    with jax.set_mesh(mesh):
        mapped(net, jax.smap, {"axis_name": "data"})(jnp.ones((8, 2)))
    return net


INDIVISIBLE = [
    ("sharding.shard_map", lambda: (sharding.shard_map(mesh_1d(4)), None), 6, 4),
    ("jax.shard_map(mapping_kwargs)", lambda: (jax.shard_map, {"mesh": mesh_1d(4)}), 6, 4),
    ("sharding.shard_map-4x2-data+model", lambda: (sharding.shard_map(mesh_2d(), axis=("data", "model")), None), 6, 8),
    ("sharding.pmap", lambda: (sharding.pmap(jax.devices()[:4]), None), 6, 4),
    ("partial(jax.pmap,devices)", lambda: (functools.partial(jax.pmap, devices=jax.devices()[:4]), None), 6, 4),
    ("jax.pmap-12-lanes-on-8", lambda: (jax.pmap, None), 12, 8),
    ("jax.smap-explicit", lambda: (jax.smap, {"mesh": explicit_mesh(4), "axis_name": "data"}), 6, 4),
    ("jax.shard_map-explicit", lambda: (jax.shard_map, {"mesh": explicit_mesh(4)}), 6, 4),
]


@pytest.mark.parametrize("case", INDIVISIBLE, ids=[c[0] for c in INDIVISIBLE])
def test_mapped_size_not_divisible_by_devices(case):
    _, build, lanes, devices = case
    net = _placed_net(lanes)
    before = snapshot(net.h, net.w)
    mapping_fn, kwargs = build()
    with pytest.raises(ValueError, match=rf"\b{lanes}\b.*\b{devices}\b devices"):
        mapped(net, mapping_fn, kwargs)(jnp.ones((lanes, 2)))
    assert_unchanged([net.h, net.w], before)


@pytest.mark.parametrize(
    "build",
    [
        lambda: sharding.shard_map(mesh_1d(4), axis="model"),
        lambda: sharding.shard_map(mesh_1d(4), axis=("data", "nope")),
    ],
    ids=["axis=model-on-data-mesh", "axis=(data,nope)"],
)
def test_missing_mesh_axis_at_construction(build):
    with pytest.raises(ValueError, match=r"the mesh has axes \('data',\)"):
        build()


@pytest.mark.parametrize(
    "case",
    [
        ("jax.shard_map-axis_names", lambda: (jax.shard_map, {"mesh": mesh_1d(4), "axis_names": ("model",)}), None),
        ("sharding.shard_map-ambient", lambda: (sharding.shard_map(None, axis="model"), None), mesh_1d(4)),
    ],
    ids=lambda c: c[0],
)
def test_missing_mesh_axis_at_call(case):
    _, build, ambient = case
    net = _placed_net(8)
    before = snapshot(net.h, net.w)
    mapping_fn, kwargs = build()
    m = mapped(net, mapping_fn, kwargs)
    with pytest.raises(ValueError, match=r"axes \('data',\), not 'model'"):
        if ambient is not None:
            with jax.set_mesh(ambient):
                m(jnp.ones((8, 2)))
        else:
            m(jnp.ones((8, 2)))
    assert_unchanged([net.h, net.w], before)


@pytest.mark.parametrize(
    "mapping_fn",
    [jax.shard_map, sharding.shard_map(None), sharding.shard_map()],
    ids=["jax.shard_map", "sharding.shard_map(None)", "sharding.shard_map()"],
)
def test_shard_map_with_no_mesh_anywhere(mapping_fn):
    net = _placed_net(8)
    before = snapshot(net.h, net.w)
    with pytest.raises(ValueError, match="no mesh"):
        mapped(net, mapping_fn)(jnp.ones((8, 2)))
    assert_unchanged([net.h, net.w], before)


def test_error_inside_the_function_leaves_sharded_states_unchanged():
    net = _placed_net(8)
    before = snapshot(net.h, net.w)
    calls = []

    def step(x):
        net(x)
        calls.append(1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        smap.StatefulMapping(
            step, state_in_axes=smap.HiddenState, axis_name="b", mapping_fn=sharding.shard_map(mesh_1d(4))
        )(jnp.ones((8, 2)))
    assert calls
    assert_unchanged([net.h, net.w], before)


@pytest.mark.parametrize("make_mesh", [mesh_1d, explicit_mesh], ids=["auto", "explicit"])
def test_indivisible_batch_names_the_mesh_axis_and_sizes(make_mesh):
    net = _placed_net(6)
    before = snapshot(net.h, net.w)
    m = mapped(net, jax.smap, {"mesh": make_mesh(4), "axis_name": "data"})
    with pytest.raises(ValueError, match=r"jax.smap: the mapped size 6 .* 4 devices of mesh axis 'data' \(size 4\)"):
        m(jnp.ones((6, 2)))
    assert_unchanged([net.h, net.w], before)


@pytest.mark.parametrize(
    "build",
    [
        lambda: (jax.smap, {"mesh": explicit_mesh(4), "axis_name": "batch"}, None),
        lambda: (functools.partial(jax.smap, axis_name="batch"), {}, explicit_mesh(4)),
        lambda: (sharding.shard_map(None, axis="batch"), {}, explicit_mesh(4)),
    ],
    ids=["jax.smap-mapping_kwargs", "jax.smap-ambient", "sharding.shard_map-ambient"],
)
def test_explicit_mesh_without_the_named_axis(build):
    net = _net_on(explicit_mesh(4))
    before = snapshot(net.h, net.w)
    mapping_fn, kwargs, ambient = build()
    with pytest.raises(ValueError, match=r"the mesh has axes \('data',\), not 'batch'"):
        with jax.set_mesh(ambient) if ambient is not None else contextlib.nullcontext():
            mapped(net, mapping_fn, kwargs)(jnp.ones((8, 2)))
    assert_unchanged([net.h, net.w], before)


@pytest.mark.parametrize("make_mesh", [mesh_1d, explicit_mesh], ids=["auto", "explicit"])
def test_pmap_under_a_mesh_of_other_devices(make_mesh):
    net = _net_on(make_mesh(4))
    before = snapshot(net.h, net.w)
    m = mapped(net, sharding.pmap(jax.devices()[4:]))
    with pytest.raises(ValueError, match=r"devices \[4, 5, 6, 7\].*ambient mesh.*devices \[0, 1, 2, 3\]"):
        with jax.set_mesh(make_mesh(4)):
            m(jnp.ones((8, 2)))
    assert_unchanged([net.h, net.w], before)


RING = [(i, (i + 1) % 8) for i in range(8)]
# Collectives on the mapped axis that smap runs, with several lanes per device, as jax.vmap runs them.
OTHER_COLLECTIVES = {
    "ppermute": lambda x: jax.lax.ppermute(x, "b", RING),
    "ppermute of two values": lambda x: sum(jax.lax.ppermute((x, 2 * x), "b", [(i, 7 - i) for i in range(8)])),
    "all_to_all": lambda x: jax.lax.all_to_all(jnp.outer(jnp.arange(1.0, 9.0), x), "b", 0, 0)[::3].sum(0),
    "all_to_all tiled": lambda x: jax.lax.all_to_all(jnp.tile(x, (2, 8)), "b", 1, 0, tiled=True)[::5].sum(0),
    "a gradient through ppermute": lambda x: jax.grad(lambda v: jnp.sum(jnp.sin(jax.lax.ppermute(v, "b", RING)) * v))(
        x
    ),
    "ppermute in a scan": lambda x: jax.lax.scan(lambda c, _: (jax.lax.ppermute(c, "b", RING) + c, None), x, None, 3)[
        0
    ],
}
DEVICE_MAPPINGS = {
    **{f"sharding.shard_map-{n}": lambda n=n: (sharding.shard_map(mesh_1d(n)), {}) for n in (1, 2, 4, 8)},
    "sharding.pmap-2": lambda: (sharding.pmap(jax.devices()[:2]), {}),
    "jax.shard_map-4": lambda: (jax.shard_map, {"mesh": mesh_1d(4)}),
    "jax.smap-explicit-4": lambda: (jax.smap, {"mesh": explicit_mesh(4), "axis_name": "data"}),
}


@pytest.mark.parametrize("where", DEVICE_MAPPINGS)
@pytest.mark.parametrize("collective", OTHER_COLLECTIVES)
def test_other_collectives_give_jax_vmap_values_on_any_number_of_devices(collective, where):
    """ppermute and all_to_all run with one lane per device and with several, as jax.vmap runs them."""
    lane = OTHER_COLLECTIVES[collective]
    h0, x = rand(8, 3, seed=1), rand(8, 3)
    h = smap.HiddenState(h0)

    def step(x):
        y = lane(x + h.value)
        h.value = h.value + y
        return y

    mapping_fn, mapping_kwargs = DEVICE_MAPPINGS[where]()
    m = smap.StatefulMapping(
        step, state_in_axes=smap.HiddenState, axis_name="b", mapping_fn=mapping_fn, mapping_kwargs=mapping_kwargs
    )
    want = jax.vmap(lambda x, h: lane(x + h), axis_name="b")(x, h0)
    np.testing.assert_allclose(m(x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h.value, h0 + want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("devices", [4, 8])
def test_a_ppermute_with_several_lanes_per_device_gathers_every_lanes_input_once(devices):
    """What the compiled program does (XLA's optimised HLO): with 2 lanes per device, one all-gather of
    every lane's input and no collective-permute; with one lane per device, the collective-permute."""
    m = smap.StatefulMapping(
        OTHER_COLLECTIVES["ppermute"], axis_name="b", mapping_fn=sharding.shard_map(mesh_1d(devices))
    )
    text = m.lower(jnp.ones((8, 16))).compile().as_text()
    ops = re.findall(r"=\s*(?:\(.*?\)|\S+)\s+(all-gather|collective-permute|all-reduce|all-to-all)(?:-start)?\(", text)
    assert sorted(ops) == (["all-gather"] if devices == 4 else ["collective-permute"]), ops
    gathered = re.findall(r"=\s*(\S+)\s+all-gather(?:-start)?\(", text)
    assert all(shape.startswith("f32[4,2,16]") for shape in gathered), gathered  # 4 devices x 2 lanes


def test_shard_map_under_set_mesh_without_collectives():
    m = smap.StatefulMapping(lambda x: x * 2, mapping_fn=jax.shard_map)
    with jax.set_mesh(mesh_1d(4)):
        out = m(jnp.arange(8.0))
    np.testing.assert_array_equal(out, 2 * np.arange(8.0))


def test_shard_map_under_set_mesh_with_collectives():
    m = smap.StatefulMapping(lambda x: x - jax.lax.pmean(x, "i"), axis_name="i", mapping_fn=jax.shard_map)
    with jax.set_mesh(mesh_1d(4)):
        out = m(jnp.arange(8.0))
    np.testing.assert_array_equal(out, np.arange(8.0) - 3.5)
    assert out.sharding.mesh == mesh_1d(4)


@pytest.mark.parametrize(
    "global_mesh, shown",
    [
        (mesh_1d(8), "Mesh('data': 8, axis_types=(Auto,)) of devices [0, 1, 2, 3, 4, 5, 6, 7]"),
        (mesh_2d(), "Mesh('data': 4, 'model': 2, axis_types=(Auto, Auto)) of devices"),
        (explicit_mesh(4), "Mesh('data': 4, axis_types=(Explicit,)) of devices [0, 1, 2, 3]"),
    ],
    ids=["data=8", "data=4,model=2", "explicit-4"],
)
@pytest.mark.parametrize("how", ["sharding.shard_map", "jax.shard_map"])
def test_a_mapping_on_another_mesh_than_the_global_one_names_both_and_the_fix(global_mesh, shown, how):
    """Called under jax.set_mesh of another mesh: refused, nothing changes; under its own mesh: runs."""
    own = mesh_1d(4)
    w = smap.ParamState(jnp.ones(3))

    def step(x):
        w.value = w.value + jax.lax.pmean(x, "i")
        return 2 * x

    if how == "jax.shard_map":
        m = smap.StatefulMapping(step, axis_name="i", mapping_fn=jax.shard_map, mapping_kwargs={"mesh": own})
    else:
        m = smap.StatefulMapping(step, axis_name="i", mapping_fn=sharding.shard_map(own))
    sharding.place([w], m)
    before = w.value
    x = jnp.arange(24.0).reshape(8, 3)
    for _ in range(2):  # before the first successful call, and after it (a cached program)
        with jax.set_mesh(global_mesh), pytest.raises(ValueError) as error:
            m(x)
        message = str(error.value)
        assert "runs on Mesh('data': 4, axis_types=(Auto,)) of devices [0, 1, 2, 3]" in message
        assert f"called under jax.set_mesh({shown}" in message
        assert "with jax.set_mesh(mesh)" in message and "with no mesh" in message
        assert w.value is before
        with jax.set_mesh(own):
            out = m(x)
        np.testing.assert_array_equal(out, 2 * x)
        np.testing.assert_allclose(w.value, before + x.mean(0))
        before = w.value


@pytest.mark.parametrize(
    "mapping_fn", [jax.pmap, sharding.pmap(jax.devices()[:2])], ids=["jax.pmap", "sharding.pmap-2dev"]
)
def test_pmap_with_nothing_mapped(mapping_fn):
    m = smap.StatefulMapping(lambda: jnp.arange(3.0), in_axes=None, axis_size=8, mapping_fn=mapping_fn)
    np.testing.assert_array_equal(m(), np.tile(np.arange(3.0), (8, 1)))


def test_shard_map_with_nothing_mapped():
    m = smap.StatefulMapping(
        lambda: jnp.arange(3.0), in_axes=None, axis_size=8, mapping_fn=sharding.shard_map(mesh_1d(4))
    )
    np.testing.assert_array_equal(m(), np.tile(np.arange(3.0), (8, 1)))


@pytest.mark.parametrize("where", DEVICE_MAPPINGS)
def test_a_batch_of_no_lanes_gives_what_jax_vmap_gives(where):
    """A mapped size of 0 (an empty last batch): empty outputs and states, as under jax.vmap, on every device
    mapping (sharding.pmap divided the lanes by the number of devices it took, none)."""
    h = smap.HiddenState(jnp.zeros((0, 3)))

    def step(x):
        h.value = h.value + x
        return jax.lax.psum(x, "b"), 2 * x

    mapping_fn, mapping_kwargs = DEVICE_MAPPINGS[where]()
    m = smap.StatefulMapping(
        step, state_in_axes=smap.HiddenState, axis_name="b", mapping_fn=mapping_fn, mapping_kwargs=mapping_kwargs
    )
    total, doubled = m(jnp.zeros((0, 3)))
    want_total, want_doubled = jax.vmap(lambda x: (jax.lax.psum(x, "b"), 2 * x), axis_name="b")(jnp.zeros((0, 3)))
    assert total.shape == want_total.shape == (0, 3) and doubled.shape == want_doubled.shape == (0, 3)
    assert h.value.shape == (0, 3)


class _Cell(smap.nn.Module):
    def __init__(self, h0):
        self.w = smap.ParamState(jnp.array([[0.5, -1.0, 0.2], [1.5, 0.3, -0.7], [0.1, 0.2, 0.3]]))
        self.h = smap.HiddenState(h0)


@pytest.mark.parametrize("where", DEVICE_MAPPINGS)
def test_a_module_passed_as_an_argument_runs_on_every_device_mapping_as_under_jax_vmap(where):
    """The Module is no array (no lane of it); its batched state is split over the lanes and written back."""
    h0, x = rand(8, 3, seed=1), rand(8, 3)
    cell = _Cell(h0)

    def step(model, x):
        model.h.value = jnp.tanh(model.h.value @ model.w.value + x)
        return jax.lax.pmean(model.h.value.sum(), "b")

    mapping_fn, mapping_kwargs = DEVICE_MAPPINGS[where]()
    m = smap.StatefulMapping(
        step, state_in_axes=smap.HiddenState, axis_name="b", mapping_fn=mapping_fn, mapping_kwargs=mapping_kwargs
    )
    out = m(cell, x)
    want_h = jax.vmap(lambda h, x: jnp.tanh(h @ cell.w.value + x))(h0, x)
    np.testing.assert_allclose(out, jnp.full(8, want_h.sum(1).mean()), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cell.h.value, want_h, rtol=1e-5, atol=1e-6)
