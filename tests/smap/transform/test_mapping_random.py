"""Tests of random states under ``StatefulMapping``, and of state types that give each lane its own value.

Every result is checked against an independent reference: the same
computation written with plain ``jax.vmap`` and explicit state passing, or
values worked out by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mapping_helpers import assert_unchanged, lanes_normal, snapshot

import smap
from smap.transform import vmap2


def lanes_reference(draw, lane_keys, *args):
    """Stack over lanes of `draw(RandomState(lane_key), *lane_args)`: what each lane should draw."""
    return jax.jit(jax.vmap(lambda k, *a: draw(smap.random.RandomState(k), *a)))(lane_keys, *args)


# -- random ----------------------------------------------------------------------


@pytest.mark.parametrize("seed, n", [(0, 1), (7, 3), (123, 8)])
def test_each_lane_draws_from_its_split_key(seed, n, close):
    smap.random.seed(seed)
    key_before = np.asarray(smap.random.DEFAULT.value)
    draws = vmap2(lambda x: smap.random.normal(size=(2,)) + x)(jnp.zeros((n, 2)))
    lane_keys = jax.random.split(key_before, n)
    assert draws.shape == (n, 2)
    close(draws, lanes_normal(lane_keys, 2))
    close(draws, lanes_reference(lambda rng: rng.normal(size=(2,)), lane_keys))
    close(draws[n - 1], smap.random.RandomState(lane_keys[n - 1]).normal(size=(2,)))
    # The key advanced exactly once for the call.
    np.testing.assert_array_equal(smap.random.DEFAULT.value, jax.random.split(key_before, n + 1)[n])


def test_each_lane_samples_its_own_action_from_its_logits():
    """A policy mapped over environments: lane i draws categorical(logits_i) from split(key, n)[i]."""
    smap.random.seed(5)
    key_before = np.asarray(smap.random.DEFAULT.value)
    logits = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
    actions = vmap2(lambda row: smap.random.categorical(row))(logits)
    lane_keys = jax.random.split(key_before, 6)
    expected = jax.vmap(lambda k, row: jax.random.categorical(jax.random.split(k)[1], row))(lane_keys, logits)
    np.testing.assert_array_equal(actions, expected)


def test_lanes_draw_several_times_from_their_own_stream(close):
    smap.random.seed(123)
    key_before = smap.random.DEFAULT.value

    def sample(mean):
        a = smap.random.uniform(0.0, 1.0)
        b = smap.random.normal(mean, 1.0)
        c = smap.random.randint(0, 100, size=3)
        return a + b, c

    def reference(rng, mean):
        a = rng.uniform(0.0, 1.0)
        b = rng.normal(mean, 1.0)
        return a + b, rng.randint(0, 100, size=3)

    means = jnp.array([0.0, 1.0, 2.0])
    out, ints = vmap2(sample)(means)
    ref_out, ref_ints = lanes_reference(reference, jax.random.split(key_before, 3), means)
    close(out, ref_out)
    np.testing.assert_array_equal(ints, ref_ints)
    np.testing.assert_array_equal(smap.random.DEFAULT.value, jax.random.split(key_before, 4)[3])


def test_successive_calls_draw_fresh_numbers(close):
    mapped = vmap2(lambda x: smap.random.normal() + x)
    key0 = smap.random.DEFAULT.value
    first = mapped(jnp.zeros(3))
    key1 = smap.random.DEFAULT.value
    second = mapped(jnp.zeros(3))
    close(first, lanes_normal(jax.random.split(key0, 3)))
    close(second, lanes_normal(jax.random.split(key1, 3)))
    assert not np.allclose(first, second)


def test_a_user_random_state_follows_the_same_rule(close):
    rng = smap.random.RandomState(42)
    untouched = smap.random.RandomState(5)
    key_before = rng.value
    default_before = smap.random.DEFAULT.value
    untouched_before = untouched.value
    out = vmap2(lambda x: rng.normal(size=2) * x)(jnp.ones((4, 1)))
    close(out, lanes_normal(jax.random.split(key_before, 4), 2))
    np.testing.assert_array_equal(rng.value, jax.random.split(key_before, 5)[4])
    np.testing.assert_array_equal(smap.random.DEFAULT.value, default_before)
    np.testing.assert_array_equal(untouched.value, untouched_before)


def test_a_random_state_not_drawn_from_is_unchanged(close):
    key_before = smap.random.DEFAULT.value
    out = vmap2(lambda x: x * 2)(jnp.arange(3.0))
    close(out, jnp.arange(3.0) * 2)
    np.testing.assert_array_equal(smap.random.DEFAULT.value, key_before)


def test_a_random_state_only_read_is_unchanged_and_lanes_see_their_keys(close):
    rng = smap.random.RandomState(3)
    key_before = rng.value
    out = vmap2(lambda x: jax.random.normal(rng.value) + x)(jnp.zeros(3))
    close(out, jnp.stack([jax.random.normal(k) for k in jax.random.split(key_before, 3)]))
    np.testing.assert_array_equal(rng.value, key_before)


def test_random_draws_with_batched_states_and_jit(close):
    state = smap.ShortTermState(jnp.zeros((3, 2)))

    def noisy(x):
        state.value = state.value + smap.random.normal(size=2) * x
        return state.value

    smap.random.seed(11)
    key_before = smap.random.DEFAULT.value
    out = smap.jit(vmap2(noisy, state_in_axes=state))(jnp.array([1.0, 2.0, 3.0]))
    expected = lanes_normal(jax.random.split(key_before, 3), 2) * jnp.array([1.0, 2.0, 3.0])[:, None]
    close(out, expected)
    close(state.value, expected)
    np.testing.assert_array_equal(smap.random.DEFAULT.value, jax.random.split(key_before, 4)[3])


def test_random_in_nested_mappings(close):
    smap.random.seed(3)
    k0 = smap.random.DEFAULT.value
    out = vmap2(vmap2(lambda x: smap.random.normal() + x))(jnp.zeros((2, 3)))
    expected = jnp.stack([lanes_normal(jax.random.split(ki, 3)) for ki in jax.random.split(k0, 2)])
    close(out, expected)
    np.testing.assert_array_equal(smap.random.DEFAULT.value, jax.random.split(k0, 3)[2])


@pytest.mark.parametrize("make_key", [jax.random.PRNGKey, jax.random.key], ids=["raw", "typed"])
def test_explicit_keys_follow_in_axes(make_key, close):
    key = make_key(0)
    scales = jnp.array([1.0, 2.0, 3.0, 4.0])

    def sample(key, scale):
        return jax.random.normal(key, ()) * scale

    shared = vmap2(sample, in_axes=(None, 0))(key, scales)
    close(shared, jax.vmap(sample, in_axes=(None, 0))(key, scales))
    close(shared, jax.random.normal(key, ()) * scales)  # the same base draw in every lane
    keys = jax.random.split(key, 4)
    unique = vmap2(sample, in_axes=(0, 0))(keys, scales)
    close(unique, jax.vmap(sample)(keys, scales))
    key_before = smap.random.DEFAULT.value
    assert len(set(np.asarray(unique / scales).round(5).tolist())) == 4
    np.testing.assert_array_equal(smap.random.DEFAULT.value, key_before)


# -- a state type that gives each lane its own value ---------------------------------


class Ticket(smap.State):
    """A user's state type: lane i gets ``n + i`` and a shared ``base``; the next call starts at ``n + lanes``."""

    def lane_values(self, value, axis_size):
        lanes = {"n": value["n"] + jnp.arange(axis_size), "base": jnp.broadcast_to(value["base"], (axis_size, 3))}
        return lanes, {"n": value["n"] + axis_size, "base": value["base"]}


def ticket(n=0):
    return Ticket({"n": jnp.asarray(n, jnp.int32), "base": jnp.arange(3.0)})


def test_a_user_state_type_gives_each_lane_its_value_and_advances(close):
    t = ticket(5)

    def serve(x):
        number = t.value["n"]
        t.value = {"n": number + 1, "base": t.value["base"]}
        return x * number + t.value["base"]

    x = jnp.array([1.0, 2.0, 3.0, 4.0])
    # by hand: lanes see n = 5, 6, 7, 8; the state then holds n = 5 + 4
    close(smap.vmap(serve)(x), x[:, None] * jnp.array([5.0, 6.0, 7.0, 8.0])[:, None] + jnp.arange(3.0))
    close(t.value, {"n": jnp.asarray(9, jnp.int32), "base": jnp.arange(3.0)})
    close(smap.jit(smap.vmap(serve))(x[:2]), x[:2, None] * jnp.array([9.0, 10.0])[:, None] + jnp.arange(3.0))
    close(t.value["n"], jnp.asarray(11, jnp.int32))


def test_a_user_state_type_read_only_or_written_lane_independently(close):
    t = ticket(2)
    read = smap.vmap(lambda x: x + t.value["n"])
    close(read(jnp.zeros(3)), jnp.array([2.0, 3.0, 4.0]))
    close(t.value["n"], jnp.asarray(2, jnp.int32))  # not written: unchanged

    def reset(x):
        t.value = {"n": jnp.asarray(40, jnp.int32), "base": jnp.ones(3)}
        return x

    smap.vmap(reset)(jnp.zeros(3))
    # a lane-independent write is written as it is
    close(t.value, {"n": jnp.asarray(40, jnp.int32), "base": jnp.ones(3)})


def test_a_user_state_type_keeps_its_value_when_the_call_fails():
    t = ticket(3)

    def bad(x):
        t.value = {"n": t.value["n"] + 1, "base": t.value["base"]}
        return x + jnp.ones(7)

    before = snapshot(t)
    with pytest.raises(TypeError):
        smap.vmap(bad)(jnp.zeros((4, 3)))
    assert_unchanged([t], before)


def test_a_user_state_type_with_a_malformed_lane_values_is_named():
    class NoLaneAxis(smap.State):
        def lane_values(self, value, axis_size):
            return value, value

    s = NoLaneAxis(jnp.zeros(2))
    with pytest.raises(TypeError, match=r"NoLaneAxis.lane_values must return .*stacked along a new axis 0"):
        smap.vmap(lambda x: x + s.value)(jnp.zeros((4, 2)))


def test_a_user_state_type_that_declines_is_left_to_state_in_axes(close):
    class Sometimes(smap.State):
        def lane_values(self, value, axis_size):
            return None if value.ndim == 2 else (jnp.broadcast_to(value, (axis_size, *value.shape)), value + 1)

    batched = Sometimes(jnp.arange(6.0).reshape(3, 2))
    f = smap.vmap(lambda x: x + batched.value, state_in_axes=Sometimes)
    close(f(jnp.ones((3, 2))), jnp.arange(6.0).reshape(3, 2) + 1)
