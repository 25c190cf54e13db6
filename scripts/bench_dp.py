"""DP-SGD written per example with smap, against the non-private step and the materialised DP step.

Four programs per workload, all SGD, f32, from the same parameters:

* ``batch``: the non-private step in plain JAX: ``jax.grad`` of the batch's
  mean loss, under ``jax.jit`` (8 devices: ``jax.jit(jax.shard_map(...))``,
  the batch split over ``data``, ``jax.lax.psum`` of the gradients);
* ``batch + noise``: the same with the Gaussian noise DP-SGD adds (one
  ``jax.random.normal`` per weight, from a key carried between steps): the fair
  floor, since DP-SGD cannot skip drawing the noise;
* ``materialised DP``: DP-SGD as JAX libraries write it (jax_privacy, optax's
  microbatching): ``jax.vmap(jax.grad(loss))`` makes every example's gradient,
  then their norms, clip factors, the clipped sum, the noise;
* ``smap DP``: the step of docs/privacy.md: the mapped function sees ONE
  example, takes ``smap.grad`` of its loss, its norm (``optax.tree.norm``),
  ``smap.privacy.clip_factor``, ``jax.lax.psum`` of the clipped gradients,
  noise from a ``smap.random.SharedRandomState`` and writes the update to the
  ``ParamState``s; ``smap.StatefulMapping`` over ``jax.vmap`` (1 device) or
  ``sharding.shard_map(mesh, axis='data')`` (8 devices).

Workloads: ``mlp`` (784 -> 512 -> 512 -> 10, relu, batch 256), ``cnn`` (two
3x3 convolutions 1 -> 16 -> 32 channels on 8x8 images, mean pool, dense;
batch 64) and ``lm``: scripts/lm.py's transformer (``lm.GPT``, width 64, 4
heads, 2 blocks, 48 tokens, no dropout, batch 32; the plain-JAX programs use a
pure function of its weights, checked to give the module's loss).

Reported per workload and device count:

* time, paired and interleaved: smap DP / (batch + noise) (targets: <= 1.3 on
  the MLP and CNN, <= 1.7 on the LM), materialised DP / (batch + noise), and
  (batch + noise) / batch;
* parity: the clipped gradient sums of smap DP and materialised DP from the
  same parameters, max |a - b| / max |b| over the weights (target <= 1e-6), and
  the parameters after that step (same noise);
* memory per device from ``compiled.memory_analysis()``: peak bytes
  (arguments + outputs + temporaries - aliased: what the executable
  allocates), smap DP / (batch + noise) (target <= 1.2: on XLA:CPU the noise
  alone needs two uint32 buffers of each weight's shape for its threefry
  bits, as much as the MLP's weights, so the step without noise is no floor
  for a DP step's memory either), smap DP / batch, and the temporary bytes
  alone;
* per-example gradient-shaped arrays in smap DP's optimised HLO: instructions
  whose result has the dims (lanes per device, a weight's dims), for weights of
  two or more dims, leaving out shapes the batch step's HLO holds too
  (activations that happen to have such a shape) and the LM's position table
  (its per-example gradient has the shape of a sequence's activations,
  (tokens, width), which every step holds). None but the layers whose
  per-example gradient the cost rule keeps (docs/privacy.md).

Time: ``--rounds`` rounds; in each, every program makes ``--calls`` calls,
the programs in turn (order rotating each call), each call blocked until its
results are ready; a round's figure is each program's median call, the
ratios are taken round by round, printed as the median of the round ratios
(min..max). The materialised step is timed in rounds of its own, against
batch + noise: interleaved with the others, its gigabyte of temporaries
slowed whichever program ran next (a rotation keeps the cyclic order, so
always the same one: smap DP on the MLP, 8 devices, 2.6x the floor beside
it and 1.04x without it).

This script sets no XLA flag but the device count.

Run:  python scripts/bench_dp.py              (all; many minutes on 2 cores)
      python scripts/bench_dp.py --quick      (smoke run: small models, 1 round)
      python scripts/bench_dp.py --workload mlp --devices 1
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # scripts/lm.py

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
import lm  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import smap  # noqa: E402
from smap.privacy import clip_factor  # noqa: E402

LR, CLIP, SIGMA = 0.05, 1.0, 1.1
TIME_TARGETS = {"mlp": 1.3, "cnn": 1.3, "lm": 1.7}  # smap DP / (batch + noise)
PARITY_TARGET = 1e-6
MEMORY_TARGET = 1.2


# -- the workloads -----------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    name: str
    batch: int
    params: dict[str, np.ndarray]  # initial values; their order is the order of the noise draws
    loss: Callable[[dict, Any, Any], jax.Array]  # one example, a pure function of the weights
    data: tuple[np.ndarray, np.ndarray]
    states: dict[str, smap.ParamState] | None = None  # the LM's: its module reads them
    state_loss: Callable[[Any, Any], jax.Array] | None = None  # one example, reading the states
    uncounted: tuple[str, ...] = ()  # weights whose per-example gradient has the activations' shape


def _normal(rng: np.random.Generator, *shape: int, fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def mlp(quick: bool) -> Workload:
    width, batch = (64, 32) if quick else (512, 256)
    rng = np.random.default_rng(0)
    params = {
        "w1": _normal(rng, 784, width, fan_in=784),
        "b1": np.zeros(width, np.float32),
        "w2": _normal(rng, width, width, fan_in=width),
        "b2": np.zeros(width, np.float32),
        "w3": _normal(rng, width, 10, fan_in=width),
        "b3": np.zeros(10, np.float32),
    }

    def loss(p, x, y):
        h = jax.nn.relu(x @ p["w1"] + p["b1"])
        h = jax.nn.relu(h @ p["w2"] + p["b2"])
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["w3"] + p["b3"], y)

    x = rng.uniform(0, 1, (batch, 784)).astype(np.float32)
    return Workload("mlp", batch, params, loss, (x, rng.integers(0, 10, batch).astype(np.int32)))


def _conv(x: jax.Array, k: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def cnn(quick: bool) -> Workload:
    batch = 16 if quick else 64
    rng = np.random.default_rng(0)
    params = {
        "k1": _normal(rng, 3, 3, 1, 16, fan_in=9),
        "c1": np.zeros(16, np.float32),
        "k2": _normal(rng, 3, 3, 16, 32, fan_in=144),
        "c2": np.zeros(32, np.float32),
        "w": _normal(rng, 32, 10, fan_in=32),
        "b": np.zeros(10, np.float32),
    }

    def loss(p, x, y):
        h = jax.nn.relu(_conv(x[None], p["k1"]) + p["c1"])
        h = jax.nn.relu(_conv(h, p["k2"]) + p["c2"])
        logits = jnp.mean(h, axis=(0, 1, 2)) @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    x = rng.uniform(0, 1, (batch, 8, 8, 1)).astype(np.float32)
    return Workload("cnn", batch, params, loss, (x, rng.integers(0, 10, batch).astype(np.int32)))


def _layernorm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def _next_token_loss(logits: jax.Array, ids: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_p, ids[None, 1:, None], axis=-1).mean()


def language_model(quick: bool) -> Workload:
    width, heads, layers, context, batch = (32, 4, 1, 16, 16) if quick else (64, 4, 2, 48, 32)
    ids, vocab = lm.encode(lm.make_text(500))
    smap.random.seed(0)
    model = lm.GPT(vocab, context, width, heads, layers, 0.0)
    states = model.states(smap.ParamState)
    params = {k: np.asarray(s.value) for k, s in states.items()}
    scale = np.float32(np.sqrt(width // heads))

    def loss(p, tokens, _):
        """lm.GPT's forward pass (rate 0) as a pure function of its weights; one sequence."""
        t = tokens[None, :-1]
        x = p["tokens"][t] + p["positions"][: t.shape[-1]]
        causal = jnp.tril(jnp.ones((t.shape[-1], t.shape[-1]), bool))
        for i in range(layers):
            b = f"blocks.{i}."
            z = _layernorm(x, p[b + "norm1.scale"], p[b + "norm1.bias"])
            split = (*z.shape[:2], heads, width // heads)
            q, k, v = ((z @ p[b + "attention." + n]).reshape(split) for n in ("query", "key", "value"))
            scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / scale
            weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
            x = x + jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(x.shape) @ p[b + "attention.out"]
            z = _layernorm(x, p[b + "norm2.scale"], p[b + "norm2.bias"])
            x = x + jax.nn.gelu(z @ p[b + "up"] + p[b + "up_bias"]) @ p[b + "down"]
        return _next_token_loss(_layernorm(x, p["norm.scale"], p["norm.bias"]) @ p["head"], tokens)

    def state_loss(tokens, _):
        return _next_token_loss(model(tokens[None, :-1], train=False), tokens)

    rng = np.random.default_rng(1)
    starts = rng.integers(0, len(ids) - context - 1, batch)
    seqs = ids[starts[:, None] + np.arange(context + 1)]
    module_loss = smap.jit(state_loss)(jnp.asarray(seqs[0]), None)
    np.testing.assert_allclose(float(loss(params, jnp.asarray(seqs[0]), None)), float(module_loss), rtol=1e-5)
    data = (seqs, np.zeros(batch, np.int32))
    return Workload("lm", batch, params, loss, data, states, state_loss, uncounted=("positions",))


WORKLOADS = {"mlp": mlp, "cnn": cnn, "lm": language_model}


# -- the programs --------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
    """``step()`` makes one call and returns what to wait for; ``clipped()`` the last call's
    clipped sum (DP programs); ``params()`` the current weights; ``compiled()`` the executable."""

    name: str
    step: Callable[[], Any]
    params: Callable[[], dict]
    compiled: Callable[[], Any]
    clipped: Callable[[], Any] = lambda: None


def _noise(key: jax.Array, params: dict, names: list[str]) -> tuple[dict, jax.Array]:
    """One normal draw of scale SIGMA * CLIP per weight, as SharedRandomState.normal draws them."""
    noise = {}
    for k in names:
        key, sub = jax.random.split(key)
        noise[k] = SIGMA * CLIP * jax.random.normal(sub, params[k].shape, params[k].dtype)
    return noise, key


def plain(w: Workload, devices: int, x: Any, y: Any, kind: str) -> Program:
    """``kind``: 'batch', 'batch + noise' or 'materialised DP', in plain JAX."""
    names = list(w.params)
    axis = "data" if devices > 1 else None

    def update(p, key, xb, yb):
        if kind == "materialised DP":
            grads = jax.vmap(jax.grad(w.loss), (None, 0, 0))(p, xb, yb)
            norms = jax.vmap(optax.tree.norm)(grads)
            factors = clip_factor(norms, CLIP)
            total = jax.tree.map(lambda g: jnp.tensordot(factors, g, 1), grads)
        else:
            norms = jnp.zeros(len(xb))
            total = jax.grad(lambda q: jnp.sum(jax.vmap(w.loss, (None, 0, 0))(q, xb, yb)))(p)
        if axis is not None:
            total = jax.lax.psum(total, axis)
        noisy = total
        if kind != "batch":
            noise, key = _noise(key, p, names)
            noisy = {k: total[k] + noise[k] for k in names}
        return {k: p[k] - LR * noisy[k] / w.batch for k in names}, key, norms, total

    params: Any = {k: jnp.asarray(v) for k, v in w.params.items()}
    key: Any = jax.random.PRNGKey(7)
    if devices == 1:
        step = jax.jit(update)
    else:
        mesh = sharding.make_mesh(data=devices)
        specs = (P(), P(), P("data"), P("data"))
        step = jax.jit(
            jax.shard_map(update, mesh=mesh, in_specs=specs, out_specs=(P(), P(), P("data"), P()), check_vma=False)
        )
        params, key = jax.device_put((params, key), NamedSharding(mesh, P()))
    compiled = step.lower(params, key, x, y).compile()  # called directly: compiled once
    last: dict[str, Any] = {}

    def call():
        nonlocal params, key
        params, key, _, last["total"] = compiled(params, key, x, y)
        return params

    return Program(kind, call, lambda: params, lambda: compiled, lambda: last.get("total"))


def smap_dp(w: Workload, devices: int, x: Any, y: Any) -> Program:
    if w.states is None:
        params = {k: smap.ParamState(v) for k, v in w.params.items()}
        state_loss = lambda xi, yi: w.loss({k: s.value for k, s in params.items()}, xi, yi)  # noqa: E731
    else:
        params, state_loss = w.states, w.state_loss
        for k, s in params.items():
            s.value = w.params[k]
    assert state_loss is not None
    noise = smap.random.SharedRandomState(jax.random.PRNGKey(7))

    def dp_example(xi, yi):
        grads = smap.grad(lambda: state_loss(xi, yi), grad_states=params)()
        factor = clip_factor(optax.tree.norm(grads), CLIP)
        clipped = jax.lax.psum(jax.tree.map(lambda g: factor * g, grads), "batch")
        for k, p in params.items():
            p.value = p.value - LR * (clipped[k] + noise.normal(0.0, SIGMA * CLIP, p.value.shape)) / w.batch
        return clipped

    if devices == 1:
        mapping_fn: Any = jax.vmap
    else:
        mapping_fn = sharding.shard_map(sharding.make_mesh(data=devices), axis="data")
    m = smap.StatefulMapping(dp_example, axis_name="batch", out_axes=None, mapping_fn=mapping_fn)
    if devices > 1:
        sharding.place([*params.values(), noise], m)
    last: dict[str, Any] = {}

    def call():
        last["clipped"] = m(x, y)
        return last["clipped"], [s.value for s in params.values()]

    return Program(
        "smap DP",
        call,
        lambda: {k: s.value for k, s in params.items()},
        lambda: m.lower(x, y).compile(),
        lambda: last.get("clipped"),
    )


def programs(w: Workload, devices: int) -> list[Program]:
    x, y = w.data
    if devices > 1:
        x, y = jax.device_put((x, y), NamedSharding(sharding.make_mesh(data=devices), P("data")))
    kinds = ("batch", "batch + noise", "materialised DP")
    return [*(plain(w, devices, x, y, kind) for kind in kinds), smap_dp(w, devices, x, y)]


# -- checks and measurements -----------------------------------------------------------------


def relative_error(got: dict, want: dict) -> float:
    """max |got - want| / max |want|, the worst weight."""
    return max(
        float(np.max(np.abs(np.asarray(got[k]) - np.asarray(want[k]))) / max(float(np.max(np.abs(want[k]))), 1e-30))
        for k in want
    )


def parity(materialised: Program, smap_program: Program) -> tuple[float, float]:
    """From the same weights and key, one step each: the clipped sums' and the new weights' relative error."""
    jax.block_until_ready(materialised.step())
    jax.block_until_ready(smap_program.step())
    clipped = relative_error(smap_program.clipped(), materialised.clipped())
    return clipped, relative_error(smap_program.params(), materialised.params())


def per_example_arrays(hlo: str, lanes: int, weights: list[tuple[int, ...]], batch_hlo: str) -> list[str]:
    """Instructions whose result has the dims (lanes, a weight's dims), in any order, but for
    shapes the batch step's HLO holds too."""
    wanted = {tuple(sorted((lanes, *s))) for s in weights if len(s) >= 2}
    in_batch = set(re.findall(r"\b(?:f32|bf16|f16)\[[\d,]+\]", batch_hlo))
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*((?:f32|bf16|f16)\[([\d,]+)\])", line)
        if m and tuple(sorted(int(d) for d in m.group(2).split(","))) in wanted and m.group(1) not in in_batch:
            found.append(m.group(1))
    return found


def memory(compiled: Any) -> tuple[int, int]:
    """(temporary bytes, peak bytes) per device."""
    stats = compiled.memory_analysis()
    live = stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return stats.temp_size_in_bytes, live + stats.temp_size_in_bytes


def rounds_of(progs: list[Program], rounds: int, calls: int) -> list[list[float]]:
    """Per round, each program's median call time (s); the programs called in turn."""
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
    batch, noisy, materialised, ours = progs
    clipped_error, params_error = parity(materialised, ours)
    compiled = [p.compiled() for p in progs]
    texts = [c.as_text() for c in compiled]
    weights = [v.shape for k, v in w.params.items() if k not in w.uncounted]
    lanes = w.batch // devices
    found = per_example_arrays(texts[3], lanes, weights, texts[0])
    found_materialised = per_example_arrays(texts[2], lanes, weights, texts[0])
    mem = [memory(c) for c in compiled]
    times = rounds_of([batch, noisy, ours], rounds, calls)
    against_materialised = rounds_of([noisy, materialised], rounds, calls)
    return {
        "ms": [
            statistics.median(r[i] for r in t) * 1e3
            for t, i in ((times, 0), (times, 1), (against_materialised, 1), (times, 2))
        ],
        "smap/floor": [r[2] / r[1] for r in times],
        "materialised/floor": [r[1] / r[0] for r in against_materialised],
        "floor/batch": [r[1] / r[0] for r in times],
        "clipped error": clipped_error,
        "params error": params_error,
        "memory": mem,
        "per-example": found,
        "per-example materialised": found_materialised,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    parser.add_argument("--devices", type=int, choices=(1, 8), action="append")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5, help="calls per program per round")
    parser.add_argument("--quick", action="store_true", help="small models, 1 round of 2 calls")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.calls = 1, 2
    print(f"JAX {jax.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores", flush=True)
    failures = []
    for name in args.workload or list(WORKLOADS):
        w = WORKLOADS[name](args.quick)
        for devices in args.devices or (1, 8):
            r = run(w, devices, args.rounds, args.calls)
            ms = r["ms"]
            (t_batch, p_batch), (_, p_floor), (t_mat, p_mat), (t_smap, p_smap) = r["memory"]
            shapes = sorted(set(r["per-example"]))
            print(
                f"{name:4s} {devices} dev  ms: batch {ms[0]:.2f}  +noise {ms[1]:.2f}  materialised {ms[2]:.2f}  "
                f"smap {ms[3]:.2f}\n"
                f"  smap DP/(batch+noise) {ratio_text(r['smap/floor'])}  "
                f"materialised/(batch+noise) {ratio_text(r['materialised/floor'])}  "
                f"(batch+noise)/batch {ratio_text(r['floor/batch'])}\n"
                f"  parity with materialised: clipped sums {r['clipped error']:.1e}, params {r['params error']:.1e}\n"
                f"  memory KiB/device temp: batch {t_batch / 1024:.0f} materialised {t_mat / 1024:.0f} "
                f"smap {t_smap / 1024:.0f} (smap/batch {t_smap / max(t_batch, 1):.2f}); "
                f"peak: batch {p_batch / 1024:.0f} batch+noise {p_floor / 1024:.0f} materialised {p_mat / 1024:.0f} "
                f"smap {p_smap / 1024:.0f} (smap/(batch+noise) {p_smap / max(p_floor, 1):.2f}, the target's "
                f"reference, <= {MEMORY_TARGET}; smap/batch {p_smap / max(p_batch, 1):.2f})\n"
                f"  per-example gradient arrays in the HLO: smap {len(r['per-example'])} {shapes or ''}  "
                f"materialised {len(r['per-example materialised'])}",
                flush=True,
            )
            where = f"{name} {devices} dev"
            if statistics.median(r["smap/floor"]) > TIME_TARGETS[name]:
                failures.append(f"{where}: smap DP/(batch+noise) {statistics.median(r['smap/floor']):.2f}")
            if r["clipped error"] > PARITY_TARGET:
                failures.append(f"{where}: clipped sums differ by {r['clipped error']:.1e}")
            if p_smap > MEMORY_TARGET * p_floor:
                failures.append(f"{where}: peak memory {p_smap / p_floor:.2f}x the batch + noise step's")
            if r["per-example"]:
                failures.append(f"{where}: {len(r['per-example'])} per-example gradient arrays")
    print("targets missed:" if failures else "all targets met", *failures, sep="\n  ")


if __name__ == "__main__":
    main()
