"""The main demo: accuracy, equivalence across mappings, devices and processes, bad options."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = ROOT / "scripts" / "demo.py"


def _demo(*args, timeout=300):
    return subprocess.run([sys.executable, str(DEMO), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_demo_reaches_its_accuracy_and_prints_mesh_table_and_progress():
    result = _demo()
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "mesh: Mesh('data': 8" in out
    assert re.search(r"model\.w1\s+ParamState\s+\(64, 128\)\s+float32\s+P\(\)\s+32,768", out), out
    epochs = re.findall(r"epoch +\d+ +loss (\S+) +train accuracy (\S+) +([\d,]+) examples/s", out)
    assert len(epochs) == 12
    assert float(epochs[-1][0]) < float(epochs[0][0])
    accuracy = float(re.search(r"test accuracy: (\S+)", out).group(1))
    assert accuracy >= 0.95


@pytest.fixture(scope="module")
def vmap_run(tmp_path_factory) -> pathlib.Path:
    """The parameters after an epoch under jax.vmap on one device: what every mapping must give."""
    reference = tmp_path_factory.mktemp("demo") / "vmap.npz"
    result = _demo("--mapping", "vmap", "--devices", "1", "--epochs", "1", "--save", str(reference))
    assert result.returncode == 0, result.stdout + result.stderr
    return reference


@pytest.mark.parametrize(
    "options",
    [
        ["--mapping", "pmap", "--devices", "4"],
        ["--mapping", "shard_map", "--devices", "8"],
        ["--mapping", "shard_map", "--devices", "2", "--processes", "2"],
    ],
    ids=["pmap-4", "shard_map-8", "shard_map-2x2-processes"],
)
def test_same_seed_gives_the_same_parameters_whatever_the_mapping(vmap_run, tmp_path, options, close):
    other = tmp_path / "other.npz"
    result = _demo(*options, "--epochs", "1", "--save", str(other))
    assert result.returncode == 0, result.stdout + result.stderr
    expected, got = np.load(vmap_run), np.load(other)
    assert sorted(expected) == ["b1", "b2", "w1", "w2"]
    close(dict(got), dict(expected), rtol=1e-4, atol=1e-5)


def test_a_run_stopped_and_resumed_on_other_devices_ends_like_an_uninterrupted_one(tmp_path, close):
    reference = tmp_path / "uninterrupted.npz"
    result = _demo("--devices", "4", "--epochs", "2", "--save", str(reference))
    assert result.returncode == 0, result.stdout + result.stderr

    checkpoints = tmp_path / "checkpoints"
    result = _demo("--devices", "4", "--epochs", "2", "--checkpoint-dir", str(checkpoints), "--stop-after-epoch", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.findall(r"epoch +(\d+) +loss", result.stdout) == ["1"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001"]

    resumed = tmp_path / "resumed.npz"
    options = ("--epochs", "2", "--checkpoint-dir", str(checkpoints), "--save", str(resumed))
    result = _demo("--devices", "2", *options)
    assert result.returncode == 2 and "already holds checkpoints (epochs [1]); pass --resume" in result.stderr
    result = _demo("--devices", "2", "--resume", *options)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {checkpoints} after epoch 1" in result.stdout
    assert re.findall(r"epoch +(\d+) +loss", result.stdout) == ["2"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000001", "step_00000002"]
    # parameters, Adam's moments and the dropout stream all went on where they stopped
    expected, got = np.load(reference), np.load(resumed)
    close(dict(got), dict(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--devices", "3", "--mapping", "pmap"], "--batch-size 64 cannot be split evenly over 3 devices"),
        (["--processes", "0"], "--processes must be at least 1"),
        (["--processes", "2", "--mapping", "pmap"], "use --mapping shard_map with --processes"),
        (["--mapping", "tpu"], "invalid choice: 'tpu'"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--stop-after-epoch", "0"], "--stop-after-epoch must be at least 1"),
    ],
)
def test_options_that_make_no_sense_get_a_message_not_a_traceback(options, message):
    result = _demo(*options)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mapping, lanes", [("shard_map", 8), ("vmap", 64)])
def test_demo_step_holds_no_per_example_gradient(mapping, lanes):
    """The per-example step compiles to one product over the batch per weight: XLA's
    optimised program has no (lanes per device, weight shape) array; with the rewrite
    switched off it has them (so the check can see them)."""
    import importlib.util
    import re

    import jax

    import sharding

    spec = importlib.util.spec_from_file_location("smap_demo", DEMO)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 64), dtype=np.float32), rng.integers(0, 10, 64).astype(np.int32)
    per_lane = {tuple(sorted((lanes, *w))) for w in [(64, 128), (128, 10)]}

    def per_lane_arrays(fuse: bool) -> set:
        _, step, _, mesh = demo.build(demo.parse_args(["--mapping", mapping, "--devices", "8"]))
        step.fuse_lane_sums = fuse  # before the first call, which traces the step
        args = sharding.global_batch((x, y), mesh) if mesh is not None else (x, y)
        jax.block_until_ready(step(*args))
        hlo = step.lower(*args).compile().as_text()
        shapes = {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", hlo)}
        return {s for s in shapes if tuple(sorted(s)) in per_lane}

    assert per_lane_arrays(fuse=False)
    assert per_lane_arrays(fuse=True) == set()
