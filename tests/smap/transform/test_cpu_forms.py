"""The equal forms the adapters give a lane's products and sums (smap.transform._cpu_forms).

Where a device holds one lane, the lane runs without ``jax.vmap``, and a weight
gradient (``dot_general(g, x)`` then ``.T``, as JAX's transpose rule writes it)
is made as ``dot_general(x, g)``; a sum that keeps an axis of size 1 sums over
it too. Checked: the values equal ``jax.vmap``'s with explicit state passing
(one lane and several per device), the optimised HLO holds no more dots
outside XLA's fused kernels than the same step partitioned by GSPMD, and no
reduction whose result keeps an axis of size 1.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
import smap

D = 16


def loss(w: dict, x: jax.Array) -> jax.Array:
    """A dense layer, a layer norm's sums over a (1, n, D) block, and a second layer."""
    h = jnp.tanh(x @ w["a"])
    h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(((h - h.mean(-1, keepdims=True)) ** 2).sum(-1, keepdims=True) + 1)
    return ((h @ w["b"]) ** 2).mean()


def weights() -> dict:
    keys = jax.random.split(jax.random.key(0), 2)
    return {k: jax.random.normal(key, (D, D)) / 4 for k, key in zip("ab", keys)}


def step(lanes: int, rows: int):
    """A step mapped over ``lanes`` lanes of shape (rows, 8, D) on 8 devices: pmean of the gradients, SGD."""
    w = {k: smap.ParamState(v) for k, v in weights().items()}

    def lane(x):
        grads = smap.grad(lambda: loss({k: s.value for k, s in w.items()}, x), grad_states=list(w.values()))()
        for s, g in zip(w.values(), jax.lax.pmean(grads, "batch")):
            s.value = s.value - 0.1 * g
        return loss({k: s.value for k, s in w.items()}, x)

    mesh = jax.make_mesh((8,), ("data",))
    mapped = smap.StatefulMapping(lane, axis_name="batch", mapping_fn=sharding.shard_map(mesh, axis="data"))
    x = jax.random.normal(jax.random.key(1), (lanes, rows, 8, D))
    return w, mapped, x


def reference(x: jax.Array) -> tuple[dict, jax.Array]:
    """The same step with jax.vmap and the weights passed explicitly."""
    w = weights()
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0))(w, x)
    new = {k: w[k] - 0.1 * grads[k].mean(0) for k in w}
    return new, jax.vmap(loss, in_axes=(None, 0))(new, x)


@pytest.mark.parametrize(
    "lanes,rows", [(8, 1), (8, 3), (32, 1)], ids=["one lane per device", "(3, 8, D) blocks", "4 lanes per device"]
)
def test_values_equal_vmap(lanes, rows):
    w, mapped, x = step(lanes, rows)
    out = mapped(x)
    new, expected = reference(x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    for k, s in w.items():
        np.testing.assert_allclose(s.value, new[k], rtol=1e-5, atol=1e-6, err_msg=k)


def _unfused_dots(hlo: str) -> int:
    entry = hlo[hlo.index("\nENTRY") :]
    return len(re.findall(r"= \S+ dot\(", entry))


def test_weight_gradients_take_the_partitioned_programs_form():
    """One lane per device: no more dots outside XLA's fused kernels than the GSPMD step has."""
    _, mapped, x = step(8, 4)
    hlo = mapped.lower(x).compile().as_text()

    mesh = jax.make_mesh((8,), ("data",))

    def plain(w, x):  # the same step: the update, then each lane's loss with the new weights
        grads = jax.grad(lambda w: jax.vmap(loss, in_axes=(None, 0))(w, x).mean())(w)
        new = {k: w[k] - 0.1 * grads[k] for k in w}
        return new, jax.vmap(loss, in_axes=(None, 0))(new, x)

    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    gspmd = jax.jit(plain, in_shardings=(replicated, split), out_shardings=(replicated, split))
    plain_hlo = gspmd.lower(weights(), x).compile().as_text()
    assert _unfused_dots(hlo) <= _unfused_dots(plain_hlo)


def test_no_reduction_keeps_a_unit_axis():
    """Lanes of (1, 8, D) blocks, four per device: the layer norm's sums run without the axis of size 1."""
    _, mapped, x = step(32, 1)
    hlo = mapped.lower(x).compile().as_text()
    kept = [
        line.strip()[:120]
        for line in hlo.splitlines()
        if re.search(r"= f32\[[\d,]*\]\S* reduce\(", line) and re.search(r"= f32\[(?:1,|[\d,]*,1[,\]])", line)
    ]
    assert not kept, kept
