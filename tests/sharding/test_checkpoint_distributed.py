"""Checkpoints across process counts: 2 processes save, 1 restores and saves, 2 restore (launch_local.py)."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

import sharding
import smap

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "scripts" / "launch_local.py"
WORKER = pathlib.Path(__file__).with_name("checkpoint_worker.py")


def _worker_module():
    spec = importlib.util.spec_from_file_location("checkpoint_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(mode, directory):
    command = [
        sys.executable,
        str(LAUNCH),
        "-n",
        "2",
        "-d",
        "2",
        "--timeout",
        "150",
        "--",
        sys.executable,
        str(WORKER),
        mode,
        str(directory),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=200, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _writers(manifest, name):
    return [[shard["process"] for shard in leaf["shards"]] for leaf in manifest["states"][name]["leaves"]]


def test_two_processes_save_one_restores_and_saves_two_restore(tmp_path):
    worker = _worker_module()

    # 2 processes x 2 devices save: each process writes only its own shards, once each
    _launch("save", tmp_path)
    assert smap.checkpoint.steps(tmp_path) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    manifest = json.loads((tmp_path / "step_00000001" / "manifest.json").read_text())
    assert manifest["processes"] == 2
    assert _writers(manifest, "hidden") == [[0, 0, 1, 1]]  # split over the lanes of 4 devices
    assert _writers(manifest, "w") == [[0, 0, 1, 1]]  # split over 'data' by a rule
    assert _writers(manifest, "opt") == [[0], [0]] and _writers(manifest, "rng") == [[0]]  # replicated
    assert _writers(manifest, "count") == [[0]]  # each process holds it whole: process 0 writes it
    assert not list((tmp_path / "step_00000001").glob("process_*"))

    # 1 process, 8 devices, restores
    mesh = sharding.make_mesh(data=8)
    states, mapping = worker.build(jax.tree_util.tree_map(np.zeros_like, worker.values(0)), mesh)
    assert smap.checkpoint.restore(tmp_path, states, mapping=mapping, rules=worker.RULES) == 1
    got = {name: jax.tree_util.tree_map(np.asarray, s.value) for name, s in states.items() if name != "rng"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, worker.values(0))
    assert states["hidden"].value.sharding.spec == P("data") and len(states["hidden"].value.devices()) == 8
    assert states["w"].value.sharding.spec == P(None, "data")
    assert states["count"].value.sharding.spec == P() and len(states["count"].value.devices()) == 8
    np.testing.assert_array_equal(states["rng"].normal(size=3), smap.random.RandomState(5).normal(size=3))

    # ... and saves step 2 from 8 devices
    states, _ = worker.build(worker.values(1), mesh)
    smap.checkpoint.save(tmp_path, states, step=2)

    # 2 processes restore the latest step, each reading only the shards its devices hold
    lines = [line for line in _launch("restore", tmp_path).splitlines() if "RESULT " in line]
    results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in lines), key=lambda r: r["process"])
    assert [r["process"] for r in results] == [0, 1]
    expected_draws = smap.random.RandomState(5).normal(size=3)
    for result in results:
        assert result["step"] == 2
        values = result["values"]
        values.pop("rng")
        jax.tree_util.tree_map(lambda e, g: np.testing.assert_array_equal(np.asarray(g), e), worker.values(1), values)
        assert result["specs"]["hidden"] == str(P("data")) and result["specs"]["w"] == str(P(None, "data"))
        assert result["specs"]["count"] == str(P())
        np.testing.assert_allclose(result["draws"], expected_draws, rtol=1e-6)
    # hidden (state 0) and w (state 1) were saved as 8 one-row / one-column files; opt, rng and count whole
    for p, result in enumerate(results):
        expected = [name for i in (0, 1) for name in [f"{i}.0.{k}.npy" for k in range(4 * p, 4 * p + 4)]]
        assert result["read"] == sorted(expected + ["2.0.0.npy", "2.1.0.npy", "3.0.0.npy", "4.0.0.npy"]), result["read"]
