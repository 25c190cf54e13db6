"""The lane-sum fusion on three training steps: per-example smap against the plain-JAX batch step.

Three workloads, each trained with Adam (optax), f32:

* ``digits-mlp``: the demo's network (scripts/demo.py) without dropout, 64 ->
  128 -> 10, relu, softmax cross-entropy, batch 64;
* ``cnn``: two 3x3 convolutions (1 -> 16 -> 32 channels, ``SAME``, relu) on
  8x8 images, a global mean pool and a dense layer to 10 classes, batch 64;
* ``lm``: a transformer language model: a token embedding (vocabulary 384,
  width 64), 2 pre-layernorm blocks (4-head
  causal self-attention, a 64 -> 256 -> 64 gelu MLP), a final layernorm and an
  unembedding, next-token cross-entropy over 24 tokens (sinusoidal
  positions), batch 32.

Each on one device and on 8 emulated devices (``make_mesh(data=8)``), three
programs that compute the same update (checked: the same params after two
steps, ``allclose`` at rtol=2e-4, atol=1e-5):

* ``jax batch``: ``jax.grad`` of the batch's mean loss and Adam, under
  ``jax.jit`` (8 devices: ``jax.jit(jax.shard_map(...))``, the batch split
  over ``data``, ``jax.lax.pmean`` of the gradients);
* ``smap``: the per-example step: ``ParamState`` params and a
  ``LongTermState`` of Adam's moments, the mapped function sees ONE example,
  takes ``smap.grad`` of its loss, ``jax.lax.pmean``s the gradients over the
  mapping's ``axis_name`` and updates the shared states;
  ``smap.StatefulMapping`` over ``jax.vmap`` (1 device) or
  ``sharding.shard_map(mesh, axis='data')`` (8 devices);
* ``smap, fuse_lane_sums=False``: the same step with the fusion off.

Reported per workload and device count: the per-call time ratios smap /
jax batch (target <= 1.05) and smap / smap unfused (target <= 1.0, within
noise <= 1.03; this checks the cost rule that picks, per fused product, one
product over the lanes or one per group of lanes: smap/transform/_lane_groups.py);
the temporary bytes of ``compiled.memory_analysis()`` per
device, smap / jax batch (target <= 1.1); and the arrays of shape (lanes per
device, a weight's shape) in the optimised HLO (every weight of two or more
dimensions, the embedding and the convolution kernels included; must be
none for smap).

Time: paired, interleaved rounds. In each round every program makes
``--calls`` calls, the programs in turn (order rotating each call), each call
blocked until its results are ready (XLA's CPU collectives can deadlock with
many programs in flight on emulated devices; see docs/performance.md); the
round's figure is each program's median call, and the ratios are taken round
by round. Printed: the median of the round ratios and their min..max.

This script sets no XLA flag but the device count (the test suite lowers
XLA's code generation effort; a benchmark must not).

Run:  python scripts/bench_fusion.py              (all, a few minutes on 2 cores)
      python scripts/bench_fusion.py --quick      (smoke run)
      python scripts/bench_fusion.py --workload lm --devices 8
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import sharding  # noqa: E402  (imports jax, but does not start its backend)

sharding.emulate_cpu_devices(8)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import smap  # noqa: E402

LR = 1e-3
TIME_TARGET = 1.05  # smap / jax batch
UNFUSED_TARGET = 1.03  # smap / smap unfused, within noise (target 1.0)
TEMP_TARGET = 1.10  # smap temp bytes / jax batch temp bytes


# -- the workloads ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    init: Callable[[np.random.Generator], dict[str, np.ndarray]]
    example_loss: Callable[[dict, Any, Any], jax.Array]  # one example
    data: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]
    batch: int


def _normal(rng: np.random.Generator, *shape: int, fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def mlp_init(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "w1": _normal(rng, 64, 128, fan_in=32),
        "b1": np.zeros(128, np.float32),
        "w2": _normal(rng, 128, 10, fan_in=128),
        "b2": np.zeros(10, np.float32),
    }


def mlp_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"] + p["b2"], y)


def digits_data(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0, 1, (batch, 64)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int32)


def cnn_init(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "k1": _normal(rng, 3, 3, 1, 16, fan_in=9),
        "c1": np.zeros(16, np.float32),
        "k2": _normal(rng, 3, 3, 16, 32, fan_in=144),
        "c2": np.zeros(32, np.float32),
        "w": _normal(rng, 32, 10, fan_in=32),
        "b": np.zeros(10, np.float32),
    }


def _conv(x: jax.Array, k: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def cnn_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jax.nn.relu(_conv(x[None], p["k1"]) + p["c1"])
    h = jax.nn.relu(_conv(h, p["k2"]) + p["c2"])
    logits = jnp.mean(h, axis=(0, 1, 2)) @ p["w"] + p["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def image_data(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0, 1, (batch, 8, 8, 1)).astype(np.float32), rng.integers(0, 10, batch).astype(np.int32)


VOCAB, WIDTH, TOKENS, HEADS, BLOCKS = 384, 64, 24, 4, 2
# Fixed sinusoidal positions (a learned (TOKENS, WIDTH) table's per-example gradient
# would have the shape of the activations' cotangent, which the batch step holds too).
_ANGLES = np.arange(TOKENS)[:, None] / 10000 ** (np.arange(0, WIDTH, 2) / WIDTH)
POSITIONS = np.concatenate([np.sin(_ANGLES), np.cos(_ANGLES)], axis=1).astype(np.float32)


def lm_init(rng: np.random.Generator) -> dict[str, np.ndarray]:
    p = {"embed": _normal(rng, VOCAB, WIDTH, fan_in=1)}
    for i in range(BLOCKS):
        for name in ("q", "k", "v", "o"):
            p[f"{i}.{name}"] = _normal(rng, WIDTH, WIDTH, fan_in=WIDTH)
        p[f"{i}.up"] = _normal(rng, WIDTH, 4 * WIDTH, fan_in=WIDTH)
        p[f"{i}.down"] = _normal(rng, 4 * WIDTH, WIDTH, fan_in=4 * WIDTH)
        for name in ("ln1", "ln2"):
            p[f"{i}.{name}"] = np.ones(WIDTH, np.float32)
    p["ln"] = np.ones(WIDTH, np.float32)
    p["unembed"] = _normal(rng, WIDTH, VOCAB, fan_in=WIDTH)
    return p


def _layernorm(x: jax.Array, scale: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale


def lm_loss(p: dict, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of one sequence: tokens and targets (TOKENS,) ints."""
    h = p["embed"][tokens] + POSITIONS
    causal = jnp.tril(jnp.ones((TOKENS, TOKENS), bool))
    heads = lambda z: z.reshape(TOKENS, HEADS, WIDTH // HEADS)  # noqa: E731
    for i in range(BLOCKS):
        z = _layernorm(h, p[f"{i}.ln1"])
        q, k, v = (heads(z @ p[f"{i}.{n}"]) for n in "qkv")
        scores = jnp.einsum("thd,shd->hts", q, k) / np.sqrt(WIDTH // HEADS)
        attention = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        h = h + jnp.einsum("hts,shd->thd", attention, v).reshape(TOKENS, WIDTH) @ p[f"{i}.o"]
        h = h + jax.nn.gelu(_layernorm(h, p[f"{i}.ln2"]) @ p[f"{i}.up"]) @ p[f"{i}.down"]
    logits = _layernorm(h, p["ln"]) @ p["unembed"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def token_data(rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
    seq = rng.integers(0, VOCAB, (batch, TOKENS + 1)).astype(np.int32)
    return seq[:, :-1], seq[:, 1:]


WORKLOADS = {
    w.name: w
    for w in (
        Workload("digits-mlp", mlp_init, mlp_loss, digits_data, 64),
        Workload("cnn", cnn_init, cnn_loss, image_data, 64),
        Workload("lm", lm_init, lm_loss, token_data, 32),
    )
}


# -- the programs ----------------------------------------------------------------------


@dataclasses.dataclass
class Program:
    """``step()`` makes one call and returns what to wait for; ``params()`` the current
    params; ``compiled()`` the compiled executable."""

    name: str
    step: Callable[[], Any]
    params: Callable[[], dict]
    compiled: Callable[[], Any]


def jax_batch(w: Workload, devices: int, x: Any, y: Any) -> Program:
    optimizer = optax.adam(LR)

    def update(p, opt, xb, yb, axis=None):
        grads = jax.grad(lambda q: jnp.mean(jax.vmap(w.example_loss, (None, 0, 0))(q, xb, yb)))(p)
        if axis is not None:
            grads = jax.lax.pmean(grads, axis)
        updates, opt = optimizer.update(grads, opt, p)
        return optax.apply_updates(p, updates), opt

    params = {k: jnp.asarray(v) for k, v in w.init(np.random.default_rng(0)).items()}
    opt = optimizer.init(params)
    if devices == 1:
        step = jax.jit(update)
    else:
        mesh = sharding.make_mesh(data=devices)
        local = lambda p, o, xb, yb: update(p, o, xb, yb, "data")  # noqa: E731
        spec = (P(), P(), P("data"), P("data"))
        step = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=(P(), P()), check_vma=False))
        params, opt = jax.device_put((params, opt), NamedSharding(mesh, P()))

    def call():
        nonlocal params, opt
        params, opt = step(params, opt, x, y)
        return params

    return Program("jax batch", call, lambda: params, lambda: step.lower(params, opt, x, y).compile())


def smap_step(w: Workload, devices: int, x: Any, y: Any, fuse: bool) -> Program:
    optimizer = optax.adam(LR)
    params = {k: smap.ParamState(v) for k, v in w.init(np.random.default_rng(0)).items()}
    opt = smap.LongTermState(optimizer.init({k: jnp.asarray(s.value) for k, s in params.items()}))

    def train_example(xi, yi):
        values = {k: s.value for k, s in params.items()}
        grads = smap.grad(lambda: w.example_loss({k: s.value for k, s in params.items()}, xi, yi), grad_states=params)()
        updates, opt.value = optimizer.update(jax.lax.pmean(grads, "batch"), opt.value, values)
        for k, u in updates.items():
            params[k].value = values[k] + u
        return jnp.zeros(())

    if devices == 1:
        mapping_fn: Any = jax.vmap
    else:
        mapping_fn = sharding.shard_map(sharding.make_mesh(data=devices), axis="data")
    m = smap.StatefulMapping(train_example, axis_name="batch", mapping_fn=mapping_fn, fuse_lane_sums=fuse)
    if devices > 1:
        sharding.place([*params.values(), opt], m)

    def compiled():
        return m.lower(x, y).compile()

    return Program(
        "smap" if fuse else "smap, fuse_lane_sums=False",
        lambda: (m(x, y), [s.value for s in params.values()]),
        lambda: {k: s.value for k, s in params.items()},
        compiled,
    )


def programs(w: Workload, devices: int) -> list[Program]:
    x, y = w.data(np.random.default_rng(1), w.batch)
    if devices > 1:
        mesh = sharding.make_mesh(data=devices)
        x, y = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    return [jax_batch(w, devices, x, y), smap_step(w, devices, x, y, True), smap_step(w, devices, x, y, False)]


# -- checks and measurements -------------------------------------------------------------


def check_same(progs: list[Program], steps: int = 2) -> None:
    """From the same initial params, ``steps`` steps give the same params on every program."""
    for _ in range(steps):
        for p in progs:
            jax.block_until_ready(p.step())
    want = progs[0].params()
    for p in progs[1:]:
        got = p.params()
        for k in want:
            np.testing.assert_allclose(
                np.asarray(got[k]), np.asarray(want[k]), rtol=2e-4, atol=1e-5, err_msg=f"{p.name}: {k}"
            )


def per_lane_arrays(hlo: str, lanes: int, weights: list[tuple[int, ...]]) -> list[str]:
    """Arrays in the HLO whose dims are (lanes, a weight's dims) in any order."""
    wanted = {tuple(sorted((lanes, *s))) for s in weights if len(s) >= 2}
    found = set()
    for dtype, dims in re.findall(r"\b(f32|bf16|f16)\[([\d,]+)\]", hlo):
        if tuple(sorted(int(d) for d in dims.split(","))) in wanted:
            found.add(f"{dtype}[{dims}]")
    return sorted(found)


def rounds_of(progs: list[Program], rounds: int, calls: int) -> list[list[float]]:
    """Per round, each program's median call time (s); the programs called in turn."""
    for _ in range(3):
        for p in progs:
            jax.block_until_ready(p.step())
    result = []
    order = list(range(len(progs)))
    for _ in range(rounds):
        samples: list[list[float]] = [[] for _ in progs]
        for _ in range(calls):
            for k in order:
                start = time.perf_counter()
                jax.block_until_ready(progs[k].step())
                samples[k].append(time.perf_counter() - start)
            order = order[1:] + order[:1]
        result.append([statistics.median(s) for s in samples])
    return result


def ratio_text(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.2f}..{max(values):.2f})"


def run(w: Workload, devices: int, rounds: int, calls: int) -> dict[str, Any]:
    progs = programs(w, devices)
    check_same(progs)
    batch, fused, unfused = progs
    weights = [v.shape for v in w.init(np.random.default_rng(0)).values()]
    lanes = w.batch // devices
    compiled = [p.compiled() for p in progs]
    per_lane = [per_lane_arrays(c.as_text(), lanes, weights) for c in compiled]
    temps = [c.memory_analysis().temp_size_in_bytes for c in compiled]
    times = rounds_of(progs, rounds, calls)
    vs_batch = [r[1] / r[0] for r in times]
    vs_unfused = [r[1] / r[2] for r in times]
    unfused_vs_batch = [r[2] / r[0] for r in times]
    return {
        "workload": w.name,
        "devices": devices,
        "batch µs": statistics.median(r[0] for r in times) * 1e6,
        "smap µs": statistics.median(r[1] for r in times) * 1e6,
        "smap/batch": vs_batch,
        "smap/unfused": vs_unfused,
        "unfused/batch": unfused_vs_batch,
        "temp KiB (batch, smap, unfused)": [t / 1024 for t in temps],
        "per-lane arrays (smap)": per_lane[1],
        "per-lane arrays (unfused)": per_lane[2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    parser.add_argument("--devices", type=int, choices=(1, 8), action="append")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=30, help="calls per program per round")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5 calls")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls = 3, 5
    print(f"JAX {jax.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    failures = []
    for name in args.workload or list(WORKLOADS):
        for devices in args.devices or (1, 8):
            r = run(WORKLOADS[name], devices, args.rounds, args.calls)
            temps = r["temp KiB (batch, smap, unfused)"]
            print(
                f"{name:10s} {devices} dev  batch {r['batch µs']:8.0f} µs  smap {r['smap µs']:8.0f} µs  "
                f"smap/batch {ratio_text(r['smap/batch'])}  smap/unfused {ratio_text(r['smap/unfused'])}  "
                f"unfused/batch {ratio_text(r['unfused/batch'])}  "
                f"temp KiB batch {temps[0]:.0f} smap {temps[1]:.0f} unfused {temps[2]:.0f}  "
                f"per-lane arrays smap {r['per-lane arrays (smap)'] or 'none'} "
                f"unfused {r['per-lane arrays (unfused)'] or 'none'}",
                flush=True,
            )
            if r["per-lane arrays (smap)"]:
                failures.append(f"{name} {devices} dev: per-lane arrays {r['per-lane arrays (smap)']}")
            if temps[1] > TEMP_TARGET * temps[0]:
                failures.append(f"{name} {devices} dev: temp memory {temps[1] / temps[0]:.2f}x the batch step")
            if statistics.median(r["smap/batch"]) > TIME_TARGET:
                failures.append(f"{name} {devices} dev: smap/batch {statistics.median(r['smap/batch']):.3f}")
            if statistics.median(r["smap/unfused"]) > UNFUSED_TARGET:
                failures.append(f"{name} {devices} dev: smap/unfused {statistics.median(r['smap/unfused']):.3f}")
    print("targets missed:" if failures else "all targets met", *failures, sep="\n  ")


if __name__ == "__main__":
    main()
