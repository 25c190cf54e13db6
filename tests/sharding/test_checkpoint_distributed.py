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
    assert sorted(p.name for p in (tmp_path / "step_00000001").iterdir()) == [
        "data_0.bin",
        "data_1.bin",
        "manifest.json",
    ]

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
    # hidden and w were saved as 8 one-row / one-column shards, opt, rng and count whole, all in data_0.bin
    for p, result in enumerate(results):
        rows = [["state 'hidden'", [[k, k + 1], [0, 3]]] for k in range(4 * p, 4 * p + 4)]
        columns = [["state 'w'", [[0, 4], [k, k + 1]]] for k in range(4 * p, 4 * p + 4)]
        whole = [
            ["state \"opt['count']\"", []],
            ["state \"opt['mu']\"", [[0, 4], [0, 8]]],
            ["state 'rng'", [[0, 2]]],
            ["state 'count'", [[0, 3]]],
        ]
        assert {file for file, _, _ in result["read"]} == {"data_0.bin"}
        assert sorted([what, index] for _, what, index in result["read"]) == sorted(rows + columns + whole)


def test_two_processes_save_in_the_background_and_commit_once_both_parts_are_written(tmp_path):
    worker = _worker_module()
    lines = [line for line in _launch("background", tmp_path).splitlines() if "RESULT " in line]
    results = sorted((json.loads(line.split("RESULT ", 1)[1]) for line in lines), key=lambda r: r["process"])
    assert [r["process"] for r in results] == [0, 1]
    # process 1 wrote its part 1 s after process 0; the step became visible only after that
    assert results[1]["written"] > results[0]["written"] + 0.5
    assert results[0]["visible"] >= results[1]["written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]
    assert sorted(p.name for p in (tmp_path / "step_00000003").iterdir()) == [
        "data_0.bin",
        "data_1.bin",
        "manifest.json",
    ]
    manifest = json.loads((tmp_path / "step_00000003" / "manifest.json").read_text())
    assert _writers(manifest, "hidden") == [[0, 0, 1, 1]]

    # the values of the call, though both processes donated and changed the states at once
    mesh = sharding.make_mesh(data=8)
    states, mapping = worker.build(jax.tree_util.tree_map(np.zeros_like, worker.values(0)), mesh)
    assert smap.checkpoint.restore(tmp_path, states, mapping=mapping, rules=worker.RULES) == 3
    got = {name: jax.tree_util.tree_map(np.asarray, s.value) for name, s in states.items() if name != "rng"}
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, worker.values(2))
