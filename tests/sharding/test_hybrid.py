"""Hybrid data and model parallelism: lanes over 'data', states split over 'model' during the call.

``sharding.shard_map(mesh, axis='data')`` on a data x model mesh is manual over
'data' only; 'model' is left to XLA. The tests check, on 4x2 and 2x4 meshes:

- outputs, every state and the random key equal ``jax.vmap``'s, with rules
  that split shared states (a Megatron MLP: W1 over its output axis, W2 over
  its input axis) and a batched state over 'model';
- the states keep their placement, and each device holds 1/model-size of each
  weight;
- the compiled step (XLA's optimised HLO) has no all-gather whose result is a
  whole weight;
- ``describe`` says which states a call gathers; rules by tag and by path;
  clear errors for a collective over an axis the program does not bind and
  for a path written where a tag is read, with the states unchanged.
"""

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
from smap.filter import AtPath, OfType

B, D, H = 8, 4, 8  # lanes, model width, hidden width (divisible by 4 model devices)


@functools.cache
def mesh(data: int, model: int, kind: str = "Auto"):
    if kind == "Auto":
        return sharding.make_mesh(data=data, model=model)
    axis_type = getattr(jax.sharding.AxisType, kind)
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(axis_type, axis_type))


KINDS = ["Auto", "Explicit"]


def trimmed(spec: P) -> P:
    """``spec`` without trailing Nones (values typed on an Explicit mesh spell out every dimension)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


MESHES = {"4x2": (4, 2), "2x4": (2, 4)}


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) / 2, dtype=jnp.float32)


class MLP(smap.nn.Module):
    """Megatron-style MLP with a per-lane hidden trace and random noise per lane."""

    def __init__(self):
        self.w1 = smap.ParamState(rand(D, H, seed=1), tag="column")
        self.b1 = smap.ParamState(rand(H, seed=2))
        self.w2 = smap.ParamState(rand(H, D, seed=3), tag="row")
        self.trace = smap.HiddenState(jnp.zeros((B, H)))  # batched: one row per lane
        self.calls = smap.LongTermState(jnp.zeros(()))  # shared, written lane-independently

    def __call__(self, x):
        noise = 0.1 * smap.random.normal(size=H)
        a = jnp.tanh(x @ self.w1.value + self.b1.value + noise)
        self.trace.value = 0.5 * self.trace.value + a
        self.calls.value = self.calls.value + jax.lax.psum(1.0, "batch") / B
        y = a @ self.w2.value
        return jnp.sum((y - x) ** 2)


RULES = {
    "column": P(None, "model"),  # by tag: W1 over its output axis
    "row": P("model"),  # by tag: W2 over its input axis
    AtPath("b1"): P("model"),  # by path
    OfType(smap.HiddenState): P(None, "model"),  # a batched state's other axis
}
WEIGHTS = ("w1", "b1", "w2")
STATE_AXES = {0: OfType(smap.HiddenState)}


def grad_outside(mlp, mapping_fn, mapping_kwargs=None):
    """One SGD step: the gradient of the mean lane loss, taken outside the mapping."""
    losses = smap.StatefulMapping(
        mlp, state_in_axes=STATE_AXES, axis_name="batch", mapping_fn=mapping_fn, mapping_kwargs=mapping_kwargs
    )
    params = [getattr(mlp, n) for n in WEIGHTS]
    loss_grad = smap.grad(lambda x: losses(x).mean(), grad_states=params, return_value=True)

    @smap.jit
    def step(x):
        grads, loss = loss_grad(x)
        for p, g in zip(params, grads):
            p.value = p.value - 0.1 * g
        return loss

    return losses, step


def grad_per_lane(mlp, mapping_fn, mapping_kwargs=None):
    """One SGD step: per-lane gradients averaged with pmean over the lanes, inside the mapping."""
    params = [getattr(mlp, n) for n in WEIGHTS]
    lane_grad = smap.grad(mlp, grad_states=params, return_value=True)

    def lane_step(x):
        grads, loss = lane_grad(x)
        for p, g in zip(params, grads):
            p.value = p.value - 0.1 * jax.lax.pmean(g, "batch")
        return loss

    step = smap.StatefulMapping(
        lane_step, state_in_axes=STATE_AXES, axis_name="batch", mapping_fn=mapping_fn, mapping_kwargs=mapping_kwargs
    )
    return step, step


PROGRAMS = {"grad-outside": grad_outside, "grad-per-lane": grad_per_lane}
SPELLINGS = {
    "sharding.shard_map": lambda m: (sharding.shard_map(m, axis="data"), None),
    "jax.shard_map": lambda m: (jax.shard_map, {"mesh": m, "axis_names": {"data"}}),
}


def run(program, mapping_fn, mapping_kwargs=None, place_on=None, calls=2):
    """After each call: the output, every state and the random key."""
    smap.random.seed(0)
    mlp = MLP()
    mapping, step = program(mlp, mapping_fn, mapping_kwargs)
    if place_on is not None:
        sharding.place(mlp, mapping, rules=RULES)
    trace = []
    for i in range(calls):
        out = step(rand(B, D, seed=10 + i))
        states = {k: np.asarray(s.value) for k, s in mlp.states().items()}
        trace.append((np.asarray(out), states, np.asarray(smap.random.DEFAULT.value)))
    return trace, mlp, mapping, step


@functools.cache
def reference(name):
    return run(PROGRAMS[name], jax.vmap)[0]


def assert_same(actual, expected):
    for (out, states, key), (out_ref, states_ref, key_ref) in zip(actual, expected):
        np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
        assert states.keys() == states_ref.keys()
        for name in states:
            np.testing.assert_allclose(states[name], states_ref[name], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(key, key_ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spelling", list(SPELLINGS))
@pytest.mark.parametrize("layout", list(MESHES))
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_vmap_values_and_states_stay_split_over_model(program, layout, spelling, kind):
    data, model = MESHES[layout]
    m = mesh(data, model, kind)
    trace, mlp, mapping, _ = run(PROGRAMS[program], *SPELLINGS[spelling](m), place_on=m)
    assert_same(trace, reference(program))
    # the draws differ between lanes (the noise is per lane, not one draw broadcast)
    ref_first = reference(program)[0]
    assert len(set(np.round(ref_first[1]["trace"][:, 0], 5).tolist())) == B
    expected = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model"), "trace": P("data", "model"), "calls": P()}
    for name, spec in expected.items():
        value = getattr(mlp, name).value
        assert trimmed(value.sharding.spec) == spec, (name, value.sharding.spec)
        assert value.sharding.mesh == m
        assert sharding.spec_for(mapping, getattr(mlp, name), RULES) == spec
    for name in WEIGHTS:
        value = getattr(mlp, name).value
        assert {s.data.nbytes for s in value.addressable_shards} == {value.nbytes // model}, name
    assert {s.data.shape for s in mlp.trace.value.addressable_shards} == {(B // data, H // model)}


def whole_weight_gathers(hlo: str, shapes) -> list[str]:
    """The all-gathers in the HLO text whose result has the shape of a whole weight."""
    wanted = {",".join(map(str, s)) for s in shapes}
    found = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(?:\(\s*)?\w+\[([\d,]*)\][^=]*?\sall-gather(?:-start)?\(", line)
        if m and m.group(1) in wanted:
            found.append(line.strip()[:160])
    return found


def compiled_hlo(fn, *args) -> str:
    return fn.lower(*args).compile().as_text()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_no_all_gather_of_a_whole_weight(program, kind):
    m = mesh(4, 2, kind)
    _, mlp, _, step = run(PROGRAMS[program], sharding.shard_map(m, axis="data"), place_on=m, calls=1)
    x = jax.device_put(rand(B, D, seed=10), NamedSharding(m, P("data")))
    hlo = compiled_hlo(step, x)
    shapes = [getattr(mlp, n).value.shape for n in WEIGHTS]
    assert whole_weight_gathers(hlo, shapes) == []
    assert "all-reduce" in hlo  # the gradient is reduced over the lanes: the text is the step's


def test_the_hlo_check_sees_a_gather_when_a_shared_weight_is_split_over_the_lane_axis():
    """The check above can fail: a weight split over 'data' (the lane axis) is gathered whole."""
    m = mesh(4, 2)
    smap.random.seed(0)
    mlp = MLP()
    _, step = grad_outside(mlp, sharding.shard_map(m, axis="data"))
    for name in WEIGHTS:
        state = getattr(mlp, name)
        state.value = jax.device_put(state.value, NamedSharding(m, P("data")))
    x = jax.device_put(rand(B, D, seed=10), NamedSharding(m, P("data")))
    step(x)
    assert whole_weight_gathers(compiled_hlo(step, x), [mlp.w1.value.shape, mlp.w2.value.shape])


def test_describe_says_what_a_call_gathers():
    m = mesh(4, 2)
    smap.random.seed(0)
    mlp = MLP()
    losses, _ = grad_outside(mlp, sharding.shard_map(m, axis="data"))
    table = sharding.describe(mlp, losses)
    assert {r.path: r.gathered for r in table} == dict.fromkeys(mlp.states(), "not on mesh")
    sharding.place(mlp, losses, rules=RULES)
    mlp.b1.value = jax.device_put(mlp.b1.value, NamedSharding(m, P(("data", "model"))))
    mlp.trace.value = jax.device_put(mlp.trace.value, NamedSharding(m, P("data", "model")))
    table = sharding.describe(mlp, losses)
    rows = {r.path: r for r in table}
    assert {k: r.gathered for k, r in rows.items()} == {
        "w1": "no",
        "b1": "over data",
        "w2": "no",
        "trace": "no",
        "calls": "no",
    }
    assert rows["w1"].bytes_per_device == D * H * 4 // 2
    assert rows["b1"].bytes_per_device == H * 4 // 8
    assert rows["trace"].bytes_per_device == B * H * 4 // 8
    text = str(table)
    assert text.splitlines()[0].split() == ["path", "type", "shape", "dtype", "spec", "bytes/device", "gathered"]
    assert "over data" in text
    assert "gathered" not in str(sharding.describe(mlp))  # without a mapping, no such column
    # a batched state split over the lane axis at another dimension is gathered too
    mlp.trace.value = jax.device_put(mlp.trace.value, NamedSharding(m, P(None, "data")))
    assert {r.path: r.gathered for r in sharding.describe(mlp, losses)}["trace"] == "over data"


def test_rules_by_tag_and_by_path_lay_out_two_states_of_one_type_differently():
    m = mesh(4, 2)
    mlp = MLP()
    losses, _ = grad_outside(mlp, sharding.shard_map(m, axis="data"))
    by_path = {AtPath("w1"): P(None, "model"), AtPath("w*"): P("model")}  # the first rule that selects wins
    assert sharding.spec_for(losses, mlp.w1, by_path) == P(None, "model")
    assert sharding.spec_for(losses, mlp.w2, by_path) == P("model")
    assert sharding.spec_for(losses, mlp.b1, by_path) == P()
    assert sharding.spec_for(losses, mlp.w1, RULES) == P(None, "model")
    assert sharding.spec_for(losses, mlp.w2, RULES) == P("model")


def test_a_path_written_where_a_tag_is_read_is_an_error_and_nothing_moves():
    m = mesh(4, 2)
    mlp = MLP()
    losses, _ = grad_outside(mlp, sharding.shard_map(m, axis="data"))
    before = {k: s.value for k, s in mlp.states().items()}
    with pytest.raises(ValueError, match=r"a string in rules is a tag.*AtPath\('b1'\)"):
        sharding.place(mlp, losses, rules={"column": P(None, "model"), "b1": P("model")})
    for k, s in mlp.states().items():
        assert s.value is before[k], k
    # A string that is no State's tag (nor a path) selects nothing anywhere: an error too.
    with pytest.raises(ValueError, match=r"'nothing-has-this-tag', which selects the States tagged .*no State has"):
        sharding.place(mlp, losses, rules={"column": P(None, "model"), "nothing-has-this-tag": P("model")})
    for k, s in mlp.states().items():
        assert s.value is before[k], k


def test_a_collective_over_the_model_axis_needs_a_shard_map_that_makes_it_manual():
    m = mesh(4, 2)
    w = smap.ParamState(jnp.arange(float(H)))
    sharding.place([w], mesh=m, rules={smap.ParamState: P("model")})
    before = w.value

    def bad(x):
        w.value = w.value + 1.0
        return jax.lax.psum(x * w.value, "model")

    mapped = smap.StatefulMapping(bad, axis_name="batch", mapping_fn=sharding.shard_map(m, axis="data"))
    with pytest.raises(NameError, match=r"over the axis 'model', which is not bound.*axis_names=\{'model'\}"):
        mapped(jnp.ones((B, H)))
    assert w.value is before

    def good(x):
        w.value = w.value + 1.0
        total = jax.shard_map(
            lambda a: jax.lax.psum(a.sum(), "model"), mesh=m, in_specs=P("model"), out_specs=P(), axis_names={"model"}
        )
        return total(x * w.value)

    x = rand(B, H, seed=4)
    got = smap.StatefulMapping(good, axis_name="batch", mapping_fn=sharding.shard_map(m, axis="data"))(x)
    w_sharded = w.value
    w.value = before
    want = smap.vmap(good, axis_name="batch")(x)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got, (np.asarray(x) * (np.arange(H) + 1.0)).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(w_sharded, w.value)
    assert w_sharded.sharding.spec == P("model")


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_draws_are_one_per_lane_on_every_device_of_its_model_group(kind):
    """Dropout under hybrid placement: the hidden layer is split over 'model', and each lane's mask
    (smap.random) is the one jax.vmap draws for that lane: the same on every device that holds a
    piece of the lane (its model group), different between lanes (data groups)."""
    m = mesh(4, 2, kind)

    def build():
        smap.random.seed(3)
        w = smap.ParamState(rand(D, H, seed=1), tag="column")

        def lane(x):
            keep = smap.random.bernoulli(0.5, (H,))
            return jnp.where(keep, jnp.tanh(x @ w.value) * 2.0, 0.0), keep

        return w, lane

    w, lane = build()
    x = rand(B, D, seed=4)
    want_out, want_keep = smap.StatefulMapping(lane, mapping_fn=jax.vmap)(x)
    w, lane = build()
    step = smap.StatefulMapping(lane, mapping_fn=sharding.shard_map(m, axis="data"))
    sharding.place([w], step, rules={"column": P(None, "model")})
    out, keep = step(jax.device_put(x, NamedSharding(m, P("data"))))
    np.testing.assert_allclose(out, want_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(keep, want_keep)
    assert len({tuple(row) for row in np.asarray(want_keep).tolist()}) == B  # lanes draw differently
    # Each device's piece of the masks (its data group's lanes; whole, or its part over 'model')
    # is that piece of the lanes' draws: the devices of a model group agree.
    assert len(keep.addressable_shards) == 8  # 4 data groups x 2 devices of 'model'
    for shard in keep.addressable_shards:
        assert shard.data.shape[0] == B // 4
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(want_keep)[shard.index])
    assert trimmed(w.value.sharding.spec) == P(None, "model")
