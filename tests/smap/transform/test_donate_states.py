"""donate_states: the written states' old buffers go to the compiled program.

Against plain ``jax.vmap`` with explicit state passing and against the same
mapping without donation; the old arrays are deleted, read-only states are
not; a call that fails before the program runs leaves every state (and every
array read from one) as it was, under ``jax.vmap`` and on 8 devices.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from mapping_helpers import assert_unchanged, rand, snapshot

import sharding
import smap

LANES, D = 8, 16


def _mesh():
    return sharding.make_mesh(data=8)


MAPPINGS = {
    "jax.vmap": lambda: (jax.vmap, {}),
    "jax.pmap": lambda: (jax.pmap, {}),
    "sharding.shard_map(8), FSDP": lambda: (sharding.shard_map(_mesh(), axis="data"), {}),
    "jax.shard_map, Explicit(8)": lambda: (jax.shard_map, {"mesh": jax.make_mesh((8,), ("data",))}),
}


class Model(smap.nn.Module):
    """A momentum step: weights and moment written, a count written, a scale only read."""

    def __init__(self):
        self.w = smap.ParamState(rand(D, seed=1))
        self.mu = smap.LongTermState(jnp.zeros(D))
        self.count = smap.LongTermState(jnp.zeros((), jnp.int32))
        self.scale = smap.State(jnp.float32(0.5))

    def __call__(self, x):
        if x.shape != (D,):
            raise ValueError(f"expected a lane of shape ({D},), got {x.shape}")
        g = jax.lax.pmean(x * self.w.value * self.scale.value, "batch")
        self.mu.value = 0.9 * self.mu.value + g
        self.w.value = self.w.value - 0.1 * self.mu.value
        self.count.value = self.count.value + 1
        return jnp.sum(x * self.w.value)

    def written(self):
        return [self.w, self.mu, self.count]


def reference(xs):
    """The same steps by hand: jax.vmap of the lane, the states passed explicitly."""
    w, mu, count, scale = rand(D, seed=1), jnp.zeros(D), 0, 0.5
    outs = []
    for x in xs:
        g = jnp.mean(jax.vmap(lambda xi, w=w: xi * w * scale)(x), axis=0)
        mu = 0.9 * mu + g
        w = w - 0.1 * mu
        count += 1
        outs.append(jax.vmap(lambda xi, w=w: jnp.sum(xi * w))(x))
    return outs, {"w": w, "mu": mu, "count": count}


def build(name, donate):
    mapping_fn, kwargs = MAPPINGS[name]()
    model = Model()
    step = smap.StatefulMapping(
        model, axis_name="batch", mapping_fn=mapping_fn, mapping_kwargs=kwargs, donate_states=donate
    )
    if name.endswith("FSDP"):  # weights and moment split over the lanes' axis
        sharding.place(model, step, rules={smap.ParamState: P("data"), smap.LongTermState: P()})
        sharding.place([model.mu], step, rules={smap.LongTermState: P("data")})
    return model, step


def values(model):
    return jax.device_get({"w": model.w.value, "mu": model.mu.value, "count": model.count.value})


@pytest.mark.parametrize("name", list(MAPPINGS))
def test_donating_gives_the_values_of_the_hand_written_steps_and_of_the_step_that_does_not(name, close):
    xs = [rand(LANES, D, seed=s) for s in range(3)]
    (model, step), (kept_model, kept_step) = build(name, True), build(name, False)
    outs, kept_outs = [], []
    for x in xs:
        old = [s.value for s in model.written()]
        kept_old = [s.value for s in kept_model.written()]
        scale = model.scale.value
        outs.append(step(x))
        kept_outs.append(kept_step(x))
        assert all(a.is_deleted() for a in old)  # donated, as with donate_argnums
        assert not any(a.is_deleted() for a in kept_old) and not scale.is_deleted()  # read only: kept
    want_outs, want = reference(xs)
    close(jax.device_get(outs), jax.device_get(kept_outs), rtol=1e-6, atol=1e-7)
    close(values(model), values(kept_model), rtol=1e-6, atol=1e-7)
    close(jax.device_get(outs), jax.device_get(want_outs), rtol=1e-5, atol=1e-6)
    close(values(model), jax.device_get(want), rtol=1e-5, atol=1e-6)
    if name.endswith("FSDP"):  # the new values live where the old ones did
        assert model.w.value.sharding.is_equivalent_to(NamedSharding(_mesh(), P("data")), 1)
        assert model.mu.value.sharding.is_equivalent_to(NamedSharding(_mesh(), P("data")), 1)


@pytest.mark.parametrize("name", ["jax.vmap", "sharding.shard_map(8), FSDP"])
def test_a_call_that_fails_before_the_program_runs_leaves_every_state_and_array_as_it_was(name, close):
    model, step = build(name, True)
    x = rand(LANES, D, seed=0)
    step(x)  # compiled and cached: the failures below happen on a warm mapping
    states = [*model.written(), model.scale]
    before = snapshot(*states)
    held = [s.value for s in states]
    failures = {
        "a lane of the wrong shape (the function raises while tracing)": (rand(LANES, D + 1), ValueError),
        "a string": ("not an array", TypeError),
    }
    if name.endswith("FSDP"):
        failures["9 lanes on 8 devices"] = (rand(LANES + 1, D), ValueError)
    for what, (bad, error) in failures.items():
        with pytest.raises(error):
            step(bad)
        assert_unchanged(states, before)
        assert not any(a.is_deleted() for a in held), what
    step(x)  # and the mapping still works, from the old values
    _, want = reference([x, x])
    close(values(model), jax.device_get(want), rtol=1e-5, atol=1e-6)


def test_jit_donates_the_written_states_and_a_state_passed_as_an_argument_too_is_refused_unchanged(close):
    w, total = smap.ParamState(jnp.arange(4.0)), smap.State(jnp.zeros(()))

    @smap.jit(donate_states=True)
    def step(x):
        total.value = total.value + jnp.sum(w.value * x)
        w.value = w.value * 2
        return total.value

    old_w, old_total = w.value, total.value
    assert float(step(jnp.ones(4))) == 6.0
    assert old_w.is_deleted() and old_total.is_deleted()
    close(w.value, np.arange(4.0) * 2)
    before, held = snapshot(w, total), [w.value, total.value]
    with pytest.raises(Exception, match="donat"):  # JAX refuses to donate a buffer that is also an argument
        step(w.value)
    assert_unchanged([w, total], before)
    assert not any(a.is_deleted() for a in held)
    assert float(step(jnp.ones(4))) == 6.0 + 12.0


def test_a_state_that_this_call_does_not_write_keeps_its_value_though_the_list_donates_it(close):
    w, m = smap.ParamState(jnp.ones(3)), smap.State(jnp.full(3, 5.0))

    @smap.jit(donate_states=True, static_argnames="both")
    def step(x, both):
        w.value = w.value + x
        if both:
            m.value = m.value + x

    step(jnp.ones(3), both=True)  # the list now writes w and m
    step(jnp.ones(3), both=False)  # a program that writes only w
    close(jax.device_get((w.value, m.value)), (np.full(3, 3.0), np.full(3, 6.0)))
    step(jnp.ones(3), both=True)
    close(jax.device_get((w.value, m.value)), (np.full(3, 4.0), np.full(3, 7.0)))


def test_donate_states_takes_a_bool():
    with pytest.raises(TypeError, match="donate_states must be True or False"):
        smap.jit(lambda: None, donate_states="yes")
    with pytest.raises(TypeError, match="donate_states must be True or False"):
        smap.vmap(lambda x: x, donate_states=1)


def test_each_written_state_gets_its_new_value_in_its_own_old_buffer():
    """States of one shape, written in another order than read: each reuses its own buffer
    (XLA updates it in place), not another state's, which would make XLA copy it first."""
    a, b, c = (smap.State(jnp.full(D, float(k))) for k in range(3))

    @smap.vmap(axis_name="batch", donate_states=True)
    def step(x):
        total = a.value + b.value + c.value
        c.value = c.value + jax.lax.pmean(x, "batch")
        b.value = b.value * 2
        a.value = total
        return x

    x = rand(LANES, D)
    step(x)  # traced; the next call runs the cached program
    pointers = [s.value.unsafe_buffer_pointer() for s in (a, b, c)]
    step(x)
    assert [s.value.unsafe_buffer_pointer() for s in (a, b, c)] == pointers
