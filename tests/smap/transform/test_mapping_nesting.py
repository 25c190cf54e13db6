"""Tests of mappings inside mappings, against nested ``jax.vmap``.

Every result is checked against an independent reference: the same
computation written with plain ``jax.vmap`` and explicit state passing, or
values worked out by hand.
"""

import jax
import jax.numpy as jnp
from mapping_helpers import rand

import smap
from smap.transform import vmap2

# -- nesting ---------------------------------------------------------------------


def test_nested_vmap2_matches_nested_jax_vmap(close):
    def fn(x, y):
        return jnp.sin(x) * y + jnp.sum(y)

    xs, ys = rand(3, 4, 2), rand(4, 2, 3, seed=1)
    inner_axes, outer_axes = (0, 1), (1, 0)
    expected = jax.vmap(jax.vmap(fn, in_axes=inner_axes), in_axes=outer_axes)(xs, ys)
    out = vmap2(vmap2(fn, in_axes=inner_axes), in_axes=outer_axes)(xs, ys)
    close(out, expected)


def test_nested_vmap2_with_axis_names(close):
    def fn(x):
        return x * jax.lax.axis_index("inner") - jax.lax.pmean(x, "outer") + jax.lax.psum(x, ("inner", "outer"))

    xs = rand(2, 3, 4)
    expected = jax.vmap(jax.vmap(fn, axis_name="inner"), axis_name="outer")(xs)
    close(vmap2(vmap2(fn, axis_name="inner"), axis_name="outer")(xs), expected)


def test_nested_vmap2_with_a_state_batched_on_two_axes(close):
    state = smap.ShortTermState(rand(2, 3, 4))
    s0 = state.value
    xs = rand(2, 3, 4, seed=1)

    def step(x):
        state.value = state.value * 0.5 + x
        return state.value.sum()

    def pure(s, x):
        new = s * 0.5 + x
        return new.sum(), new

    ref_out, ref_state = jax.vmap(jax.vmap(pure))(s0, xs)
    inner = vmap2(step, state_in_axes=state, unexpected_out_state_mapping="raise")
    outer = vmap2(inner, state_in_axes=state, unexpected_out_state_mapping="raise")
    close(outer(xs), ref_out)
    close(state.value, ref_state)


def test_nested_vmap2_with_a_state_batched_on_axis_1_outside(close):
    # The outer mapping splits axis 1 of the state, the inner one axis 0 of what is left.
    state = smap.ShortTermState(rand(3, 2, 4))
    s0 = state.value
    xs = rand(2, 3, 4, seed=1)
    shared = smap.LongTermState(jnp.zeros(4))

    def step(x):
        state.value = jnp.tanh(state.value + x)
        shared.value = shared.value + jax.lax.psum(state.value, ("i", "j"))
        return state.value.mean()

    def pure(s, x):
        new = jnp.tanh(s + x)
        return new.mean(), new, jax.lax.psum(new, ("i", "j"))

    ref_out, ref_state, ref_total = jax.vmap(
        jax.vmap(pure, axis_name="j", out_axes=(0, 0, None)),
        in_axes=(1, 0),
        out_axes=(0, 1, None),
        axis_name="i",
    )(s0, xs)
    inner = vmap2(step, state_in_axes={0: state}, axis_name="j", unexpected_out_state_mapping="raise")
    outer = vmap2(inner, state_in_axes={1: state}, axis_name="i", unexpected_out_state_mapping="raise")
    close(outer(xs), ref_out)
    close(state.value, ref_state)
    close(shared.value, ref_total)
    assert shared.value.shape == (4,)


def test_nested_shared_state_written_per_lane_gets_both_axes(close):
    total = smap.LongTermState(jnp.zeros(2))

    def step(x):
        total.value = total.value + x
        return x

    xs = rand(3, 4)
    vmap2(vmap2(step, state_out_axes={1: total}), state_out_axes={0: total})(xs)
    # Inner lanes put their axis at 1 of the (2,) value, then outer lanes at 0.
    expected = jax.vmap(jax.vmap(lambda x: jnp.zeros(2) + x, out_axes=1), out_axes=0)(xs)
    assert total.value.shape == (3, 2, 4)
    close(total.value, expected)
