"""Tests of ``sharding._placement``: where states live, spec_for, place, describe.

After a sharded call, batched states are partitioned over the mesh axis at
their mapped axis and shared states are replicated; a second call moves and
re-shards nothing (checked with JAX's transfer guard, the states' shardings,
and the compiled program's collectives). Values are always checked against
``jax.vmap`` or by hand.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
import smap
from smap.filter import OfType, WithTag

B = 8


@functools.cache
def mesh_1d(n):
    return sharding.make_mesh(data=n, devices=jax.devices()[:n])


@functools.cache
def mesh_2d():
    return sharding.make_mesh(data=4, model=2)


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=jnp.float32)


def close(a, e):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, e)


class Model(smap.nn.Module):
    """Rows batched at axis 0, columns batched at axis 1, parameters shared."""

    def __init__(self):
        self.rows = smap.HiddenState(jnp.zeros((B, 4)))
        self.cols = smap.LongTermState(jnp.zeros((3, B)), tag="cols")
        self.w = smap.ParamState(rand(3, 4, seed=1))
        self.scale = smap.LongTermState(jnp.asarray([2.0, 3.0, 4.0]))  # read, never written

    def __call__(self, x):
        y = x * self.scale.value
        self.rows.value = 0.5 * self.rows.value + y @ self.w.value
        self.cols.value = self.cols.value + y
        g = jax.grad(lambda w: jnp.sum((y @ w) ** 2))(self.w.value)
        self.w.value = self.w.value - 0.01 * jax.lax.pmean(g, "batch")
        return jnp.sum(self.rows.value)


STATE_AXES = {0: OfType(smap.HiddenState), 1: WithTag("cols")}


def model_mapping(model, mapping_fn, mapping_kwargs=None):
    return smap.StatefulMapping(
        model, state_in_axes=STATE_AXES, axis_name="batch", mapping_fn=mapping_fn, mapping_kwargs=mapping_kwargs
    )


@functools.cache
def vmap_reference(calls=2):
    """The model's outputs and states after ``calls`` jax.vmap calls on x, 2x, ... (cached)."""
    model = Model()
    m = model_mapping(model, jax.vmap)
    outs = [m(rand(B, 3, seed=2) * (i + 1)) for i in range(calls)]
    return outs, {k: s.value for k, s in model.states().items()}


LAYOUTS = {
    "shard_map-1dev": (lambda: sharding.shard_map(mesh_1d(1)), lambda: mesh_1d(1), "data"),
    "shard_map-2dev": (lambda: sharding.shard_map(mesh_1d(2)), lambda: mesh_1d(2), "data"),
    "shard_map-4dev": (lambda: sharding.shard_map(mesh_1d(4)), lambda: mesh_1d(4), "data"),
    "shard_map-8dev": (lambda: sharding.shard_map(mesh_1d(8)), lambda: mesh_1d(8), "data"),
    "jax.shard_map-4dev": (lambda: functools.partial(jax.shard_map, mesh=mesh_1d(4)), lambda: mesh_1d(4), "data"),
    "shard_map-4x2-axis=data": (lambda: sharding.shard_map(mesh_2d(), axis="data"), mesh_2d, "data"),
    "shard_map-4x2-axis=data+model": (
        lambda: sharding.shard_map(mesh_2d(), axis=("data", "model")),
        mesh_2d,
        ("data", "model"),
    ),
}


def _axis_size(mesh, axis):
    axes = axis if isinstance(axis, tuple) else (axis,)
    return int(np.prod([mesh.shape[a] for a in axes]))


@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
def test_batched_states_sharded_shared_states_replicated(layout):
    build, get_mesh, axis = LAYOUTS[layout]
    mesh = get_mesh()
    model = Model()
    scale_before = model.scale.value
    m = model_mapping(model, build())
    x = rand(B, 3, seed=2)
    out = m(x)
    out2 = m(2 * x)
    ref_outs, ref_states = vmap_reference()
    close([out, out2], ref_outs)
    close({k: s.value for k, s in model.states().items()}, ref_states)

    expected = {"rows": P(axis), "cols": P(None, axis), "w": P()}
    for name, spec in expected.items():
        value = model.states()[name].value
        assert isinstance(value, jax.Array)
        assert isinstance(value.sharding, NamedSharding), (name, value.sharding)
        assert value.sharding.mesh == mesh, name
        assert value.sharding.is_equivalent_to(NamedSharding(mesh, spec), value.ndim), (name, value.sharding.spec)
        if mesh.size > 1:  # on one device P() and P('data') are the same placement
            assert value.sharding.spec == spec, (name, value.sharding.spec)
        assert sharding.spec_for(m, model.states()[name]) == spec
    assert model.w.value.sharding.is_fully_replicated
    # the mapped axis of the outputs is partitioned the same way
    assert out2.sharding.is_equivalent_to(NamedSharding(mesh, P(axis)), 1)
    # each device holds 1/axis-size of a batched state, all of a shared one
    size = _axis_size(mesh, axis)
    for shard in model.rows.value.addressable_shards:
        assert shard.data.shape == (B // size, 4)
    for shard in model.cols.value.addressable_shards:
        assert shard.data.shape == (3, B // size)
    for shard in model.w.value.addressable_shards:
        assert shard.data.shape == (3, 4)
    # a state the function only reads is left untouched
    assert model.scale.value is scale_before


@pytest.mark.parametrize(
    "mapping_fn, n",
    [(lambda: sharding.pmap(jax.devices()[:4]), 4), (lambda: jax.pmap, 8)],
    ids=["sharding.pmap-4dev", "jax.pmap"],
)
def test_pmap_keeps_batched_states_on_its_devices(mapping_fn, n):
    model = Model()
    m = model_mapping(model, mapping_fn())
    x = rand(B, 3, seed=2)
    outs = [m(x), m(2 * x)]
    ref_outs, ref_states = vmap_reference()
    close(outs, ref_outs)
    close({k: s.value for k, s in model.states().items()}, ref_states)
    rows = model.rows.value
    assert rows.sharding.device_set == set(jax.devices()[:n])
    for shard in rows.addressable_shards:
        assert shard.data.shape == (B // n, 4)
        # device k holds lanes [k * B/n, (k+1) * B/n)
        k = jax.devices().index(shard.device)
        np.testing.assert_allclose(shard.data, np.asarray(ref_states["rows"])[k * B // n : (k + 1) * B // n], rtol=1e-5)
    assert model.w.value.sharding.is_fully_replicated


# -- spec_for --------------------------------------------------------------------------


def test_spec_for_batched_and_shared_states():
    model = Model()
    m = model_mapping(model, sharding.shard_map(mesh_1d(4)))
    assert sharding.spec_for(m, model.rows) == P("data")
    assert sharding.spec_for(m, model.cols) == P(None, "data")
    assert sharding.spec_for(m, model.w) == P()
    assert sharding.spec_for(m, model.scale) == P()
    neg = smap.StatefulMapping(model, state_in_axes={-1: WithTag("cols")}, mapping_fn=sharding.shard_map(mesh_1d(4)))
    assert sharding.spec_for(neg, model.cols) == P(None, "data")
    both = model_mapping(model, sharding.shard_map(mesh_2d(), axis=("data", "model")))
    assert sharding.spec_for(both, model.rows) == P(("data", "model"))
    routed = model_mapping(model, jax.shard_map, {"mesh": mesh_1d(2)})
    assert sharding.spec_for(routed, model.cols) == P(None, "data")


def test_spec_for_with_rules_on_a_2d_mesh():
    model = Model()
    m = model_mapping(model, sharding.shard_map(mesh_2d(), axis="data"))
    rules = {smap.ParamState: P(None, "model")}
    assert sharding.spec_for(m, model.w, rules) == P(None, "model")
    assert sharding.spec_for(m, model.scale, rules) == P()  # not selected: replicated
    assert sharding.spec_for(m, model.rows, rules) == P("data")
    # the same filters as state_in_axes, and the first rule that selects a state wins
    rules = {OfType(smap.HiddenState): P(None, "model"), (lambda path, s: path == ("w",)): P("model"), smap.State: P()}
    assert sharding.spec_for(m, model.rows, rules) == P("data", "model")
    assert sharding.spec_for(m, model.w, rules) == P("model")
    assert sharding.spec_for(m, model.scale, rules) == P()


def test_spec_for_rejects_impossible_rules():
    model = Model()
    m = model_mapping(model, sharding.shard_map(mesh_2d(), axis="data"))
    with pytest.raises(ValueError, match="names 3 dimensions, but its value has 2"):
        sharding.spec_for(m, model.w, {smap.ParamState: P(None, None, "model")})
    with pytest.raises(ValueError, match="dimension 0"):
        sharding.spec_for(m, model.rows, {smap.HiddenState: P("model")})
    with pytest.raises(TypeError, match="no mesh"):
        sharding.spec_for(smap.StatefulMapping(model, mapping_fn=jax.vmap), model.w)


# -- place -----------------------------------------------------------------------------


def test_place_with_rules_then_calls_keep_placement_and_match_vmap():
    model = Model()
    m = model_mapping(model, sharding.shard_map(mesh_2d(), axis="data"))
    rules = {smap.ParamState: P(None, "model"), OfType(smap.HiddenState): P(None, "model")}
    values = {k: np.asarray(s.value) for k, s in model.states().items()}
    sharding.place(model, m, rules=rules)
    expected = {"rows": P("data", "model"), "cols": P(None, "data"), "w": P(None, "model"), "scale": P()}
    for name, state in model.states().items():
        assert state.value.sharding == NamedSharding(mesh_2d(), expected[name]), name
        np.testing.assert_array_equal(state.value, values[name])  # placing moves, never changes
    x = rand(B, 3, seed=2)
    outs = [m(x)]
    after_first = {k: s.value.sharding for k, s in model.states().items()}
    outs.append(m(2 * x))
    ref_outs, ref_states = vmap_reference()
    close(outs, ref_outs)
    close({k: s.value for k, s in model.states().items()}, ref_states)
    for name, state in model.states().items():
        assert state.value.sharding.spec == expected[name], name
        assert state.value.sharding == after_first[name], name


def test_place_without_mapping():
    a, b = smap.ParamState(jnp.ones((4, 2))), smap.HiddenState(jnp.arange(8.0))
    sharding.place([a, b], mesh=mesh_1d(4))
    assert a.value.sharding == NamedSharding(mesh_1d(4), P()) and b.value.sharding.spec == P()
    sharding.place({"a": a, "b": b}, mesh=mesh_1d(4), rules={smap.HiddenState: P("data")})
    assert b.value.sharding == NamedSharding(mesh_1d(4), P("data"))
    assert a.value.sharding.spec == P()
    sharding.place(a, mesh=mesh_2d(), rules={smap.ParamState: P("data", "model")})
    assert a.value.sharding == NamedSharding(mesh_2d(), P("data", "model"))
    sharding.place([b], mesh_1d(2), rules={smap.HiddenState: P("data")})  # the mesh second, as the contract writes it
    assert b.value.sharding == NamedSharding(mesh_1d(2), P("data"))
    np.testing.assert_array_equal(a.value, np.ones((4, 2)))
    np.testing.assert_array_equal(b.value, np.arange(8.0))


def test_place_rejects_bad_requests():
    model = Model()
    values = {k: np.asarray(s.value) for k, s in model.states().items()}
    m = model_mapping(model, sharding.shard_map(mesh_2d(), axis="data"))
    with pytest.raises(ValueError, match="names 3 dimensions"):
        sharding.place(model, m, rules={smap.ParamState: P(None, None, "model")})
    with pytest.raises(ValueError, match="rank|dimensions"):
        sharding.place([model.scale], mesh=mesh_2d(), rules={smap.LongTermState: P("data", "model")})
    with pytest.raises(ValueError, match="mesh"):
        sharding.place(model)
    with pytest.raises(TypeError):
        sharding.place(model, smap.StatefulMapping(model, mapping_fn=jax.vmap))
    with pytest.raises(TypeError, match="two meshes"):
        sharding.place(model, mesh_2d(), mesh=mesh_1d(4))
    for name, state in model.states().items():
        np.testing.assert_array_equal(state.value, values[name])


def test_place_without_mapping_names_the_state_a_bad_rule_hits():
    model = Model()
    with pytest.raises(ValueError, match="scale"):
        sharding.place(model, mesh=mesh_2d(), rules={OfType(smap.LongTermState): P(None, "model")})


# -- the second call moves and re-shards nothing --------------------------------------------

_MOVING = re.compile(r"\b(all-gather|collective-permute|all-to-all|reduce-scatter)(-start)?\(")
_MOVING_LINE = re.compile(
    r"=\s*\(?([a-z]+[0-9]*)\[([0-9,]*)\][^=]*?\b(all-gather|collective-permute|all-to-all|reduce-scatter)(-start)?\("
)


def moving_collectives(hlo):
    """(dtype, shape, op) of every collective in ``hlo`` that moves data between devices."""
    return [(m.group(1), m.group(2), m.group(3)) for m in _MOVING_LINE.finditer(hlo)]


_COLLECTIVE = re.compile(
    r"\b(all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter|collective-broadcast)(-start)?\("
)


def compiled_text(m, *args):
    """The optimised HLO of the program a call of ``m`` with ``args`` runs now."""
    return m.lower(*args).compile().as_text()


SECOND_CALL_LAYOUTS = [
    "shard_map-2dev",
    "shard_map-4dev",
    "shard_map-8dev",
    "jax.shard_map-4dev",
    "shard_map-4x2-axis=data",
    "shard_map-4x2-axis=data+model",
]


@pytest.mark.parametrize("placed", [False, True], ids=["unplaced", "placed"])
@pytest.mark.parametrize("layout", SECOND_CALL_LAYOUTS)
def test_second_call_moves_nothing(layout, placed):
    build, get_mesh, axis = LAYOUTS[layout]
    model = Model()
    m = model_mapping(model, build())
    if placed:
        sharding.place(model, m)
    x = jax.device_put(rand(B, 3, seed=2), NamedSharding(get_mesh(), P(axis)))
    m(x)
    assert_second_call_moves_nothing(m, model, x, placed)


def assert_second_call_moves_nothing(m, model, x, placed):
    """A second call (states as the first left them) moves no data, keeps every placement,
    gives jax.vmap's values, and compiles to a data-parallel step with one all-reduce."""
    x2 = 2 * x
    before = {k: s.value.sharding for k, s in model.states().items()}
    # Placed states move not at all; without place, the state that is only read
    # (never written back) stays where it was created, so only host<->device
    # transfers are ruled out.
    with jax.transfer_guard("disallow") if placed else jax.transfer_guard_host_to_device("disallow"):
        with jax.transfer_guard_device_to_host("disallow"):
            out = m(x2)
    assert {k: s.value.sharding for k, s in model.states().items()} == before
    ref_outs, ref_states = vmap_reference()
    close(out, ref_outs[1])
    close({k: s.value for k, s in model.states().items()}, ref_states)

    hlo = compiled_text(m, x)
    assert not _MOVING.search(hlo), _MOVING.search(hlo).group(0)
    # a data-parallel step: the mean gradient is the only collective
    assert {c for c, _ in _COLLECTIVE.findall(hlo)} == {"all-reduce"}


# Meshes of Explicit axes, as jax.make_mesh makes by default: mapping_fn -> mesh shape and lane axes.
EXPLICIT = {
    "sharding.shard_map-4dev": (lambda mesh: (sharding.shard_map(mesh), None), (4,), "data"),
    "jax.shard_map-8dev": (lambda mesh: (jax.shard_map, {"mesh": mesh}), (8,), "data"),
    "jax.smap-2dev": (lambda mesh: (jax.smap, {"mesh": mesh, "axis_name": "data"}), (2,), "data"),
    "jax.smap-4x2": (lambda mesh: (functools.partial(jax.smap, axis_name="data"), {"mesh": mesh}), (4, 2), "data"),
    "sharding.shard_map-4x2-axis=data+model": (
        lambda mesh: (sharding.shard_map(mesh, axis=("data", "model")), None),
        (4, 2),
        ("data", "model"),
    ),
}


@functools.cache
def explicit_mesh(shape):
    names = ("data", "model")[: len(shape)]
    return jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])


@pytest.mark.parametrize("placed", [False, True], ids=["unplaced", "placed"])
@pytest.mark.parametrize("case", EXPLICIT, ids=list(EXPLICIT))
def test_explicit_mesh_first_call_moves_onto_it_second_moves_nothing(case, placed):
    build, shape, axis = EXPLICIT[case]
    mesh = explicit_mesh(shape)
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Explicit}  # jax.make_mesh's default
    model = Model()
    m = model_mapping(model, *build(mesh))
    if placed:
        sharding.place(model, m)
    # The batch is already on the mesh; unplaced states start on one device.
    x = jax.device_put(rand(B, 3, seed=2), NamedSharding(mesh, P(axis)))
    m(x)
    assert model.rows.value.sharding.is_equivalent_to(NamedSharding(mesh, P(axis)), 2)
    assert model.cols.value.sharding.is_equivalent_to(NamedSharding(mesh, P(None, axis)), 2)
    assert_second_call_moves_nothing(m, model, x, placed)


def test_second_call_with_rule_placed_params_keeps_them_placed():
    model = Model()
    m = model_mapping(model, sharding.shard_map(mesh_2d(), axis="data"))
    sharding.place(model, m, rules={smap.ParamState: P(None, "model")})
    assert model.w.value.sharding.spec == P(None, "model")
    x = jax.device_put(rand(B, 3, seed=2), NamedSharding(mesh_2d(), P("data")))
    m(x)
    before = {k: s.value.sharding for k, s in model.states().items()}
    x2 = 2 * x
    with jax.transfer_guard("disallow"):
        m(x2)
    assert {k: s.value.sharding for k, s in model.states().items()} == before
    assert model.w.value.sharding.spec == P(None, "model")
    assert model.rows.value.sharding.spec == P("data")


def test_second_call_with_random_state_moves_nothing():
    h = smap.HiddenState(jnp.zeros((B, 3)))

    def step(x):
        h.value = h.value + x * smap.random.uniform(size=3)
        return h.value.sum()

    m = smap.StatefulMapping(step, state_in_axes=smap.HiddenState, mapping_fn=sharding.shard_map(mesh_1d(4)))
    x = jax.device_put(jnp.ones((B, 3)), NamedSharding(mesh_1d(4), P("data")))
    m(x)
    key, spec = smap.random.DEFAULT.value, h.value.sharding
    with jax.transfer_guard("disallow"):
        m(x)
    assert h.value.sharding == spec
    assert not np.array_equal(smap.random.DEFAULT.value, key)
    # The per-lane keys may be split across devices (a few uint32 words move), but
    # the batched float state never moves.
    hlo = compiled_text(m, x)
    assert len(moving_collectives(hlo)) == len(_MOVING.findall(hlo))
    assert [c for c in moving_collectives(hlo) if c[0] != "u32"] == []


# -- a state left on another mapping's devices -------------------------------------------


def _lane_keys_normal(key, lanes, d):
    """What ``x + smap.random.normal(size=d)`` adds in each of ``lanes`` lanes, and the key after."""
    draws = jax.vmap(lambda k: jax.random.normal(jax.random.split(k)[1], (d,)))(jax.random.split(key, lanes))
    return draws, jax.random.split(key, lanes + 1)[lanes]


@pytest.mark.parametrize("first", [1, 2, 4])
def test_the_default_key_follows_mappings_on_other_devices(first):
    """A mapping on some devices leaves the default key there; a mapping on others, or on another mesh
    of the same devices, moves it (found by tests/sharding/test_state_fuzz.py: JAX refused the key to
    every later mapping on other devices, and on a 4 x 2 mesh after a 1-D one)."""
    mappings = {
        "first": sharding.pmap(jax.devices()[:first]),
        "eight": sharding.shard_map(mesh_1d(8)),
        "two": sharding.shard_map(mesh_1d(2)),
        "grid": sharding.shard_map(mesh_2d(), axis="data"),  # the same 8 devices as a 4 x 2 mesh
        "pmap": sharding.pmap(),
        "vmap": jax.vmap,
    }
    x = rand(B, 3)
    key = smap.random.DEFAULT.value
    # Never "eight" then "grid": there JAX 0.9's compiler aborts the process (docs/sharding.md).
    for name in ("first", "eight", "two", "grid", "pmap", "grid", "first", "vmap", "eight"):
        m = smap.StatefulMapping(lambda x: x + smap.random.normal(size=3), axis_name="i", mapping_fn=mappings[name])
        draws, key = _lane_keys_normal(key, B, 3)
        np.testing.assert_allclose(m(x), x + draws, rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(smap.random.DEFAULT.value, key, err_msg=name)


def test_a_shared_state_follows_mappings_on_other_meshes():
    """A weight written by a mapping on 4 devices, then read and written by mappings on other devices
    and meshes and by jax.vmap: the values of plain jax.vmap with the weight passed along."""
    w = smap.ParamState(rand(3, seed=1))

    def step(x):
        w.value = w.value - 0.1 * jax.lax.pmean(x * w.value, "i")
        return x * w.value

    def plain(w, x):
        new = w - 0.1 * jnp.mean(x * w, axis=0)
        return new, x * new

    explicit = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:4])
    mapping_fns = [
        sharding.shard_map(mesh_1d(4)),
        sharding.shard_map(mesh_1d(8)),
        jax.vmap,
        sharding.pmap(),
        sharding.shard_map(explicit),  # on a mesh of Explicit axes, JAX refuses it in the trace
        sharding.shard_map(mesh_1d(2)),
    ]
    want = rand(3, seed=1)
    for mapping_fn in mapping_fns:
        x = rand(B, 3, seed=2)
        got = smap.StatefulMapping(step, axis_name="i", mapping_fn=mapping_fn)(x)
        want, out = plain(want, x)
        np.testing.assert_allclose(got, out, rtol=1e-6)
        np.testing.assert_allclose(w.value, want, rtol=1e-6)


@pytest.mark.parametrize("in_jit", [False, True])
def test_a_weight_replicated_on_eight_devices_follows_a_mapping_on_a_grid_of_them(in_jit):
    """A weight of 4 that a mapping on 8 devices left replicated, then a mapping on a 4 x 2 mesh of the
    same devices (found by tests/sharding/test_state_fuzz.py, seed 39: the retry took the weight as
    placed already, replicated on the same devices, but JAX refuses it on a mesh of the other shape)."""
    w = smap.ParamState(rand(4, seed=1))

    def step(x):
        w.value = w.value - 0.1 * jax.lax.pmean(x * w.value, "i")
        return x * w.value

    want = rand(4, seed=1)
    for mapping_fn in (sharding.pmap(), sharding.shard_map(mesh_2d(), axis="data")):
        m = smap.StatefulMapping(step, axis_name="i", mapping_fn=mapping_fn)
        x = rand(B, 4, seed=2)
        got = (smap.jit(m) if in_jit else m)(x)
        want = want - 0.1 * jnp.mean(x * want, axis=0)
        np.testing.assert_allclose(got, x * want, rtol=1e-6)
        np.testing.assert_allclose(w.value, want, rtol=1e-6)


def test_batched_and_shared_states_follow_mappings_off_a_mesh_of_explicit_axes():
    """States a mapping left on a mesh of Explicit axes (whose values' types carry the mesh) move to a
    mapping on one device, and back: the values of plain jax.vmap with the states passed along."""
    explicit = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:4])
    h, w = smap.HiddenState(rand(B, 3, seed=3)), smap.ParamState(rand(3, seed=4))

    def step(x):
        h.value = jnp.tanh(h.value * w.value + x)
        w.value = w.value - 0.1 * jax.lax.pmean(h.value, "i")
        return h.value.sum()

    def plain(h, w, x):
        h = jnp.tanh(h * w + x)
        return h, w - 0.1 * jnp.mean(h, axis=0)

    want_h, want_w = rand(B, 3, seed=3), rand(3, seed=4)
    for seed, mapping_fn in enumerate([sharding.shard_map(explicit), sharding.shard_map(mesh_1d(1))] * 2):
        x = rand(B, 3, seed=10 + seed)
        smap.StatefulMapping(step, axis_name="i", state_in_axes=smap.HiddenState, mapping_fn=mapping_fn)(x)
        want_h, want_w = plain(want_h, want_w, x)
        np.testing.assert_allclose(h.value, want_h, rtol=1e-6)
        np.testing.assert_allclose(w.value, want_w, rtol=1e-6)


def test_a_state_the_user_moves_between_calls_stays_where_it_was_put():
    """The dispatcher's trace constrains each written state to where it lay when traced; after the user
    moves the state to another mesh, the next call neither refuses it nor puts it back: it stays where
    the user put it, with plain JAX's values."""
    w = smap.State(jax.device_put(rand(B, 3), NamedSharding(mesh_1d(8), P("data"))))
    step = smap.jit(lambda x: setattr(w, "value", w.value * 2.0 + x))
    want = rand(B, 3) * 2.0 + 1.0
    step(1.0)
    for devices in (4, 2, 8):
        placed = NamedSharding(mesh_1d(devices), P("data"))
        w.value = jax.device_put(w.value, placed)
        step(1.0)
        want = want * 2.0 + 1.0
        np.testing.assert_allclose(w.value, want, rtol=1e-6)
        assert w.value.sharding.is_equivalent_to(placed, 2), (devices, w.value.sharding)


def test_a_batched_state_written_on_a_mesh_follows_a_mapping_on_one_device():
    """A state that a mapping on 8 devices wrote per lane (``state_out_axes``) and a mapping on one
    device writes again without reading it (found by tests/sharding/test_state_fuzz.py: the retry
    moved the other states but asked the refused dispatcher where, and looped)."""
    rows = smap.State(jnp.zeros(3), tag="rows")

    def step(x):
        rows.value = 2.0 * x
        return x + smap.random.normal(size=3)

    for mapping_fn in (sharding.shard_map(mesh_1d(8)), sharding.pmap(jax.devices()[:1]), jax.vmap):
        x = rand(B, 3, seed=5)
        m = smap.StatefulMapping(step, axis_name="i", state_out_axes={0: WithTag("rows")}, mapping_fn=mapping_fn)
        key = smap.random.DEFAULT.value
        draws, key = _lane_keys_normal(key, B, 3)
        np.testing.assert_allclose(m(x), x + draws, rtol=1e-6)
        np.testing.assert_allclose(rows.value, 2.0 * x, rtol=1e-6)
        np.testing.assert_array_equal(smap.random.DEFAULT.value, key)


def test_a_call_that_does_not_write_a_listed_pytree_state_moves_the_others():
    """The mapping's list has a slot for a pytree state that one signature writes; a call of another
    signature, which leaves it alone, after the default key moved to another device: the key moves
    back, the pytree state is untouched."""
    stats = smap.State({"sum": jnp.zeros(3), "max": jnp.zeros(3)})

    def step(x):
        if x.shape[-1] == 3:
            stats.value = {"sum": jax.lax.psum(x, "i"), "max": jax.lax.pmax(x, "i")}
        return x + smap.random.normal(size=x.shape[-1])

    m = smap.StatefulMapping(step, axis_name="i", mapping_fn=sharding.shard_map(mesh_1d(8)))
    elsewhere = smap.StatefulMapping(step, axis_name="i", mapping_fn=sharding.pmap(jax.devices()[:1]))
    key = smap.random.DEFAULT.value
    for mapping, d in ((m, 3), (elsewhere, 2), (m, 4)):
        x = rand(B, d, seed=d)
        draws, key = _lane_keys_normal(key, B, d)
        np.testing.assert_allclose(mapping(x), x + draws, rtol=1e-6)
        np.testing.assert_array_equal(smap.random.DEFAULT.value, key)
    x = rand(B, 3, seed=3)
    np.testing.assert_allclose(stats.value["sum"], x.sum(0), rtol=1e-6)
    np.testing.assert_allclose(stats.value["max"], x.max(0), rtol=1e-6)


def test_an_argument_on_other_devices_is_refused_as_jax_refuses_it():
    """Arguments are the caller's: one committed to other devices than the mapping's is not moved."""
    w = smap.ParamState(jnp.ones(3))

    def step(x):
        w.value = w.value + jax.lax.pmean(x, "i")

    m = smap.StatefulMapping(step, axis_name="i", mapping_fn=sharding.shard_map(mesh_1d(2)))
    x = jax.device_put(rand(B, 3), NamedSharding(mesh_1d(4), P("data")))
    with pytest.raises(ValueError, match="incompatible devices"):
        m(x)
    np.testing.assert_array_equal(w.value, jnp.ones(3))


# -- describe ----------------------------------------------------------------------------


def _row(table, path):
    (row,) = [r for r in table if r.path == path]
    return row


@pytest.mark.parametrize(
    "layout", ["shard_map-4dev", "shard_map-8dev", "shard_map-4x2-axis=data", "shard_map-4x2-axis=data+model"]
)
def test_describe_rows_and_bytes_per_device(layout):
    build, get_mesh, axis = LAYOUTS[layout]
    model = Model()
    m = model_mapping(model, build())
    m(rand(B, 3, seed=2))
    table = sharding.describe(model)
    assert [r.path for r in table] == list(model.states())
    size = _axis_size(get_mesh(), axis)
    for name, state in model.states().items():
        row, value = _row(table, name), state.value
        assert row.type == type(state).__name__
        assert row.shape == value.shape
        assert row.dtype == "float32"
        if name != "scale":  # scale is only read: it stays where it was created
            assert row.spec == str(value.sharding.spec)
            assert row.spec == str(sharding.spec_for(m, state))
    total = lambda s: s.value.size * 4  # noqa: E731
    assert _row(table, "rows").bytes_per_device == total(model.rows) // size
    assert _row(table, "cols").bytes_per_device == total(model.cols) // size
    assert _row(table, "w").bytes_per_device == total(model.w)
    assert _row(table, "scale").bytes_per_device == total(model.scale)


def test_describe_with_rules_and_other_targets():
    model = Model()
    m = model_mapping(model, sharding.shard_map(mesh_2d(), axis="data"))
    sharding.place(model, m, rules={smap.ParamState: P(None, "model")})
    table = sharding.describe(model)
    assert _row(table, "w").bytes_per_device == 3 * 4 * 4 // 2
    assert _row(table, "w").spec == str(P(None, "model"))
    assert _row(table, "rows").bytes_per_device == B * 4 * 4 // 4
    # a dict, a list and a lone state
    assert [r.path for r in sharding.describe({"x": model.w, "y": model.rows})] == ["x", "y"]
    assert len(sharding.describe([model.w, model.rows])) == 2
    (row,) = sharding.describe(smap.ParamState(jnp.zeros((2, 5), jnp.int32)))
    assert (row.type, row.shape, row.dtype, row.bytes_per_device) == ("ParamState", (2, 5), "int32", 40)


def test_describe_prints_an_aligned_table():
    model = Model()
    m = model_mapping(model, sharding.shard_map(mesh_1d(4)))
    m(rand(B, 3, seed=2))
    table = sharding.describe(model)
    lines = str(table).splitlines()
    assert repr(table) == str(table)
    assert len(lines) == 2 + len(model.states())
    header, rule, *rows = lines
    assert header.split() == ["path", "type", "shape", "dtype", "spec", "bytes/device"]
    assert set(rule.replace(" ", "")) == {"-"}
    # columns: the dashes mark each column; every cell sits inside its column
    spans = [m_.span() for m_ in re.finditer(r"-+", rule)]
    assert len(spans) == 6
    for line, row in zip(rows, table):
        cells = [row.path, row.type, str(row.shape), row.dtype, row.spec, f"{row.bytes_per_device:,}"]
        for i, ((start, end), cell) in enumerate(zip(spans, cells)):
            text = line[start:end]
            assert text.strip() == cell, (line, i)
            if i < 5:
                assert text.startswith(cell)  # left-aligned text
            else:
                assert text.endswith(cell)  # right-aligned numbers
        assert header[spans[5][0] : spans[5][1]].strip() == "bytes/device"
