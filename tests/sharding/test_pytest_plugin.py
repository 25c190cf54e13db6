"""The pytest plugin, from a fresh project that only installs smap."""

import subprocess
import sys
import textwrap
from pathlib import Path

PROJECT_TEST = textwrap.dedent(
    """
    import jax
    import pytest

    @pytest.mark.devices(2)
    def test_two_devices_in_process(mesh):
        # The run emulates 4 devices, so this one runs here with a 2-device mesh.
        assert jax.device_count() == 4
        assert mesh.shape["data"] == 2

    @pytest.mark.devices(6)
    def test_six_devices_in_subprocess(mesh):
        assert jax.device_count() == 6
        assert mesh.shape["data"] == 6

    def test_default_mesh(mesh):
        assert mesh.shape["data"] == jax.device_count() == 4

    @pytest.mark.devices(5)
    def test_failure_in_subprocess_is_reported():
        assert jax.device_count() == 4, "runs with 5 devices"
    """
)


def _run_pytest(tmp_path, *args):
    (tmp_path / "test_user.py").write_text(PROJECT_TEST)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_plugin_options_marker_and_fixture(tmp_path):
    result = _run_pytest(tmp_path, "--cpu-devices", "4")
    out = result.stdout + result.stderr
    assert "1 failed, 3 passed" in out, out
    assert "test_failure_in_subprocess_is_reported" in out and "5 devices" in out, out


def test_plugin_is_registered_as_an_entry_point():
    from importlib.metadata import entry_points

    names = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert names.get("sharding.pytest_plugin") == "sharding.pytest_plugin"


SUBPROCESS_OUTCOMES = textwrap.dedent(
    """
    import jax
    import pytest

    @pytest.mark.devices(6)
    def test_skipped_in_subprocess():
        assert jax.device_count() == 6
        pytest.skip("needs a GPU")

    @pytest.mark.devices(6)
    @pytest.mark.xfail(reason="a known bug", strict=True)
    def test_xfail_in_subprocess():
        assert jax.device_count() == 5

    @pytest.mark.devices(6)
    def test_passes_in_subprocess():
        assert jax.device_count() == 6
    """
)


def test_a_test_skipped_or_xfailed_in_its_subprocess_is_reported_so(tmp_path):
    """Not as passed: the outcome in the subprocess is the outcome of the test."""
    (tmp_path / "test_outcomes.py").write_text(SUBPROCESS_OUTCOMES)
    root = str(Path(__file__).resolve().parents[2])
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": root}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rsx",
            "-p",
            "no:cacheprovider",
            "-p",
            "sharding.pytest_plugin",
            "--cpu-devices",
            "4",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert "1 passed, 1 skipped, 1 xfailed" in out, out
    assert "needs a GPU" in out and "a known bug" in out, out
