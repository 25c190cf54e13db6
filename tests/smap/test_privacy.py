"""DP-SGD written per example: clip_factor, padded lanes, bad input, against the materialised step.

The reference is the step as JAX libraries write it (jax_privacy, optax's
microbatching): ``jax.vmap(jax.grad(loss))`` materialises every example's
gradient, then norms, clip factors ``min(1, C / norm)``, the weighted sum and
the noise, with the parameters and keys passed explicitly — on the real
examples only, where smap's step runs a padded batch with a 0/1 mask.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sharding
import smap
from smap.privacy import clip_factor

CLIP, SIGMA, LR, EXPECTED_BATCH = 1.0, 0.7, 0.5, 6.0


# -- clip_factor -------------------------------------------------------------------


def test_clip_factor_scales_a_norm_above_the_bound_down_to_it():
    norms = jnp.array([0.0, 0.5, 2.0, 2.5, 10.0])
    np.testing.assert_allclose(np.asarray(clip_factor(norms, 2.0)), [1.0, 1.0, 1.0, 0.8, 0.2], rtol=1e-7)
    assert clip_factor(norms, 2).dtype == jnp.float32
    assert clip_factor(jnp.array(3, jnp.int32), 1.5).dtype == jnp.result_type(float)
    assert clip_factor(jnp.array(4.0, jnp.bfloat16), 1.0).dtype == jnp.bfloat16
    # an array of bounds (one per layer, say) broadcasts against the norms
    np.testing.assert_allclose(np.asarray(clip_factor(jnp.array([4.0, 4.0]), np.array([1.0, 8.0]))), [0.25, 1.0])


@pytest.mark.parametrize(
    "bad, shown",
    [
        (0.0, "0.0"),
        (-1.0, "-1.0"),
        (0, "0"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (np.float32(-np.inf), "-inf"),
        (jnp.array(-2.0), "-2.0"),
        (np.array([1.0, 0.0, 3.0]), r"0.0 at index \(1,\)"),
        ("1.0", "'1.0'"),
        (True, "True"),
        (None, "None"),
    ],
)
def test_a_clip_norm_that_is_not_positive_and_finite_is_a_value_error_naming_it(bad, shown):
    with pytest.raises(ValueError, match=rf"clip_factor: clip_norm must be a positive, finite number, got {shown}\."):
        clip_factor(jnp.array(1.0), bad)


def test_a_traced_clip_norm_is_not_checked():
    # under jax.jit the bound is a tracer: nothing to check at trace time, the formula applies
    assert float(jax.jit(clip_factor)(jnp.array(4.0), jnp.array(2.0))) == 0.5
    assert float(jax.jit(clip_factor)(jnp.array(4.0), jnp.array(-2.0))) == -2.0 / max(4.0, -2.0)


def test_nan_and_infinite_norms_are_not_special_cased():
    factors = np.asarray(clip_factor(jnp.array([jnp.nan, jnp.inf, 1.0]), 0.5))
    assert math.isnan(factors[0]) and factors[1] == 0.0 and factors[2] == 0.5


# -- the DP-SGD step -----------------------------------------------------------------


def init_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0, 0.8, (5, 7)).astype(np.float32),
        "b1": rng.normal(0, 0.1, 7).astype(np.float32),
        "w2": rng.normal(0, 0.8, (7, 3)).astype(np.float32),
        "b2": np.zeros(3, np.float32),
    }


def loss(p, x, y):
    """One example's loss: x (5,), y an int label."""
    logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def data(n, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 2.0, (n, 5)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


class DPStep:
    """smap's DP-SGD step, written per example, with its states."""

    def __init__(self, clip_norm=CLIP, **mapping):
        self.params = {k: smap.ParamState(v) for k, v in init_params().items()}
        self.noise = smap.random.SharedRandomState(3)
        self.seen = smap.LongTermState(jnp.zeros(()))  # examples used so far
        self.norm_sum = smap.LongTermState(jnp.zeros(()))  # sum of their gradient norms
        self.traces = 0

        def dp_example(x, y, mask):
            self.traces += 1
            grads = smap.grad(lambda: loss({k: s.value for k, s in self.params.items()}, x, y), self.params)()
            norm = optax.tree.norm(grads)
            factor = mask * clip_factor(norm, clip_norm)
            clipped = jax.lax.psum(jax.tree.map(lambda g: factor * g, grads), "batch")
            self.seen.value = self.seen.value + jax.lax.psum(mask, "batch")
            self.norm_sum.value = self.norm_sum.value + jax.lax.psum(mask * norm, "batch")
            for k, p in self.params.items():
                noise = self.noise.normal(0.0, SIGMA * clip_norm, p.value.shape)
                p.value = p.value - LR * (clipped[k] + noise) / EXPECTED_BATCH
            return norm, clipped

        self.step = smap.StatefulMapping(dp_example, axis_name="batch", out_axes=(0, None), **mapping)

    def values(self):
        return {
            "params": {k: s.value for k, s in self.params.items()},
            "key": self.noise.value,
            "seen": self.seen.value,
            "norm_sum": self.norm_sum.value,
        }


@jax.jit
def materialised(state, x, y):
    """The step with every example's gradient materialised, states passed explicitly; x, y the real examples."""
    p, key = state["params"], state["key"]
    grads = jax.vmap(jax.grad(loss), (None, 0, 0))(p, x, y)
    norms = jnp.sqrt(sum(jnp.sum(g.reshape(len(x), -1) ** 2, axis=1) for g in jax.tree.leaves(grads)))
    factors = jnp.minimum(1.0, CLIP / norms)
    clipped = jax.tree.map(lambda g: jnp.tensordot(factors, g, 1), grads)
    new = {}
    for k in init_params():  # the draws in the order the step makes them (jit sorts a dict's keys)
        key, sub = jax.random.split(key)
        new[k] = p[k] - LR * (clipped[k] + SIGMA * CLIP * jax.random.normal(sub, p[k].shape)) / EXPECTED_BATCH
    state = {"params": new, "key": key, "seen": state["seen"] + len(x), "norm_sum": state["norm_sum"] + norms.sum()}
    return norms, clipped, state


def padded(x, y, size, seed=2):
    """The batch padded to ``size`` lanes with junk examples, and the mask of the real ones."""
    rng = np.random.default_rng(seed)
    n = len(x)
    junk_x = rng.normal(0, 50.0, (size - n, 5)).astype(np.float32)
    junk_y = rng.integers(0, 3, size - n).astype(np.int32)
    mask = np.concatenate([np.ones(n), np.zeros(size - n)]).astype(np.float32)
    return np.concatenate([x, junk_x]), np.concatenate([y, junk_y]), mask


MAPPINGS = {
    "vmap": lambda: {},
    "8 devices": lambda: {"mapping_fn": sharding.shard_map(sharding.make_mesh(data=8), axis="data")},
}


@pytest.mark.parametrize("lanes_per_device", [1, 2, 4])
@pytest.mark.parametrize("mapping", list(MAPPINGS))
def test_padded_lanes_contribute_nothing_to_norms_sums_or_states(mapping, lanes_per_device, close):
    size = 8 * lanes_per_device
    dp = DPStep(**MAPPINGS[mapping]())
    state = dp.values()
    for step, n in enumerate([size - 3, size - 1, size // 2]):  # batches of varying size, one program
        x, y = data(n, seed=step)
        norms, clipped, state = materialised(state, x, y)
        got_norms, got_clipped = dp.step(*padded(x, y, size, seed=step))
        close(got_norms[:n], norms, rtol=1e-5)
        close(got_clipped, clipped, rtol=1e-5, atol=1e-6)
        close(dp.values(), state, rtol=1e-5, atol=1e-6)
        assert float(dp.seen.value) == float(state["seen"])
    assert dp.traces == 1  # the batch's size changed, the program did not
    assert (np.asarray(got_norms[n:]) > 0.1).all()  # the junk has gradients: had it counted, the sums would differ


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nan_or_inf_in_one_example_propagates_as_in_the_materialised_step(bad):
    dp = DPStep()
    x, y = data(6)
    x[2, 1] = bad
    norms, clipped, state = materialised(dp.values(), x, y)
    got_norms, got_clipped = dp.step(x, y, np.ones(6, np.float32))
    for got, want in [(got_norms, norms), (got_clipped, clipped), (dp.values(), state)]:
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert not np.isfinite(np.asarray(got_norms[2])) and np.isfinite(np.delete(np.asarray(got_norms), 2)).all()
    assert any(np.isnan(np.asarray(g)).any() for g in jax.tree.leaves(got_clipped))  # the bad example shows


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_bad_clip_norm_in_the_step_is_a_value_error_and_no_state_changes(bad):
    dp = DPStep(clip_norm=bad)
    before = jax.tree.map(np.asarray, dp.values())
    x, y = data(4)
    with pytest.raises(ValueError, match="clip_norm must be a positive, finite number"):
        dp.step(x, y, np.ones(4, np.float32))
    for a, b in zip(jax.tree.leaves(dp.values()), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)
