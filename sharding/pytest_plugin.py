"""A pytest plugin for testing smap programs on emulated CPU devices.

Installed with smap (the ``pytest11`` entry point ``sharding.pytest_plugin``):

- ``--cpu-devices N`` emulates N CPU devices for the whole run;
- ``@pytest.mark.devices(n)`` runs a test with n devices: in this process
  when it has at least n, otherwise in a subprocess started with n;
- the ``mesh`` fixture is a one-axis mesh ``('data',)`` over the test's
  devices (n for a ``devices(n)`` test, all devices otherwise).

Example (a test file in a project that installs smap)::

    import pytest

    @pytest.mark.devices(4)
    def test_on_four_devices(mesh):
        assert mesh.shape["data"] == 4
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from typing import Any
from xml.etree import ElementTree

import pytest

from ._mesh import emulate_cpu_devices, make_mesh

_SUBPROCESS_ENV = "SMAP_PYTEST_DEVICES_SUBPROCESS"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("smap")
    group.addoption(
        "--cpu-devices",
        type=int,
        default=None,
        metavar="N",
        help="emulate N CPU devices for this run (sets XLA_FLAGS before JAX starts).",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "devices(n): run the test with n emulated CPU devices (in a subprocess when this process has fewer).",
    )
    n = config.getoption("--cpu-devices")
    if n:
        emulate_cpu_devices(n)


def _wanted(item: pytest.Item) -> int | None:
    marker = item.get_closest_marker("devices")
    if marker is None:
        return None
    (n,) = marker.args
    if not isinstance(n, int) or n < 1:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.devices needs a positive int, got {n!r}.")
    return n


def _available() -> int:
    import jax

    return jax.device_count()


@pytest.fixture
def mesh(request: pytest.FixtureRequest) -> Any:
    """A mesh with one axis, ``'data'``, over the test's devices."""
    import jax

    n = _wanted(request.node) or jax.device_count()
    if n > jax.device_count():
        return None  # the test runs in a subprocess that has the devices
    return make_mesh(data=n, devices=jax.devices()[:n])


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    n = _wanted(pyfuncitem)
    if n is None or n <= _available():
        return None
    if os.environ.get(_SUBPROCESS_ENV):
        pytest.fail(f"the subprocess for {pyfuncitem.nodeid} has fewer than {n} devices.")
    env = {**os.environ, _SUBPROCESS_ENV: "1"}
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.xml")
        command = [
            sys.executable,
            "-m",
            "pytest",
            pyfuncitem.nodeid,
            f"--cpu-devices={n}",
            f"--junit-xml={report}",
            "-p",
            "sharding.pytest_plugin",
            "-p",
            "no:xdist",
            "-p",
            "no:cacheprovider",
            "-q",
            "--no-header",
        ]
        result = subprocess.run(
            command, cwd=pyfuncitem.config.rootpath, env=env, capture_output=True, text=True, timeout=600
        )
        outcome = _outcome(report)
    if result.returncode != 0 or outcome is None:
        pytest.fail(
            f"{pyfuncitem.nodeid} failed in a subprocess with {n} devices:\n{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    kind, message = outcome
    if kind == "xfail":
        pytest.xfail(message)
    if kind == "skip":
        pytest.skip(message)
    return True


def _outcome(report: str) -> tuple[str, str] | None:
    """What the subprocess's one test did: ("pass", ""), ("skip", reason) or ("xfail", reason); None if it ran none."""
    try:
        cases = list(ElementTree.parse(report).iter("testcase"))
    except (OSError, ElementTree.ParseError):
        return None
    if len(cases) != 1:
        return None
    skipped = cases[0].find("skipped")
    if skipped is None:
        return "pass", ""
    message = skipped.get("message", "")
    if skipped.get("type") == "pytest.xfail":
        return "xfail", message
    return "skip", message.removeprefix("Skipped: ")
