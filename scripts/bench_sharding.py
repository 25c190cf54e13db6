"""A sharded data-parallel training step: smap against hand-written ``jax.shard_map``.

Runs on 8 emulated CPU devices (set here, before JAX starts). In one run:

(a) Per-call time of one SGD step of a two-layer MLP (64 -> 128 -> 10, tanh,
    softmax cross-entropy), data-parallel over a mesh ``make_mesh(data=8)``:

    * ``hand-written``: ``jax.jit(jax.shard_map(step, in_specs=(P(), P('data'),
      P('data')), out_specs=(P(), P('data'))))``; params replicated, the batch
      split over ``'data'``; each device takes ``jax.grad`` of the mean loss
      of its block, ``jax.lax.pmean`` over ``'data'``, SGD update.
    * ``smap``: the params are ``smap.ParamState``s, the mapped function sees
      ONE example (a lane): ``smap.grad`` of its loss, ``jax.lax.pmean`` of the
      gradients over the mapping's ``axis_name``, SGD update of the shared
      params; ``smap.StatefulMapping(..., mapping_fn=sharding.shard_map(mesh,
      axis='data'))``. The mean of the per-example gradients is the gradient
      of the mean loss, so both give the same updated params (checked).

    and, to explain the difference, four more programs that compute the same
    update:

    * ``smap, fuse_lane_sums=False``: the smap step without the rewrite of
      the ``pmean`` of per-example gradients into one product over the batch;

    * ``hand-written, per-example grads``: the hand-written step with
      ``jax.vmap(jax.grad(per-example loss))`` then the mean and ``pmean``:
      the smap program's arithmetic, written without smap;
    * ``smap, one lane per device``: the batch reshaped to (8, B/8, ...), so
      that a lane is one device's block; the lane takes ``smap.grad`` of its
      block's mean loss and ``pmean``s it (the hand-written arithmetic, in smap);
    * ``smap, grad outside the mapping``: ``smap.grad`` of the mean of the
      per-example losses that a ``StatefulMapping`` returns, and the update,
      under ``smap.jit``; no ``pmean`` is written (the transpose of
      ``shard_map`` sums the gradient over the devices).

    Time: after warm-up, the programs are called in turn, one call each, each
    call blocked until its results and its updated params are ready (see
    "blocking" below), ``--calls`` calls per program; the per-call time is the
    median. The calls are split into rounds, and the ratio to the
    hand-written step is also given per round (min..max), as a noise gauge.

(b) The communication in the compiled programs: the collectives in the
    compiled HLO text (``.lower(...).compile().as_text()``; for an smap
    transform ``m``, its jitted dispatcher ``m._dispatch`` lowered with
    ``m._state_list`` and the state values), counted by kind: all-reduce,
    all-gather, reduce-scatter, collective-permute, all-to-all. The smap
    data-parallel step must contain only all-reduces (of the gradients), and
    a second program, a recurrent cell whose per-lane ``HiddenState`` is
    batched over the mesh, must contain no all-gather (its hidden state stays
    partitioned ``P('data')``; only the ``pmean`` the program writes
    communicates).

(c) The memory of the compiled programs, per device: the largest array an
    instruction of the optimised HLO produces (inside fusions too), the
    arrays of shape (lanes per device, a weight's shape) in any order (what a
    per-example weight gradient is), and the temporary bytes of
    ``compiled.memory_analysis()``. The smap step (``fuse_lane_sums``, the
    default) must hold no per-example array; ``smap, fuse_lane_sums=False`` is
    the same step with the rewrite switched off (smap before it: the same
    compiled HLO), so the two are measured in the same run.

(d) Data and model parallelism at once (``--part hybrid``), on a mesh
    ``make_mesh(data=4, model=2)``: one SGD step of a two-layer MLP (128 ->
    512 -> 128, tanh, squared error) in the Megatron layout (W1 ``P(None,
    'model')`` over its output axis, b1 ``P('model')``, W2 ``P('model', None)``
    over its input axis, b2 replicated), the batch over ``'data'``:

    * ``hand-written``: ``jax.jit`` of the step on the whole batch, with
      ``in_shardings``/``out_shardings`` of those ``NamedSharding``s (GSPMD);
    * ``smap``: the params are ``ParamState``s placed by ``sharding.place``
      rules (by tag and by path), the mapped function is one example's loss
      under ``sharding.shard_map(mesh, axis='data')``, and ``smap.grad`` of the
      mean loss and the update run under ``smap.jit``.

    Both give the same params (checked). Reported: the time ratio, the
    collectives of each compiled program by kind and the all-reduce result
    shapes, the all-gathers whose result is a whole weight (must be none),
    and each weight's bytes per device (must be its size / 2 for the split
    ones, on both sides).

Blocking: every timed call is waited for before the next starts. On JAX
0.10.2's CPU backend with 8 emulated devices on 2 cores, a loop of a few dozen
unblocked calls of any program with an all-reduce (plain ``jax.jit(jax.shard_map
(...))`` included) deadlocks in the all-reduce rendezvous ("Expected 8 threads
to join the rendezvous, but only 7 of them arrived"), so the times here are
per-call latencies, dispatch included, for both sides alike.

Run:  python scripts/bench_sharding.py             (full run, a few minutes on 2 cores)
      python scripts/bench_sharding.py --part hybrid (only (d))
      python scripts/bench_sharding.py --quick     (smoke run, batch 256 only, few calls)
      python scripts/bench_sharding.py --markdown  (also print the tables as Markdown)
      python scripts/bench_sharding.py --model 256 512 10  (another MLP)
      python scripts/bench_sharding.py --profile /tmp/prof  (also: device time per HLO op, batch 256)
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sharding  # noqa: E402  (imports jax, but does not start its backend)

sharding.emulate_cpu_devices(8)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import smap  # noqa: E402

F32 = jnp.float32
D_IN, D_HIDDEN, D_OUT = 64, 128, 10
LR = 0.05
N_DEVICES = 8
TARGET = 1.05  # smap per-call time / hand-written per-call time
TEMP_TARGET = 1.10  # smap temporary bytes per device / hand-written
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_COLLECTIVE_RE = re.compile(r"=\s*.*?\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


# -- the model -----------------------------------------------------------------


def init_params() -> list[jax.Array]:
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return [
        jax.random.normal(k1, (D_IN, D_HIDDEN), F32) / np.sqrt(D_IN),
        jnp.zeros((D_HIDDEN,), F32),
        jax.random.normal(k2, (D_HIDDEN, D_OUT), F32) / np.sqrt(D_HIDDEN),
        jnp.zeros((D_OUT,), F32),
    ]


def example_loss(p: list, x: jax.Array, y: jax.Array) -> jax.Array:
    """Softmax cross-entropy of one example: x (D_IN,), y an int label."""
    h = jnp.tanh(x @ p[0] + p[1])
    logits = h @ p[2] + p[3]
    return -jax.nn.log_softmax(logits)[y]


def batch_data(batch: int) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    return jax.random.normal(kx, (batch, D_IN), F32), jax.random.randint(ky, (batch,), 0, D_OUT)


# -- the programs ----------------------------------------------------------------


@dataclasses.dataclass
class Program:
    """One way to write the step: ``step()`` makes one call and returns what to
    wait for; ``params()`` the current params; ``hlo()`` the compiled HLO text."""

    name: str
    step: Callable[[], Any]
    params: Callable[[], list]
    compiled: Callable[[], Any]
    is_smap: bool

    def hlo(self) -> str:
        return self.compiled().as_text()


def smap_compiled(m: Any, *args: Any) -> Any:
    """The compiled executable of an smap transform's cached program (call it once first)."""
    values = [s.value for s in m._state_list.states]
    return m._state_list.dispatch.lower(values, *args).compile()


def smap_hlo(m: Any, *args: Any) -> str:
    """The compiled HLO of an smap transform's cached program (call it once first)."""
    return smap_compiled(m, *args).as_text()


def hand_written(mesh: Any, x: jax.Array, y: jax.Array, per_example: bool) -> Program:
    def local_step(p, xb, yb):
        losses = lambda p: jax.vmap(lambda a, b: example_loss(p, a, b))(xb, yb)  # noqa: E731
        if per_example:
            grads = jax.vmap(lambda a, b: jax.grad(example_loss)(p, a, b))(xb, yb)
            grads = [g.mean(axis=0) for g in grads]
            ls = losses(p)
        else:
            (_, ls), grads = jax.value_and_grad(lambda p: (losses(p).mean(), losses(p)), has_aux=True)(p)
        grads = jax.lax.pmean(grads, "data")
        return [w - LR * g for w, g in zip(p, grads)], ls

    # check_vma=False: the classic data-parallel step. (With JAX's default
    # check_vma=True, the gradient of a replicated P() input is already summed
    # over 'data' by the transpose, and the pmean below would be wrong.)
    step = jax.jit(
        jax.shard_map(
            local_step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P("data")), check_vma=False
        )
    )
    params = [jax.device_put(w, NamedSharding(mesh, P())) for w in init_params()]

    def call():
        nonlocal params
        params, losses = step(params, x, y)
        return params, losses

    name = "hand-written, per-example grads" if per_example else "hand-written jax.shard_map"
    return Program(name, call, lambda: params, lambda: step.lower(params, x, y).compile(), False)


def smap_per_example(mesh: Any, x: jax.Array, y: jax.Array, fuse: bool = True) -> Program:
    """The smap step: a lane is one example (``fuse=False``: with the per-lane products kept)."""
    params = [smap.ParamState(w) for w in init_params()]
    loss_grad = smap.grad(
        lambda xi, yi: example_loss([s.value for s in params], xi, yi), grad_states=params, return_value=True
    )

    def train_step(xi, yi):
        grads, loss = loss_grad(xi, yi)
        grads = jax.lax.pmean(grads, "batch")
        for s, g in zip(params, grads):
            s.value = s.value - LR * g
        return loss

    m = smap.StatefulMapping(
        train_step, axis_name="batch", mapping_fn=sharding.shard_map(mesh, axis="data"), fuse_lane_sums=fuse
    )
    sharding.place(params, m)  # replicated: the params are shared by the lanes

    def call():
        return m(x, y), [s.value for s in params]

    name = "smap" if fuse else "smap, fuse_lane_sums=False"
    return Program(name, call, lambda: [s.value for s in params], lambda: smap_compiled(m, x, y), True)


def smap_per_device(mesh: Any, x: jax.Array, y: jax.Array) -> Program:
    """A lane is one device's block of B/8 examples."""
    params = [smap.ParamState(w) for w in init_params()]

    def block_loss(xb, yb):
        losses = jax.vmap(lambda a, b: example_loss([s.value for s in params], a, b))(xb, yb)
        return losses.mean(), losses

    loss_grad = smap.grad(block_loss, grad_states=params, has_aux=True)

    def train_step(xb, yb):
        grads, losses = loss_grad(xb, yb)
        grads = jax.lax.pmean(grads, "batch")
        for s, g in zip(params, grads):
            s.value = s.value - LR * g
        return losses

    m = smap.StatefulMapping(train_step, axis_name="batch", mapping_fn=sharding.shard_map(mesh, axis="data"))
    sharding.place(params, m)
    blocks = NamedSharding(mesh, P("data"))
    xb = jax.device_put(x.reshape(N_DEVICES, -1, D_IN), blocks)
    yb = jax.device_put(y.reshape(N_DEVICES, -1), blocks)

    def call():
        return m(xb, yb), [s.value for s in params]

    return Program(
        "smap, one lane per device", call, lambda: [s.value for s in params], lambda: smap_compiled(m, xb, yb), True
    )


def smap_grad_outside(mesh: Any, x: jax.Array, y: jax.Array) -> Program:
    """smap.grad of the mean of the mapped per-example losses, update under smap.jit."""
    params = [smap.ParamState(w) for w in init_params()]
    losses = smap.StatefulMapping(
        lambda xi, yi: example_loss([s.value for s in params], xi, yi),
        mapping_fn=sharding.shard_map(mesh, axis="data"),
    )
    loss_grad = smap.grad(lambda xb, yb: losses(xb, yb).mean(), grad_states=params)

    @smap.jit
    def train_step(xb, yb):
        grads = loss_grad(xb, yb)
        for s, g in zip(params, grads):
            s.value = s.value - LR * g

    sharding.place(params, mesh=mesh)

    def call():
        train_step(x, y)
        return [s.value for s in params]

    return Program(
        "smap, grad outside the mapping",
        call,
        lambda: [s.value for s in params],
        lambda: smap_compiled(train_step, x, y),
        True,
    )


BUILDERS: list[Callable[..., Program]] = [
    lambda mesh, x, y: hand_written(mesh, x, y, per_example=False),
    smap_per_example,
    lambda mesh, x, y: smap_per_example(mesh, x, y, fuse=False),
    lambda mesh, x, y: hand_written(mesh, x, y, per_example=True),
    smap_per_device,
    smap_grad_outside,
]


# -- (a) time --------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    name: str
    median_s: float
    round_ratios: list[float]  # per round: this program's median / the hand-written median


def check_same(programs: list[Program], n_steps: int = 2) -> None:
    """From the same initial params, ``n_steps`` steps give the same params on every program."""
    for _ in range(n_steps):
        for p in programs:
            jax.block_until_ready(p.step())
    want = programs[0].params()
    for p in programs[1:]:
        for got, ref in zip(p.params(), want):
            np.testing.assert_allclose(
                np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6, err_msg=f"{p.name} vs {programs[0].name}"
            )


def measure(programs: list[Program], calls: int, rounds: int, warmup: int) -> list[Timing]:
    """Per-call times, the programs called in turn (order rotating), each call blocked."""
    for _ in range(warmup):
        for p in programs:
            jax.block_until_ready(p.step())
    samples: list[list[float]] = [[] for _ in programs]
    order = list(range(len(programs)))
    for _ in range(calls):
        for k in order:
            start = time.perf_counter()
            jax.block_until_ready(programs[k].step())
            samples[k].append(time.perf_counter() - start)
        order = order[1:] + order[:1]
    per_round = max(1, calls // rounds)
    timings = []
    for p, s in zip(programs, samples):
        ratios = []
        for r in range(0, calls - per_round + 1, per_round):
            ratios.append(statistics.median(s[r : r + per_round]) / statistics.median(samples[0][r : r + per_round]))
        timings.append(Timing(p.name, statistics.median(s), ratios))
    return timings


# -- (b) communication -----------------------------------------------------------


def collectives(hlo: str) -> dict[str, int]:
    """How many collective ops of each kind the compiled HLO text holds (async pairs once)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo.splitlines():
        m = _COLLECTIVE_RE.search(line)
        if m:
            counts[m.group(1)] += 1
    return counts


def collective_shapes(hlo: str, kind: str) -> list[str]:
    """The result shapes of the ``kind`` ops in the HLO text."""
    shapes = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+" + re.escape(kind) + r"(?:-start)?\(", line)
        if m:
            shapes.append(re.sub(r"\{[^{}]*\}", "", m.group(1)))
    return shapes


def gemm_and_outer_products(hlo: str) -> tuple[int, int]:
    """Dots in the HLO, and per-example weight gradients: multiplies of shape
    (examples, weight shape), which is what XLA makes of a dot_general with a
    batch dimension and no contracting dimension (a batch of outer products)."""
    dots = len(re.findall(r"=\s*f32\[[^\]]*\]\S*\s+dot\(", hlo))
    weights = [sorted((D_IN, D_HIDDEN)), sorted((D_HIDDEN, D_OUT)), sorted((D_HIDDEN, D_HIDDEN))]
    outer = 0
    for dims in re.findall(r"=\s*f32\[(\d+),(\d+),(\d+)\]\S*\s+multiply\(", hlo):
        n, *rest = map(int, dims)
        outer += n > 1 and sorted(rest) in weights
    return dots, outer


def largest_array(hlo: str) -> tuple[str, int]:
    """The largest array (by bytes) that an instruction of the HLO text produces."""
    sizes = {
        "f64": 8,
        "s64": 8,
        "u64": 8,
        "f32": 4,
        "s32": 4,
        "u32": 4,
        "f16": 2,
        "bf16": 2,
        "pred": 1,
        "s8": 1,
        "u8": 1,
    }
    best = ("", 0)
    for dtype, dims in re.findall(r"=\s*\(?(\w+)\[([\d,]*)\]", hlo):
        if dtype in sizes:
            n = sizes[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
            best = max(best, (f"{dtype}[{dims}]", n), key=lambda b: b[1])
    return best


def per_example_arrays(hlo: str, lanes: int) -> list[str]:
    """Arrays of shape (lanes, a weight's shape), in any order: per-example weight gradients."""
    weights = [sorted((D_IN, D_HIDDEN, lanes)), sorted((D_HIDDEN, D_OUT, lanes))]
    found = set()
    for dims in re.findall(r"=\s*f32\[(\d+),(\d+),(\d+)\]", hlo):
        if sorted(map(int, dims)) in weights:
            found.add("f32[{}]".format(",".join(dims)))
    return sorted(found)


def temp_bytes(compiled: Any) -> int | None:
    """Per-device temporary bytes of a compiled program, where the backend reports them."""
    try:
        return compiled.memory_analysis().temp_size_in_bytes
    except (AttributeError, NotImplementedError, TypeError):
        return None


class Cell(smap.nn.Module):
    """A recurrent cell with a per-lane hidden state and a running mean of its output."""

    def __init__(self, batch: int):
        k1, k2 = jax.random.split(jax.random.PRNGKey(2))
        self.w_in = smap.ParamState(jax.random.normal(k1, (D_IN, D_HIDDEN), F32) / np.sqrt(D_IN))
        self.w_h = smap.ParamState(jax.random.normal(k2, (D_HIDDEN, D_HIDDEN), F32) / np.sqrt(D_HIDDEN))
        self.h = smap.HiddenState(jnp.zeros((batch, D_HIDDEN), F32))
        self.mean_activity = smap.LongTermState(jnp.zeros((), F32))

    def __call__(self, x):
        self.h.value = jnp.tanh(x @ self.w_in.value + self.h.value @ self.w_h.value)
        self.mean_activity.value = jax.lax.pmean(jnp.mean(self.h.value**2), "batch")
        return self.h.value.sum()


def hidden_state_program(mesh: Any, x: jax.Array, steps: int = 3) -> tuple[str, Any, str]:
    """Run the cell under sharding.shard_map and jax.vmap; check they agree; the compiled HLO."""
    results = {}
    for name, mapping_fn in (("vmap", jax.vmap), ("shard", sharding.shard_map(mesh, axis="data"))):
        cell = Cell(x.shape[0])
        m = smap.StatefulMapping(cell, state_in_axes=smap.HiddenState, axis_name="batch", mapping_fn=mapping_fn)
        if name == "shard":
            sharding.place(cell, m)
        for _ in range(steps):
            out = jax.block_until_ready(m(x))
        results[name] = (out, cell.h.value, cell.mean_activity.value)
        if name == "shard":
            hlo = smap_hlo(m, x)
            spec = cell.h.value.sharding.spec
            table = sharding.describe(cell)
    for got, want in zip(jax.tree_util.tree_leaves(results["shard"]), jax.tree_util.tree_leaves(results["vmap"])):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert spec == P("data"), f"the hidden state should stay partitioned P('data'), is {spec}"
    return hlo, spec, str(table)


# -- (c) hybrid data and model parallelism -------------------------------------------

HYBRID_D, HYBRID_H = 128, 512  # a Megatron MLP: D -> H (W1 split over H) -> D (W2 split over H)
HYBRID_RULES = {"column": P(None, "model"), "row": P("model", None), smap.filter.AtPath("b1"): P("model")}
HYBRID_SPECS = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None), "b2": P()}


def hybrid_init() -> dict[str, jax.Array]:
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    return {
        "w1": jax.random.normal(k1, (HYBRID_D, HYBRID_H), F32) / np.sqrt(HYBRID_D),
        "b1": jnp.zeros((HYBRID_H,), F32),
        "w2": jax.random.normal(k2, (HYBRID_H, HYBRID_D), F32) / np.sqrt(HYBRID_H),
        "b2": jnp.zeros((HYBRID_D,), F32),
    }


def hybrid_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    """Squared error of one example (or, by broadcasting, a batch of them)."""
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.sum((h @ p["w2"] + p["b2"] - y) ** 2, axis=-1)


def hybrid_data(mesh: Any, batch: int) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.PRNGKey(4))
    data = NamedSharding(mesh, P("data"))
    x = jax.random.normal(kx, (batch, HYBRID_D), F32)
    return jax.device_put(x, data), jax.device_put(jax.random.normal(ky, (batch, HYBRID_D), F32), data)


def hybrid_hand_written(mesh: Any, x: jax.Array, y: jax.Array) -> Program:
    """jax.jit with NamedShardings (GSPMD): the params in the Megatron layout, the batch over 'data'."""
    shardings = {k: NamedSharding(mesh, spec) for k, spec in HYBRID_SPECS.items()}
    data = NamedSharding(mesh, P("data"))

    def train_step(p, xb, yb):
        loss, grads = jax.value_and_grad(lambda p: hybrid_loss(p, xb, yb).mean())(p)
        return {k: p[k] - LR * grads[k] for k in p}, loss

    step = jax.jit(train_step, in_shardings=(shardings, data, data), out_shardings=(shardings, None))
    params = jax.device_put(hybrid_init(), shardings)

    def call():
        nonlocal params
        params, loss = step(params, x, y)
        return params, loss

    ordered = lambda: [params[k] for k in HYBRID_SPECS]  # noqa: E731
    return Program(
        "hand-written jax.jit + NamedSharding",
        call,
        ordered,
        lambda: step.lower(params, x, y).compile().as_text(),
        False,
    )


class HybridMLP(smap.nn.Module):
    def __init__(self):
        p = hybrid_init()
        self.w1 = smap.ParamState(p["w1"], tag="column")
        self.b1 = smap.ParamState(p["b1"])
        self.w2 = smap.ParamState(p["w2"], tag="row")
        self.b2 = smap.ParamState(p["b2"])

    def __call__(self, x, y):  # one lane: one example
        return hybrid_loss({k: getattr(self, k).value for k in HYBRID_SPECS}, x, y)


def hybrid_smap(mesh: Any, x: jax.Array, y: jax.Array) -> tuple[Program, HybridMLP, Any]:
    """smap: lanes over 'data' (one example each), the params placed over 'model' by rules."""
    mlp = HybridMLP()
    losses = smap.StatefulMapping(mlp, axis_name="batch", mapping_fn=sharding.shard_map(mesh, axis="data"))
    params = [getattr(mlp, k) for k in HYBRID_SPECS]
    loss_grad = smap.grad(lambda xb, yb: losses(xb, yb).mean(), grad_states=params, return_value=True)

    @smap.jit
    def train_step(xb, yb):
        grads, loss = loss_grad(xb, yb)
        for s, g in zip(params, grads):
            s.value = s.value - LR * g
        return loss

    sharding.place(mlp, losses, rules=HYBRID_RULES)
    values = lambda: [s.value for s in params]  # noqa: E731

    def call():
        return train_step(x, y), values()

    program = Program("smap, sharding.shard_map(axis='data')", call, values, lambda: smap_hlo(train_step, x, y), True)
    return program, mlp, losses


def whole_weight_gathers(hlo: str, shapes: list[tuple[int, ...]]) -> int:
    """All-gathers whose result has the shape of a whole weight."""
    wanted = {"f32[" + ",".join(map(str, s)) + "]" for s in shapes}
    return sum(shape in wanted for shape in collective_shapes(hlo, "all-gather"))


def hybrid_case(
    batch: int, calls: int, rounds: int, warmup: int
) -> tuple[list[list[str]], list[list[str]], list[list[str]], float, str]:
    """The Megatron MLP step on a 4x2 (data x model) mesh: smap against GSPMD by hand."""
    mesh = sharding.make_mesh(data=4, model=2)
    x, y = hybrid_data(mesh, batch)
    hand = hybrid_hand_written(mesh, x, y)
    mine, mlp, losses = hybrid_smap(mesh, x, y)
    programs = [hand, mine]
    check_same(programs)
    timings = measure(programs, calls, rounds, warmup)
    time_rows = [
        [
            t.name,
            str(batch),
            f"{t.median_s * 1e6:.0f}",
            f"{t.median_s / timings[0].median_s:.3f}",
            f"{min(t.round_ratios):.2f}..{max(t.round_ratios):.2f}",
        ]
        for t in timings
    ]
    shapes = [v.shape for v in hybrid_init().values() if v.ndim == 2] + [(HYBRID_H,)]
    comm_rows = []
    for p in programs:
        hlo = p.hlo()
        counts = collectives(hlo)
        gathers = whole_weight_gathers(hlo, shapes)
        assert gathers == 0, f"{p.name}: {gathers} all-gather(s) of a whole weight"
        comm_rows.append(
            [
                p.name,
                *(str(counts[k]) for k in COLLECTIVES),
                str(gathers),
                " ".join(collective_shapes(hlo, "all-reduce")),
            ]
        )
    model_size = mesh.shape["model"]
    byte_rows = []
    for name, hand_value, state in zip(HYBRID_SPECS, hand.params(), [getattr(mlp, k) for k in HYBRID_SPECS]):
        per_device = {
            p: max(s.data.nbytes for s in v.addressable_shards)
            for p, v in (("hand", hand_value), ("smap", state.value))
        }
        split = HYBRID_SPECS[name] != P()
        expected = state.value.nbytes // (model_size if split else 1)
        assert per_device["smap"] == per_device["hand"] == expected, (name, per_device, expected)
        byte_rows.append(
            [
                name,
                str(tuple(state.value.shape)),
                str(state.value.sharding.spec),
                f"{state.value.nbytes:,}",
                f"{per_device['hand']:,}",
                f"{per_device['smap']:,}",
            ]
        )
    return (
        time_rows,
        comm_rows,
        byte_rows,
        timings[1].median_s / timings[0].median_s,
        str(sharding.describe(mlp, losses)),
    )


# -- profile (--profile) ---------------------------------------------------------


def profile(programs: list[Program], calls: int, directory: str) -> list[list[str]]:
    """Device time per step of each HLO op, from a JAX profiler trace of ``calls`` calls.

    Sums the trace events named after the compiled program's instructions over
    the 8 devices (they share the 2 cores, so wall time is about this sum / 2
    plus the wait for the slowest device in each all-reduce).
    """
    import glob
    import gzip
    import json
    import shutil

    rows = []
    for p in programs:
        shapes = {
            name: re.sub(r"\{[^{}]*\}", "", shape)
            for name, shape in re.findall(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\S+)", p.hlo(), flags=re.M)
        }
        names = set(shapes)
        out = os.path.join(directory, re.sub(r"\W+", "_", p.name))
        shutil.rmtree(out, ignore_errors=True)
        with jax.profiler.trace(out, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(p.step())
        (path,) = glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        per_op: dict[str, float] = {}
        for e in events:
            if e.get("ph") == "X" and e.get("name") in names:
                per_op[e["name"]] = per_op.get(e["name"], 0.0) + e.get("dur", 0.0) / calls
        compute = {k: v for k, v in per_op.items() if not any(c in k for c in COLLECTIVES)}
        top = sorted(compute.items(), key=lambda kv: -kv[1])[:3]
        rows.append(
            [
                p.name,
                f"{sum(compute.values()):.0f}",
                f"{sum(v for k, v in per_op.items() if k not in compute):.0f}",
                ", ".join(f"{k} {shapes[k]} {v:.0f}" for k, v in top),
            ]
        )
    return rows


# -- report ----------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        found = re.search(r"Model name:\s*(.+)", out)
        if found:
            model = found.group(1).strip()
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, JAX {jax.__version__}, Python {platform.python_version()}"


def table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)])


def main() -> int:
    global D_IN, D_HIDDEN, D_OUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 256 only, few calls")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 256 1024)")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per program and batch (default 1500)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds the calls are split into, for the ratio spread")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    parser.add_argument(
        "--model",
        type=int,
        nargs=3,
        default=None,
        metavar=("IN", "HIDDEN", "OUT"),
        help=f"layer sizes of the MLP (default {D_IN} {D_HIDDEN} {D_OUT})",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        default=None,
        help="also profile the programs at the first batch size (JAX profiler traces written to DIR)",
    )
    parser.add_argument(
        "--part",
        choices=("all", "data", "hybrid"),
        default="all",
        help="data: (a) to (c), the data-parallel step; hybrid: (d), data and model parallelism; all: both",
    )
    args = parser.parse_args()
    if args.model:
        D_IN, D_HIDDEN, D_OUT = args.model
    batches = args.batches or ([256] if args.quick else [256, 1024])
    for batch in batches:
        if batch % N_DEVICES:
            parser.error(f"batch {batch} is not a multiple of the {N_DEVICES} devices")
    calls = args.calls or (60 if args.quick else 1500)
    warmup = 5 if args.quick else 50

    assert jax.device_count() == N_DEVICES, f"expected {N_DEVICES} emulated devices, got {jax.device_count()}"
    started = time.perf_counter()
    print(f"bench_sharding: {datetime.date.today().isoformat()}, {machine()}")
    if args.part in ("all", "data"):
        data_parallel(args, batches, calls, warmup)
    if args.part in ("all", "hybrid"):
        hybrid(args, batches, calls, warmup)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


def hybrid(args: argparse.Namespace, batches: list[int], calls: int, warmup: int) -> None:
    print(
        f"\n(c) data and model parallelism: mesh data=4 x model=2; MLP {HYBRID_D}->{HYBRID_H}->{HYBRID_D}, "
        f"tanh, squared error, f32, SGD; W1 P(None, 'model'), b1 P('model'), W2 P('model', None), b2 replicated"
    )
    time_rows, comm_rows, byte_rows, verdicts = [], [], [], []
    for batch in batches:
        t, c, b, ratio, described = hybrid_case(batch, calls, args.rounds, warmup)
        time_rows += t
        comm_rows += [[r[0], str(batch), *r[1:]] for r in c]
        byte_rows = b
        verdicts.append(
            f"batch {batch}: smap / hand-written = {ratio:.3f} "
            f"({'meets' if ratio <= TARGET else 'misses'} the target <= {TARGET:.2f})"
        )
    time_header = ["program", "batch", "per call (us)", "vs hand-written", "per-round ratio"]
    comm_header = ["program", "batch", *COLLECTIVES, "whole-weight all-gathers", "all-reduce results"]
    byte_header = ["weight", "shape", "spec", "bytes", "bytes/device, hand-written", "bytes/device, smap"]
    print(table(time_header, time_rows, False))
    print()
    print(table(comm_header, comm_rows, False))
    print()
    print(table(byte_header, byte_rows, False))
    print()
    print("sharding.describe(mlp, losses):")
    print(described)
    print()
    print("\n".join(verdicts))
    if args.markdown:
        for header, rows in ((time_header, time_rows), (comm_header, comm_rows), (byte_header, byte_rows)):
            print()
            print(table(header, rows, True))


def data_parallel(args: argparse.Namespace, batches: list[int], calls: int, warmup: int) -> None:
    mesh = sharding.make_mesh(data=N_DEVICES)
    print(f"8 emulated CPU devices, mesh {dict(mesh.shape)}; MLP {D_IN}->{D_HIDDEN}->{D_OUT}, f32, SGD lr={LR}")
    print(f"{calls} blocked calls per program and batch, in turn; median per-call time; {args.rounds} rounds\n")

    time_rows: list[list[str]] = []
    comm_rows: list[list[str]] = []
    memory_rows: list[list[str]] = []
    temp_ratio: dict[int, float] = {}
    headline: dict[int, float] = {}
    for batch in batches:
        x, y = batch_data(batch)
        data = NamedSharding(mesh, P("data"))
        x, y = jax.device_put(x, data), jax.device_put(y, data)
        programs = [build(mesh, x, y) for build in BUILDERS]
        check_same(programs)
        timings = measure(programs, calls, args.rounds, warmup)
        base = timings[0].median_s
        for t in timings:
            ratio = t.median_s / base
            spread = f"{min(t.round_ratios):.2f}..{max(t.round_ratios):.2f}"
            time_rows.append([f"{t.name}", str(batch), f"{t.median_s * 1e6:.0f}", f"{ratio:.3f}", spread])
        headline[batch] = timings[1].median_s / base
        if args.profile and batch == batches[0]:
            profile_rows = profile(programs, 200, args.profile)
        base_temp = None
        for p in programs:
            compiled = p.compiled()
            hlo = compiled.as_text()
            temp = temp_bytes(compiled)
            base_temp = temp if base_temp is None else base_temp
            shape, size = largest_array(hlo)
            per_example = per_example_arrays(hlo, batch // N_DEVICES)
            memory_rows.append(
                [
                    p.name,
                    str(batch),
                    f"{shape} ({size / 1024:.0f} KiB)",
                    " ".join(per_example) or "none",
                    "n/a" if temp is None else f"{temp / 1024:.0f}",
                    "n/a" if temp is None or not base_temp else f"{temp / base_temp:.2f}",
                ]
            )
            if p.name == "smap":
                assert not per_example, f"smap: per-example gradient arrays in the compiled step: {per_example}"
                if temp is not None and base_temp:
                    temp_ratio[batch] = temp / base_temp
            counts = collectives(hlo)
            dots, outer = gemm_and_outer_products(hlo)
            comm_rows.append(
                [
                    p.name,
                    str(batch),
                    *(str(counts[k]) for k in COLLECTIVES),
                    " ".join(collective_shapes(hlo, "all-reduce")),
                    f"{dots}/{outer}",
                ]
            )
            if p.is_smap:
                others = {k: v for k, v in counts.items() if k != "all-reduce" and v}
                assert not others, f"{p.name}: the data-parallel step communicates more than all-reduces: {others}"
                assert counts["all-reduce"] >= 1, f"{p.name}: no all-reduce of the gradients"

    # The second program: a batched HiddenState must stay on its devices.
    x, _ = batch_data(256)
    x = jax.device_put(x, NamedSharding(mesh, P("data")))
    cell_hlo, cell_spec, cell_table = hidden_state_program(mesh, x)
    cell_counts = collectives(cell_hlo)
    assert cell_counts["all-gather"] == 0, "the recurrent cell all-gathers: a batched state left its devices"
    assert set(k for k, v in cell_counts.items() if v) <= {"all-reduce"}, cell_counts
    comm_rows.append(
        [
            "smap recurrent cell (HiddenState batched)",
            "256",
            *(str(cell_counts[k]) for k in COLLECTIVES),
            " ".join(collective_shapes(cell_hlo, "all-reduce")),
            "{}/{}".format(*gemm_and_outer_products(cell_hlo)),
        ]
    )

    time_header = ["program", "batch", "per call (us)", "vs hand-written", "per-round ratio"]
    comm_header = ["program", "batch", *COLLECTIVES, "all-reduce results", "dots/outer"]
    memory_header = [
        "program",
        "batch",
        "largest array",
        "(lanes/device, weight) arrays",
        "temp KiB/device",
        "vs hand-written",
    ]
    print("(a) per-call time of one data-parallel SGD step, 8 devices")
    print(table(time_header, time_rows, False))
    print()
    print("(b) collectives in the compiled programs (from .compile().as_text())")
    print(table(comm_header, comm_rows, False))
    print("    dots/outer: dot ops, and multiplies of shape (examples, weight shape): per-example outer products")
    print()
    print("(c) memory of the compiled programs (per device; temp: compiled.memory_analysis())")
    print(table(memory_header, memory_rows, False))
    print()
    if args.profile:
        print(f"profile, batch {batches[0]}: device time per step, summed over the 8 devices (us)")
        profile_header = ["program", "compute ops", "all-reduce (incl. waiting)", "largest compute ops: result, us"]
        print(table(profile_header, profile_rows, False))
        print()
    print(f"the recurrent cell's states after 3 calls (its HiddenState stays {cell_spec}):")
    print(cell_table)
    print()
    for batch, ratio in headline.items():
        verdict = "meets" if ratio <= TARGET else "misses"
        print(f"batch {batch}: smap / hand-written = {ratio:.3f} ({verdict} the target <= {TARGET:.2f})")
        if batch in temp_ratio:
            verdict = "meets" if temp_ratio[batch] <= TEMP_TARGET else "misses"
            ratio = temp_ratio[batch]
            print(f"batch {batch}: smap temp bytes / hand-written = {ratio:.2f} ({verdict} <= {TEMP_TARGET:.2f})")
    print("smap data-parallel steps: only all-reduces; recurrent cell: no all-gather of its HiddenState")
    if args.markdown:
        print()
        print(table(time_header, time_rows, True))
        print()
        print(table(comm_header, comm_rows, True))
        print()
        print(table(memory_header, memory_rows, True))
        if args.profile:
            print()
            print(table(profile_header, profile_rows, True))


if __name__ == "__main__":
    raise SystemExit(main())
