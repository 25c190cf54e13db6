"""Differential tests of the sharding layer: every mapping_fn gives jax.vmap's result.

Each program below is a factory: given a ``mapping`` (``StatefulMapping`` with
the mapping_fn under test bound in), it builds fresh States and returns them
with the calls to make. The harness runs the program with ``jax.vmap`` (the
reference, once per process) and with each sharded strategy, and checks that
the outputs, every State's value and the default random key after each of two
calls equal the reference to float round-off (a call that raises under
``jax.vmap`` must raise the same kind of error and leave the same states).

Each program is one test function, parametrised by strategy and layout:

- ``[vmap]``: the reference itself against values worked out by hand;
- ``sharding.shard_map`` on 1, 2, 4 and 8 devices and on a 4x2 mesh (lanes over
  ``'data'`` or over ``('data', 'model')``), ``sharding.pmap`` on 1, 2, 4 and 8
  devices, and plain ``jax.pmap``: the full program x layout product;
- the other spellings that StatefulMapping routes to those adapters
  (``partial(jax.pmap, devices=...)``, ``jax.shard_map`` with
  ``mapping_kwargs={'mesh': ...}``, ``partial(jax.shard_map, mesh=...)`` and
  ``jax.shard_map`` under ``jax.set_mesh``), each on one layout per program,
  rotating, so that every spelling meets every layout and every program;
- every mapping_fn (``sharding.shard_map``, ``jax.shard_map``, ``jax.smap``,
  ``sharding.pmap``, ``jax.pmap``) with meshes of Explicit axes (made by
  ``jax.make_mesh``, its default) and of Auto axes (``sharding.make_mesh``) on
  1, 2, 4, 8 devices and 4x2, rotating in the same way over the programs of
  :data:`MESH_PROGRAMS`, which between them use every feature (batched,
  shared and random states, gradients, collectives, control flow, errors).
  The pmaps run under ``jax.set_mesh`` of the mesh; arguments start on one
  device and are moved onto the mesh by the first call.

Lanes: 8, which 1, 2, 4 and 8 devices divide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
import smap
from smap.filter import OfType

B = 8  # lanes: divisible by 1, 2, 4 and 8 devices


# -- meshes and mapping strategies ---------------------------------------------------


@functools.cache
def mesh_1d(n: int):
    return sharding.make_mesh(data=n, devices=jax.devices()[:n])


@functools.cache
def mesh_2d():
    return sharding.make_mesh(data=4, model=2)


@dataclasses.dataclass(frozen=True)
class Strategy:
    """How a StatefulMapping is given its mapping_fn, and the context its calls run in."""

    id: str
    build: Callable[[], tuple[Callable, dict]]  # -> (mapping_fn, mapping_kwargs)
    ambient: Callable[[], Any] | None = None  # -> mesh set with jax.set_mesh around the calls

    def mapping(self) -> Callable:
        mapping_fn, kwargs = self.build()
        return functools.partial(smap.StatefulMapping, mapping_fn=mapping_fn, mapping_kwargs=kwargs)

    def context(self):
        return jax.set_mesh(self.ambient()) if self.ambient else contextlib.nullcontext()


def _devices(n):
    return jax.devices()[:n]


REFERENCE = Strategy("vmap", lambda: (jax.vmap, {}))
LAYOUTS = ("1dev", "2dev", "4dev", "8dev")
N = {"1dev": 1, "2dev": 2, "4dev": 4, "8dev": 8}

# The sharding adapters, on every device count and on the 4x2 mesh, for every program.
CORE = [Strategy("jax.pmap", lambda: (jax.pmap, {}))]
for _l in LAYOUTS:
    CORE += [
        Strategy(f"sharding.shard_map-{_l}", lambda n=N[_l]: (sharding.shard_map(mesh_1d(n), axis="data"), {})),
        Strategy(f"sharding.pmap-{_l}", lambda n=N[_l]: (sharding.pmap(_devices(n)), {})),
    ]
CORE += [
    Strategy("sharding.shard_map-4x2-axis=data", lambda: (sharding.shard_map(mesh_2d(), axis="data"), {})),
    Strategy(
        "sharding.shard_map-4x2-axis=data+model", lambda: (sharding.shard_map(mesh_2d(), axis=("data", "model")), {})
    ),
]

# The spellings that StatefulMapping routes to those adapters (sharding.adapt). Each
# runs on every layout, but each program runs it on one layout, rotating with the
# program's position: every (spelling, layout) pair and every (spelling, program)
# pair is covered, while the full program x layout product is carried by the
# adapters above, which is where the device count matters. This keeps the suite
# within its time budget.
ALIASES = {
    "partial(jax.pmap,devices)": [
        Strategy(
            f"partial(jax.pmap,devices)-{_l}", lambda n=N[_l]: (functools.partial(jax.pmap, devices=_devices(n)), {})
        )
        for _l in LAYOUTS
    ],
    "jax.shard_map(mapping_kwargs)": [
        Strategy(f"jax.shard_map(mapping_kwargs)-{_l}", lambda n=N[_l]: (jax.shard_map, {"mesh": mesh_1d(n)}))
        for _l in LAYOUTS
    ]
    + [Strategy("jax.shard_map(mapping_kwargs)-4x2", lambda: (jax.shard_map, {"mesh": mesh_2d()}))],
    "partial(jax.shard_map,mesh)": [
        Strategy(
            f"partial(jax.shard_map,mesh)-{_l}", lambda n=N[_l]: (functools.partial(jax.shard_map, mesh=mesh_1d(n)), {})
        )
        for _l in LAYOUTS
    ],
    "jax.shard_map(set_mesh)": [
        Strategy(f"jax.shard_map(set_mesh)-{_l}", lambda: (jax.shard_map, {}), ambient=lambda n=N[_l]: mesh_1d(n))
        for _l in LAYOUTS
    ]
    + [Strategy("jax.shard_map(set_mesh)-4x2", lambda: (jax.shard_map, {}), ambient=mesh_2d)],
}


@functools.cache
def explicit_mesh(layout: str):
    """A mesh of Explicit axes, what ``jax.make_mesh`` makes by default."""
    shape, names = ((4, 2), ("data", "model")) if layout == "4x2" else ((N[layout],), ("data",))
    axis_types = (jax.sharding.AxisType.Explicit,) * len(names)
    return jax.make_mesh(shape, names, axis_types=axis_types, devices=_devices(math.prod(shape)))


def auto_mesh(layout: str):
    return mesh_2d() if layout == "4x2" else mesh_1d(N[layout])


def _pmap_over(mesh):
    """jax.pmap on the mesh's devices: all devices plainly, fewer through a partial."""
    devices = list(mesh.devices.flat)
    return jax.pmap if len(devices) == jax.device_count() else functools.partial(jax.pmap, devices=devices)


def _smap():
    if getattr(jax, "smap", None) is None:
        pytest.skip(f"JAX {jax.__version__} has no jax.smap")
    return jax.smap


# spelling -> (mesh -> (mapping_fn, mapping_kwargs), whether the calls run under jax.set_mesh(mesh))
SPELLINGS = {
    "sharding.shard_map": (lambda mesh: (sharding.shard_map(mesh, axis="data"), {}), False),
    "jax.shard_map(mapping_kwargs)": (lambda mesh: (jax.shard_map, {"mesh": mesh}), False),
    "jax.smap(mapping_kwargs)": (lambda mesh: (_smap(), {"mesh": mesh, "axis_name": "data"}), False),
    "partial(jax.smap)(set_mesh)": (lambda mesh: (functools.partial(_smap(), axis_name="data"), {}), True),
    "sharding.pmap(set_mesh)": (lambda mesh: (sharding.pmap(list(mesh.devices.flat)), {}), True),
    "jax.pmap(set_mesh)": (lambda mesh: (_pmap_over(mesh), {}), True),
}
# Auto meshes with sharding.shard_map and jax.shard_map are in CORE and ALIASES.
MESH_KINDS = {"explicit": (explicit_mesh, list(SPELLINGS)), "auto": (auto_mesh, list(SPELLINGS)[2:])}
MESH_LAYOUTS = (*LAYOUTS, "4x2")


def _mesh_strategy(spelling: str, kind: str, layout: str) -> Strategy:
    make_mesh, (build, ambient) = MESH_KINDS[kind][0], SPELLINGS[spelling]
    return Strategy(
        f"{spelling}-{kind}-{layout}",
        lambda: build(make_mesh(layout)),
        ambient=(lambda: make_mesh(layout)) if ambient else None,
    )


MESH_FAMILIES = {
    f"{spelling}-{kind}": [_mesh_strategy(spelling, kind, layout) for layout in MESH_LAYOUTS]
    for kind, (_, spellings) in MESH_KINDS.items()
    for spelling in spellings
}


# -- the harness ----------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What a program's factory returns: its states and the calls to make, in order."""

    states: dict[str, smap.State]
    calls: list[Callable[[], Any]]
    check: Callable[[list], None] | None = None  # checks the reference by hand
    raises: bool = False  # whether some call is expected to raise (under jax.vmap too)


def execute(program: Callable, strategy: Strategy) -> tuple[list[dict], Run]:
    """Run ``program`` under ``strategy``: after each call, the output, every state and the key."""
    smap.random.seed(0)
    run = program(strategy.mapping())
    trace = []
    with strategy.context():
        for call in run.calls:
            try:
                record = {"out": jax.tree_util.tree_map(np.asarray, call())}
            except Exception as error:  # compared with the reference's error
                record = {"error": (type(error).__name__, str(error))}
            record["states"] = {k: jax.tree_util.tree_map(np.asarray, s.value) for k, s in run.states.items()}
            record["key"] = np.asarray(smap.random.DEFAULT.value)
            trace.append(record)
    return trace, run


_REFERENCES: dict[str, list] = {}


def reference(program: Callable) -> list[dict]:
    """The jax.vmap result of ``program``, computed once per test process."""
    if program.__name__ not in _REFERENCES:
        trace, run = execute(program, REFERENCE)
        errors = [r["error"] for r in trace if "error" in r]
        assert run.raises or not errors, f"the jax.vmap reference raised: {errors}"
        if run.check is not None:
            run.check(trace)
        _REFERENCES[program.__name__] = trace
    return _REFERENCES[program.__name__]


def assert_same(actual: list[dict], expected: list[dict]) -> None:
    assert len(actual) == len(expected)
    for call, (a, e) in enumerate(zip(actual, expected)):
        if "error" in a or "error" in e:
            # the same kind of error as jax.vmap, and then (checked below) the same states
            assert a.get("error", ("no error",))[0] == e.get("error", ("no error",))[0], (
                f"call {call}: {a.get('error', 'no error')} != {e.get('error', 'no error')}"
            )
        for part in ("out", "states", "key") if "error" not in e else ("states", "key"):
            a_leaves, a_tree = jax.tree_util.tree_flatten(a[part])
            e_leaves, e_tree = jax.tree_util.tree_flatten(e[part])
            assert a_tree == e_tree, f"call {call}, {part}: {a_tree} != {e_tree}"
            for path_leaf, x, y in zip(jax.tree_util.tree_flatten_with_path(e[part])[0], a_leaves, e_leaves):
                where = f"call {call}, {part}{jax.tree_util.keystr(path_leaf[0])}"
                assert x.shape == y.shape and x.dtype == y.dtype, f"{where}: {x.shape}/{x.dtype} != {y.shape}/{y.dtype}"
                np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=where)


def check_program(program: Callable, strategy: Strategy) -> None:
    expected = reference(program)
    actual, _ = execute(program, strategy)
    assert_same(actual, expected)


def rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=jnp.float32)


def lane_keys(key0, n=B):
    """Lane i's key inside a mapping: lane i of jax.random.split(key before the call)."""
    return jax.random.split(key0, n)


def draw_key(lane_key):
    """The key the first draw of a RandomState holding ``lane_key`` uses."""
    return jax.random.split(lane_key)[1]


def advanced(key0, n=B):
    """The key after a mapping call that drew from it."""
    return jax.random.split(key0, n + 1)[n]


KEY0 = np.asarray(jax.random.PRNGKey(0))


# -- 1. the seed tutorial's programs --------------------------------------------------


class Counter(smap.nn.Module):
    def __init__(self):
        self.count = smap.ShortTermState(jnp.zeros(B))

    def __call__(self, delta):
        self.count.value = self.count.value + delta
        return self.count.value


def tutorial_counter(mapping):
    counter = Counter()
    m = mapping(
        counter,
        in_axes=0,
        out_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
    )
    d1, d2 = jnp.arange(1.0, B + 1), jnp.linspace(0.0, 1.0, B)

    def check(trace):
        np.testing.assert_allclose(trace[0]["out"], d1)
        np.testing.assert_allclose(trace[1]["states"]["count"], d1 + d2, rtol=1e-6)

    return Run({"count": counter.count}, [lambda: m(d1), lambda: m(d2)], check)


class LinearLayer(smap.nn.Module):
    def __init__(self, n_in, n_out):
        self.weight = smap.ParamState(rand(n_in, n_out, seed=1))
        self.bias = smap.ParamState(rand(n_out, seed=2))

    def __call__(self, x):
        return x @ self.weight.value + self.bias.value


def tutorial_linear_layer(mapping):
    layer = LinearLayer(3, 2)
    m = mapping(layer, in_axes=0, out_axes=0)
    x1, x2 = rand(B, 3, seed=3), rand(B, 3, seed=4)
    w, b = np.asarray(layer.weight.value), np.asarray(layer.bias.value)

    def check(trace):
        np.testing.assert_allclose(trace[1]["out"], np.asarray(x2) @ w + b, rtol=1e-5)
        np.testing.assert_array_equal(trace[1]["states"]["weight"], w)

    return Run(layer.states(), [lambda: m(x1), lambda: m(x2)], check)


def tutorial_update_temp(mapping):
    # state_in_axes batches temp; `write` is shared but written with a per-lane value:
    # the 'ignore' policy writes it back with the mapped axis at 0. The second call
    # then batches `write` too (a State used directly as a selector).
    temp = smap.ShortTermState(jnp.zeros(B))
    write = smap.LongTermState(jnp.asarray(0.0))

    def update_temp(x):
        temp.value = temp.value + x
        write.value = temp.value
        return temp.value

    m = mapping(
        update_temp,
        in_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
        unexpected_out_state_mapping="ignore",
    )
    m2 = mapping(update_temp, state_in_axes={0: [temp, write]})
    x = jnp.arange(1.0, B + 1)

    def check(trace):
        np.testing.assert_allclose(trace[0]["states"]["write"], x)
        np.testing.assert_allclose(trace[0]["states"]["temp"], x)
        np.testing.assert_allclose(trace[1]["states"]["write"], 3 * x)

    return Run({"temp": temp, "write": write}, [lambda: m(x), lambda: m2(2 * x)], check)


def tutorial_update_temp_unbatched(mapping):
    # Neither state is selected: both are shared and written with per-lane values.
    temp = smap.ShortTermState(jnp.asarray(0.0))
    write = smap.LongTermState(jnp.asarray(0.0))

    def update_temp2(x):
        temp.value = temp.value + x
        write.value = temp.value
        return temp.value

    m = mapping(update_temp2, in_axes=0, unexpected_out_state_mapping="ignore")
    x = jnp.arange(1.0, B + 1)

    def check(trace):
        np.testing.assert_allclose(trace[0]["out"], x)
        np.testing.assert_allclose(trace[0]["states"]["write"], x)

    return Run({"temp": temp, "write": write}, [lambda: m(x), lambda: m(2 * x)], check)


def tutorial_random_normal(mapping):
    smap.random.seed(42)
    m = mapping(lambda scale: smap.random.normal(0.0, scale), in_axes=0)
    scales = jnp.arange(1.0, B + 1)

    def check(trace):
        key = np.asarray(jax.random.PRNGKey(42))
        z = jnp.stack([jax.random.normal(draw_key(k), ()) for k in lane_keys(key)])
        np.testing.assert_allclose(trace[0]["out"], z * scales, rtol=1e-5)
        np.testing.assert_array_equal(trace[0]["key"], advanced(key))
        assert len(set(trace[0]["out"].tolist())) == B

    return Run({}, [lambda: m(scales), lambda: m(scales)], check)


def tutorial_multiple_random(mapping):
    smap.random.seed(123)

    def sample_multiple(mean):
        return smap.random.uniform(0.0, 1.0) + smap.random.normal(mean, 1.0)

    m = mapping(sample_multiple, in_axes=0)
    means = jnp.arange(float(B))

    def by_hand(key):
        # Lane i's key k: uniform draws with split(k)[1], then normal with split(split(k)[0])[1].
        out = []
        for k, mean in zip(lane_keys(key), np.asarray(means)):
            rest, first = jax.random.split(k)
            out.append(jax.random.uniform(first, ()) + (mean + jax.random.normal(jax.random.split(rest)[1], ())))
        return np.stack(out)

    def check(trace):
        key = np.asarray(jax.random.PRNGKey(123))
        for call in trace:
            np.testing.assert_allclose(call["out"], by_hand(key), rtol=1e-5, atol=1e-6)
            key = advanced(key)
            np.testing.assert_array_equal(call["key"], key)
        assert not np.allclose(trace[0]["out"], trace[1]["out"])

    return Run({}, [lambda: m(means), lambda: m(means)], check)


class Dropout(smap.nn.Module):
    def __init__(self, rate=0.5):
        self.rate = rate

    def __call__(self, x, training=True):
        if not training:
            return x
        keep = smap.random.uniform(0.0, 1.0, x.shape) > self.rate
        return jnp.where(keep, x / (1 - self.rate), 0.0)


def tutorial_dropout(mapping):
    smap.random.seed(456)
    dropout = Dropout(rate=0.3)
    m = mapping(lambda x: dropout(x, training=True), in_axes=0)
    data = jnp.ones((B, 5))

    def check(trace):
        key = np.asarray(jax.random.PRNGKey(456))
        for call, scale in zip(trace, (1.0, 2.0)):
            keep = np.stack([jax.random.uniform(draw_key(k), (5,)) > 0.3 for k in lane_keys(key)])
            np.testing.assert_allclose(call["out"], np.where(keep, scale / 0.7, 0.0), rtol=1e-6)
            key = advanced(key)
            np.testing.assert_array_equal(call["key"], key)
        assert 0 < (trace[0]["out"] == 0).sum() < trace[0]["out"].size

    return Run({}, [lambda: m(data), lambda: m(2 * data)], check)


def tutorial_accumulate(mapping):
    accumulator = smap.ShortTermState(jnp.zeros(B))

    def accumulate(x):
        accumulator.value = accumulator.value + x
        return accumulator.value

    m = mapping(accumulate, in_axes=0, out_axes=0, axis_size=B, state_in_axes={0: OfType(smap.ShortTermState)})
    x = jnp.arange(float(B))
    return Run(
        {"acc": accumulator}, [lambda: m(x), lambda: m(x)], lambda t: np.testing.assert_allclose(t[1]["out"], 2 * x)
    )


class StatefulComputation(smap.nn.Module):
    def __init__(self):
        self.temp = smap.ShortTermState(jnp.zeros(B))
        self.param = smap.ParamState(jnp.array(1.5))

    def __call__(self, x):
        self.temp.value = self.temp.value + x
        return self.temp.value * self.param.value


def tutorial_stateful_computation(mapping):
    model = StatefulComputation()
    m = mapping(
        model,
        in_axes=0,
        out_axes=0,
        state_in_axes={0: OfType(smap.ShortTermState)},
        state_out_axes={0: OfType(smap.ShortTermState)},
    )
    x = jnp.arange(1.0, B + 1)

    def check(trace):
        np.testing.assert_allclose(trace[1]["out"], 2 * x * 1.5)
        assert trace[1]["states"]["param"] == 1.5

    return Run(model.states(), [lambda: m(x), lambda: m(x)], check)


def tutorial_normalize_batch(mapping):
    m = mapping(lambda x: x - jax.lax.pmean(x, axis_name="batch"), in_axes=0, axis_name="batch")
    data = jnp.arange(1.0, B + 1) ** 2

    def check(trace):
        np.testing.assert_allclose(trace[0]["out"], data - data.mean(), rtol=1e-6)

    return Run({}, [lambda: m(data), lambda: m(data + 1)], check)


def tutorial_weighted_sum(mapping):
    # in_axes=(0, None): the weight is broadcast; out_axes=(0, None): a lane-independent output.
    m = mapping(lambda x, w: (x * w, jax.lax.psum(x * w, "i")), in_axes=(0, None), out_axes=(0, None), axis_name="i")
    x, w = jnp.arange(1.0, B + 1), jnp.asarray(2.0)

    def check(trace):
        np.testing.assert_allclose(trace[0]["out"][0], 2 * x)
        assert trace[0]["out"][1].shape == ()
        np.testing.assert_allclose(trace[0]["out"][1], 2 * x.sum())

    return Run({}, [lambda: m(x, w), lambda: m(x, 3 * w)], check)


def tutorial_generate_sequence(mapping):
    # Nothing is mapped: axis_size gives the number of lanes.
    m = mapping(lambda unused=None: jnp.arange(3), in_axes=None, axis_size=B)

    def check(trace):
        np.testing.assert_array_equal(trace[0]["out"], np.tile(np.arange(3), (B, 1)))

    return Run({}, [lambda: m(), lambda: m()], check)


def tutorial_out_axes_1(mapping):
    m = mapping(lambda s: jnp.array([s, s * 2, s * 3]), in_axes=0, out_axes=1)
    x = jnp.arange(float(B))
    return Run(
        {},
        [lambda: m(x), lambda: m(-x)],
        lambda t: np.testing.assert_allclose(t[0]["out"], np.stack([x, 2 * x, 3 * x])),
    )


def tutorial_nested_vmap(mapping):
    # The tutorial's vmap of a vmap, with the outer one sharded.
    inner = smap.vmap(lambda x, y: x * y, in_axes=(0, 0))
    m = mapping(inner, in_axes=(0, 0))
    a, b = jnp.ones((B, 4)), jnp.arange(4.0 * B).reshape(B, 4)
    return Run({}, [lambda: m(a, b), lambda: m(b, b)], lambda t: np.testing.assert_allclose(t[0]["out"], b))


def tutorial_jit_grad(mapping):
    # jit -> mapping -> grad, as in the tutorial's last example.
    def loss_fn(x, target):
        return jnp.sum((x**2 - target) ** 2)

    f = smap.jit(mapping(smap.grad(loss_fn, argnums=0), in_axes=(0, 0)))
    x, t = jnp.arange(1.0, B + 1), 2 * jnp.arange(1.0, B + 1)

    def check(trace):
        np.testing.assert_allclose(trace[0]["out"], 4 * x * (x**2 - t), rtol=1e-6)

    return Run({}, [lambda: f(x, t), lambda: f(t, x)], check)


# -- 2. per-lane hidden state and shared parameters -------------------------------


class Recurrent(smap.nn.Module):
    def __init__(self):
        self.w = smap.ParamState(rand(3, 4, seed=5))
        self.b = smap.ParamState(jnp.zeros(4))
        self.h = smap.HiddenState(jnp.zeros((B, 4)))

    def __call__(self, x, *, gain):
        self.h.value = jnp.tanh(0.5 * self.h.value + x @ self.w.value + self.b.value) * gain
        return self.h.value.sum(), self.h.value


def hidden_and_params(mapping):
    net = Recurrent()
    m = mapping(net, state_in_axes=smap.HiddenState, axis_name="batch")
    x1, x2 = rand(B, 3, seed=6), rand(B, 3, seed=7)
    gain = jnp.linspace(0.5, 1.5, B)
    w = np.asarray(net.w.value)

    def check(trace):
        h1 = np.tanh(np.asarray(x1) @ w) * np.asarray(gain)[:, None]
        np.testing.assert_allclose(trace[0]["states"]["h"], h1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(trace[0]["out"][0], h1.sum(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(trace[1]["states"]["w"], w)

    return Run(net.states(), [lambda: m(x1, gain=gain), lambda: m(x2, gain=gain)], check)


def hidden_state_axis_1(mapping):
    # A state batched along axis 1, arguments along axis 1 and -1, outputs at axis 1.
    h = smap.HiddenState(jnp.zeros((3, B)))
    w = smap.ParamState(rand(3, seed=8))

    def step(x, y):
        h.value = h.value * 0.5 + x * w.value + y
        return h.value, (h.value * 2).sum()

    m = mapping(step, in_axes=(1, -1), out_axes=(1, 0), state_in_axes={1: smap.HiddenState})
    x, y = rand(3, B, seed=9), rand(3, B, seed=10)  # y is mapped along its last axis
    w0 = np.asarray(w.value)

    def check(trace):
        expected = np.asarray(x) * w0[:, None] + np.asarray(y)
        np.testing.assert_allclose(trace[0]["states"]["h"], expected, rtol=1e-5)
        np.testing.assert_allclose(trace[0]["out"][0], expected, rtol=1e-5)

    return Run({"h": h, "w": w}, [lambda: m(x, y), lambda: m(x, y)], check)


# -- 3. per-example gradients with a mean-gradient update ----------------------------


class Regression(smap.nn.Module):
    def __init__(self):
        self.w = smap.ParamState(rand(3, 2, seed=11))
        self.b = smap.ParamState(jnp.zeros(2))

    def loss(self, x, y):
        return jnp.sum((x @ self.w.value + self.b.value - y) ** 2)


def grads_np(w, b, x, y):
    """Per-example gradients of sum((x @ w + b - y)**2), by hand."""
    r = 2 * (x @ w + b - y)  # (B, 2)
    return x[:, :, None] * r[:, None, :], r


def per_example_grad_smap(mapping):
    model = Regression()
    grad_fn = smap.grad(model.loss, grad_states=model.states(), return_value=True)

    def step(x, y):
        grads, loss = grad_fn(x, y)
        mean = jax.lax.pmean(grads, "batch")
        for name, state in model.states().items():
            state.value = state.value - 0.1 * mean[name]
        return loss, grads["w"]

    m = mapping(step, axis_name="batch")
    x, y = rand(B, 3, seed=12), rand(B, 2, seed=13)
    w0, b0 = np.asarray(model.w.value), np.asarray(model.b.value)

    def check(trace):
        gw, gb = grads_np(w0, b0, np.asarray(x), np.asarray(y))
        np.testing.assert_allclose(trace[0]["out"][1], gw, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(trace[0]["states"]["w"], w0 - 0.1 * gw.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(trace[0]["states"]["b"], b0 - 0.1 * gb.mean(0), rtol=1e-4, atol=1e-5)
        assert trace[1]["states"]["w"].shape == (3, 2) and trace[1]["states"]["b"].shape == (2,)

    return Run(model.states(), [lambda: m(x, y), lambda: m(x, y)], check)


def per_example_grad_jax(mapping):
    w = smap.ParamState(rand(3, 2, seed=11))
    seen = smap.LongTermState(jnp.zeros(()))

    def step(x, y):
        loss, g = jax.value_and_grad(lambda w_: jnp.sum((x @ w_ - y) ** 2))(w.value)
        w.value = w.value - 0.1 * jax.lax.pmean(g, "batch")
        seen.value = seen.value + jax.lax.psum(1.0, "batch")
        return loss

    m = mapping(step, axis_name="batch")
    x, y = rand(B, 3, seed=12), rand(B, 2, seed=13)
    w0 = np.asarray(w.value)

    def check(trace):
        gw, _ = grads_np(w0, np.zeros(2), np.asarray(x), np.asarray(y))
        np.testing.assert_allclose(trace[0]["states"]["w"], w0 - 0.1 * gw.mean(0), rtol=1e-4, atol=1e-5)
        assert trace[1]["states"]["w"].shape == (3, 2)
        assert trace[1]["states"]["seen"] == 2 * B

    return Run({"w": w, "seen": seen}, [lambda: m(x, y), lambda: m(x, y)], check)


class Member(smap.nn.Module):
    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.w = smap.ParamState(jax.random.normal(k1, (3, 4)))
        self.v = smap.ParamState(jax.random.normal(k2, (4,)))

    def __call__(self, x):
        return jnp.tanh(x @ self.w.value) @ self.v.value


def ensemble(mapping):
    """One member per lane: each lane writes its parameters from a Member made there, then trains it."""
    model = Member(jax.random.PRNGKey(0))
    params = model.states(OfType(smap.ParamState))

    def init(key):
        fresh = Member(key).states(OfType(smap.ParamState))
        for path, state in params.items():
            state.value = fresh[path].value

    def train(x, y):
        grads, value = smap.grad(lambda: jnp.mean((model(x) - y) ** 2), grad_states=params, return_value=True)()
        for path, g in grads.items():
            params[path].value = params[path].value - 0.1 * g
        return value

    keys = jax.random.split(jax.random.PRNGKey(1), B)
    x, y = rand(5, 3, seed=14), rand(5, seed=15)
    init_lanes = mapping(init, state_out_axes=OfType(smap.ParamState))
    train_lanes = mapping(train, in_axes=None, state_in_axes=OfType(smap.ParamState))

    def check(trace):  # against the ensemble written with jax.vmap over its initialisation and its step
        def init_ref(key):
            k1, k2 = jax.random.split(key)
            return {"w": jax.random.normal(k1, (3, 4)), "v": jax.random.normal(k2, (4,))}

        def step_ref(p):
            value, g = jax.value_and_grad(lambda p: jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2))(p)
            return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), value

        members = jax.vmap(init_ref)(keys)
        for record, step in zip(trace, [None, step_ref, step_ref]):
            if step is not None:
                members, value = jax.vmap(step)(members)
                np.testing.assert_allclose(record["out"], value, rtol=1e-5, atol=1e-6)
            for name in ("w", "v"):
                np.testing.assert_allclose(record["states"][name], members[name], rtol=1e-5, atol=1e-6)

    return Run(params, [lambda: init_lanes(keys), lambda: train_lanes(x, y), lambda: train_lanes(x, y)], check)


# -- 4. random dropout: lane i draws the same on any device count -------------------


class RandomDropout(smap.nn.Module):
    def __init__(self, rate):
        self.rate = rate
        self.rng = smap.random.RandomState(7)
        self.h = smap.HiddenState(jnp.zeros((B, 6)))

    def __call__(self, x):
        keep = self.rng.uniform(size=x.shape) > self.rate
        self.h.value = self.h.value + jnp.where(keep, x / (1 - self.rate), 0.0)
        return keep


def random_dropout(mapping):
    layer = RandomDropout(0.5)
    m = mapping(layer, state_in_axes=smap.HiddenState)
    x = jnp.ones((B, 6))
    key0 = np.asarray(jax.random.PRNGKey(7))

    def check(trace):
        keep = np.stack([jax.random.uniform(draw_key(k), (6,)) > 0.5 for k in lane_keys(key0)])
        np.testing.assert_array_equal(trace[0]["out"], keep)
        np.testing.assert_allclose(trace[0]["states"]["h"], np.where(keep, 2.0, 0.0))
        np.testing.assert_array_equal(trace[0]["states"]["rng"], advanced(key0))
        key1 = advanced(key0)
        keep1 = np.stack([jax.random.uniform(draw_key(k), (6,)) > 0.5 for k in lane_keys(key1)])
        np.testing.assert_array_equal(trace[1]["out"], keep1)
        assert not np.array_equal(keep, keep1)
        np.testing.assert_array_equal(trace[0]["key"], KEY0)  # the default key is untouched

    return Run(layer.states(), [lambda: m(x), lambda: m(x)], check)


# -- 5. undeclared writes of shared states ------------------------------------------


def undeclared_write(mapping):
    last = smap.LongTermState(jnp.zeros(2))
    total = smap.LongTermState(jnp.zeros(()))
    w = smap.ParamState(jnp.asarray([1.0, -1.0]))

    def step(x):
        last.value = x * w.value  # a per-lane value: 'ignore' stacks it at axis 0
        total.value = total.value + jax.lax.psum(x.sum(), "batch")  # lane-independent
        return x.sum()

    m = mapping(step, axis_name="batch", unexpected_out_state_mapping="ignore")
    # `last` is batched now: the next mapping says so
    m2 = mapping(step, axis_name="batch", state_in_axes={0: last})
    x = rand(B, 2, seed=14)

    def check(trace):
        np.testing.assert_allclose(trace[0]["states"]["last"], np.asarray(x) * [1.0, -1.0])
        assert trace[0]["states"]["total"].shape == ()
        np.testing.assert_allclose(trace[0]["states"]["total"], np.asarray(x).sum(), rtol=1e-5)
        np.testing.assert_allclose(trace[1]["states"]["last"], -np.asarray(x) * [1.0, -1.0])
        np.testing.assert_allclose(trace[1]["states"]["total"], 0.0, atol=1e-5)

    return Run({"last": last, "total": total, "w": w}, [lambda: m(x), lambda: m2(-x)], check)


def undeclared_write_out_axis_1(mapping):
    # The same write, selected by state_out_axes={1: ...}: the mapped axis goes to 1.
    last = smap.LongTermState(jnp.zeros(3))

    def step(x):
        last.value = x + 1.0
        return x

    m = mapping(step, state_out_axes={1: OfType(smap.LongTermState)})
    m2 = mapping(step, state_in_axes={1: OfType(smap.LongTermState)})
    x = rand(B, 3, seed=15)

    def check(trace):
        np.testing.assert_allclose(trace[0]["states"]["last"], np.asarray(x).T + 1.0)
        np.testing.assert_allclose(trace[1]["states"]["last"], 2 * np.asarray(x).T + 1.0)

    return Run({"last": last}, [lambda: m(x), lambda: m2(2 * x)], check)


def undeclared_write_warn(mapping):
    # A shared state read and written with a per-lane value, policy 'warn': the first
    # call stacks it at axis 0 with a warning; the mapping's next call maps it along
    # axis 0 (lane i carries its own value on), with no warning, and keeps its shape.
    acc = smap.LongTermState(jnp.zeros(()))

    def step(x):
        acc.value = acc.value + x
        return x

    m = mapping(step, unexpected_out_state_mapping="warn")
    x = jnp.arange(float(B))

    def first():
        with pytest.warns(UserWarning, match="written with a per-lane value"):
            return m(x)

    def second():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return m(x)

    def check(trace):
        np.testing.assert_allclose(trace[0]["states"]["acc"], x)
        np.testing.assert_allclose(trace[1]["states"]["acc"], 2 * x)

    return Run({"acc": acc}, [first, second], check)


def write_shape_error(mapping):
    # After the first call makes `last` batched (shape (B,)), a mapping that marks it
    # shared ({None: last}) and writes it a per-lane scalar is a shape error under
    # jax.vmap; every mapping_fn must raise the same error and change no state.
    last = smap.LongTermState(jnp.zeros(()))
    h = smap.HiddenState(jnp.zeros(B))

    def step(x):
        h.value = h.value + x + smap.random.normal()
        last.value = x * 2
        return x

    m = mapping(step, state_in_axes=smap.HiddenState)
    shared = mapping(step, state_in_axes={0: smap.HiddenState, None: last})
    x = jnp.arange(float(B))

    def check(trace):
        assert "error" not in trace[0]
        assert trace[1]["error"][0] == "ValueError" and "shape" in trace[1]["error"][1]
        for part in ("states", "key"):
            jax.tree_util.tree_map(np.testing.assert_array_equal, trace[1][part], trace[0][part])

    return Run({"last": last, "h": h}, [lambda: m(x), lambda: shared(x)], check, raises=True)


# -- 6. nested mappings ---------------------------------------------------------------


def nested_mapping(mapping):
    h = smap.HiddenState(jnp.zeros((B, 3)))

    def inner_lane(x):
        total = jax.lax.psum(x, "outer")  # over the outer (sharded) lanes
        everything = jax.lax.psum(x, ("inner", "outer"))
        index = jax.lax.axis_index("outer") * 10 + jax.lax.axis_index("inner")
        return total, everything, index

    inner = smap.vmap(inner_lane, axis_name="inner")

    def outer_lane(x):
        total, everything, index = inner(x)
        h.value = h.value + total
        return everything, index

    m = mapping(outer_lane, axis_name="outer", state_in_axes=smap.HiddenState)
    x = rand(B, 3, seed=16)

    def check(trace):
        xs = np.asarray(x)
        np.testing.assert_allclose(trace[0]["states"]["h"], np.broadcast_to(xs.sum(0), (B, 3)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(trace[0]["out"][0], np.full((B, 3), xs.sum()), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(trace[0]["out"][1], np.arange(B)[:, None] * 10 + np.arange(3))

    return Run({"h": h}, [lambda: m(x), lambda: m(x)], check)


def nested_stateful_inner(mapping):
    # The inner smap.vmap batches a state along its own axis; the outer one shards.
    h = smap.HiddenState(jnp.zeros((B, 4)))

    def cell(x):
        h.value = h.value + x * jax.lax.axis_index("inner")
        return h.value

    inner = smap.vmap(cell, axis_name="inner", state_in_axes=smap.HiddenState)
    m = mapping(lambda x: inner(x), state_in_axes=smap.HiddenState)
    x = rand(B, 4, seed=17)
    return Run(
        {"h": h},
        [lambda: m(x), lambda: m(x)],
        lambda t: np.testing.assert_allclose(t[1]["states"]["h"], 2 * np.asarray(x) * np.arange(4), rtol=1e-5),
    )


# -- 7. collectives ---------------------------------------------------------------------


def collectives(mapping):
    def lane(x):
        return {
            "psum": jax.lax.psum(x, "i"),
            "pmean": jax.lax.pmean(x, "i"),
            "pmax": jax.lax.pmax(x, "i"),
            "pmin": jax.lax.pmin(x, "i"),
            "gather0": jax.lax.all_gather(x, "i"),
            "gather1": jax.lax.all_gather(x, "i", axis=1),
            "gather0_tiled": jax.lax.all_gather(x, "i", tiled=True),
            "gather1_tiled": jax.lax.all_gather(x, "i", axis=1, tiled=True),
            "index": jax.lax.axis_index("i"),
            "size": jax.lax.psum(1, "i"),
            "shift": jax.lax.ppermute(x, "i", [(j, (j + 1) % B) for j in range(B)]),
            # row j of lane i's rows goes to lane j: lane i receives x of every lane times i + 1
            "all_to_all": jax.lax.all_to_all(jnp.stack([x * (j + 1) for j in range(B)]), "i", 0, 0),
        }

    m = mapping(lane, axis_name="i")
    x = rand(B, 2, 3, seed=18)

    def check(trace):
        out, xs = trace[0]["out"], np.asarray(x)
        np.testing.assert_allclose(out["psum"], np.broadcast_to(xs.sum(0), xs.shape), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["pmean"], np.broadcast_to(xs.mean(0), xs.shape), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out["pmax"], np.broadcast_to(xs.max(0), xs.shape))
        np.testing.assert_array_equal(out["pmin"], np.broadcast_to(xs.min(0), xs.shape))
        np.testing.assert_array_equal(out["gather0"], np.broadcast_to(xs, (B, *xs.shape)))
        np.testing.assert_array_equal(out["gather1"], np.broadcast_to(xs.transpose(1, 0, 2), (B, 2, B, 3)))
        np.testing.assert_array_equal(out["gather0_tiled"], np.broadcast_to(xs.reshape(B * 2, 3), (B, B * 2, 3)))
        np.testing.assert_array_equal(
            out["gather1_tiled"], np.broadcast_to(xs.transpose(1, 0, 2).reshape(2, B * 3), (B, 2, B * 3))
        )
        np.testing.assert_array_equal(out["index"], np.arange(B))
        np.testing.assert_array_equal(out["size"], np.full(B, B))
        np.testing.assert_array_equal(out["shift"], np.roll(xs, 1, axis=0))
        want = np.arange(1.0, B + 1)[:, None, None, None] * xs[None]
        np.testing.assert_allclose(out["all_to_all"], want, rtol=1e-6)

    return Run({}, [lambda: m(x), lambda: m(x * 2)], check)


def collectives_on_states(mapping):
    # Collectives over a batched state; a shared state updated by a lane-independent reduction.
    h = smap.HiddenState(jnp.arange(B * 2.0).reshape(B, 2))
    stat = smap.LongTermState(jnp.zeros(2))

    def lane(x):
        i = jax.lax.axis_index("i")
        h.value = h.value + jax.lax.pmax(h.value, "i") * i + x
        stat.value = 0.9 * stat.value + 0.1 * jax.lax.pmean(h.value, "i")
        return jax.lax.all_gather(h.value[0], "i"), jax.lax.pmin(x, "i")

    m = mapping(lane, axis_name="i", state_in_axes=smap.HiddenState)
    x = rand(B, 2, seed=19)

    def check(trace):
        # Lane i by hand: pmax/pmean/pmin/all_gather are a max/mean/min/stack over the lanes.
        hs, st, xs, i = np.arange(B * 2.0).reshape(B, 2), np.zeros(2), np.asarray(x), np.arange(B)[:, None]
        for call in trace:
            hs = hs + hs.max(0) * i + xs
            st = 0.9 * st + 0.1 * hs.mean(0)
            gathered, low = call["out"]
            np.testing.assert_allclose(gathered, np.broadcast_to(hs[:, 0], (B, B)), rtol=1e-5)
            np.testing.assert_allclose(low, np.broadcast_to(xs.min(0), (B, 2)), rtol=1e-6)
            np.testing.assert_allclose(call["states"]["h"], hs, rtol=1e-5)
            np.testing.assert_allclose(call["states"]["stat"], st, rtol=1e-5)

    return Run({"h": h, "stat": stat}, [lambda: m(x), lambda: m(x)], check)


# -- 8. control flow with collectives inside ------------------------------------------


def control_flow(mapping):
    h = smap.HiddenState(jnp.zeros((B, 2)))

    def lane(x):
        def body(carry, xt):
            s = jax.lax.psum(xt, "b")
            return carry + s * jax.lax.axis_index("b"), s

        carry, sums = jax.lax.scan(body, jnp.zeros(()), x)
        total = jax.lax.psum(x.sum(), "b")
        # a lane-dependent predicate, and a lane-independent one
        branch = jax.lax.cond(x[0] > 0, lambda v: jax.lax.pmax(v, "b"), lambda v: jax.lax.pmin(v, "b"), x[1])
        shared = jax.lax.cond(total > 0, lambda v: jax.lax.psum(v, "b"), lambda v: -jax.lax.psum(v, "b"), x[2])

        def cond_fn(c):
            return c[0] < 3

        def body_fn(c):
            return c[0] + 1, c[1] + jax.lax.psum(c[1] * 0.5 + x[3], "b") / B

        _, looped = jax.lax.while_loop(cond_fn, body_fn, (0, x[3]))
        # a loop whose trip count differs between lanes (its body has no collective)
        _, counted = jax.lax.while_loop(
            lambda c: c[0] < jax.lax.axis_index("b"), lambda c: (c[0] + 1, c[1] * 2), (0, 1.0)
        )
        h.value = h.value + jnp.stack([carry, looped])
        return sums, branch, shared, looped, counted

    m = mapping(lane, axis_name="b", state_in_axes=smap.HiddenState)
    x = rand(B, 5, seed=20)

    def check(trace):
        xs = np.asarray(x)
        sums, branch, shared, _, counted = trace[0]["out"]
        np.testing.assert_allclose(sums, np.broadcast_to(xs.sum(0), (B, 5)), rtol=1e-5, atol=1e-5)
        expected_branch = np.where(xs[:, 0] > 0, xs[:, 1].max(), xs[:, 1].min())
        np.testing.assert_allclose(branch, expected_branch)
        sign = 1.0 if xs.sum() > 0 else -1.0
        np.testing.assert_allclose(shared, np.full(B, sign * xs[:, 2].sum()), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(counted, 2.0 ** np.arange(B))
        carry = np.arange(B) * xs.sum()
        np.testing.assert_allclose(trace[0]["states"]["h"][:, 0], carry, rtol=1e-4, atol=1e-4)

    return Run({"h": h}, [lambda: m(x), lambda: m(-x)], check)


# -- 9. a user's state type that gives each lane its own value ------------------------


class Ticket(smap.State):
    """Lane i gets the number ``n + i``; after a call that wrote it per lane, ``n + lanes``."""

    def lane_values(self, value, axis_size):
        return value + jnp.arange(axis_size, dtype=value.dtype), value + axis_size


def user_lane_state(mapping):
    ticket = Ticket(jnp.asarray(10, jnp.int32))
    h = smap.HiddenState(jnp.zeros(B))

    def lane(x):
        number = ticket.value
        ticket.value = number + 1
        h.value = h.value + x * number
        return number, jax.lax.psum(number, "i")

    m = mapping(lane, axis_name="i", state_in_axes=smap.HiddenState)
    x = rand(B, seed=21)

    def check(trace):
        numbers = np.arange(10, 10 + B)
        np.testing.assert_array_equal(trace[0]["out"][0], numbers)
        np.testing.assert_array_equal(trace[0]["out"][1], np.full(B, numbers.sum()))
        assert int(trace[0]["states"]["ticket"]) == 10 + B and int(trace[1]["states"]["ticket"]) == 10 + 2 * B
        second = np.arange(10 + B, 10 + 2 * B)
        np.testing.assert_allclose(trace[1]["states"]["h"], np.asarray(x) * (numbers + second), rtol=1e-6)

    return Run({"ticket": ticket, "h": h}, [lambda: m(x), lambda: m(x)], check)


# -- the tests ------------------------------------------------------------------------

PROGRAMS = [
    tutorial_counter,
    tutorial_linear_layer,
    tutorial_update_temp,
    tutorial_update_temp_unbatched,
    tutorial_random_normal,
    tutorial_multiple_random,
    tutorial_dropout,
    tutorial_accumulate,
    tutorial_stateful_computation,
    tutorial_normalize_batch,
    tutorial_weighted_sum,
    tutorial_generate_sequence,
    tutorial_out_axes_1,
    tutorial_nested_vmap,
    tutorial_jit_grad,
    hidden_and_params,
    hidden_state_axis_1,
    per_example_grad_smap,
    per_example_grad_jax,
    ensemble,
    random_dropout,
    undeclared_write,
    undeclared_write_out_axis_1,
    undeclared_write_warn,
    write_shape_error,
    nested_mapping,
    nested_stateful_inner,
    collectives,
    collectives_on_states,
    control_flow,
    user_lane_state,
]

# The programs that run the mapping_fns on meshes of both kinds: between them they
# use batched, shared and random states, gradients, collectives, control flow and errors.
MESH_PROGRAMS = [
    tutorial_counter,
    tutorial_random_normal,
    hidden_state_axis_1,
    per_example_grad_smap,
    undeclared_write,
    write_shape_error,
    collectives,
    control_flow,
]


def rotation(families: dict, programs: list) -> dict:
    """For each program, one layout of each family, rotating with the program's position."""
    return {
        program.__name__: [layouts[(position + f) % len(layouts)] for f, layouts in enumerate(families.values())]
        for position, program in enumerate(programs)
    }


ROTATION = {
    name: rotation(ALIASES, PROGRAMS).get(name, []) + rotation(MESH_FAMILIES, MESH_PROGRAMS).get(name, [])
    for name in (p.__name__ for p in PROGRAMS)
}


def strategies_for(program: Callable) -> list:
    """The reference by hand, every core strategy, and one layout of each rotating family."""
    chosen = [REFERENCE, *CORE, *ROTATION[program.__name__]]
    return [pytest.param(strategy, id=strategy.id) for strategy in chosen]


def _differential_test(program: Callable) -> Callable:
    @pytest.mark.parametrize("strategy", strategies_for(program))
    def test(strategy):
        if strategy is REFERENCE:
            # The reference itself, against the values worked out by hand.
            _REFERENCES.pop(program.__name__, None)
            reference(program)
        else:
            check_program(program, strategy)

    test.__name__ = test.__qualname__ = f"test_{program.__name__}"
    test.__doc__ = f"{program.__name__}: every mapping_fn and device count gives jax.vmap's result."
    return test


for _program in PROGRAMS:
    globals()[f"test_{_program.__name__}"] = _differential_test(_program)


@pytest.mark.parametrize("families", [ALIASES, MESH_FAMILIES], ids=["aliases", "mesh-families"])
def test_every_spelling_runs_on_every_layout(families):
    """The rotation runs each (spelling, layout) pair of a family at least once."""
    used = {s.id for strategies in ROTATION.values() for s in strategies}
    for name, layouts in families.items():
        assert {s.id for s in layouts} <= used, name


def test_every_mapping_fn_meets_both_mesh_kinds_on_every_layout():
    """Each mapping_fn runs with meshes of Explicit and of Auto axes on 1, 2, 4, 8 devices and 4x2."""
    assert all(t == jax.sharding.AxisType.Explicit for t in explicit_mesh("4x2").axis_types)
    assert all(t == jax.sharding.AxisType.Auto for t in auto_mesh("4x2").axis_types)
    ids = {s.id for s in CORE} | {s.id for strategies in ROTATION.values() for s in strategies}
    for kind in ("explicit", "auto"):
        for layout in MESH_LAYOUTS:
            for spelling in SPELLINGS:
                auto_core = {
                    "sharding.shard_map": f"sharding.shard_map-{layout if layout != '4x2' else '4x2-axis=data'}",
                    "jax.shard_map(mapping_kwargs)": f"jax.shard_map(mapping_kwargs)-{layout}",
                }
                wanted = f"{spelling}-{kind}-{layout}"
                if kind == "auto" and spelling in auto_core:
                    wanted = auto_core[spelling]
                assert wanted in ids, wanted
