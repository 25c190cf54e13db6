"""Tests of ``sharding._mesh``: make_mesh and CPU device emulation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import sharding


def test_make_mesh_over_all_devices():
    mesh = sharding.make_mesh(data=8)
    assert mesh.axis_names == ("data",)
    assert dict(mesh.shape) == {"data": 8}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_two_axes_in_order():
    mesh = sharding.make_mesh(data=4, model=2)
    assert mesh.axis_names == ("data", "model")
    assert mesh.devices.shape == (4, 2)
    assert {d.id for d in mesh.devices.flat} == {d.id for d in jax.devices()}


@pytest.mark.parametrize("n", [1, 2, 4])
def test_make_mesh_over_given_devices(n):
    devices = jax.devices()[:n]
    mesh = sharding.make_mesh(data=n, devices=devices)
    assert dict(mesh.shape) == {"data": n}
    assert list(mesh.devices.flat) == devices


@pytest.mark.parametrize(
    "axes, devices, numbers",
    [
        ({"data": 3}, None, ("3", "8")),
        ({"data": 4, "model": 4}, None, ("16", "8")),
        ({"data": 2}, 4, ("2", "4")),
        ({"data": 8}, 4, ("8", "4")),
    ],
    ids=["3-of-8", "4x4-of-8", "2-of-4-given", "8-of-4-given"],
)
def test_make_mesh_size_mismatch_is_a_clear_error(axes, devices, numbers):
    kwargs = dict(axes)
    if devices is not None:
        kwargs["devices"] = jax.devices()[:devices]
    with pytest.raises(ValueError) as error:
        sharding.make_mesh(**kwargs)
    message = str(error.value)
    needed, available = numbers
    assert f"needs {needed} devices" in message and f"{available} are available" in message, message


@pytest.mark.parametrize(
    "axes", [{}, {"data": 0}, {"data": -2}, {"data": 2.0}], ids=["none", "zero", "negative", "float"]
)
def test_make_mesh_rejects_bad_axes(axes):
    with pytest.raises(ValueError, match="make_mesh"):
        sharding.make_mesh(**axes)


# -- emulate_cpu_devices -------------------------------------------------------------------

_CHILD = """
import json, os, sys
import sharding
sharding.emulate_cpu_devices(int(sys.argv[1]))
flags = os.environ["XLA_FLAGS"]
import jax
mesh = sharding.make_mesh(data=jax.device_count())
print(json.dumps({"count": jax.device_count(), "flags": flags, "mesh": dict(mesh.shape)}))
"""


def _run_child(n, xla_flags):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_XDIST_WORKER")}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_emulate_cpu_devices_in_a_fresh_process():
    # An earlier count is replaced, other flags are kept.
    flags = "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"
    out = _run_child(4, flags)
    assert out["count"] == 4
    assert out["mesh"] == {"data": 4}
    assert "--xla_cpu_enable_fast_math=false" in out["flags"].split()
    assert "--xla_force_host_platform_device_count=4" in out["flags"].split()
    assert "--xla_force_host_platform_device_count=2" not in out["flags"]


def test_emulate_cpu_devices_without_xla_flags():
    out = _run_child(3, None)
    assert out["count"] == 3
    assert out["flags"].split() == ["--xla_force_host_platform_device_count=3"]


def test_emulate_cpu_devices_after_the_backend_started():
    assert jax.device_count() == 8  # starts the backend if nothing has yet
    flags = os.environ.get("XLA_FLAGS")
    with pytest.raises(RuntimeError) as error:
        sharding.emulate_cpu_devices(16)
    message = str(error.value)
    assert "16" in message and "8" in message and "already started" in message
    # asking for no more devices than exist is fine, and changes nothing
    sharding.emulate_cpu_devices(4)
    sharding.emulate_cpu_devices(8)
    assert os.environ.get("XLA_FLAGS") == flags
    assert jax.device_count() == 8
    np.testing.assert_array_equal(jax.numpy.arange(3) + 1, [1, 2, 3])


@pytest.mark.parametrize("n", [0, -1, 2.5, "4"], ids=["zero", "negative", "float", "str"])
def test_emulate_cpu_devices_rejects_bad_counts(n):
    with pytest.raises(ValueError, match="positive int"):
        sharding.emulate_cpu_devices(n)
