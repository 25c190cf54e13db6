"""The lane-sum fusion of embedding and convolution weight gradients (smap.transform._fuse_layers).

Each program is a per-example SGD step: ``smap.grad`` of one example's loss,
a ``pmean`` (or a weighted ``psum``) of the gradients over the lanes, the
update written back. The updated weights must equal plain JAX's
(``jax.vmap(jax.grad(loss))`` over the batch, then the mean), with the fusion
on and off, under ``jax.vmap`` and on 8 emulated devices holding 1, 2 and 4
lanes each; and XLA's optimised HLO of the fused step must hold no array of
(lanes per device, a weight's shape), where the unfused step does.
Sums the fusion does not recognise (a scatter into a table that is not
zeros, a factor that would change the dtype) must be computed as written.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
import smap
from smap import _compat
from smap.transform._lane_groups import lane_groups

AXIS = "batch"
LR = 0.5
VOCAB, WIDTH, TOKENS = 11, 6, 5


@dataclasses.dataclass(frozen=True)
class Case:
    """``loss(params, *example)`` of one example; ``data(rng, lanes)`` the examples;
    ``weighted``: the gradients are summed with a per-example weight (the last argument)."""

    init: Callable[[np.random.Generator], dict[str, np.ndarray]]
    loss: Callable[..., jax.Array]
    data: Callable[[np.random.Generator, int], tuple]
    weighted: bool = False


def _normal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)


def _tokens(rng: np.random.Generator, lanes: int) -> tuple:
    seq = rng.integers(0, VOCAB, (lanes, TOKENS + 1)).astype(np.int32)
    return seq[:, :-1], seq[:, 1:]


def _next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None], axis=1))


def embedding_init(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"table": _normal(rng, VOCAB, WIDTH), "head": _normal(rng, WIDTH, VOCAB)}


def embedding_loss(p: dict, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    return _next_token_loss(jnp.tanh(p["table"][tokens]) @ p["head"], targets)


def tied_loss(p: dict, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """The table embeds the tokens and, transposed, gives the logits."""
    return _next_token_loss(jnp.tanh(p["table"][tokens]) @ p["table"].T, targets)


def weighted_loss(p: dict, tokens: jax.Array, targets: jax.Array, weight: jax.Array) -> jax.Array:
    return embedding_loss(p, tokens, targets)


def weighted_data(rng: np.random.Generator, lanes: int) -> tuple:
    return (*_tokens(rng, lanes), rng.uniform(0.5, 2.0, lanes).astype(np.float32))


def taken_loss(p: dict, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Ids past the table: ``jnp.take`` clips them, ``.at[].get(mode='fill')`` reads zeros."""
    clipped = jnp.take(p["table"], tokens + 3, axis=0, mode="clip")
    filled = p["table"].at[tokens + 3].get(mode="fill", fill_value=0.0)
    return _next_token_loss(jnp.tanh(clipped + filled) @ p["head"], targets)


def fixed_tokens_loss(p: dict, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """The same tokens in every lane, scaled by the lane's targets."""
    return jnp.mean(jnp.sin(p["table"][jnp.arange(TOKENS) % VOCAB] * targets[:, None]))


def added_loss(p: dict, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """A scatter-add in the loss itself, into the shared head (each lane's own head)."""
    rows = p["table"][tokens]
    head = p["head"].T.at[tokens].add(rows).T
    return _next_token_loss(jnp.tanh(rows) @ head, targets)


def sliced_loss(p: dict, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Two overlapping slices of one weight: its gradient is a sum of zero-padded products."""
    h = jnp.tanh(p["table"][tokens])
    left, right = h @ p["head"][:, :7], jnp.tanh(h @ p["head"][:, 4:])
    return _next_token_loss(jnp.concatenate([left, right[:, 3:]], axis=1), targets)


def _conv(x: jax.Array, k: jax.Array, **options: Any) -> jax.Array:
    return jax.lax.conv_general_dilated(x, k, dimension_numbers=("NHWC", "HWIO", "NHWC"), **options)


def cnn_init(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"k1": _normal(rng, 3, 3, 2, 4), "k2": _normal(rng, 2, 2, 4, 5), "w": _normal(rng, 5, 3)}


def cnn_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Two convolutions (one strided and dilated) on one image, a mean pool, a dense layer."""
    h = jnp.tanh(_conv(x[None], p["k1"], window_strides=(1, 1), padding="SAME"))
    h = jnp.tanh(_conv(h, p["k2"], window_strides=(2, 1), padding="VALID", rhs_dilation=(1, 2)))
    return -jax.nn.log_softmax(jnp.mean(h, axis=(0, 1, 2)) @ p["w"])[y]


def images(rng: np.random.Generator, lanes: int) -> tuple:
    return rng.standard_normal((lanes, 7, 6, 2)).astype(np.float32), rng.integers(0, 3, lanes).astype(np.int32)


def nchw_init(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"k": _normal(rng, 4, 2, 3, 3)}


def nchw_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """A lane is a block of 2 images in NCHW, kernel OIHW."""
    out = jax.lax.conv_general_dilated(x, p["k"], (1, 1), ((1, 0), (0, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return jnp.sum(jnp.sin(out) * y)


def blocks(rng: np.random.Generator, lanes: int) -> tuple:
    return rng.standard_normal((lanes, 2, 2, 5, 4)).astype(np.float32), rng.standard_normal(lanes).astype(np.float32)


def grouped_init(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"k": _normal(rng, 3, 3, 1, 4)}


def grouped_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """A depthwise convolution (feature_group_count=2): its kernel gradient groups the batch
    (batch_group_count=2) and sums over the examples as features, which the fusion folds."""
    out = _conv(x[None], p["k"], window_strides=(1, 1), padding="SAME", feature_group_count=2)
    return jnp.sum(jnp.sin(out)) * y.astype(jnp.float32)


CASES = {
    "embedding": Case(embedding_init, embedding_loss, _tokens),
    "tied": Case(lambda rng: {"table": _normal(rng, VOCAB, WIDTH)}, tied_loss, _tokens),
    "weighted": Case(embedding_init, weighted_loss, weighted_data, weighted=True),
    "taken": Case(embedding_init, taken_loss, _tokens),
    "fixed_tokens": Case(lambda rng: {"table": _normal(rng, VOCAB, WIDTH)}, fixed_tokens_loss, _tokens),
    "added": Case(embedding_init, added_loss, _tokens),
    "sliced": Case(embedding_init, sliced_loss, _tokens),
    "cnn": Case(cnn_init, cnn_loss, images),
    "nchw_blocks": Case(nchw_init, nchw_loss, blocks),
    "grouped": Case(grouped_init, grouped_loss, images),
}
FUSED = {
    "embedding": ["table"],
    "tied": ["table"],
    "weighted": ["table"],
    "taken": ["table"],
    "fixed_tokens": ["table"],
    "sliced": ["table", "head"],
    "cnn": ["k1", "k2"],
    "nchw_blocks": ["k"],
    "grouped": ["k"],
}


def mapping(devices: int | None) -> dict:
    """``jax.vmap`` (None) or ``sharding.shard_map`` over ``devices`` emulated devices."""
    if devices is None:
        return {}
    return {"mapping_fn": sharding.shard_map(sharding.make_mesh(data=devices, devices=jax.devices()[:devices]))}


def step_of(case: Case, seed: int, **options: Any) -> tuple[smap.StatefulMapping, dict[str, smap.ParamState]]:
    params = {k: smap.ParamState(v) for k, v in case.init(np.random.default_rng(seed)).items()}

    def step(*example):
        grads = smap.grad(lambda: case.loss({k: s.value for k, s in params.items()}, *example), grad_states=params)()
        if case.weighted:
            grads = jax.tree.map(lambda g: jax.lax.psum(example[-1] * g, AXIS) / jax.lax.psum(1, AXIS), grads)
        else:
            grads = jax.lax.pmean(grads, AXIS)
        for k, g in grads.items():
            params[k].value = params[k].value - LR * g
        return jnp.zeros(())

    return smap.StatefulMapping(step, axis_name=AXIS, **options), params


def plain_jax(case: Case, seed: int, data: tuple) -> dict[str, np.ndarray]:
    """The step in plain JAX: per-example gradients by jax.vmap(jax.grad), their (weighted) mean."""
    p = {k: jnp.asarray(v) for k, v in case.init(np.random.default_rng(seed)).items()}
    grads = jax.vmap(jax.grad(case.loss), (None, *[0] * len(data)))(p, *data)
    weight = data[-1] if case.weighted else jnp.ones(len(data[0]))
    return {k: p[k] - LR * jnp.tensordot(weight, g, axes=1) / len(weight) for k, g in grads.items()}


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(
    ("devices", "lanes"), [(None, 8), (8, 8), (8, 16), (8, 32)], ids=["vmap", "8dev-1", "8dev-2", "8dev-4"]
)
@pytest.mark.parametrize("name", sorted(CASES))
def test_step_gives_plain_jax_values(name, devices, lanes, fuse):
    case = CASES[name]
    data = case.data(np.random.default_rng(1), lanes)
    m, params = step_of(case, 0, fuse_lane_sums=fuse, **mapping(devices))
    m(*data)
    want = plain_jax(case, 0, data)
    for k, state in params.items():
        np.testing.assert_allclose(np.asarray(state.value), want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def compiled_hlo(case: Case, lanes: int, devices: int | None, fuse: bool) -> str:
    data = case.data(np.random.default_rng(1), lanes)
    m, _ = step_of(case, 0, fuse_lane_sums=fuse, **mapping(devices))
    m(*data)
    return m.lower(*data).compile().as_text()


def per_lane_arrays(hlo: str, lanes: int, shapes: list[tuple[int, ...]]) -> list[str]:
    """Arrays in the HLO whose dims are (lanes, a weight's dims), in any order."""
    wanted = {tuple(sorted((lanes, *s))) for s in shapes}
    found = {d for d in re.findall(r"\bf32\[([\d,]+)\]", hlo) if tuple(sorted(map(int, d.split(",")))) in wanted}
    return sorted(found)


@pytest.mark.parametrize(("devices", "lanes"), [(None, 8), (8, 32)], ids=["vmap", "8dev-4"])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_no_per_lane_weight_gradient_in_the_optimised_program(name, devices, lanes):
    case = CASES[name]
    init = case.init(np.random.default_rng(0))
    shapes = [init[k].shape for k in FUSED[name]]
    per_device = lanes // (devices or 1)
    assert per_lane_arrays(compiled_hlo(case, lanes, devices, fuse=False), per_device, shapes)
    assert per_lane_arrays(compiled_hlo(case, lanes, devices, fuse=True), per_device, shapes) == []


def test_a_complex_factor_is_not_moved_onto_real_updates():
    """psum(c * g) with a complex per-lane c and a real embedding gradient stays complex."""
    table = smap.ParamState(_normal(np.random.default_rng(2), VOCAB, WIDTH))

    def lane(tokens, c):
        grad = smap.grad(lambda: jnp.sum(jnp.sin(table.value[tokens])), grad_states=table)()
        return jax.lax.psum(c * grad, AXIS)

    tokens, _ = _tokens(np.random.default_rng(3), 8)
    c = (np.arange(8) + 1j * np.arange(8, 0, -1)).astype(np.complex64)
    got = smap.StatefulMapping(lane, axis_name=AXIS, out_axes=None)(tokens, c)
    grads = jax.vmap(jax.grad(lambda t, tok: jnp.sum(jnp.sin(t[tok]))), (None, 0))(jnp.asarray(table.value), tokens)
    np.testing.assert_allclose(got, jnp.tensordot(c, grads, axes=1), rtol=1e-5, atol=1e-5)


def test_a_scatter_into_a_shared_table_that_is_not_zeros_is_summed_as_written():
    # psum(base.at[i].add(u)) == lanes * base + the scatter of every lane's rows: not fused.
    base = np.arange(VOCAB * 2, dtype=np.float32).reshape(VOCAB, 2)

    def lane(tokens, u):
        return jax.lax.psum(jnp.asarray(base).at[tokens].add(u), AXIS)

    tokens = np.random.default_rng(4).integers(0, VOCAB, (8, 3)).astype(np.int32)
    u = np.random.default_rng(5).standard_normal((8, 3, 2)).astype(np.float32)
    want = 8 * base
    np.add.at(want, tokens.reshape(-1), u.reshape(-1, 2))
    got = smap.StatefulMapping(lane, axis_name=AXIS, out_axes=None)(tokens, u)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("name", ["SCATTER_ADD", "CONV", "PAD"])
def test_the_primitives_the_layer_fusion_reads_exist(name):
    from jax.extend.core import primitives

    names = {p.name for p in vars(primitives).values() if hasattr(p, "bind") and hasattr(p, "name")}
    assert getattr(_compat, name) in names


# -- the fused products are the batch step's --------------------------------------------

DOT_FORMS = {
    "x @ w": lambda w, x: jnp.sum(jnp.tanh(x[0] @ w)),
    "tokens @ w": lambda w, x: jnp.sum(jnp.tanh(x @ w)),
    "einsum": lambda w, x: jnp.sum(jnp.tanh(jnp.einsum("td,df->tf", x, w))),
    "tokens @ w.T": lambda w, x: jnp.sum(jnp.tanh(x @ w[:, :WIDTH].T)),
}


def dots(hlo: str) -> list[str]:
    """Each dot of the HLO: its result shape and dimension numbers (operand names left out)."""
    found = re.findall(r"=\s*(f32\[[\d,]*\])\S*\s+dot\([^)]*\),\s*([^\n]*?)(?:,\s*metadata|$)", hlo, re.MULTILINE)
    return sorted(f"{shape} {dims}" for shape, dims in found)


@pytest.mark.parametrize("form", sorted(DOT_FORMS))
def test_the_fused_weight_gradient_is_the_batch_steps_product(form):
    """The fused step's dots (operand order, contracting dimensions, result layout) are the
    dots XLA compiles for jax.grad of the batch loss, so the backend runs the same kernels,
    where the cost rule makes one product over the lanes (8 lanes of 5 tokens: too few to
    group; test_lane_groups.py checks the grouped form)."""
    assert lane_groups(8, TOKENS, jax.default_backend()) == 1
    loss = DOT_FORMS[form]
    x = np.random.default_rng(6).standard_normal((8, TOKENS, WIDTH)).astype(np.float32)
    w0 = _normal(np.random.default_rng(7), WIDTH, 2 * WIDTH)

    def per_example(fuse):
        w = smap.ParamState(w0)

        def step(xi):
            grad = smap.grad(lambda: loss(w.value, xi), grad_states=w)()
            w.value = w.value - LR * jax.lax.pmean(grad, AXIS)
            return jnp.zeros(())

        m = smap.StatefulMapping(step, axis_name=AXIS, fuse_lane_sums=fuse)
        m(x)
        return m.lower(x).compile().as_text()

    batch = jax.jit(lambda w, xs: w - LR * jax.grad(lambda v: jnp.mean(jax.vmap(loss, (None, 0))(v, xs)))(w))
    want = dots(batch.lower(w0, x).compile().as_text())
    assert dots(per_example(False)) != want  # the per-example products, without the fusion
    assert dots(per_example(True)) == want
