"""The language model of scripts/lm.py: each smap form against the same step written in plain JAX.

    python scripts/bench_lm.py                   # 8 emulated CPU devices, 30 rounds
    python scripts/bench_lm.py --rounds 60 --width 128 --markdown

Runs on 8 emulated CPU devices (set here, before JAX starts). Forms, each on a
mesh of Explicit axes (``jax.make_mesh``'s default) and on one of Auto axes:

* ``whole step, FSDP``: scripts/lm.py's default: a lane is one device's block
  of sequences, every weight and Adam moment split along its first axis over
  ``data`` (8 devices);
* ``per-example, FSDP``: the same placement, a lane is one sequence
  (``--per-example``);
* ``4x2 tensor parallel``: lanes over ``data`` (4), the attention and MLP
  weights and their moments split over ``model`` (2) in the Megatron layout
  (``--tensor-parallel``).

The smap side is scripts/lm.py's own ``build`` (dropout 0, so that both
sides compute one function of the batch). The plain side is the same model,
loss and Adam update written by hand as functions of a dict of arrays, under
``jax.jit`` with ``jax.set_mesh(mesh)``, the weights and moments in the same
``NamedSharding``s, the batch split over ``data``: for FSDP each weight is
gathered where it is used (``jax.sharding.reshard(w, P())`` on Explicit
axes, ``jax.lax.with_sharding_constraint`` on Auto ones) and the gradients
and the update stay split like the weights; for tensor parallel GSPMD
partitions the products (on Explicit axes, ``out_sharding`` says where the
products that contract over ``model`` go). Both steps donate their states:
the plain one with ``donate_argnums``, smap's with ``donate_states``.

Reported per form: (1) the loss after 1 and after 20 steps on both sides,
from the same initial parameters and the same batches; (2) time per step:
in each of ``--rounds`` rounds every program makes ``--calls`` blocked calls,
the two programs of a form one after the other (which goes first alternates),
and the round's ratio is the smap median over the plain median; the median
ratio over the rounds and its spread are printed, and the median ratio of
the process CPU time per call (every thread's: steadier than wall time on a
shared machine, where a call of 8 emulated devices waits for whichever
thread the OS runs); (3) the collectives in
XLA's optimised HLO of each step, by kind, and (4) its temporary bytes per
device (``compiled.memory_analysis()``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import pathlib
import platform
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import sharding

sharding.emulate_cpu_devices(8)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

_spec = importlib.util.spec_from_file_location("smap_lm", pathlib.Path(__file__).with_name("lm.py"))
assert _spec is not None and _spec.loader is not None
lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lm)

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_COLLECTIVE_RE = re.compile(r"=\s*.*?\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
FORMS = {"whole step, FSDP": [], "per-example, FSDP": ["--per-example"], "4x2 tensor parallel": ["--tensor-parallel"]}


@dataclasses.dataclass
class Program:
    """One way to write the step: ``step(ids)`` makes one call and returns the loss (or the lanes' losses)."""

    step: Callable[[Any], Any]
    params: Callable[[], dict]
    compiled: Callable[[Any], Any]


def make_mesh(kind: str, tensor_parallel: bool) -> Any:
    shape, names = ((4, 2), ("data", "model")) if tensor_parallel else ((8,), ("data",))
    return jax.make_mesh(shape, names, axis_types=(getattr(jax.sharding.AxisType, kind),) * len(names))


# -- the smap side: scripts/lm.py -------------------------------------------------


def smap_program(args: argparse.Namespace, vocab: int, mesh: Any) -> tuple[Program, dict]:
    model, step, states, _ = lm.build(args, vocab, mesh)
    lanes = None if args.per_example else mesh.shape["data"]

    def layout(ids: np.ndarray) -> jax.Array:
        if lanes is not None:
            ids = ids.reshape(lanes, -1, ids.shape[-1])
        return jax.device_put(ids, NamedSharding(mesh, P("data")))

    def compiled(ids: np.ndarray) -> Any:
        return step.lower(layout(ids)).compile()

    params = {k: s.value for k, s in model.states(lm.smap.ParamState).items()}
    program = Program(
        step=lambda ids: step(layout(ids)),  # the lanes' losses
        params=lambda: {k: s.value for k, s in model.states(lm.smap.ParamState).items()},
        compiled=compiled,
    )
    return program, params


# -- the plain side: the same model by hand ---------------------------------------


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias


def plain_loss(p: dict, ids: jax.Array, heads: int, layers: int, use: Callable, out: Any) -> jax.Array:
    """scripts/lm.py's GPT and loss on a batch; ``use(w)`` is how a weight is read, ``out`` the
    sharding of the products that contract over a split axis (None: the compiler's choice)."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    batch, length = inputs.shape
    x = use(p["tokens"]).at[inputs].get(out_sharding=out) + use(p["positions"])[:length]
    width = x.shape[-1]
    split = (batch, length, heads, width // heads)
    causal = jnp.tril(jnp.ones((length, length), bool))
    for i in range(layers):
        w = {k[len(f"blocks.{i}.") :]: use(v) for k, v in p.items() if k.startswith(f"blocks.{i}.")}
        h = layer_norm(x, w["norm1.scale"], w["norm1.bias"])
        q, k, v = ((h @ w[f"attention.{n}"]).reshape(split) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / np.float32(np.sqrt(width // heads))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        attended = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(x.shape)
        x = x + jnp.matmul(attended, w["attention.out"], out_sharding=out)
        h = jax.nn.gelu(layer_norm(x, w["norm2.scale"], w["norm2.bias"]) @ w["up"] + w["up_bias"])
        x = x + jnp.matmul(h, w["down"], out_sharding=out)
    logits = layer_norm(x, use(p["norm.scale"]), use(p["norm.bias"])) @ use(p["head"])
    log_p = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_p, targets[..., None], axis=-1).mean()


def plain_program(args: argparse.Namespace, params: dict, placements: dict, mesh: Any) -> Program:
    """The hand-written step from the same initial ``params``, placed as smap placed them."""
    explicit = mesh.axis_types[0] == jax.sharding.AxisType.Explicit
    fsdp = not args.tensor_parallel
    if fsdp and explicit:
        use: Callable = lambda w: jax.sharding.reshard(w, P())  # noqa: E731
    elif fsdp:
        use = lambda w: jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))  # noqa: E731
    else:
        use = lambda w: w  # noqa: E731
    out = P("data") if explicit else None
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, args.learning_rate

    def step(state: tuple, ids: jax.Array) -> tuple:
        p, mu, nu, count = state
        loss, grads = jax.value_and_grad(plain_loss)(p, ids, args.heads, args.layers, use, out)
        count = count + 1
        t = count.astype(jnp.float32)
        size = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        mu = {k: b1 * mu[k] + (1 - b1) * g for k, g in grads.items()}
        nu = {k: b2 * nu[k] + (1 - b2) * g**2 for k, g in grads.items()}
        p = {k: p[k] - size * mu[k] / (jnp.sqrt(nu[k]) + eps) for k in p}
        return (p, mu, nu, count), loss

    shardings = {k: NamedSharding(mesh, placements[k]) for k in params}
    state_sharding = (shardings, shardings, shardings, NamedSharding(mesh, P()))
    batch_sharding = NamedSharding(mesh, P("data"))
    if explicit:
        jitted = jax.jit(step, donate_argnums=0)
    else:
        jitted = jax.jit(
            step,
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, NamedSharding(mesh, P())),
            donate_argnums=0,
        )
    mu, nu = ({k: jnp.zeros_like(v) for k, v in params.items()} for _ in range(2))
    # copies (through the host): both steps donate their states, so they must not share a buffer
    box = [jax.device_put((jax.device_get(params), mu, nu, np.zeros((), np.int32)), state_sharding)]

    def call(ids: np.ndarray) -> jax.Array:
        with jax.set_mesh(mesh):
            box[0], loss = jitted(box[0], jax.device_put(ids, batch_sharding))
        return loss

    def compiled(ids: np.ndarray) -> Any:
        with jax.set_mesh(mesh):
            return jitted.lower(box[0], jax.device_put(ids, batch_sharding)).compile()

    return Program(step=call, params=lambda: box[0][0], compiled=compiled)


# -- measuring ----------------------------------------------------------------------


def collectives(hlo: str) -> dict[str, int]:
    """How many collective ops of each kind the compiled HLO text holds (async pairs once)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo.splitlines():
        found = _COLLECTIVE_RE.search(line)
        if found:
            counts[found.group(1)] += 1
    return counts


def temp_bytes(compiled: Any) -> int:
    return int(compiled.memory_analysis().temp_size_in_bytes)


def check_losses(pair: tuple[Program, Program], batches: list[np.ndarray]) -> list[tuple[float, float]]:
    """The loss of both programs at steps 1 and 20 (the same batches), and their parameters after 20 agree."""
    seen = []
    for k, ids in enumerate(batches, 1):
        losses = [float(np.mean(jax.device_get(program.step(ids)))) for program in pair]
        if k in (1, len(batches)):
            seen.append((losses[0], losses[1]))
    smap_params, plain_params = (jax.device_get(program.params()) for program in pair)
    for name in plain_params:
        np.testing.assert_allclose(smap_params[name], plain_params[name], rtol=2e-4, atol=2e-5, err_msg=name)
    return seen


def measure(
    pairs: list[tuple[Program, Program]], ids: np.ndarray, rounds: int, calls: int
) -> tuple[list[list[float]], list[list[float]]]:
    """Per form, the ratios smap / plain of each round's median call time and median process CPU
    time (all threads: the devices' work, and their waits) per call; the pair's order alternates."""
    ratios: list[list[float]] = [[] for _ in pairs]
    cpu_ratios: list[list[float]] = [[] for _ in pairs]
    for r in range(rounds):
        for i, pair in enumerate(pairs):
            times: list[list[float]] = [[], []]
            cpu: list[list[float]] = [[], []]
            order = (0, 1) if (r + i) % 2 == 0 else (1, 0)
            for j in order:
                for _ in range(calls):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    jax.block_until_ready(pair[j].step(ids))
                    times[j].append(time.perf_counter() - start)
                    cpu[j].append(time.process_time() - start_cpu)
            ratios[i].append(statistics.median(times[0]) / statistics.median(times[1]))
            cpu_ratios[i].append(statistics.median(cpu[0]) / statistics.median(cpu[1]))
    return ratios, cpu_ratios


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.+)", f.read())
        model = found.group(1).strip() if found else model
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, JAX {jax.__version__}, Python {platform.python_version()}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timing rounds (default 30)")
    parser.add_argument("--calls", type=int, default=3, help="calls per program per round (default 3)")
    parser.add_argument("--width", default="64", help="model width (default 64)")
    parser.add_argument("--batch-size", default="32", help="sequences per step (default 32)")
    parser.add_argument("--markdown", action="store_true", help="print the tables in Markdown")
    options = parser.parse_args()
    print(machine())
    ids, vocab = lm.encode(lm.make_text())
    rows, pairs = [], []
    for mesh_kind in ("Explicit", "Auto"):
        for form, flags in FORMS.items():
            args = lm.parse_args(
                ["--dropout", "0", "--width", options.width, "--batch-size", options.batch_size, *flags]
            )
            mesh = make_mesh(mesh_kind, args.tensor_parallel)
            smap_side, params = smap_program(args, vocab, mesh)
            placements = {k: v.sharding.spec for k, v in params.items()}
            plain_side = plain_program(args, params, placements, mesh)
            batches = [lm.batch_at(ids, k, args).reshape(args.batch_size, -1) for k in range(1, 21)]
            losses = check_losses((smap_side, plain_side), batches)
            compiled = [program.compiled(batches[0]) for program in (smap_side, plain_side)]
            counts = [collectives(c.as_text()) for c in compiled]
            temps = [temp_bytes(c) for c in compiled]
            rows.append([f"{form}, {mesh_kind}", losses, counts, temps])
            pairs.append((smap_side, plain_side))
            print(f"built {form} on {mesh_kind} axes", flush=True)
    batch = lm.batch_at(ids, 0, args).reshape(int(options.batch_size), -1)
    ratios, cpu_ratios = measure(pairs, batch, options.rounds, options.calls)

    header = [
        "form",
        "smap / plain (median)",
        "range",
        "CPU time (median)",
        "loss step 1 (smap, plain)",
        "step 20",
        "all-gathers",
        "collectives",
        "temp bytes",
    ]
    lines = []
    for (name, losses, counts, temps), r, c in zip(rows, ratios, cpu_ratios):
        lines.append(
            [
                name,
                f"{statistics.median(r):.2f}x",
                f"{min(r):.2f}-{max(r):.2f}",
                f"{statistics.median(c):.2f}x",
                f"{losses[0][0]:.6f}, {losses[0][1]:.6f}",
                f"{losses[1][0]:.6f}, {losses[1][1]:.6f}",
                f"{counts[0]['all-gather']} ({counts[1]['all-gather']})",
                f"{sum(counts[0].values())} ({sum(counts[1].values())})",
                f"{temps[0]:,} ({temps[1]:,}) {temps[0] / max(temps[1], 1):.2f}x",
            ]
        )
    if options.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" for _ in header) + "|")
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
        for line in [header, *lines]:
            print("  ".join(c.ljust(w) for c, w in zip(line, widths)))
    print("(plain JAX's figures in parentheses; ratios over", options.rounds, "rounds of", options.calls, "calls)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
