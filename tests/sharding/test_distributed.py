"""Several processes through scripts/launch_local.py, gloo collectives on 127.0.0.1."""

import importlib.util
import inspect
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import sharding

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "scripts" / "launch_local.py"
WORKER = pathlib.Path(__file__).with_name("dp_worker.py")
HEARTBEAT_S = inspect.signature(sharding.initialize).parameters["heartbeat_timeout_seconds"].default


def _worker_module():
    spec = importlib.util.spec_from_file_location("dp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(*args, env=None, timeout=240):
    command = [sys.executable, str(LAUNCH), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("devices", [4, 1], ids=["2x4-devices", "2x1-device"])
def test_two_processes_match_single_process_vmap(devices, close):
    result = _launch(
        "--processes", "2", "--devices", str(devices), "--timeout", "200", "--", sys.executable, str(WORKER)
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if "RESULT " in line]
    assert len(lines) == 1 and lines[0].startswith("[p0] "), result.stdout
    got = {k: np.asarray(v) for k, v in json.loads(lines[0].split("RESULT ", 1)[1]).items()}

    worker = _worker_module()
    step, states = worker.build(jax.vmap)
    for x, y in worker.batches():
        step(x, y)
    expected = {k: np.asarray(s.value) for k, s in states.items()}
    close(got, expected, rtol=1e-5, atol=1e-6)
    assert expected["seen"].shape == (worker.BATCH, 2)
    # the batched state is split over the 2 x devices, the parameters replicated
    assert re.search(
        rf"seen\s+HiddenState\s+\(8, 2\)\s+float32\s+P\('data',?\)\s+{8 * 2 * 4 // (2 * devices)}\b", result.stdout
    ), result.stdout


def test_a_process_that_dies_stops_the_run_with_a_clear_message():
    import os

    start = time.monotonic()
    env = {**os.environ, "DP_WORKER_DIE": "1"}
    # One device per process also covers placing states across processes (no local replicas).
    result = _launch(
        "--processes", "2", "--devices", "1", "--timeout", "200", "--", sys.executable, str(WORKER), env=env
    )
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "process 1 was killed by signal SIGKILL; stopping the others." in result.stdout, result.stdout
    assert "RESULT" not in result.stdout
    assert elapsed < 120


def test_launcher_sets_each_process_up_and_prefixes_its_output():
    code = (
        "import os; print(os.environ['SMAP_PROCESS_ID'], os.environ['SMAP_NUM_PROCESSES'], "
        "os.environ['SMAP_CPU_DEVICES'], os.environ['SMAP_COORDINATOR_ADDRESS'].split(':')[0])"
    )
    result = _launch("-n", "3", "-d", "2", "--", sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        "[p0] 0 3 2 127.0.0.1",
        "[p1] 1 3 2 127.0.0.1",
        "[p2] 2 3 2 127.0.0.1",
    ]


def test_launcher_fails_when_a_process_fails_and_times_out():
    code = "import os, sys, time; sys.exit(3) if os.environ['SMAP_PROCESS_ID'] == '1' else time.sleep(60)"
    start = time.monotonic()
    result = _launch("-n", "2", "--", sys.executable, "-c", code)
    assert result.returncode == 1
    assert "process 1 exited with code 3; stopping the others." in result.stdout
    assert time.monotonic() - start < 30

    result = _launch("-n", "2", "--timeout", "2", "--", sys.executable, "-c", "import time; time.sleep(60)")
    assert result.returncode == 124 and "timed out after 2 s" in result.stdout


def test_launcher_rejects_bad_options():
    result = _launch("--processes", "0", "--", "true")
    assert result.returncode == 2 and "--processes must be at least 1" in result.stderr
    result = _launch("--processes", "2")
    assert result.returncode == 2 and "give the command to run" in result.stderr
    result = _launch("--timeout", "-1", "--", "true")
    assert result.returncode == 2 and "--timeout must be a positive number of seconds, got -1.0" in result.stderr
    result = _launch("--", "/no/such/program")
    assert result.returncode == 127 and "[launch] cannot start '/no/such/program': No such file" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_without_the_launcher_survivors_fail_within_the_heartbeat_timeout():
    """sharding.initialize() sets a 10 s heartbeat timeout: a dead peer is noticed, not waited for."""
    import os
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    processes = []
    for i in range(2):
        env = {
            **os.environ,
            "SMAP_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
            "SMAP_NUM_PROCESSES": "2",
            "SMAP_PROCESS_ID": str(i),
            "SMAP_CPU_DEVICES": "2",
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "",
            "DP_WORKER_DIE": "1",
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, str(WORKER)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    try:
        processes[1].wait(timeout=180)  # it kills itself at its second step
        died = time.monotonic()
        # Waited for well past the bound below, so that a survivor that waits longer fails the assert, not this.
        survivor_output, _ = processes[0].communicate(timeout=HEARTBEAT_S + 120)
        noticed_after = time.monotonic() - died
    finally:
        for p in processes:
            p.kill()
            p.communicate()
    assert processes[1].returncode == -signal.SIGKILL
    assert processes[0].returncode != 0 and "RESULT" not in survivor_output, survivor_output[-3000:]
    # The heartbeat timeout sharding.initialize sets (10 s), not JAX's default (100 s), stopped the survivor.
    assert noticed_after < HEARTBEAT_S + 30, (noticed_after, survivor_output[-3000:])
    assert re.search("heartbeat", survivor_output, re.IGNORECASE), survivor_output[-3000:]
