"""Helpers shared by the mapping tests (tests/smap/transform/test_mapping_*.py) and the program fuzzers."""

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import smap
from smap.transform import _cpu_forms, _mapping


def snapshot(*states):
    """Copies of the states' values (and the default random key)."""
    return [jax.tree_util.tree_map(np.array, s.value) for s in (*states, smap.random.DEFAULT)]


def assert_unchanged(states, before):
    """Every state (and the default random key) holds exactly the value of `before`."""
    for state, old in zip((*states, smap.random.DEFAULT), before):
        now = jax.tree_util.tree_map(np.asarray, state.value)
        assert jax.tree_util.tree_structure(now) == jax.tree_util.tree_structure(old)
        for a, b in zip(jax.tree_util.tree_leaves(now), jax.tree_util.tree_leaves(old)):
            assert a.shape == b.shape and a.dtype == b.dtype, (state, a.shape, b.shape)
            np.testing.assert_array_equal(a, b)


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=jnp.float32)


def lane_draw_normal(lane_key, *shape):
    """The draw of `RandomState(lane_key).normal(size=shape)`, written with jax.random."""
    return jax.random.normal(jax.random.split(lane_key)[1], shape)


@functools.partial(jax.jit, static_argnums=1)
def _lanes_normal(lane_keys, shape):
    return jax.vmap(lambda k: lane_draw_normal(k, *shape))(lane_keys)


def lanes_normal(lane_keys, *shape):
    """`lane_draw_normal` for every lane key, stacked."""
    return _lanes_normal(lane_keys, shape)


def fuzz_groups(group_size: int, ci_groups: range) -> range:
    """The fuzzer's groups to run: ``ci_groups``, or those of seeds ``SMAP_FUZZ_START`` onwards
    (``SMAP_FUZZ_PROGRAMS`` of them) when that is set."""
    count = os.environ.get("SMAP_FUZZ_PROGRAMS")
    start = int(os.environ.get("SMAP_FUZZ_START", "0")) // group_size
    return range(start, start + -(-int(count) // group_size)) if count else ci_groups


# How a fuzzer runs smap on a drawn program: with every rewrite, with the fusion off (what
# ``fuse_lane_sums=False`` gives a user), and with no rewrite at all (see ``rewrites``).
REWRITES = ("every rewrite", "no fusion", "no rewrite")


@contextlib.contextmanager
def rewrites(setting: str):
    """Run smap's mappings with the rewrites of ``setting`` (one of ``REWRITES``); yields the
    ``fuse_lane_sums`` value to map with.

    ``"no rewrite"`` also turns off the two rewrites that have no switch of their own: the
    lane-invariant tail run after the lanes (smap/transform/_hoist.py) and the equal forms of
    products and sums on CPU (smap/transform/_cpu_forms.py). The lanes then run the program
    as it was traced, so a fuzzer compares each rewrite on and off against plain JAX.
    """
    assert setting in REWRITES, setting
    with pytest.MonkeyPatch.context() as patch:
        if setting == "no rewrite":
            patch.setattr(_mapping, "split_tail", lambda *args, **kwargs: None)
            patch.setattr(_cpu_forms.CpuForms, "rewrite", lambda self, eqn, ins, rule: None)
        yield setting == "every rewrite"


def less_twice_the_gap(got, want, other):
    """``got`` moved towards ``want`` by up to twice the gap between ``want`` and ``other``
    (0 where ``want`` is inf or NaN): a fuzzer's allowance for a bfloat16 program's values,
    which move with where they round, measured against a reference that rounds elsewhere."""
    finite = np.isfinite(want)
    gap = 2 * np.abs(np.where(finite, want, 0) - np.where(finite, other, 0))
    d = got - want
    if np.iscomplexobj(d):
        return got - (np.clip(d.real, -gap, gap) + 1j * np.clip(d.imag, -gap, gap))
    return got - np.clip(d, -gap, gap)
