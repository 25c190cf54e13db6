"""The cost rule of the fused product over the lanes (smap/transform/_lane_groups.py).

The rule splits the lanes into groups where each lane's product contracts
dimensions of its own (tokens) and keeps one product where it does not; either
way the sum is the same to round-off and no (lanes, weight) array is made.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
import smap
from smap.transform._lane_groups import MAX_GROUPS, MIN_GROUP_CONTRACTION, lane_groups

AXIS = "batch"


@pytest.mark.parametrize(
    "lanes, contraction, backend, groups",
    [
        (32, 24, "cpu", 8),  # 4 lanes x 24 tokens = 96 per group: at the threshold
        (32, 23, "cpu", 4),  # 4 x 23 = 92 < 96: the next divisor, 8 x 23
        (32, 2, "cpu", 1),  # 16 x 2 = 32 even for 2 groups: one product
        (64, 1, "cpu", 1),  # a lane contracts nothing of its own (an outer product)
        (8, 24, "cpu", 2),
        (4, 24, "cpu", 1),  # 2 x 24 = 48: too short
        (2, 1000, "cpu", 1),  # never one lane per group
        (512, 1000, "cpu", MAX_GROUPS),  # never more than MAX_GROUPS
        (32, 24, "gpu", 1),  # measured on CPU only
        (32, 24, "tpu", 1),
    ],
)
def test_the_rule_picks_the_groups_on_each_side_of_its_threshold(lanes, contraction, backend, groups):
    assert MIN_GROUP_CONTRACTION == 96
    assert lane_groups(lanes, contraction, backend) == groups


def _lane_products(x, g):
    """psum over the lanes of each lane's x.T @ g (x: (tokens, in), g: (tokens, out))."""
    return jax.lax.psum(x.T @ g, AXIS)


def _per_lane_transposed(xt, g):
    """The same with x stored transposed, (in, tokens): a lane contracts its trailing dim."""
    return jax.lax.psum(xt @ g, AXIS)


def _mapping(where: str) -> tuple[dict, int]:
    if where == "jax.vmap":
        return {}, 32
    mesh = sharding.make_mesh(data=8, devices=jax.devices()[:8])
    return {"mapping_fn": sharding.shard_map(mesh)}, 64  # 8 lanes per device


@pytest.mark.parametrize("where", ["jax.vmap", "sharding.shard_map-8"])
@pytest.mark.parametrize("tokens", [24, 2])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", ["tokens first", "tokens last"])
def test_grouped_and_single_products_give_the_per_lane_sum(where, tokens, dtype, layout):
    mapping, lanes = _mapping(where)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((lanes, tokens, 5)).astype(dtype)
    g = rng.standard_normal((lanes, tokens, 3)).astype(dtype)
    fn, first = (_lane_products, x) if layout == "tokens first" else (_per_lane_transposed, x.transpose(0, 2, 1))
    got = smap.StatefulMapping(fn, axis_name=AXIS, out_axes=None, **mapping)(first, g)
    want = np.einsum("lti,lto->io", x.astype(np.float64), g.astype(np.float64))
    assert got.dtype == jnp.dtype(dtype)
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tolerance, atol=tolerance * np.abs(want).max())


@pytest.mark.parametrize("where", ["jax.vmap", "sharding.shard_map-8"])
@pytest.mark.parametrize("tokens", [24, 2])
def test_the_compiled_product_is_the_rules_form_and_never_per_lane(where, tokens):
    """24 tokens: the lanes (32 under vmap, 8 per device) in groups, one weight-shaped partial
    sum per group; 2 tokens: one product. Never a (lanes, in, out) array."""
    mapping, lanes = _mapping(where)
    per_device = lanes if where == "jax.vmap" else lanes // 8
    x = jnp.ones((lanes, tokens, 5))
    g = jnp.ones((lanes, tokens, 3))
    hlo = smap.StatefulMapping(_lane_products, axis_name=AXIS, out_axes=None, **mapping).lower(x, g).compile().as_text()
    groups = lane_groups(per_device, tokens, jax.default_backend())
    assert (groups > 1) == (tokens == 24)
    shapes = {tuple(int(d) for d in dims.split(",")) for dims in re.findall(r"f32\[([\d,]+)\]", hlo)}
    assert (per_device, 5, 3) not in shapes and (per_device, 3, 5) not in shapes
    if groups > 1:
        assert (groups, 5, 3) in shapes
    assert not any(len(s) == 3 and s[0] > 1 and s[1:] == (5, 3) for s in shapes if s[0] != groups)
