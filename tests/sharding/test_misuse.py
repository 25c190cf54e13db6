"""Bad input to the sharding layer: an error naming the argument or the state
and what was expected; a failed ``place`` leaves every state where it was."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import sharding
import smap


@pytest.mark.parametrize(
    "devices, error, words",
    [
        (["cpu0"], TypeError, r"sharding\.pmap: devices\[0\] must be a JAX device.*got str 'cpu0'"),
        ([], ValueError, r"sharding\.pmap: devices is empty"),
        ("cpu", TypeError, r"sharding\.pmap: devices must be a list of JAX devices, got str"),
    ],
)
def test_pmap_devices_must_be_jax_devices(devices, error, words):
    with pytest.raises(error, match=words):
        sharding.pmap(devices=devices)
    with pytest.raises(error, match=words):
        smap.StatefulMapping(lambda x: x, mapping_fn=jax.pmap, mapping_kwargs={"devices": devices})(jnp.ones(2))


def test_pmap_with_a_repeated_device():
    d = jax.devices()
    words = rf"sharding\.pmap: devices lists {d[1]} more than once"
    with pytest.raises(ValueError, match=words):
        sharding.pmap([d[0], d[1], d[1]])
    with pytest.raises(ValueError, match=words):
        smap.StatefulMapping(lambda x: x, mapping_fn=jax.pmap, mapping_kwargs={"devices": [d[1], d[1]]})(jnp.ones(2))


def test_make_mesh_with_a_repeated_device():
    d = jax.devices()
    with pytest.raises(ValueError, match=rf"make_mesh: devices lists {d[1]} more than once"):
        sharding.make_mesh(data=4, devices=[d[0], d[1], d[1], d[2]])


def mapping_on(mesh):
    return smap.StatefulMapping(lambda x: x, state_in_axes=smap.HiddenState, mapping_fn=sharding.shard_map(mesh))


def test_spec_for_and_describe_given_arrays_name_what_they_expect():
    mesh = sharding.make_mesh(data=8)
    with pytest.raises(TypeError, match=r"spec_for: state must be a smap\.State, got ArrayImpl"):
        sharding.spec_for(mapping_on(mesh), jnp.ones(3))
    with pytest.raises(TypeError, match=r"mapping must be a smap\.StatefulMapping, got ArrayImpl"):
        sharding.spec_for(jnp.ones(3), smap.State(jnp.ones(3)))
    with pytest.raises(TypeError, match=r"target must be a Module, a State, or a dict or list of States, got Array"):
        sharding.describe(jnp.ones(3))
    with pytest.raises(TypeError, match=r"target\['a'\] must be a smap\.State, got ArrayImpl"):
        sharding.describe({"a": jnp.ones(3)})
    with pytest.raises(TypeError, match=r"target\[1\] must be a smap\.State, got ArrayImpl"):
        sharding.place([smap.State(jnp.ones(8)), jnp.ones(3)], mesh=mesh)


def test_describe_and_place_given_the_mapping_first_say_where_it_goes():
    mapping = mapping_on(sharding.make_mesh(data=8))
    words = r"got StatefulMapping \(the states go first and the mapping second\)"
    with pytest.raises(TypeError, match=words):
        sharding.describe(mapping)
    with pytest.raises(TypeError, match=words):
        sharding.place(mapping)


def shardings(*states):
    return [s.value.sharding for s in states]


def test_place_with_a_spec_that_does_not_divide_a_state_names_it_and_leaves_all_where_they_were():
    mesh = sharding.make_mesh(data=8)
    fits, odd = smap.ParamState(jnp.ones((8, 4))), smap.ParamState(jnp.ones((3, 4)))
    before = shardings(fits, odd)
    with pytest.raises(ValueError, match=r"ParamState float32\[3,4\] has size 3 in dimension 0.*mesh axis 'data'"):
        sharding.place([fits, odd], mesh=mesh, rules={smap.ParamState: P("data")})
    assert shardings(fits, odd) == before  # `fits` was not placed either
    np.testing.assert_array_equal(np.asarray(fits.value), np.ones((8, 4)))
    # With a batched state of a mapping: the mesh axis is the mapping's.
    h = smap.HiddenState(jnp.zeros((6, 2)))
    with pytest.raises(ValueError, match=r"HiddenState float32\[6,2\] has size 6 in dimension 0.*mesh axis 'data'"):
        sharding.place([fits, h], mapping_on(mesh))
    assert shardings(fits, h)[0] == before[0]


def test_place_with_a_string_or_an_unknown_mesh_axis_where_a_spec_belongs():
    mesh = sharding.make_mesh(data=8)
    w = smap.ParamState(jnp.ones((8, 4)))
    before = shardings(w)
    with pytest.raises(TypeError, match=r"rules\[.*ParamState.*\] must be a PartitionSpec, got str 'data'"):
        sharding.place([w], mesh=mesh, rules={smap.ParamState: "data"})
    # A tuple is read as one entry per dimension, and the fix says so.
    with pytest.raises(TypeError, match=r"got tuple \('data', None\); write PartitionSpec\('data', None\)"):
        sharding.place([w], mesh=mesh, rules={smap.ParamState: ("data", None)})
    fixed = smap.ParamState(jnp.ones((8, 4)))
    sharding.place([fixed], mesh=mesh, rules={smap.ParamState: P("data", None)})  # the fix as written works
    assert fixed.value.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("data", None)), 2)
    with pytest.raises(TypeError, match=r"rules must be a dict from a selector .* to a PartitionSpec, got list"):
        sharding.place([w], mesh=mesh, rules=[smap.ParamState, P("data")])
    with pytest.raises(ValueError, match=r"names mesh axis 'model', but the mesh has axes \('data',\)"):
        sharding.place([w], mesh=mesh, rules={smap.ParamState: P("model")})
    assert shardings(w) == before
    sharding.place([w], mesh=mesh, rules={smap.ParamState: P("data")})
    assert w.value.sharding.spec == P("data")


class Pair(smap.nn.Module):
    def __init__(self):
        self.w = smap.ParamState(jnp.arange(32.0).reshape(8, 4), tag="misuse-weights")
        self.h = smap.HiddenState(jnp.arange(16.0).reshape(8, 2))


@pytest.mark.parametrize(
    "rule, words",
    [
        ("hidden", r"pass the class smap\.HiddenState"),
        ("misuse-weight", r"Tags in use: .*'misuse-weights'"),  # a typo of a tag
    ],
)
def test_place_with_a_string_rule_that_is_no_tag_names_what_it_could_have_meant_and_moves_nothing(rule, words):
    mesh = sharding.make_mesh(data=8)
    pair = Pair()
    before = shardings(pair.w, pair.h)
    message = rf"(?s)a key of rules is the string '{rule}', which selects the States tagged '{rule}', and no State"
    with pytest.raises(ValueError, match=message + r".*" + words + r".*Paths of the states here: 'w', 'h'"):
        sharding.place(pair, mesh=mesh, rules={"misuse-weights": P("data"), rule: P("data")})
    assert shardings(pair.w, pair.h) == before
    sharding.place(pair, mesh=mesh, rules={"misuse-weights": P("data"), smap.HiddenState: P("data")})
    assert pair.w.value.sharding.spec == P("data") and pair.h.value.sharding.spec == P("data")
    np.testing.assert_array_equal(pair.h.value, np.arange(16.0).reshape(8, 2))  # placing moves, never changes


def test_place_with_a_path_rule_that_selects_nothing_warns_and_places_the_rest():
    mesh = sharding.make_mesh(data=8)
    pair = Pair()
    with pytest.warns(
        UserWarning, match=r"the rule AtPath\('v'\) selects none of the states placed \(their paths: 'h', 'w'\)"
    ):
        sharding.place(pair, mesh=mesh, rules={smap.filter.AtPath("v"): P(None, "data"), smap.HiddenState: P("data")})
    assert pair.w.value.sharding.spec == P() and pair.h.value.sharding.spec == P("data")
    np.testing.assert_array_equal(pair.w.value, np.arange(32.0).reshape(8, 4))


def test_place_with_a_type_rule_for_a_type_not_there_is_silent():
    # A rule set shared by several models may name a type that this one lacks.
    mesh = sharding.make_mesh(data=8)
    pair = Pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sharding.place(pair, mesh=mesh, rules={smap.random.RandomState: P("data"), smap.ParamState: P("data")})
    assert pair.w.value.sharding.spec == P("data") and pair.h.value.sharding.spec == P()


def test_global_batch_places_a_process_batch_and_names_what_it_cannot_split():
    mesh = sharding.make_mesh(data=8)
    x, y = np.arange(32.0, dtype=np.float32).reshape(16, 2), np.arange(16, dtype=np.int32)
    gx, gy = sharding.global_batch((x, y), mesh)
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)
    assert gx.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P("data")), 2)
    with pytest.raises(TypeError, match=r"global_batch: mesh must be a jax.sharding.Mesh, got str"):
        sharding.global_batch(x, "data")
    with pytest.raises(ValueError, match=r"global_batch: local\[1\]\['step'\] is a scalar; a batch is split along"):
        sharding.global_batch((x, {"step": np.float32(3)}), mesh)
    with pytest.raises(ValueError, match=r"global_batch: the mesh has axes \('data',\), not 'batch'"):
        sharding.global_batch(x, mesh, axis="batch")
    with pytest.raises(
        ValueError, match=r"global_batch: local\[1\] \(shape \(12,\)\) cannot be split along axis 0 over"
    ):
        sharding.global_batch((x, np.arange(12)), mesh)


@pytest.mark.parametrize(
    "mesh, axis, error, match",
    [
        ("mesh", "data", TypeError, r"mesh must be a jax.sharding.Mesh or None, got str"),
        (None, 0, TypeError, r"axis must be a mesh axis name, a tuple of them, or None \(every axis\), got 0"),
        (None, ("data", 1), TypeError, r"axis must be a mesh axis name, .* got \('data', 1\)"),
    ],
    ids=["mesh-str", "axis-int", "axis-tuple-with-int"],
)
def test_shard_map_names_a_mesh_or_axis_of_the_wrong_kind(mesh, axis, error, match):
    with pytest.raises(error, match=match):
        sharding.shard_map(mesh, axis=axis)


@pytest.mark.parametrize(
    "num_processes, process_id, match",
    [
        (0, 0, r"num_processes must be a positive int, got 0"),
        (2, 2, r"process_id must be an int from 0 to num_processes - 1 = 1, got 2"),
        (2, -1, r"process_id must be an int from 0 to num_processes - 1 = 1, got -1"),
    ],
)
def test_initialize_names_a_process_count_or_id_out_of_range(num_processes, process_id, match):
    # Refused before JAX's distributed runtime is asked anything.
    with pytest.raises(ValueError, match=match):
        sharding.initialize("127.0.0.1:1", num_processes=num_processes, process_id=process_id)
