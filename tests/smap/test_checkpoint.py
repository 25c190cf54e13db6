"""Tests of ``smap.checkpoint``: exact round trips onto any mesh, atomic saves, and clear errors.

Every restored value is compared with the NumPy array it was made from; every
restored placement with the sharding the sharding layer gives on the target
mesh (``sharding.place`` on a copy of the states). Errors must leave every
state as it was.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
import smap
from smap.checkpoint import CheckpointError, _files, _io

ROOT = pathlib.Path(__file__).resolve().parents[2]
B = 8


def mesh_1d(n, axis_type=jax.sharding.AxisType.Auto):
    return jax.make_mesh((n,), ("data",), axis_types=(axis_type,), devices=jax.devices()[:n])


def arrays(seed=0):
    """The values of the states, as NumPy arrays: the reference every restore is checked against."""
    rng = np.random.default_rng(seed)
    return {
        "hidden": rng.normal(size=(B, 3)).astype(np.float32),
        "w": rng.normal(size=(4, B)).astype(np.float32),
        "adam": {"mu": rng.normal(size=(4, B)).astype(np.float32), "count": np.int32(7 + seed)},
        "half": rng.normal(size=(B, 2)).astype(jnp.bfloat16),
        "flags": rng.random(5) > 0.5,
    }


class Net(smap.nn.Module):
    def __init__(self, values):
        self.hidden = smap.HiddenState(values["hidden"])
        self.w = smap.ParamState(values["w"])
        self.adam = smap.LongTermState(values["adam"], tag="optimizer")
        self.half = smap.HiddenState(values["half"])
        self.flags = smap.State(values["flags"])
        self.rng = smap.random.RandomState(3)


def zeros_like(values):
    return jax.tree_util.tree_map(np.zeros_like, values)


def host(states):
    return {name: jax.tree_util.tree_map(np.asarray, s.value) for name, s in states.items()}


def assert_values(net, values):
    got = host(net.states())
    got.pop("rng")
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, values)


def mapping_on(mesh):
    """A mapping that batches HiddenStates over the mesh's 'data' axis."""
    return smap.StatefulMapping(lambda x: x, state_in_axes=smap.HiddenState, mapping_fn=sharding.shard_map(mesh))


def expected_shardings(values, mesh, **place):
    """What sharding.place gives each state of a fresh Net on ``mesh``: the reference for restore."""
    reference = Net(values)
    sharding.place(reference, mesh=mesh, **place)
    return {name: s.value for name, s in reference.states().items()}


def assert_placed_like(net, reference):
    for name, state in net.states().items():
        for got, want in zip(jax.tree_util.tree_leaves(state.value), jax.tree_util.tree_leaves(reference[name])):
            assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (name, got.sharding, want.sharding)


def test_round_trip_on_the_same_mesh_keeps_values_and_placement(tmp_path):
    mesh = mesh_1d(8)
    values = arrays()
    net = Net(values)
    mapping = mapping_on(mesh)
    sharding.place(net, mapping, rules={smap.ParamState: P(None, "data")})
    before = {name: s.value for name, s in net.states().items()}
    smap.checkpoint.save(tmp_path, net, step=5)

    for state in net.states().values():  # other values, same placement
        state.value = jax.tree_util.tree_map(lambda x: x * 0 if x.dtype != bool else ~x, state.value)
    assert smap.checkpoint.restore(tmp_path, net) == 5
    assert_values(net, values)
    for name, state in net.states().items():
        for got, want in zip(jax.tree_util.tree_leaves(state.value), jax.tree_util.tree_leaves(before[name])):
            assert got.sharding == want.sharding and got.dtype == want.dtype, name
    assert net.hidden.value.sharding.spec == P("data") and net.w.value.sharding.spec == P(None, "data")

    # Each distinct shard once: 8 for a state split 8 ways, one for a replicated one, all in one data file.
    folder = tmp_path / "step_00000005"
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = {name: [len(leaf["shards"]) for leaf in record["leaves"]] for name, record in manifest["states"].items()}
    assert shards == {"hidden": [8], "w": [8], "adam": [1, 1], "half": [8], "flags": [1], "rng": [1]}
    assert manifest["states"]["half"]["leaves"][0]["dtype"] == "bfloat16"
    assert manifest["states"]["adam"]["type"] == "smap.LongTermState"
    assert sorted(p.name for p in folder.iterdir()) == ["data_0.bin", "manifest.json"]
    # a shard is its raw bytes at its offset (NumPy reads it), each on its own page
    entry = manifest["states"]["w"]["leaves"][0]["shards"][3]
    assert entry["index"] == [[0, 4], [3, 4]] and entry["offset"] % _io.ALIGN == 0
    raw = np.fromfile(folder / entry["file"], np.float32, count=4, offset=entry["offset"]).reshape(4, 1)
    np.testing.assert_array_equal(raw, values["w"][:, 3:4])
    total = sum(s["nbytes"] for r in manifest["states"].values() for leaf in r["leaves"] for s in leaf["shards"])
    assert total == sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(values)) + 8  # + the key (2 x u32)
    assert (folder / "data_0.bin").stat().st_size <= total + 28 * _io.ALIGN  # at most a page of padding a shard


def test_restore_onto_8_then_2_then_1_then_4_devices(tmp_path):
    values = arrays()
    net = Net(values)
    sharding.place(net, mapping_on(mesh_1d(8)))
    smap.checkpoint.save(tmp_path, net, step=0)

    for step, n in enumerate([2, 1, 4]):
        net = Net(zeros_like(values))
        mesh = mesh_1d(n)
        assert smap.checkpoint.restore(tmp_path, net, mapping=mapping_on(mesh)) == step
        assert_values(net, values)
        assert_placed_like(net, expected_shardings(values, mesh, mapping=mapping_on(mesh)))
        assert net.hidden.value.sharding.spec == P("data")
        assert len(net.hidden.value.sharding.device_set) == n
        smap.checkpoint.save(tmp_path, net, step=step + 1, keep=1)  # the next restore reads what n devices wrote
        assert smap.checkpoint.steps(tmp_path) == [step + 1]

    # mesh=None: a state on one device is restored on that device, uncommitted stays uncommitted
    plain = Net(zeros_like(values))
    device = jax.devices()[5]
    plain.w.value = jax.device_put(plain.w.value, device)
    smap.checkpoint.restore(tmp_path, plain)
    assert_values(plain, values)
    assert plain.w.value.sharding.device_set == {device} and plain.w.value.committed
    assert not plain.hidden.value.committed


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_4x2_data_model_mesh_to_8x1(tmp_path, axis_type):
    kind = getattr(jax.sharding.AxisType, axis_type)
    rules = {smap.HiddenState: P("data"), smap.ParamState: P("model", "data")}
    values = arrays()
    net = Net(values)
    mesh_4x2 = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
    sharding.place(net, mesh=mesh_4x2, rules=rules)
    assert net.w.value.sharding.spec == P("model", "data")
    smap.checkpoint.save(tmp_path, net, step=1)
    manifest = json.loads((tmp_path / "step_00000001" / "manifest.json").read_text())
    assert [s["index"] for s in manifest["states"]["w"]["leaves"][0]["shards"]][:3] == [
        [[0, 2], [0, 2]],
        [[0, 2], [2, 4]],
        [[0, 2], [4, 6]],
    ]

    mesh_8x1 = jax.make_mesh((8, 1), ("data", "model"), axis_types=(kind, kind))
    net = Net(zeros_like(values))
    smap.checkpoint.restore(tmp_path, net, mesh_8x1, rules=rules)
    assert_values(net, values)
    assert_placed_like(net, expected_shardings(values, mesh_8x1, rules=rules))
    assert net.w.value.sharding.mesh is mesh_8x1 and net.w.value.sharding.spec == P("model", "data")
    assert net.adam.value["mu"].sharding.spec == P()  # no rule: replicated
    assert [tuple(s.data.shape) for s in net.w.value.addressable_shards] == [(4, 1)] * 8

    # a placement the shapes do not allow is named
    with pytest.raises(
        CheckpointError, match="state 'w' cannot be placed as asked: .*has size 4 in dimension 0.*mesh axis 'data'"
    ):
        smap.checkpoint.restore(tmp_path, net, mesh_8x1, rules={smap.ParamState: P("data")})


def test_restore_under_jax_set_mesh(tmp_path):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    values = arrays()
    net = Net(values)
    sharding.place(net, mesh=mesh, rules={smap.HiddenState: P("data")})
    smap.checkpoint.save(tmp_path, net, step=1)
    with jax.set_mesh(mesh):
        for kwargs in [{}, {"mesh": mesh, "rules": {smap.HiddenState: P("data")}}]:
            net.hidden.value = net.hidden.value * 0
            assert smap.checkpoint.restore(tmp_path, net, **kwargs) == 1
            assert_values(net, values)
            assert net.hidden.value.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)


def test_random_states_round_trip_so_the_next_draws_are_identical(tmp_path):
    rng = smap.random.RandomState(11)
    rng.normal(size=2)  # the key has advanced from the seed's
    typed = smap.State(jax.random.split(jax.random.key(4), B))  # a typed key array, split over the mesh
    typed.value = jax.device_put(typed.value, NamedSharding(mesh_1d(8), P("data")))
    states = {"rng": rng, "default": smap.random.DEFAULT, "typed": typed}
    smap.checkpoint.save(tmp_path, states, step=0)
    expected = (rng.normal(size=3), smap.random.uniform(size=2), jax.random.key_data(typed.value))
    expected_next = rng.randint(0, 100, size=4)

    typed.value = jax.device_put(jax.random.split(jax.random.key(0), B), typed.value.sharding)
    smap.random.seed(99)
    assert smap.checkpoint.restore(tmp_path, states) == 0
    np.testing.assert_array_equal(rng.normal(size=3), expected[0])
    np.testing.assert_array_equal(smap.random.uniform(size=2), expected[1])
    np.testing.assert_array_equal(rng.randint(0, 100, size=4), expected_next)
    assert jax.dtypes.issubdtype(typed.value.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(typed.value), expected[2])
    assert typed.value.sharding.spec == P("data")
    np.testing.assert_array_equal(  # the draws of the restored keys are those of the saved ones
        jax.vmap(jax.random.normal)(typed.value), jax.vmap(jax.random.normal)(jax.random.split(jax.random.key(4), B))
    )


def test_steps_keep_overwrite_and_the_latest(tmp_path):
    w = smap.ParamState(np.zeros(3, np.float32))
    directory = tmp_path / "new" / "checkpoints"  # created when missing
    for step in [3, 1, 4, 2]:
        w.value = np.full(3, step, np.float32)
        smap.checkpoint.save(directory, {"w": w}, step=step)
    assert smap.checkpoint.steps(directory) == [1, 2, 3, 4]
    assert smap.checkpoint.restore(directory, {"w": w}) == 4 and float(w.value[0]) == 4
    assert smap.checkpoint.restore(directory, {"w": w}, step=1) == 1 and float(w.value[0]) == 1

    with pytest.raises(CheckpointError, match="step 4 exists; pass overwrite=True"):
        smap.checkpoint.save(directory, {"w": w}, step=4)
    w.value = np.full(3, 40, np.float32)
    smap.checkpoint.save(directory, {"w": w}, step=4, overwrite=True)
    w.value = np.zeros(3, np.float32)
    smap.checkpoint.restore(directory, {"w": w})
    np.testing.assert_array_equal(w.value, np.full(3, 40))

    smap.checkpoint.save(directory, {"w": w}, step=5, keep=2)
    assert smap.checkpoint.steps(directory) == [4, 5]
    assert sorted(p.name for p in directory.iterdir()) == ["step_00000004", "step_00000005"]


def test_bad_requests_are_clear_errors(tmp_path):
    w = smap.ParamState(np.ones(3, np.float32))
    with pytest.raises(CheckpointError, match="no complete checkpoint to restore \\(it does not exist\\)"):
        smap.checkpoint.restore(tmp_path / "nothing", {"w": w})
    with pytest.raises(CheckpointError, match="no complete checkpoint to restore \\(it holds no complete step\\)"):
        smap.checkpoint.restore(tmp_path, {"w": w})
    (tmp_path / "a_file").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="a_file is a file, not a directory of checkpoints"):
        smap.checkpoint.save(tmp_path / "a_file", {"w": w}, step=0)
    with pytest.raises(CheckpointError, match="no complete checkpoint to restore \\(it is a file, not a directory\\)"):
        smap.checkpoint.restore(tmp_path / "a_file", {"w": w})
    (tmp_path / "a_file").unlink()
    smap.checkpoint.save(tmp_path, {"w": w}, step=2)
    with pytest.raises(CheckpointError, match=r"step 3 was never saved completely; the complete steps are \[2\]"):
        smap.checkpoint.restore(tmp_path, {"w": w}, step=3)
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        smap.checkpoint.save(tmp_path, {"w": w}, step=-1)
    with pytest.raises(ValueError, match="keep must be None or a positive int, got 0"):
        smap.checkpoint.save(tmp_path, {"w": w}, step=3, keep=0)
    with pytest.raises(TypeError, match="target: expected a Module or a mapping from names to States, got list"):
        smap.checkpoint.save(tmp_path, [w], step=3)
    with pytest.raises(TypeError, match=r"target\['w'\]: expected a State, got ArrayImpl"):
        smap.checkpoint.save(tmp_path, {"w": w.value}, step=3)
    with pytest.raises(ValueError, match="rules place states on a mesh"):
        smap.checkpoint.restore(tmp_path, {"w": w}, rules={smap.ParamState: P("data")})
    assert smap.checkpoint.steps(tmp_path) == [2]

    @smap.jit
    def inside():
        smap.checkpoint.restore(tmp_path, {"w": w})
        return w.value

    with pytest.raises(CheckpointError, match=r"restore runs outside transforms \(jit, grad, mappings\)"):
        inside()
    np.testing.assert_array_equal(w.value, np.ones(3))


def test_mismatched_target_names_every_state_and_changes_none(tmp_path):
    saved = {
        "same": smap.ParamState(np.ones(2, np.float32)),
        "gone": smap.ParamState(np.ones(2, np.float32)),
        "shape": smap.ParamState(np.ones((2, 3), np.float32)),
        "dtype": smap.ParamState(np.ones(2, np.float32)),
        "kind": smap.LongTermState(np.ones(2, np.float32)),
        "tree": smap.State({"a": np.ones(2, np.float32)}),
        "leaf": smap.State({"a": np.ones(2, np.float32), "b": np.ones(2, np.float32)}),
    }
    smap.checkpoint.save(tmp_path, saved, step=1)
    target = {
        "same": smap.ParamState(np.zeros(2, np.float32)),
        "shape": smap.ParamState(np.zeros((3, 2), np.float32)),
        "dtype": smap.ParamState(np.zeros(2, np.int32)),
        "kind": smap.ParamState(np.zeros(2, np.float32)),
        "tree": smap.State({"b": np.zeros(2, np.float32)}),
        "leaf": smap.State({"a": np.zeros(2, np.float32), "b": np.zeros(3, np.float32)}),
        "extra": smap.ParamState(np.zeros(2, np.float32)),
    }
    before = {name: s.value for name, s in target.items()}
    with pytest.raises(CheckpointError) as error:
        smap.checkpoint.restore(tmp_path, target)
    message = str(error.value)
    assert "the target does not match the checkpoint (7 states)" in message
    for line in [
        "'gone': in the checkpoint, not in the target",
        "'extra': in the target, not in the checkpoint",
        "'shape': float32[2,3] in the checkpoint, float32[3,2] in the target",
        "'dtype': float32[2] in the checkpoint, int32[2] in the target",
        "'kind': a smap.LongTermState in the checkpoint, a smap.ParamState in the target",
        "'tree': leaves [\"['a']\"] in the checkpoint, [\"['b']\"] in the target",
        "\"leaf['b']\": float32[2] in the checkpoint, float32[3] in the target",
    ]:
        assert line in message, message
    assert "'same'" not in message
    assert all(target[name].value is value for name, value in before.items())


def test_corrupted_truncated_or_missing_data_is_named_and_changes_nothing(tmp_path):
    values = arrays()
    net = Net(values)
    sharding.place(net, mapping_on(mesh_1d(8)))
    smap.checkpoint.save(tmp_path, net, step=1)
    folder = tmp_path / "step_00000001"
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = manifest["states"]["half"]["leaves"][0]["shards"][3]
    data = folder / shard["file"]
    content = bytearray(data.read_bytes())
    content[shard["offset"] + shard["nbytes"] - 1] ^= 0xFF  # the last byte of that shard
    data.write_bytes(bytes(content))

    target = Net(zeros_like(values))
    before = {name: s.value for name, s in target.states().items()}
    with pytest.raises(CheckpointError, match=r"data_0.bin: the shard of state 'half' is corrupted: its sha256 is"):
        smap.checkpoint.restore(tmp_path, target)
    assert all(target.states()[name].value is value for name, value in before.items())

    data.write_bytes(bytes(content[: shard["offset"] + 2]))  # cut short inside that shard
    with pytest.raises(CheckpointError, match=r"data_0.bin: cannot read a shard of state 'half' \(the file ends"):
        smap.checkpoint.restore(tmp_path, target)
    assert all(target.states()[name].value is value for name, value in before.items())

    data.unlink()  # a missing data file is named too
    with pytest.raises(CheckpointError, match=r"data_0.bin: cannot read a shard of state 'hidden'"):
        smap.checkpoint.restore(tmp_path, target)
    assert all(target.states()[name].value is value for name, value in before.items())

    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json: cannot read the manifest"):
        smap.checkpoint.restore(tmp_path, target)
    assert all(target.states()[name].value is value for name, value in before.items())


def _fail_on_the_third_shard(monkeypatch):
    write = _io._write_at
    calls = []

    def fail(fd, offset, data):
        calls.append(offset)
        if len(calls) == 3:
            raise OSError("disk full")
        return write(fd, offset, data)

    monkeypatch.setattr(_io, "_write_at", fail)


@pytest.mark.parametrize("wait", [True, False])
def test_a_failed_save_leaves_the_previous_step_the_latest(tmp_path, monkeypatch, wait):
    w = smap.ParamState(np.arange(B * 4, dtype=np.float32).reshape(B, 4))
    w.value = jax.device_put(w.value, NamedSharding(mesh_1d(8), P("data")))
    smap.checkpoint.save(tmp_path, {"w": w}, step=1)
    _fail_on_the_third_shard(monkeypatch)
    w.value = w.value + 1
    failure = r"saving step 2 failed \(OSError: disk full\)"
    if wait:
        with pytest.raises(CheckpointError, match=failure):
            smap.checkpoint.save(tmp_path, {"w": w}, step=2)
    else:  # the failure surfaces at wait()
        pending = smap.checkpoint.save(tmp_path, {"w": w}, step=2, wait=False)
        with pytest.raises(CheckpointError, match=failure):
            pending.wait()
        assert pending.done()
    monkeypatch.undo()
    assert smap.checkpoint.steps(tmp_path) == [1]
    assert (tmp_path / ".partial_step_00000002").is_dir()
    assert smap.checkpoint.restore(tmp_path, {"w": w}) == 1  # ... which removes the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    np.testing.assert_array_equal(w.value, np.arange(B * 4).reshape(B, 4))
    smap.checkpoint.save(tmp_path, {"w": w}, step=2)
    assert smap.checkpoint.steps(tmp_path) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]


SLOW_SAVER = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp, numpy as np, smap
    from smap.checkpoint import _io

    directory = sys.argv[1]
    states = {f"s{i}": smap.ParamState(jnp.full((64, 64), float(i))) for i in range(40)}
    smap.checkpoint.save(directory, states, step=1)
    write = _io._write_at
    def slow(fd, offset, data):
        time.sleep(0.25)
        return write(fd, offset, data)
    _io._write_at = slow
    for state in states.values():
        state.value = state.value + 1000
    print("saving step 2", flush=True)
    smap.checkpoint.save(directory, states, step=2)
    print("saved step 2", flush=True)
    """
)


def test_a_save_killed_midway_never_loads(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    saver = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVER, str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    partial = tmp_path / ".partial_step_00000002"
    deadline = time.monotonic() + 120
    states = {f"s{i}": smap.ParamState(jnp.zeros((64, 64))) for i in range(40)}
    try:
        while not (partial / "data_0.bin").exists():
            assert saver.poll() is None, saver.stdout.read().decode()
            assert time.monotonic() < deadline, "the save of step 2 did not start"
            time.sleep(0.05)
        # a restore meanwhile neither sees step 2 nor removes the folder of the save under way
        assert smap.checkpoint.restore(tmp_path, states) == 1
        assert (partial / "data_0.bin").exists() and saver.poll() is None
        saver.send_signal(signal.SIGKILL)
    finally:
        saver.kill()
        output = saver.communicate()[0].decode()
    assert "saving step 2" in output and "saved step 2" not in output, output
    assert smap.checkpoint.steps(tmp_path) == [1]
    assert smap.checkpoint.restore(tmp_path, states) == 1
    for i, state in enumerate(states.values()):
        np.testing.assert_array_equal(state.value, np.full((64, 64), float(i)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # the killed save's folder is gone
    with pytest.raises(CheckpointError, match="step 2 was never saved completely"):
        smap.checkpoint.restore(tmp_path, states, step=2)


OVERWRITER = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("files", sys.argv[1])
    files = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(files)
    directory = Path(sys.argv[2])
    for k in range(1, 10**9):  # overwrite step 1 again and again, as save(overwrite=True) does
        with files.step_lock(directory, 1):
            files.clean_step(directory, 1)
            partial = files.partial_dir(directory, 1)
            partial.mkdir()
            for i in range(16):
                (partial / str(i)).write_text(str(k))
            files.write_durably(partial / files.MANIFEST, json.dumps({"k": k}).encode())
            files.commit(partial, files.step_dir(directory, 1))
        print(k, flush=True)
    """
)


def test_an_overwrite_killed_at_any_moment_leaves_the_old_or_the_new_step(tmp_path):
    """SIGKILL at random moments of repeated overwrites: step 1 is always there, whole, and not older than committed.

    The processes import only ``_files`` (the commit protocol, stdlib only) so
    that 60 kills take a few seconds; 6 run at once, each in its own directory.
    """
    rng = np.random.default_rng(0)
    in_the_window = 0
    for batch in range(10):
        directories = [tmp_path / f"{batch}.{i}" for i in range(6)]
        children = []
        for directory in directories:
            directory.mkdir()
            command = [
                sys.executable,
                "-S",
                "-I",
                "-c",
                OVERWRITER,
                str(ROOT / "smap/checkpoint/_files.py"),
                str(directory),
            ]
            children.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for child in children:
            assert child.stdout.readline().strip() == b"1", child.stderr.read()  # a first step is committed
        start = time.monotonic()
        for delay, child in sorted(zip(rng.uniform(0, 0.1, len(children)), children), key=lambda pair: pair[0]):
            time.sleep(max(0.0, start + delay - time.monotonic()))
            child.send_signal(signal.SIGKILL)
        for child, directory in zip(children, directories):
            printed = child.communicate()[0].split()
            committed = int(printed[-1]) if printed else 1
            in_the_window += (directory / ".old_step_00000001").exists()
            assert _files.complete_steps(directory) == [1]
            _files.clean(directory)  # as the next save or restore does
            assert sorted(p.name for p in directory.iterdir()) == ["step_00000001"]
            folder = directory / "step_00000001"
            k = json.loads((folder / "manifest.json").read_text())["k"]
            assert k >= committed  # the last committed step, or the one being written after it
            assert [(folder / str(i)).read_text() for i in range(16)] == [str(k)] * 16
    assert in_the_window > 0  # some kills hit an overwrite between its two renames or before the old one was gone


def _hold_writes(monkeypatch):
    """Writes of shards wait until the returned event is set."""
    release, write = threading.Event(), _io._write_at

    def held(fd, offset, data):
        release.wait()
        return write(fd, offset, data)

    monkeypatch.setattr(_io, "_write_at", held)
    return release


def test_a_background_save_holds_the_values_of_the_call_while_training_donates_the_states(tmp_path, monkeypatch):
    net = Net(arrays())
    sharding.place(net, mapping_on(mesh_1d(8)), rules={smap.ParamState: P(None, "data")})
    # a training step that writes every array state, donating its buffers
    bump = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: ~x if x.dtype == bool else x + 1, t), donate_argnums=0)

    def train():
        for state in (net.hidden, net.w, net.adam, net.half, net.flags):
            state.value = bump(state.value)
        net.rng.normal(size=2)

    release = _hold_writes(monkeypatch)
    expected = {1: host(net.states())}
    pending = smap.checkpoint.save(tmp_path, net, step=1, wait=False)
    assert isinstance(pending, smap.checkpoint.PendingSave)
    for _ in range(3):
        train()
    assert not pending.done() and smap.checkpoint.steps(tmp_path) == []  # nothing visible before the commit
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        smap.checkpoint.restore(tmp_path, Net(arrays()))  # ... and it leaves the folder of the save under way
    assert (tmp_path / ".partial_step_00000001").is_dir()

    # a second background save of the directory waits for the first
    expected[2] = host(net.states())
    seconds = []
    second = threading.Thread(target=lambda: seconds.append(smap.checkpoint.save(tmp_path, net, step=2, wait=False)))
    second.start()
    second.join(0.3)
    assert second.is_alive() and not (tmp_path / ".partial_step_00000002").exists()
    release.set()
    second.join()
    train()
    pending.wait()
    seconds[0].wait()
    assert pending.done() and seconds[0].done() and smap.checkpoint.steps(tmp_path) == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]

    for step in (1, 2):
        other = Net(zeros_like(arrays()))
        assert smap.checkpoint.restore(tmp_path, other, step=step) == step
        got, want = host(other.states()), expected[step]
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


BACKGROUND_AT_EXIT = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp, smap
    from smap.checkpoint import _io

    write = _io._write_at
    def slow(fd, offset, data):
        time.sleep(0.3)
        return write(fd, offset, data)
    _io._write_at = slow
    states = {f"s{i}": smap.ParamState(jnp.full((16,), float(i))) for i in range(4)}
    smap.checkpoint.save(sys.argv[1], states, step=1, wait=False)
    print("returned", flush=True)
    """
)


def test_the_process_waits_for_its_background_saves_at_exit(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    result = subprocess.run(
        [sys.executable, "-c", BACKGROUND_AT_EXIT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "returned" in result.stdout, result.stderr
    states = {f"s{i}": smap.ParamState(jnp.zeros(16)) for i in range(4)}
    assert smap.checkpoint.restore(tmp_path, states) == 1
    for i, state in enumerate(states.values()):
        np.testing.assert_array_equal(state.value, np.full(16, float(i)))


def test_leftovers_of_interrupted_saves_and_removals_are_cleaned_by_the_next_save(tmp_path):
    w = smap.ParamState(np.arange(4, dtype=np.float32))
    for step in (1, 2, 3):
        smap.checkpoint.save(tmp_path, {"w": w}, step=step)
    # what kills leave: a half-deleted step, an overwrite killed after its new folder took the name
    # (the old one left beside it), one killed between its two renames (only the old one), a partial save
    os.rename(tmp_path / "step_00000003", tmp_path / ".removing_step_00000003")
    (tmp_path / ".removing_step_00000003" / "manifest.json").unlink()
    shutil.copytree(tmp_path / "step_00000001", tmp_path / ".old_step_00000001")
    os.rename(tmp_path / "step_00000002", tmp_path / ".old_step_00000002")
    (tmp_path / ".partial_step_00000004").mkdir()
    (tmp_path / ".partial_step_00000004" / "data_0.bin").write_bytes(b"half")
    assert smap.checkpoint.steps(tmp_path) == [1, 2]  # the old folder of step 2 is still step 2

    smap.checkpoint.save(tmp_path, {"w": w}, step=5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002", "step_00000005"]
    for step in (1, 2, 5):
        w.value = jnp.zeros(4)
        assert smap.checkpoint.restore(tmp_path, {"w": w}, step=step) == step
        np.testing.assert_array_equal(w.value, np.arange(4))
