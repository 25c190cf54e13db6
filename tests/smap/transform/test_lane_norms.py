"""Per-lane gradient norms without per-lane gradients (lane norms, issue 21).

Each layer kind below is a per-example loss; each lane takes its gradient,
its norm (spelled several ways), a clip factor and the psum of the clipped
gradients. The norms and the clipped sum must equal plain ``jax.vmap`` of the
same lane (the per-example gradients materialised) under ``jax.vmap`` and on
8 devices with 1, 2 and 4 lanes per device; and where the rewrite applies,
XLA's optimised HLO must hold no (lanes, weight shape) array while the
program with ``fuse_lane_sums=False`` does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import sharding
import smap

AXIS = "batch"
CLIP = 0.5


@dataclasses.dataclass
class Kind:
    params: dict[str, np.ndarray]
    loss: Callable  # (params, example) -> scalar
    data: Callable[[np.random.Generator, int], tuple]  # (rng, lanes) -> per-example inputs
    rewritten: list[str]  # params whose per-lane gradient the rewrite must not materialise


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


def _inputs(*shape: int) -> Callable:
    return lambda rng, lanes: (rng.standard_normal((lanes, *shape)).astype(np.float32),)


def dense(rng):
    """One token: the norm is |x|^2 |delta|^2; the bias is computed as written."""
    p = {"w": _normal(rng, 13, 7), "b": _normal(rng, 7)}
    return Kind(p, lambda p, ex: jnp.sum(jnp.tanh(ex[0] @ p["w"] + p["b"]) ** 2), _inputs(13), ["w"])


def dense_tokens(rng):
    """Three tokens: Gram matrices of the inputs and the cotangents (3 * (11 + 9) <= 11 * 9)."""
    p = {"w": _normal(rng, 11, 9)}
    return Kind(p, lambda p, ex: jnp.mean(jnp.sin(ex[0] @ p["w"])), _inputs(3, 11), ["w"])


def dense_long(rng):
    """Twelve tokens through a 3 x 2 weight: the product is cheaper, computed as written."""
    p = {"w": _normal(rng, 3, 2)}
    return Kind(p, lambda p, ex: jnp.mean(jnp.sin(ex[0] @ p["w"])), _inputs(12, 3), [])


def einsum(rng):
    p = {"w": _normal(rng, 2, 10, 6)}
    return Kind(p, lambda p, ex: jnp.sum(jnp.tanh(jnp.einsum("td,hde->the", ex[0], p["w"]))), _inputs(3, 10), ["w"])


def batched_einsum(rng):
    """A weight per head (a batch dimension of the product)."""
    p = {"w": _normal(rng, 2, 10, 6)}
    return Kind(p, lambda p, ex: jnp.sum(jnp.tanh(jnp.einsum("htd,hde->hte", ex[0], p["w"]))), _inputs(2, 3, 10), ["w"])


def conv(rng):
    """A 1-D convolution's kernel over 9 positions: the product is cheaper (9 * (12 + 5) > 12 * 5),
    made per lane and summed over the lanes as it is."""
    p = {"k": _normal(rng, 3, 4, 5)}

    def loss(p, ex):
        y = jax.lax.conv_general_dilated(ex[0][None], p["k"], (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))
        return jnp.sum(jnp.tanh(y))

    return Kind(p, loss, _inputs(9, 4), [])


def _conv_kind(rng, kernel, inputs, **conv):
    """A 2-D convolution (NHWC, HWIO) then a bias and tanh; ``conv`` its window options."""
    p = {"k": _normal(rng, *kernel), "c": _normal(rng, kernel[-1])}

    def loss(p, ex):
        y = jax.lax.conv_general_dilated(ex[0][None], p["k"], dimension_numbers=("NHWC", "HWIO", "NHWC"), **conv)
        return jnp.sum(jnp.tanh(y + p["c"]))

    return Kind(p, loss, _inputs(*inputs), ["k"])


def conv_strided(rng):
    """Stride 2, no padding: 3 x 3 outputs of a 3 x 3 x 5 x 12 kernel, Gram matrices of 9 tokens."""
    return _conv_kind(rng, (3, 3, 5, 12), (7, 7, 5), window_strides=(2, 2), padding="VALID")


def conv_dilated(rng):
    """A kernel dilated by 2 and asymmetric padding: 2 x 3 outputs."""
    return _conv_kind(
        rng, (3, 3, 4, 10), (6, 6, 4), window_strides=(1, 1), padding=((0, 0), (0, 1)), rhs_dilation=(2, 2)
    )


def conv_transposed(rng):
    """An input dilated by 2 (a transposed convolution's form) with padding: 3 x 2 outputs."""
    return _conv_kind(
        rng, (2, 3, 6, 9), (2, 2, 6), window_strides=(1, 1), padding=((0, 0), (1, 0)), lhs_dilation=(2, 2)
    )


def conv_small_outputs(rng):
    """A 2 x 2 kernel over 3 x 3 outputs, 8 -> 16 features: more output positions than window
    positions, so the patches are sliced per output position; Gram matrices of 9 tokens."""
    return _conv_kind(rng, (2, 2, 8, 16), (4, 4, 8), window_strides=(1, 1), padding="VALID")


def conv_kept(rng):
    """The CNN benchmark's second layer, 3 x 3 x 16 x 32 over 8 x 8 positions: the product is cheaper
    (64 * (144 + 32) > 144 * 32), made per lane in the convolution's own order."""
    kind = _conv_kind(rng, (3, 3, 16, 32), (8, 8, 16), window_strides=(1, 1), padding="SAME")
    return dataclasses.replace(kind, rewritten=[])


def conv_nchw(rng):
    """Channels first (NCHW, OIHW): the same Gram matrices under another layout."""
    p = {"k": _normal(rng, 12, 5, 3, 3)}

    def loss(p, ex):
        y = jax.lax.conv_general_dilated(
            ex[0][None], p["k"], (1, 1), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        return jnp.sum(jnp.tanh(y))

    return Kind(p, loss, _inputs(5, 4, 4), ["k"])


def conv_grouped(rng):
    """Two feature groups: the kernel gradient groups the batch, computed as written."""
    p = {"k": _normal(rng, 3, 3, 2, 8)}

    def loss(p, ex):
        y = jax.lax.conv_general_dilated(
            ex[0][None], p["k"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2
        )
        return jnp.sum(jnp.tanh(y))

    return Kind(p, loss, _inputs(4, 4, 4), [])


def _ids(low: int, high: int, n: int) -> Callable:
    return lambda rng, lanes: (rng.integers(low, high, size=(lanes, n)).astype(np.int32),)


def embedding(rng):
    """Token ids with repeats: the rows are summed per distinct id."""
    p = {"table": _normal(rng, 17, 6)}
    c = np.linspace(-1, 1, 6, dtype=np.float32)
    return Kind(p, lambda p, ex: jnp.sum(jnp.sin(p["table"][ex[0]]) * c), _ids(0, 6, 5), ["table"])


def embedding_clip(rng):
    """``jnp.take(mode='clip')`` with ids out of range: they count as the first or last row."""
    p = {"table": _normal(rng, 17, 6)}
    c = np.linspace(-1, 1, 6, dtype=np.float32)

    def loss(p, ex):
        return jnp.sum(jnp.sin(jnp.take(p["table"], ex[0], axis=0, mode="clip")) * c)

    return Kind(p, loss, _ids(-4, 21, 5), ["table"])


def embedding_fill(rng):
    """``.at[ids].get(mode='fill')`` with ids out of range: their rows get no gradient."""
    p = {"table": _normal(rng, 17, 6)}
    c = np.linspace(-1, 1, 6, dtype=np.float32)

    def loss(p, ex):
        return jnp.sum(jnp.sin(p["table"].at[ex[0]].get(mode="fill", fill_value=0.5)) * c)

    return Kind(p, loss, _ids(0, 21, 5), ["table"])


def layernorm(rng):
    """Layernorm's scale and bias (sums over the tokens, computed as written), then a dense layer."""
    p = {"scale": 1 + _normal(rng, 8), "bias": _normal(rng, 8), "w": _normal(rng, 8, 12)}

    def loss(p, ex):
        h = ex[0]
        mean = h.mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-3) * p["scale"] + p["bias"]
        return jnp.mean(jnp.tanh(h @ p["w"]))

    return Kind(p, loss, _inputs(3, 8), ["w"])


def attention(rng):
    """Self-attention over 4 tokens: the query, key, value and output projections."""
    p = {k: _normal(rng, 8, 8) for k in ("q", "k", "v", "o")}

    def loss(p, ex):
        h = ex[0]
        scores = (h @ p["q"]) @ (h @ p["k"]).T / np.float32(np.sqrt(8))
        return jnp.mean(jnp.tanh((jax.nn.softmax(scores, -1) @ (h @ p["v"])) @ p["o"]))

    return Kind(p, loss, _inputs(4, 8), ["q", "k", "v", "o"])


def tied(rng):
    """One weight in two places: its gradient is a sum of two products, computed as written."""
    p = {"w": _normal(rng, 10, 6)}
    return Kind(p, lambda p, ex: jnp.sum((jnp.tanh(ex[0] @ p["w"]) @ p["w"].T - ex[0]) ** 2), _inputs(10), [])


def sliced(rng):
    """A slice of a weight: its gradient is the product padded with zeros."""
    p = {"w": _normal(rng, 10, 8)}
    return Kind(p, lambda p, ex: jnp.sum(jnp.tanh(ex[0] @ p["w"][:, :5])), _inputs(10), ["w"])


KINDS = {
    f.__name__: f
    for f in (
        dense,
        dense_tokens,
        dense_long,
        einsum,
        batched_einsum,
        conv,
        conv_strided,
        conv_dilated,
        conv_transposed,
        conv_small_outputs,
        conv_kept,
        conv_nchw,
        conv_grouped,
        embedding,
        embedding_clip,
        embedding_fill,
        layernorm,
        attention,
        tied,
        sliced,
    )
}

# How a lane spells its gradient's norm.
NORMS: dict[str, Callable[[Any], jax.Array]] = {
    "optax.tree.norm": optax.tree.norm,
    "sum of g**2": lambda g: jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree_util.tree_leaves(g))),
    "sum of g*g": lambda g: jnp.sqrt(sum(jnp.sum(v * v) for v in jax.tree_util.tree_leaves(g))),
    "jnp.square": lambda g: jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree_util.tree_leaves(g))),
    "jnp.vdot": lambda g: jnp.sqrt(sum(jnp.vdot(v, v) for v in jax.tree_util.tree_leaves(g))),
    "jnp.linalg.norm": lambda g: jnp.linalg.norm(jnp.stack([jnp.linalg.norm(v) for v in jax.tree_util.tree_leaves(g)])),
}


def dp_lane(kind: Kind, spelling: str) -> Callable:
    """One example's DP step: gradient, norm, clip factor, the psum of the clipped gradients."""

    def lane(p, *example):
        g = jax.grad(kind.loss)(p, example)
        norm = NORMS[spelling](g)
        factor = jnp.minimum(1.0, CLIP / (norm + 1e-6))
        return norm, jax.lax.psum(jax.tree_util.tree_map(lambda v: factor * v, g), AXIS)

    return lane


def reference(kind: Kind, spelling: str, data: tuple) -> Any:
    in_axes = (None, *[0] * len(data))
    lane = dp_lane(kind, spelling)
    return jax.jit(jax.vmap(lane, in_axes=in_axes, axis_name=AXIS, out_axes=(0, None)))(kind.params, *data)


def mapped(kind: Kind, spelling: str, data: tuple, **mapping: Any) -> smap.StatefulMapping:
    in_axes = (None, *[0] * len(data))
    return smap.StatefulMapping(dp_lane(kind, spelling), in_axes=in_axes, axis_name=AXIS, out_axes=(0, None), **mapping)


PLACES = ["jax.vmap", "shard_map-1", "shard_map-2", "shard_map-4"]


def place(where: str) -> tuple[dict, int]:
    """Mapping keywords and the number of lanes: 16 under jax.vmap, 8 devices x n lanes otherwise."""
    if where == "jax.vmap":
        return {}, 16
    return {"mapping_fn": sharding.shard_map(sharding.make_mesh(data=8))}, 8 * int(where.rsplit("-", 1)[1])


def per_lane_arrays(hlo: str, lanes: int, shapes: list[tuple[int, ...]]) -> list[str]:
    """Arrays in the HLO whose dims are (lanes, one of ``shapes``), in any order."""
    wanted = [sorted((lanes, *s)) for s in shapes]
    return sorted({d for d in re.findall(r"\bf32\[([\d,]+)\]", hlo) if sorted(map(int, d.split(","))) in wanted})


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize("where", PLACES)
@pytest.mark.parametrize("name", sorted(KINDS))
def test_norms_and_clipped_sums_equal_the_materialised_ones(name, where):
    mapping, lanes = place(where)
    rng = np.random.default_rng(sorted(KINDS).index(name))
    kind = KINDS[name](rng)
    data = kind.data(rng, lanes)
    want = reference(kind, "optax.tree.norm", data)
    got = mapped(kind, "optax.tree.norm", data, **mapping)(kind.params, *data)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for k in kind.params:
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=1e-5, atol=1e-6 * float(np.abs(want[1][k]).max()))


@pytest.mark.parametrize("spelling", sorted(NORMS))
def test_every_spelling_of_the_norm(spelling):
    rng = np.random.default_rng(7)
    kind = attention(rng)
    data = kind.data(rng, 8)
    want = reference(kind, spelling, data)
    m = mapped(kind, spelling, data)
    got = m(kind.params, *data)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    hlo = m.lower(kind.params, *data).compile().as_text()
    assert per_lane_arrays(hlo, 8, [(8, 8)]) == []


# -- the rewrite applies where it says, and only there ----------------------------------------


@pytest.mark.parametrize("where", ["jax.vmap", "shard_map-2"])
@pytest.mark.parametrize("name", sorted(n for n in KINDS if KINDS[n](np.random.default_rng(0)).rewritten))
def test_no_per_lane_gradient_where_the_rewrite_applies(name, where):
    mapping, lanes = place(where)
    per_device = lanes if where == "jax.vmap" else lanes // 8
    kind = KINDS[name](np.random.default_rng(0))
    data = kind.data(np.random.default_rng(1), lanes)
    shapes = [kind.params[k].shape for k in kind.rewritten]
    fused = mapped(kind, "optax.tree.norm", data, **mapping).lower(kind.params, *data).compile().as_text()
    plain = mapped(kind, "optax.tree.norm", data, fuse_lane_sums=False, **mapping)
    plain = plain.lower(kind.params, *data).compile().as_text()
    assert per_lane_arrays(plain, per_device, shapes), "the program as written holds per-lane gradients"
    assert per_lane_arrays(fused, per_device, shapes) == []


@pytest.mark.parametrize("where", ["jax.vmap", "shard_map-2"])
@pytest.mark.parametrize("name", ["conv", "conv_kept"])
def test_a_kept_convolution_product_is_read_where_it_is_made(name, where):
    """Per-lane kernel gradients that the cost rule keeps are one convolution's output, which the
    norms and the clipped sum read as it is: no second (lanes x kernel) array (a copy into the
    kernel's order, which XLA:CPU made for the CNN benchmark's layer before)."""
    mapping, lanes = place(where)
    per_device = lanes if where == "jax.vmap" else lanes // 8
    kind = KINDS[name](np.random.default_rng(0))
    data = kind.data(np.random.default_rng(1), lanes)
    size = per_device * kind.params["k"].size

    def arrays(hlo: str) -> list[str]:
        """Instructions of the entry computation (the last), other than bitcasts, whose f32 result
        has the per-lane kernels' size."""
        hlo = hlo[hlo.index("\nENTRY") :]
        found = re.findall(r"^\s*(?:ROOT )?%\S+ = f32\[([\d,]+)\]\{[\d,]*\} (?!bitcast\()(?!parameter\()", hlo, re.M)
        return [d for d in found if math.prod(map(int, d.split(","))) == size]

    fused = mapped(kind, "optax.tree.norm", data, **mapping).lower(kind.params, *data).compile().as_text()
    plain = mapped(kind, "optax.tree.norm", data, fuse_lane_sums=False, **mapping)
    assert arrays(plain.lower(kind.params, *data).compile().as_text()), "the program as written makes them too"
    assert len(arrays(fused)) == 1


def test_a_norm_of_something_else_is_computed_as_written():
    """Per-lane norms of activations and of an outer product of two inputs (not gradients)."""
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((8, 5)).astype(np.float32), rng.standard_normal((8, 4)).astype(np.float32)
    w = _normal(rng, 5, 4)

    def lane(x, y):
        h = jnp.tanh(x @ w)
        outer = jnp.outer(x, y) * 3.0
        return jnp.sum(h**2), jnp.sum(jnp.square(outer)), jnp.vdot(h, y), jnp.sum(h * h + outer[0, 0] ** 2)

    got = smap.StatefulMapping(lane, axis_name=AXIS)(x, y)
    want = jax.vmap(lane)(x, y)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=2e-6)
    np.testing.assert_allclose(got[1], 9 * (x**2).sum(1) * (y**2).sum(1), rtol=2e-6)


@pytest.mark.parametrize("where", ["jax.vmap", "shard_map-2"])
def test_nan_in_one_example_propagates_as_in_the_materialised_step(where):
    """A NaN input gives its lane a NaN norm and a NaN factor, so the clipped sum is NaN, as
    with the per-example gradients materialised; the other lanes' norms are unaffected."""
    mapping, lanes = place(where)
    rng = np.random.default_rng(4)
    kind = dense_tokens(rng)
    (x,) = kind.data(rng, lanes)
    x[3, 1, 2] = np.nan
    want = reference(kind, "optax.tree.norm", (x,))
    got = mapped(kind, "optax.tree.norm", (x,), **mapping)(kind.params, x)
    assert np.isnan(got[0][3]) and np.isnan(want[0][3])
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)  # NaN where want is NaN
    assert np.isnan(got[1]["w"]).all() and np.isnan(want[1]["w"]).all()


def test_a_float16_gradient_that_overflows_has_an_infinite_norm_as_written():
    """A lane's float16 gradient that overflows is inf in the program as written, and so is
    its norm (its clip factor 0); the Gram identity, without the gradient, would be finite."""
    rng = np.random.default_rng(6)
    x = rng.uniform(0.5, 1.0, (8, 3)).astype(np.float32)
    x[2, 0] = 1000.0  # its gradient 2 y x reaches 6e5 in row 0
    w = np.full((3, 2), 0.3, np.float32)

    def loss(v, xe):
        y = xe.astype(jnp.float16) @ v.astype(jnp.float16)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    def lane(xe):
        g = jax.grad(lambda v: loss(v.astype(jnp.float16), xe))(w.astype(jnp.float16)).astype(jnp.float32)
        return jnp.sum(g**2)

    got = smap.StatefulMapping(lane, axis_name=AXIS)(x)
    want = jax.vmap(lane)(x)
    assert np.isinf(want[2]) and np.isfinite(np.delete(want, 2)).all()
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_masked_lane_contributes_nothing():
    """A 0/1 mask as a per-lane factor: a masked lane's norm is still computed, its clipped
    gradient contributes nothing to the sum."""
    rng = np.random.default_rng(5)
    kind = embedding(rng)
    (ids,) = kind.data(rng, 8)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1], np.float32)

    def lane(p, ids, m):
        g = jax.grad(kind.loss)(p, (ids,))
        norm = optax.tree.norm(g)
        factor = jnp.minimum(1.0, CLIP / (norm + 1e-6)) * m
        return norm, jax.lax.psum(jax.tree_util.tree_map(lambda v: factor * v, g), AXIS)

    got = smap.StatefulMapping(lane, in_axes=(None, 0, 0), axis_name=AXIS, out_axes=(0, None))(kind.params, ids, mask)
    grads = jax.vmap(jax.grad(kind.loss), (None, 0))(kind.params, (ids,))["table"]
    norms = jnp.sqrt(jnp.sum(grads**2, (1, 2)))
    want = jnp.einsum("b,bij->ij", jnp.minimum(1.0, CLIP / (norms + 1e-6)) * mask, grads)
    np.testing.assert_allclose(got[0], norms, rtol=2e-6)
    np.testing.assert_allclose(got[1]["table"], want, rtol=1e-5, atol=1e-7)


# -- the DP-SGD step: no per-example gradient array in the optimised program ------------------


def mlp_model(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    """The issue's MLP, 784-512-512-10, softmax cross-entropy on one example."""
    dims = (784, 512, 512, 10)
    p = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        p[f"w{i}"], p[f"b{i}"] = _normal(rng, a, b), np.zeros(b, np.float32)

    def loss(p, x, y):
        h = x
        for i in range(2):
            h = jnp.tanh(h @ p[f"w{i}"] + p[f"b{i}"])
        return -jax.nn.log_softmax(h @ p["w2"] + p["b2"])[y]

    def data(rng, lanes):
        return rng.standard_normal((lanes, 784)).astype(np.float32), rng.integers(0, 10, lanes).astype(np.int32)

    return p, loss, data


def lm_model(rng: np.random.Generator) -> tuple[dict, Callable, Callable]:
    """A small transformer LM like scripts/lm.py's (one block, no dropout); a lane is one sequence."""
    vocab, context, width, heads = 48, 8, 32, 2
    p = {"tokens": 0.02 * _normal(rng, vocab, width), "positions": 0.02 * _normal(rng, context, width)}
    for k in ("q", "k", "v", "o"):
        p[k] = _normal(rng, width, width)
    p["up"], p["up_b"], p["down"] = (
        _normal(rng, width, 4 * width),
        np.zeros(4 * width, np.float32),
        _normal(rng, 4 * width, width),
    )
    for k in ("norm1", "norm2", "norm3"):
        p[k + "_s"], p[k + "_b"] = np.ones(width, np.float32), np.zeros(width, np.float32)
    p["head"] = _normal(rng, width, vocab)

    def norm(p, k, x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * p[k + "_s"] + p[k + "_b"]

    def attend(p, x):
        split = (x.shape[0], heads, width // heads)
        q, k, v = ((x @ p[n]).reshape(split) for n in ("q", "k", "v"))
        scores = jnp.einsum("qhc,khc->hqk", q, k) / np.float32(np.sqrt(width // heads))
        causal = jnp.tril(jnp.ones((x.shape[0],) * 2, bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        return jnp.einsum("hqk,khc->qhc", weights, v).reshape(x.shape) @ p["o"]

    def loss(p, ids):
        x = p["tokens"][ids[:-1]] + p["positions"]
        x = x + attend(p, norm(p, "norm1", x))
        x = x + jax.nn.gelu(norm(p, "norm2", x) @ p["up"] + p["up_b"]) @ p["down"]
        log_p = jax.nn.log_softmax(norm(p, "norm3", x) @ p["head"])
        return -jnp.take_along_axis(log_p, ids[1:, None], axis=-1).mean()

    def data(rng, lanes):
        return (rng.integers(0, vocab, (lanes, context + 1)).astype(np.int32),)

    return p, loss, data


MODELS = {
    "mlp": (mlp_model, ["w0", "w1", "w2"]),
    "lm": (lm_model, ["tokens", "q", "k", "v", "o", "up", "down", "head"]),
}
LR, SIGMA = 0.1, 0.3


def dp_step(params: dict[str, smap.ParamState], loss: Callable, lanes: int) -> Callable:
    """The DP-SGD step written per example: grad, norm, clip factor, clipped psum, shared noise, SGD."""

    def lane(key, *example):
        def example_loss():
            return loss({k: s.value for k, s in params.items()}, *example)

        g = smap.grad(example_loss, grad_states=params)()
        norm = optax.tree.norm(g)
        factor = jnp.minimum(1.0, CLIP / (norm + 1e-6))
        summed = jax.lax.psum(jax.tree_util.tree_map(lambda v: factor * v, g), AXIS)
        keys = dict(zip(sorted(params), jax.random.split(key, len(params))))
        for k, s in params.items():
            noise = jax.random.normal(keys[k], s.value.shape) * (SIGMA * CLIP)
            s.value = s.value - LR * (summed[k] + noise) / lanes
        return norm

    return lane


def materialised_step(p: dict, loss: Callable, key: jax.Array, data: tuple) -> tuple:
    """The same step in plain JAX, with the per-example gradients materialised (the jax_privacy way)."""
    grads = jax.vmap(jax.grad(loss), (None, *[0] * len(data)))(p, *data)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, 1) for g in grads.values()))
    factors = jnp.minimum(1.0, CLIP / (norms + 1e-6))
    keys = dict(zip(sorted(p), jax.random.split(key, len(p))))
    lanes = norms.shape[0]
    new = {}
    for k, v in p.items():
        summed = jnp.tensordot(factors, grads[k], 1)
        new[k] = v - LR * (summed + jax.random.normal(keys[k], v.shape) * (SIGMA * CLIP)) / lanes
    return norms, new


@pytest.mark.parametrize("where", ["jax.vmap", "shard_map-2"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_dp_step_has_no_per_example_gradient_and_the_materialised_values(model, where):
    mapping, lanes = place(where)
    per_device = lanes if where == "jax.vmap" else lanes // 8
    build, weights = MODELS[model]
    rng = np.random.default_rng(11)
    p0, loss, make_data = build(rng)
    data = make_data(rng, lanes)
    key = jax.random.key(3)
    want_norms, want = jax.jit(materialised_step, static_argnums=1)(p0, loss, key, data)

    def compiled(**options: Any) -> tuple[str, Any, dict]:
        params = {k: smap.ParamState(v) for k, v in p0.items()}
        step = smap.StatefulMapping(
            dp_step(params, loss, lanes), in_axes=(None, *[0] * len(data)), axis_name=AXIS, **mapping, **options
        )
        norms = step(key, *data)
        return step.lower(key, *data).compile().as_text(), norms, {k: s.value for k, s in params.items()}

    hlo, norms, values = compiled()
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    for k in p0:
        np.testing.assert_allclose(values[k], want[k], rtol=1e-5, atol=1e-6)
    shapes = [p0[k].shape for k in weights]
    assert per_lane_arrays(hlo, per_device, shapes) == []
    plain, _, _ = compiled(fuse_lane_sums=False)
    assert len(per_lane_arrays(plain, per_device, shapes)) >= len(set(shapes))


# -- hybrid placement: weights split over a model axis -----------------------------------------

# Megatron's layout: the first projection of a pair split over its output axis, the second
# over its input axis; the rest replicated.
SPLIT = {
    "mlp": {"w0": P(None, "model"), "b0": P("model"), "w1": P("model", None)},
    "lm": {
        **{k: P(None, "model") for k in ("q", "k", "v", "up")},
        "up_b": P("model"),
        "o": P("model", None),
        "down": P("model", None),
    },
}


def _trimmed(spec: P) -> tuple:
    """``spec``'s entries without trailing Nones."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_dp_step_with_weights_split_over_a_model_axis(model):
    """On a 4 x 2 data x model mesh, with weights split over 'model' during the call (each
    layer's norm is then a sum over the model group, which XLA partitions): the norms and
    the new weights equal the materialised step's, the weights keep their placement, and
    the optimised HLO holds no per-example gradient, whole or split, while the program
    with ``fuse_lane_sums=False`` does."""
    build, weights = MODELS[model]
    rng = np.random.default_rng(12)
    p0, loss, make_data = build(rng)
    lanes, per_device = 16, 4
    data = make_data(rng, lanes)
    key = jax.random.key(5)
    want_norms, want = jax.jit(materialised_step, static_argnums=1)(p0, loss, key, data)
    mesh = sharding.make_mesh(data=4, model=2)

    def run(**options: Any) -> tuple[str, Any, dict]:
        params = {k: smap.ParamState(v, tag=k) for k, v in p0.items()}
        step = smap.StatefulMapping(
            dp_step(params, loss, lanes),
            in_axes=(None, *[0] * len(data)),
            axis_name=AXIS,
            mapping_fn=sharding.shard_map(mesh, axis="data"),
            **options,
        )
        sharding.place(list(params.values()), step, rules=dict(SPLIT[model]))
        norms = step(key, *data)
        for k, spec in SPLIT[model].items():
            assert _trimmed(params[k].value.sharding.spec) == _trimmed(spec), k
        return step.lower(key, *data).compile().as_text(), norms, {k: s.value for k, s in params.items()}

    hlo, norms, values = run()
    np.testing.assert_allclose(norms, want_norms, rtol=1e-5)
    for k in p0:
        np.testing.assert_allclose(values[k], want[k], rtol=1e-5, atol=1e-6)
    shapes = [p0[k].shape for k in weights]
    split = [
        tuple(n // 2 if a == "model" else n for n, a in zip(p0[k].shape, SPLIT[model][k]))
        for k in weights
        if k in SPLIT[model]
    ]
    assert per_lane_arrays(hlo, per_device, shapes + split) == []
    plain, plain_norms, _ = run(fuse_lane_sums=False)
    np.testing.assert_allclose(plain_norms, want_norms, rtol=1e-5)
    assert per_lane_arrays(plain, per_device, shapes + split)
