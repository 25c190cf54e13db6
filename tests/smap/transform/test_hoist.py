"""The lane-invariant tail: what is cut off, the same values under every mapping_fn, and no state gathered for it."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
import smap
from smap.transform._hoist import split_tail

LANES, D_IN, D_OUT = 16, 8, 16
LR, B1, B2, DECAY = 0.1, 0.9, 0.99, 0.5


# -- the cut --------------------------------------------------------------------------


def test_the_tail_is_what_only_lane_invariant_values_feed_and_only_unmapped_outputs_read():
    def lane(x, w, mu, count):
        g = jax.lax.pmean(x * w, "i")  # a collective: stays in the lanes
        new_mu = 0.9 * mu + g
        return x * w, w - new_mu, new_mu, count + 1, w * 2

    program = jax.make_jaxpr(lane, axis_env=[("i", 4)])(1.0, 1.0, 1.0, 0)
    # outputs: x * w per lane; the new w, mu and count once; w * 2 mapped (every lane its copy)
    cut = split_tail(program, [True, False, False, False], [0, None, None, None, 0], "i")
    assert cut.kept == (0, 4) and cut.hoisted == (1, 2, 3)
    head = [str(e.primitive) for e in cut.head.jaxpr.eqns]
    tail = [str(e.primitive) for e in cut.tail.eqns]
    assert head == ["mul", "psum", "mul", "mul"]  # x * w, the sum of pmean, x * w again, w * 2
    assert tail[0] == "div" and tail[-2:] == ["sub", "add"]  # the mean of pmean, ..., the new w and count
    # the tail reads w, mu and count from the program's inputs, and g from the head
    assert sorted(kind for kind, _ in cut.sources) == ["head", "input", "input", "input"]
    x, w, mu, count = 3.0, 2.0, 1.0, 5
    want = jax.vmap(lane, in_axes=(0, None, None, None), axis_name="i")(jnp.full(4, x), w, mu, count)
    head = jax.vmap(
        lambda x: tuple(jax.core.eval_jaxpr(cut.head.jaxpr, cut.head.consts, x, w, mu, count)),
        axis_name="i",
        out_axes=cut.head_out_axes([0, None, None, None, 0]),
    )(jnp.full(4, x))
    got = cut.finish(head, [x, w, mu, count], program.consts)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_nothing_is_cut_when_every_output_is_per_lane_or_the_tail_is_empty():
    def lane(x, w):
        return x * w, jax.lax.psum(x, "i")

    program = jax.make_jaxpr(lane, axis_env=[("i", 4)])(1.0, 1.0)
    assert split_tail(program, [True, False], [0, 0], "i") is None
    assert split_tail(program, [True, False], [0, None], "i") is None  # the psum stays in the lanes


def test_random_draws_and_other_effects_stay_in_the_lanes():
    def lane(x, w):
        jax.debug.print("w {}", w)
        return x, w + 1

    program = jax.make_jaxpr(lane)(1.0, 1.0)
    cut = split_tail(program, [True, False], [0, None], None)
    assert cut is not None and [str(e.primitive) for e in cut.tail.eqns] == ["add"]
    assert any("debug" in str(e.primitive) for e in cut.head.jaxpr.eqns)


# -- the same values under every mapping_fn ------------------------------------------


class Trainer(smap.nn.Module):
    """A linear layer trained per example: pmean of the gradients, Adam's moments, a step count, an EMA."""

    def __init__(self):
        k1, k2 = jax.random.split(jax.random.PRNGKey(0))
        self.w = smap.ParamState(jax.random.normal(k1, (D_IN, D_OUT)) / D_IN**0.5)
        self.b = smap.ParamState(jax.random.normal(k2, (D_OUT,)) / 10)
        self.mu = {k: smap.LongTermState(jnp.zeros_like(p.value), tag="moment") for k, p in self.params().items()}
        self.nu = {k: smap.LongTermState(jnp.zeros_like(p.value), tag="moment") for k, p in self.params().items()}
        self.ema = smap.LongTermState(jnp.zeros((D_IN, D_OUT)), tag="moment")
        self.count = smap.LongTermState(jnp.zeros((), jnp.int32))

    def params(self) -> dict:
        return {"w": self.w, "b": self.b}

    def __call__(self, x, y):
        params = self.params()
        noise = smap.random.normal(size=(D_OUT,)) / 100  # a per-lane draw in the loss

        def loss():
            return jnp.sum((jnp.tanh(x @ self.w.value + self.b.value) + noise - y) ** 2)

        grads, value = smap.grad(loss, grad_states=params, return_value=True)()
        grads = jax.lax.pmean(grads, "batch")
        count = self.count.value + 1
        for k, p in params.items():
            mu = B1 * self.mu[k].value + (1 - B1) * grads[k]
            nu = B2 * self.nu[k].value + (1 - B2) * grads[k] ** 2
            p.value = p.value - LR * mu / (1 - B1**count) / (jnp.sqrt(nu / (1 - B2**count)) + 1e-8)
            self.mu[k].value, self.nu[k].value = mu, nu
        self.ema.value = DECAY * self.ema.value + (1 - DECAY) * self.w.value
        self.count.value = count
        return value


def reference(n_calls: int, x, y) -> tuple[list, dict]:
    """The same training by hand: jax.vmap of the per-example gradient, explicit state passing."""
    model = Trainer()
    p = {k: s.value for k, s in model.params().items()}
    mu = {k: jnp.zeros_like(v) for k, v in p.items()}
    nu = {k: jnp.zeros_like(v) for k, v in p.items()}
    ema, count, key = jnp.zeros((D_IN, D_OUT)), 0, smap.random.RandomState(7).value
    losses = []
    for _ in range(n_calls):
        # lane i draws from split(key, lanes)[i]; the key after the call is split(key, lanes + 1)[lanes]
        lane_keys, key = jax.random.split(key, LANES), jax.random.split(key, LANES + 1)[LANES]
        noise = jnp.stack([smap.random.RandomState(k).normal(size=(D_OUT,)) / 100 for k in lane_keys])

        def example(p, x, y, noise):
            return jnp.sum((jnp.tanh(x @ p["w"] + p["b"]) + noise - y) ** 2)

        values, grads = jax.vmap(jax.value_and_grad(example), in_axes=(None, 0, 0, 0))(p, x, y, noise)
        grads = jax.tree_util.tree_map(lambda g: g.mean(0), grads)
        count += 1
        for k in p:
            mu[k] = B1 * mu[k] + (1 - B1) * grads[k]
            nu[k] = B2 * nu[k] + (1 - B2) * grads[k] ** 2
            p[k] = p[k] - LR * mu[k] / (1 - B1**count) / (jnp.sqrt(nu[k] / (1 - B2**count)) + 1e-8)
        ema = DECAY * ema + (1 - DECAY) * p["w"]
        losses.append(values)
    return losses, {"w": p["w"], "b": p["b"], "mu": mu, "nu": nu, "ema": ema, "count": count}


def _explicit_mesh(n: int):
    return jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])


MAPPINGS = {
    "jax.vmap": lambda: (jax.vmap, {}),
    "jax.pmap": lambda: (jax.pmap, {}),
    "sharding.pmap(4)": lambda: (sharding.pmap(jax.devices()[:4]), {}),
    "sharding.shard_map(8)": lambda: (sharding.shard_map(sharding.make_mesh(data=8), axis="data"), {}),
    "sharding.shard_map(4x2)": lambda: (sharding.shard_map(sharding.make_mesh(data=4, model=2), axis="data"), {}),
    "jax.shard_map, Explicit(8)": lambda: (jax.shard_map, {"mesh": _explicit_mesh(8)}),
    "jax.smap, Explicit(4)": lambda: (jax.smap, {"mesh": _explicit_mesh(4), "axis_name": "data"}),
    "sharding.shard_map(Explicit 8)": lambda: (sharding.shard_map(_explicit_mesh(8), axis="data"), {}),
}


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(LANES, D_IN)).astype(np.float32), rng.normal(size=(LANES, D_OUT)).astype(np.float32)


@pytest.mark.parametrize("name", list(MAPPINGS))
def test_a_training_step_gives_the_hand_written_values_under_every_mapping_fn(name, close):
    mapping_fn, kwargs = MAPPINGS[name]()
    x, y = _data()
    smap.random.seed(7)
    model = Trainer()
    step = smap.StatefulMapping(model, axis_name="batch", mapping_fn=mapping_fn, mapping_kwargs=kwargs)
    if name.startswith("sharding.shard_map"):  # FSDP: weights and moments split over the lanes' axis
        sharding.place(model, step, rules={smap.ParamState: P("data"), "moment": P("data")})
    losses = [step(x, y) for _ in range(2)]
    want_losses, want = reference(2, x, y)
    close([np.asarray(v) for v in losses], [np.asarray(v) for v in want_losses], rtol=1e-5, atol=1e-6)
    got = {
        "w": model.w.value,
        "b": model.b.value,
        "mu": {k: s.value for k, s in model.mu.items()},
        "nu": {k: s.value for k, s in model.nu.items()},
        "ema": model.ema.value,
        "count": model.count.value,
    }
    close(jax.device_get(got), jax.device_get(want), rtol=1e-5, atol=1e-6)
    if name.startswith("sharding.shard_map"):  # every state is back where it was placed
        for state in (model.mu["w"], model.w, model.ema):
            assert state.value.sharding.is_equivalent_to(NamedSharding(step_mesh(step), P("data")), 2)


def step_mesh(step):
    return step.mapping_fn.mesh


# -- the compiled program gathers what the hand-written one gathers ------------------


def _all_gathers(hlo: str) -> list[str]:
    return [re.sub(r"\{[^{}]*\}", "", s) for s in re.findall(r"= (\S+) all-gather(?:-start)?\(", hlo)]


def _hand_written(mesh, explicit: bool):
    """FSDP by hand: each weight gathered where the loss reads it; gradients, moments and update stay split."""

    def gather(w):
        return (
            jax.sharding.reshard(w, P()) if explicit else jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
        )

    def step(p, mu, nu, ema, count, x, y):
        def loss(p):
            return jnp.mean(jnp.sum((jnp.tanh(x @ gather(p["w"]) + gather(p["b"])) - y) ** 2, -1))

        grads = jax.grad(loss)(p)
        count = count + 1
        mu = {k: B1 * mu[k] + (1 - B1) * g for k, g in grads.items()}
        nu = {k: B2 * nu[k] + (1 - B2) * g**2 for k, g in grads.items()}
        p = {k: p[k] - LR * mu[k] / (1 - B1**count) / (jnp.sqrt(nu[k] / (1 - B2**count)) + 1e-8) for k in p}
        return p, mu, nu, DECAY * ema + (1 - DECAY) * p["w"], count

    return jax.jit(step)


@pytest.mark.parametrize("explicit", [False, True], ids=["Auto", "Explicit"])
def test_fsdp_gathers_the_weights_the_lanes_read_and_no_optimizer_state(explicit):
    mesh = _explicit_mesh(8) if explicit else sharding.make_mesh(data=8)
    x, y = _data()
    x, y = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))

    model = Trainer()
    step = smap.StatefulMapping(model, axis_name="batch", mapping_fn=sharding.shard_map(mesh, axis="data"))
    sharding.place(model, step, rules={smap.ParamState: P("data"), "moment": P("data")})
    step(x, y)
    smap_hlo = step.lower(x, y).compile().as_text()

    split = functools.partial(jax.device_put, device=NamedSharding(mesh, P("data")))
    p = {k: split(s.value) for k, s in model.params().items()}
    mu = {k: split(s.value) for k, s in model.mu.items()}
    nu = {k: split(s.value) for k, s in model.nu.items()}
    args = (p, mu, nu, split(model.ema.value), jnp.zeros((), jnp.int32), x, y)
    with jax.set_mesh(mesh):
        plain_hlo = _hand_written(mesh, explicit).lower(*args).compile().as_text()

    weights = {f"f32[{D_IN},{D_OUT}]", f"f32[{D_OUT}]"}
    assert sorted(_all_gathers(plain_hlo)) == sorted(weights)  # the hand-written step gathers each weight once
    assert sorted(_all_gathers(smap_hlo)) == sorted(_all_gathers(plain_hlo))  # no moment, no EMA gathered
