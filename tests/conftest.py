"""Test setup: 8 emulated CPU devices, set before JAX starts its backend; deprecations are errors.

The suite compiles a few thousand small programs, so its time is mostly XLA's
CPU compiler's; three settings make that time shorter without changing what
the tests check:

- The code generator's effort is lowered (the HLO passes, SPMD partitioning
  included, are unchanged).
- On jaxlib 0.9 and 0.10, XLA:CPU's earlier kernel emitters are used
  (``--xla_cpu_use_fusion_emitters=false``; jaxlib 0.11 removed the flag and
  them): they compile the suite in 30% less time. They group the optimised
  HLO's element-wise work into other fusions, but the partitioning, the
  collectives and the shapes of the arrays (what the tests read in the HLO)
  are the same, and the suite passes with either; the suite on the newest
  JAX runs XLA's default emitters.
- Many programs are compiled more than once: the same reference in several
  tests, the same training step in each run of the demo that a test starts.
  JAX's persistent compilation cache, in a directory made for the run and
  removed after it, compiles each once (13% less time); it is shared by
  pytest-xdist's workers and every process a test starts, which inherit the
  environment.
"""

import atexit
import importlib.metadata
import os
import shutil
import tempfile

_FLAGS = [
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
]
if tuple(map(int, importlib.metadata.version("jaxlib").split(".")[:2])) < (0, 11):
    _FLAGS.append("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_FLAGS]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's deprecation warnings are errors (pyproject's filterwarnings), in the Python
# processes that tests start too (the demo, documentation blocks, distributed workers).
os.environ.setdefault("PYTHONWARNINGS", "error::DeprecationWarning")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # (set: the run's, made by pytest-xdist's controller)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="smap-tests-compilation-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the suite's programs compile in well under 1 s
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

import smap  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_default_key():
    """Each test starts from the same default random key."""
    smap.random.seed(0)
    yield


def assert_trees_close(actual, expected, rtol=1e-6, atol=1e-6):
    """Same tree structure, and every leaf equal to float round-off."""
    import numpy as np

    a_leaves, a_tree = jax.tree_util.tree_flatten(actual)
    e_leaves, e_tree = jax.tree_util.tree_flatten(expected)
    assert a_tree == e_tree, f"{a_tree} != {e_tree}"
    for a, e in zip(a_leaves, e_leaves):
        assert np.shape(a) == np.shape(e), f"{np.shape(a)} != {np.shape(e)}"
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


@pytest.fixture
def close():
    """`close(actual, expected)`: assert two pytrees are equal to float round-off."""
    return assert_trees_close
