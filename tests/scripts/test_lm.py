"""The language-model demo: the loss falls below the text's unigram entropy, layouts agree, resume, bad options."""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LM = ROOT / "scripts" / "lm.py"
SMALL = ("--width", "32", "--context", "32", "--layers", "1", "--batch-size", "16")


def _lm(*args, timeout=300):
    return subprocess.run([sys.executable, str(LM), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _steps(out: str) -> list[tuple[int, float]]:
    return [(int(k), float(loss)) for k, loss in re.findall(r"step +(\d+) +loss (\S+) +[\d,]+ tokens/s", out)]


def test_a_short_run_prints_its_layout_and_progress_and_its_loss_falls_below_the_unigram_entropy():
    result = _lm(*SMALL, "--steps", "60", "--log-every", "20")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    entropy = float(re.search(r"unigram entropy (\S+) nats", out).group(1))
    assert 2.5 < entropy < 3.5  # about 28 symbols, far from uniform
    assert "mesh: Mesh('data': 8" in out and "FSDP" in out
    assert re.search(r"blocks\.0\.up\s+ParamState\s+\(32, 128\)\s+float32\s+P\('data',\)\s+2,048", out), out
    steps = _steps(out)
    assert [k for k, _ in steps] == [20, 40, 60]
    losses = [loss for _, loss in steps]
    assert losses[0] > losses[1] > losses[2]
    assert losses[-1] < 0.8 * entropy
    assert f"final loss {losses[-1]:.4f}" in out


def test_the_layouts_give_the_same_parameters(tmp_path, close):
    """Without dropout the step is one function of the batch: FSDP over 8 lanes, one lane per
    sequence, and tensor parallel over a 4 x 2 mesh (4 lanes) give the same parameters."""
    saved = {}
    for name, options in [
        ("fsdp", ()),
        ("per-example", ("--per-example",)),
        ("tensor-parallel", ("--tensor-parallel",)),
    ]:
        saved[name] = tmp_path / f"{name}.npz"
        result = _lm(*SMALL, *options, "--dropout", "0", "--steps", "3", "--save", str(saved[name]))
        assert result.returncode == 0, result.stdout + result.stderr
    expected = dict(np.load(saved["fsdp"]))
    assert len(expected) == 16  # two embeddings, the block's 11 weights, the final norm's 2, the read-out
    for name in ("per-example", "tensor-parallel"):
        close(dict(np.load(saved[name])), expected, rtol=1e-4, atol=1e-5)


def test_a_run_stopped_and_resumed_ends_like_an_uninterrupted_one(tmp_path, close):
    reference = tmp_path / "uninterrupted.npz"
    result = _lm(*SMALL, "--steps", "12", "--save", str(reference))
    assert result.returncode == 0, result.stdout + result.stderr

    checkpoints = tmp_path / "checkpoints"
    options = (*SMALL, "--steps", "12", "--checkpoint-dir", str(checkpoints), "--checkpoint-every", "4")
    result = _lm(*options, "--stop-after-step", "6", "--log-every", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [k for k, _ in _steps(result.stdout)] == [2, 4, 6]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000004", "step_00000006"]

    resumed = tmp_path / "resumed.npz"
    result = _lm(*options, "--save", str(resumed), "--log-every", "2")
    assert result.returncode == 2 and "already holds checkpoints (steps [4, 6]); pass --resume" in result.stderr
    result = _lm(*options, "--resume", "--save", str(resumed), "--log-every", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"resumed from {checkpoints} after step 6" in result.stdout
    assert [k for k, _ in _steps(result.stdout)] == [8, 10, 12]
    # parameters, Adam's moments and step count, and the dropout stream all went on where they stopped
    expected, got = np.load(reference), np.load(resumed)
    close(dict(got), dict(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--batch-size", "12"], "--batch-size 12 cannot be split evenly over the 8 devices of the data axis"),
        (["--tensor-parallel", "--heads", "3", "--width", "48"], "--devices and --heads must be even"),
        (["--width", "30"], "--width 30 must be a multiple of --heads 4"),
        (["--width", "36", "--heads", "3"], "--width and --context must be multiples of 8"),
        (["--resume"], "--resume needs --checkpoint-dir"),
        (["--stop-after-step", "0"], "--stop-after-step must be at least 1"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--steps", "0"], "--steps must be at least 1"),
    ],
)
def test_options_that_make_no_sense_get_a_message_not_a_traceback(options, message):
    result = _lm(*options)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
