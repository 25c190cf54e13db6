"""Per-call overhead of smap against hand-written ``jax.jit(jax.vmap(pure_fn))``.

For each workload the same computation is written twice:

* with smap: a function that reads and writes States, mapped with
  ``smap.vmap2`` / ``smap.StatefulMapping`` (two rows: differentiated with
  ``smap.grad``; ``smap.jit`` of a step given a Module);
* by hand: a pure function that takes the states as arguments and returns
  their new values, under ``jax.jit(jax.vmap(...))`` (``jax.jit(jax.grad(...))``,
  ``jax.jit(...)``);
  the caller carries the new values to the next call, as smap writes them
  back into the States.

Both sides use the same dtypes, shapes and operations, and the script checks
once per workload (two consecutive calls from the same initial values) that
both give the same outputs and the same new states.

Measured per workload:

* cached call: after warm-up, ``--repeats`` repeats of N calls each, smap and
  reference repeats interleaved (the order alternates between repeats),
  ``jax.block_until_ready`` on the last call's outputs; the per-call time of
  the best repeat is reported (``--stat median`` for the median): on a
  shared machine the best repeat is the one least disturbed by other work.
* first call: trace + compile + run of the first call, each time on freshly
  built objects (fresh States, fresh Python functions, a fresh smap transform
  and a fresh ``jax.jit``; nothing global is cleared, and no persistent
  compilation cache is used); the best of ``--first-repeats`` fresh builds,
  both sides timed on each build in alternating order. JAX's monitoring
  events split it into lowering to MLIR, XLA compile, and the rest (tracing,
  smap's Python, the first run).

Targets: cached-call ratio (smap / jax) <= 1.10, first-call ratio <= 1.5;
rows that miss one are marked.

Run:  python scripts/bench_overhead.py            (full run, under ~3 minutes on 2 CPU cores)
      python scripts/bench_overhead.py --quick    (smoke run, about 10 s)
      python scripts/bench_overhead.py --markdown (also print the table as Markdown)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import smap

F32 = jnp.float32
CACHED_TARGET = 1.10  # smap cached call / reference cached call
FIRST_TARGET = 1.5  # smap first call / reference first call


# -- workloads -----------------------------------------------------------------


@dataclasses.dataclass
class Case:
    """One freshly built instance of a workload, for both sides.

    ``smap_step()`` / ``ref_step()`` make one call and return its outputs;
    ``smap_state()`` / ``ref_state()`` return the current state values (the
    reference's carried values), in the same structure.
    """

    smap_step: Callable[[], Any]
    ref_step: Callable[[], Any]
    smap_state: Callable[[], Any]
    ref_state: Callable[[], Any]


def counter(batch: int) -> Case:
    """A per-lane counter: ShortTermState of shape (batch,), split by state_in_axes."""
    count = smap.ShortTermState(jnp.zeros((batch,), F32))
    x = jnp.linspace(0.0, 1.0, batch, dtype=F32)

    def step(x):
        count.value = count.value + x
        return count.value * 2.0

    f = smap.StatefulMapping(step, state_in_axes=smap.ShortTermState)

    def pure(c, x):
        c = c + x
        return c * 2.0, c

    ref = jax.jit(jax.vmap(pure))
    c = count.value

    def smap_step():
        return f(x)

    def ref_step():
        nonlocal c
        out, c = ref(c, x)
        return out

    return Case(smap_step, ref_step, lambda: count.value, lambda: c)


def linear(batch: int) -> Case:
    """A 32x32 linear layer whose ParamState weight and bias all lanes share."""
    kw, kx = jax.random.split(jax.random.PRNGKey(1))
    w = smap.ParamState(jax.random.normal(kw, (32, 32), F32) / np.sqrt(32.0))
    b = smap.ParamState(jnp.full((32,), 0.1, F32))
    x = jax.random.normal(kx, (batch, 32), F32)

    def layer(x):
        return x @ w.value + b.value

    f = smap.vmap2(layer)

    def pure(w, b, x):
        return x @ w + b

    ref = jax.jit(jax.vmap(pure, in_axes=(None, None, 0)))
    rw, rb = w.value, b.value

    def smap_step():
        return f(x)

    def ref_step():
        return ref(rw, rb, x)

    return Case(smap_step, ref_step, lambda: (w.value, b.value), lambda: (rw, rb))


def gradient(batch: int) -> Case:
    """``smap.grad`` of a 32x32 tanh layer's loss for its ParamState weight, against ``jax.jit(jax.grad)``."""
    kw, kx = jax.random.split(jax.random.PRNGKey(3))
    w = smap.ParamState(jax.random.normal(kw, (32, 32), F32) / np.sqrt(32.0))
    x = jax.random.normal(kx, (batch, 32), F32)
    f = smap.grad(lambda x: jnp.sum(jnp.tanh(x @ w.value)), grad_states=w)
    ref = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w))))
    rw = w.value

    def smap_step():
        return f(x)

    def ref_step():
        return ref(rw, x)

    return Case(smap_step, ref_step, lambda: w.value, lambda: rw)


class Counted(smap.nn.Module):
    """A 32x32 tanh layer that counts its calls."""

    def __init__(self, key: jax.Array):
        self.w = smap.ParamState(jax.random.normal(key, (32, 32), F32) / np.sqrt(32.0))
        self.calls = smap.State(jnp.zeros((), F32))


def module_argument(batch: int) -> Case:
    """``smap.jit`` of a step that takes a Module as an argument (as Flax NNX passes one), against ``jax.jit``
    of the step that takes its arrays."""
    kw, kx = jax.random.split(jax.random.PRNGKey(4))
    model = Counted(kw)
    x = jax.random.normal(kx, (batch, 32), F32)

    @smap.jit
    def step(m, x):
        m.calls.value = m.calls.value + 1.0
        return jnp.tanh(x @ m.w.value)

    @jax.jit
    def pure(w, calls, x):
        return jnp.tanh(x @ w), calls + 1.0

    w, calls = model.w.value, model.calls.value

    def smap_step():
        return step(model, x)

    def ref_step():
        nonlocal calls
        out, calls = pure(w, calls, x)
        return out

    return Case(smap_step, ref_step, lambda: model.calls.value, lambda: calls)


def random_draws(batch: int) -> Case:
    """Per-lane draws from smap.random (the global RandomState), 16 per lane.

    smap gives lane i the key ``split(key, batch)[i]``, a draw splits the
    lane's key once, and after the call the state holds
    ``split(key, batch + 1)[batch]``. The reference does the same with one
    ``split(key, batch + 1)``: with ``jax_threefry_partitionable`` (JAX's
    default) its first ``batch`` keys are ``split(key, batch)``; the
    equality check verifies it. (smap computes ``split(key, batch)`` and
    ``split(key, batch + 1)`` separately: one more threefry in its program.)
    """
    smap.random.seed(0)
    x = jnp.linspace(-1.0, 1.0, batch * 16, dtype=F32).reshape(batch, 16)

    def noisy(x):
        return x + smap.random.normal(size=(16,))

    f = smap.vmap2(noisy)

    def pure(key, x):
        keys = jax.random.split(key, batch + 1)

        def lane(k, x):
            _, sub = jax.random.split(k)  # what RandomState.split_key does in the lane
            return x + (0.0 + 1.0 * jax.random.normal(sub, (16,), F32))  # smap.random.normal: loc + scale * z

        return jax.vmap(lane)(keys[:batch], x), keys[batch]

    ref = jax.jit(pure)
    key = smap.random.DEFAULT.value

    def smap_step():
        return f(x)

    def ref_step():
        nonlocal key
        out, key = ref(key, x)
        return out

    return Case(smap_step, ref_step, lambda: smap.random.DEFAULT.value, lambda: key)


class Linear(smap.nn.Module):
    def __init__(self, key: jax.Array, n_in: int, n_out: int):
        self.weight = smap.ParamState(jax.random.normal(key, (n_in, n_out), F32) / np.sqrt(n_in))
        self.bias = smap.ParamState(jnp.full((n_out,), 0.01, F32))

    def __call__(self, x):
        return x @ self.weight.value + self.bias.value


class MLP(smap.nn.Module):
    def __init__(self, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.l1 = Linear(k1, 16, 32)
        self.l2 = Linear(k2, 32, 1)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def mlp_train(batch: int, lr: float = 0.1) -> Case:
    """One SGD step of a 16-32-1 MLP with per-example gradients, averaged by pmean."""
    kp, kx = jax.random.split(jax.random.PRNGKey(2))
    model = MLP(kp)
    params = model.states(smap.ParamState)  # {'l1.weight': ..., ...}
    x = jax.random.normal(kx, (batch, 16), F32)
    y = jnp.sin(x.sum(axis=1, keepdims=True))

    def train_step(x, y):
        grads, loss = smap.grad(lambda: jnp.mean((model(x) - y) ** 2), grad_states=params, return_value=True)()
        for name, g in grads.items():
            params[name].value = params[name].value - lr * jax.lax.pmean(g, "batch")
        return loss

    f = smap.vmap2(train_step, axis_name="batch")

    def apply(p, x):
        h = jnp.tanh(x @ p["l1.weight"] + p["l1.bias"])
        return h @ p["l2.weight"] + p["l2.bias"]

    def pure(p, x, y):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((apply(p, x) - y) ** 2))(p)
        g = jax.lax.pmean(g, "batch")
        return loss, jax.tree_util.tree_map(lambda w, g: w - lr * g, p, g)

    ref = jax.jit(jax.vmap(pure, in_axes=(None, 0, 0), out_axes=(0, None), axis_name="batch"))
    p = {name: s.value for name, s in params.items()}

    def smap_step():
        return f(x, y)

    def ref_step():
        nonlocal p
        out, p = ref(p, x, y)
        return out

    return Case(smap_step, ref_step, lambda: {n: s.value for n, s in params.items()}, lambda: p)


class Stack(smap.nn.Module):
    def __init__(self, key: jax.Array, depth: int, lanes: int):
        self.layers = [Linear(k, 16, 16) for k in jax.random.split(key, depth)]
        self.calls = smap.ShortTermState(jnp.zeros((lanes,), F32))

    def __call__(self, x):
        self.calls.value = self.calls.value + 1.0
        for layer in self.layers:
            x = jnp.tanh(layer(x))
        return x


def stack(depth: int, lanes: int = 8) -> Case:
    """``depth`` 16x16 Linear modules (ParamState weight and bias) and one per-lane counter."""
    kp, kx = jax.random.split(jax.random.PRNGKey(3))
    model = Stack(kp, depth, lanes)
    x = jax.random.normal(kx, (lanes, 16), F32)
    f = smap.vmap2(model, state_in_axes=smap.ShortTermState)

    def pure(params, calls, x):
        calls = calls + 1.0
        for w, b in params:
            x = jnp.tanh(x @ w + b)
        return x, calls

    ref = jax.jit(jax.vmap(pure, in_axes=(None, 0, 0)))
    params = [(layer.weight.value, layer.bias.value) for layer in model.layers]
    calls = model.calls.value

    def smap_step():
        return f(x)

    def ref_step():
        nonlocal calls
        out, calls = ref(params, calls, x)
        return out

    def smap_state():
        return [(layer.weight.value, layer.bias.value) for layer in model.layers], model.calls.value

    return Case(smap_step, ref_step, smap_state, lambda: (params, calls))


WORKLOADS: list[tuple[str, Callable[[], Case]]] = [
    ("counter b=8", lambda: counter(8)),
    ("counter b=1024", lambda: counter(1024)),
    ("linear 32x32 b=8", lambda: linear(8)),
    ("linear 32x32 b=1024", lambda: linear(1024)),
    ("random.normal b=8", lambda: random_draws(8)),
    ("grad 32x32 b=8", lambda: gradient(8)),
    ("jit, Module argument b=8", lambda: module_argument(8)),
    ("mlp train step b=256", lambda: mlp_train(256)),
    ("stack 5x16x16 b=8", lambda: stack(5)),
    ("stack 20x16x16 b=8", lambda: stack(20)),
    ("stack 100x16x16 b=8", lambda: stack(100)),
]


# -- measurement ---------------------------------------------------------------


def assert_same(name: str, call: int, got: Any, want: Any) -> None:
    got_leaves, got_tree = jax.tree_util.tree_flatten(got)
    want_leaves, want_tree = jax.tree_util.tree_flatten(want)
    assert got_tree == want_tree, f"{name}, call {call}: structures differ: {got_tree} vs {want_tree}"
    for g, w in zip(got_leaves, want_leaves):
        assert g.shape == w.shape and g.dtype == w.dtype, (
            f"{name}, call {call}: smap gives {g.dtype}{list(g.shape)}, the reference {w.dtype}{list(w.shape)}"
        )
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6, err_msg=f"{name}, call {call}")


def summary(samples: list[float], stat: str) -> float:
    return min(samples) if stat == "min" else statistics.median(samples)


_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_events: list[tuple[str, float]] | None = None


def _on_duration(event: str, duration: float, **kwargs: Any) -> None:
    if _events is not None and event in (_LOWER_EVENT, _COMPILE_EVENT):
        _events.append((event, duration))


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@dataclasses.dataclass
class FirstCall:
    """A first call's seconds: in all, and JAX's lowering to MLIR and XLA compile
    within it (what remains is tracing, smap's own Python, and the first run)."""

    total: float
    lower: float
    compile: float

    @property
    def rest(self) -> float:
        return self.total - self.lower - self.compile


def time_first_call(step: Callable[[], Any]) -> tuple[FirstCall, Any]:
    """Time one call up to its outputs being ready; return the timing and the outputs."""
    global _events
    _events = []
    try:
        start = time.perf_counter()
        out = jax.block_until_ready(step())
        total = time.perf_counter() - start
    finally:
        events, _events = _events, None
    lower = sum(d for e, d in events if e == _LOWER_EVENT)
    comp = sum(d for e, d in events if e == _COMPILE_EVENT)
    return FirstCall(total, lower, comp), out


def first_calls(name: str, build: Callable[[], Case], repeats: int, stat: str) -> tuple[Case, FirstCall, FirstCall]:
    """First calls (trace + compile + run) of (smap, reference), on fresh builds.

    Every build makes fresh States, fresh Python functions, a fresh smap
    transform and a fresh ``jax.jit``; both sides' first calls are timed on
    it, in alternating order. On the first build the two sides are checked
    to give the same outputs and states, on the first call and on the second
    (which runs the cached programs on the states the first call wrote); that
    build is returned for the cached-call timing.
    """
    samples: tuple[list[FirstCall], list[FirstCall]] = ([], [])
    kept = None
    for r in range(repeats):
        case = build()
        jax.block_until_ready((case.smap_state(), case.ref_state()))  # inputs exist before timing
        steps = ((case.smap_step, case.smap_state), (case.ref_step, case.ref_state))
        results: list[Any] = [None, None]
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            step, state = steps[side]
            gc.collect()
            timing, out = time_first_call(step)
            samples[side].append(timing)
            results[side] = (out, state())
        if kept is None:
            assert_same(name, 1, results[0], results[1])
            assert_same(name, 2, (case.smap_step(), case.smap_state()), (case.ref_step(), case.ref_state()))
            kept = case

    def pick(side: list[FirstCall]) -> FirstCall:
        # The build whose total is the min (or the lower median), with its split.
        ordered = sorted(side, key=lambda c: c.total)
        return ordered[0] if stat == "min" else ordered[(len(ordered) - 1) // 2]

    return kept, pick(samples[0]), pick(samples[1])


def per_call(step: Callable[[], Any], n: int) -> float:
    """Seconds per call over ``n`` calls, blocking on the last call's outputs."""
    start = time.perf_counter()
    for _ in range(n):
        out = step()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / n


def cached_calls(case: Case, repeats: int, repeat_s: float, stat: str) -> tuple[float, float]:
    """Per-call seconds of (smap, reference) once compiled, repeats interleaved."""
    steps = (case.smap_step, case.ref_step)
    for step in steps:  # warm up
        per_call(step, 20)
    rough = min(per_call(step, 20) for step in steps)
    n = max(10, int(repeat_s / rough))
    samples: tuple[list, list] = ([], [])
    for r in range(repeats):
        for side in (0, 1) if r % 2 == 0 else (1, 0):
            samples[side].append(per_call(steps[side], n))
    return summary(samples[0], stat), summary(samples[1], stat)


def warm_up_process() -> None:
    """One tiny jit and one tiny smap call, so that the first workload does not
    pay for starting the backend and the compiler."""
    jax.block_until_ready(jax.jit(lambda x: x + 1.0)(jnp.ones(2)))
    state = smap.ShortTermState(jnp.zeros(2))

    def bump(x):
        state.value = state.value + x

    smap.vmap2(bump, state_in_axes=smap.ShortTermState)(jnp.ones(2))
    jax.block_until_ready(state.value)


@dataclasses.dataclass
class Row:
    name: str
    smap_us: float
    jax_us: float
    smap_first: FirstCall
    jax_first: FirstCall

    @property
    def smap_first_ms(self) -> float:
        return self.smap_first.total * 1e3

    @property
    def jax_first_ms(self) -> float:
        return self.jax_first.total * 1e3

    @property
    def cached_ratio(self) -> float:
        return self.smap_us / self.jax_us

    @property
    def first_ratio(self) -> float:
        return self.smap_first_ms / self.jax_first_ms

    def misses(self) -> str:
        marks = []
        # Compared as printed (two decimals): the timings are not more precise than that.
        if round(self.cached_ratio, 2) > CACHED_TARGET:
            marks.append("cached")
        if round(self.first_ratio, 2) > FIRST_TARGET:
            marks.append("first")
        return "MISS " + "+".join(marks) if marks else ""


HEADER = ("workload", "smap µs", "jax µs", "ratio", "smap 1st ms", "jax 1st ms", "ratio", "")


def cells(row: Row) -> tuple[str, ...]:
    return (
        row.name,
        f"{row.smap_us:.1f}",
        f"{row.jax_us:.1f}",
        f"{row.cached_ratio:.2f}",
        f"{row.smap_first_ms:.1f}",
        f"{row.jax_first_ms:.1f}",
        f"{row.first_ratio:.2f}",
        row.misses(),
    )


def print_table(rows: list[Row]) -> None:
    table = [HEADER, *map(cells, rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    for j, r in enumerate(table):
        line = "  ".join(c.ljust(w) if i in (0, 7) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        print(line.rstrip())
        if j == 0:
            print("-" * len(line.rstrip()))


def split(first: FirstCall) -> str:
    return f"{first.rest * 1e3:6.1f} / {first.lower * 1e3:5.1f} / {first.compile * 1e3:6.1f}"


def print_markdown(rows: list[Row]) -> None:
    print("| " + " | ".join(HEADER[:-1]) + " | target |")
    print("|" + "---|" + "---:|" * 6 + "---|")
    for row in rows:
        c = list(cells(row))
        c[-1] = c[-1] or "met"
        print("| " + " | ".join(c) + " |")


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (
        f"{model}, {cores} cores; Python {platform.python_version()}, jax {jax.__version__}, "
        f"backend {jax.default_backend()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few, short repeats; one build per workload")
    parser.add_argument("--repeats", type=int, help="cached-call repeats per side (default 101, quick 5)")
    parser.add_argument(
        "--first-repeats", type=int, help="fresh builds per workload for the first call (default 5, quick 1)"
    )
    parser.add_argument(
        "--stat",
        choices=("min", "median"),
        default="min",
        help="how repeats are summarised (default min: the least disturbed by other processes)",
    )
    parser.add_argument("--only", help="run only the workloads whose name contains this string")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 101)
    first_repeats = args.first_repeats or (1 if args.quick else 5)
    repeat_s = 0.003 if args.quick else 0.005
    workloads = [(n, b) for n, b in WORKLOADS if not args.only or args.only in n]

    print(f"smap overhead benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {machine()}")
    if os.path.exists("/proc/loadavg"):
        with open("/proc/loadavg") as f:
            print(f"load average at start: {' '.join(f.read().split()[:3])} (other processes share the CPUs)")
    print(
        f"cached call: {args.stat} over {repeats} interleaved repeats of N calls (~{repeat_s * 1e3:.0f} ms each); "
        f"first call: {args.stat} over {first_repeats} fresh build(s)"
    )
    print(f"targets: cached ratio <= {CACHED_TARGET:.2f}, first-call ratio <= {FIRST_TARGET:.2f} (smap / jax)\n")
    if jax.config.jax_compilation_cache_dir:
        print(
            f"warning: a persistent compilation cache is set ({jax.config.jax_compilation_cache_dir}); "
            "first-call times may be cache hits",
            file=sys.stderr,
        )

    started = time.perf_counter()
    warm_up_process()
    rows = []
    for name, build in workloads:
        case, smap_first, jax_first = first_calls(name, build, first_repeats, args.stat)
        smap_s, jax_s = cached_calls(case, repeats, repeat_s, args.stat)
        del case
        rows.append(Row(name, smap_s * 1e6, jax_s * 1e6, smap_first, jax_first))
        print(f"  done {name} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    print_table(rows)
    print("\nfirst call split (ms): trace + Python + first run / lowering to MLIR / XLA compile")
    for row in rows:
        print(f"  {row.name:22s} smap {split(row.smap_first)}   jax {split(row.jax_first)}")
    if args.markdown:
        print()
        print_markdown(rows)
    missed = [r for r in rows if r.misses()]
    print(
        f"\n{len(rows) - len(missed)}/{len(rows)} workloads meet both targets "
        f"(cached <= {CACHED_TARGET:.2f}, first call <= {FIRST_TARGET:.2f}); "
        f"total {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
