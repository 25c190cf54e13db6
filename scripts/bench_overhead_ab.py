"""Cached-call overhead of two versions of smap in one process, interleaved with the reference.

On a shared machine the load changes between two runs of
``scripts/bench_overhead.py``; timing the code before and the code now in
the same process, round after round beside the hand-written
``jax.jit(jax.vmap(...))`` reference, keeps the comparison fair. The code
at ``--before`` (a git commit) is exported with ``git archive`` into a
temporary folder under the package name ``smap_before``; each workload of
``scripts/bench_overhead.py`` is built once with each version, and the best
per-call time of ``--rounds`` rounds of ``--calls`` calls is printed for the
reference, the code before and the code now, with the ratios to the
reference.

Run:  python scripts/bench_overhead_ab.py --before df6e06f
      python scripts/bench_overhead_ab.py --before HEAD~3 --only counter --rounds 200
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from typing import Any

import jax

ROOT = pathlib.Path(__file__).resolve().parent.parent


def export_before(commit: str, folder: pathlib.Path) -> None:
    """``smap/`` at ``commit``, as the package ``smap_before`` in ``folder``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "smap"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    (folder / "smap").rename(folder / "smap_before")
    for path in (folder / "smap_before").rglob("*.py"):
        text = re.sub(r"^(\s*)from smap([ .])", r"\1from smap_before\2", path.read_text(), flags=re.M)
        text = re.sub(r"^(\s*)import smap$", r"\1import smap_before as smap", text, flags=re.M)
        path.write_text(text)


def workloads(package: str) -> list[tuple[str, Callable[[], Any]]]:
    """``bench_overhead.WORKLOADS``, built with ``package`` as ``smap``."""
    source = (ROOT / "scripts" / "bench_overhead.py").read_text()
    module = types.ModuleType(f"bench_overhead_{package}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    code = source.replace("\nimport smap\n", f"\nimport {package} as smap\n")
    exec(compile(code, module.__name__, "exec"), module.__dict__)
    return module.WORKLOADS


def best_per_call(steps: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, float]:
    """The best per-call seconds of each step over ``rounds`` rounds, steps interleaved (order alternating)."""
    best = dict.fromkeys(steps, float("inf"))
    items = list(steps.items())
    for r in range(rounds):
        for name, step in items if r % 2 == 0 else items[::-1]:
            start = time.perf_counter()
            for _ in range(calls):
                out = step()
            jax.block_until_ready(out)
            best[name] = min(best[name], (time.perf_counter() - start) / calls)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the git commit of the code before")
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--calls", type=int, default=50, help="calls per round")
    parser.add_argument("--only", help="run only the workloads whose name contains this string")
    args = parser.parse_args(argv)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"jax {jax.__version__}, Python {sys.version.split()[0]}, load average {load}; before = {args.before}")
    print(f"best of {args.rounds} rounds of {args.calls} calls; ratio = smap / jax\n")
    with tempfile.TemporaryDirectory() as folder:
        export_before(args.before, pathlib.Path(folder))
        sys.path[:0] = [folder, str(ROOT)]
        now, before = workloads("smap"), workloads("smap_before")
        gc.disable()  # a collection inside one side's round would be charged to it
        for (name, build_now), (_, build_before) in zip(now, before):
            if args.only and args.only not in name:
                continue
            case_now, case_before = build_now(), build_before()
            for _ in range(3):  # compile and warm up
                case_now.ref_step(), case_now.smap_step(), case_before.smap_step()
            t = best_per_call(
                {"jax": case_now.ref_step, "before": case_before.smap_step, "now": case_now.smap_step},
                args.rounds,
                args.calls,
            )
            print(
                f"{name:22s} jax {t['jax'] * 1e6:8.2f} µs   before {t['before'] * 1e6:8.2f} "
                f"({t['before'] / t['jax']:.2f})   now {t['now'] * 1e6:8.2f} ({t['now'] / t['jax']:.2f})",
                flush=True,
            )
            gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
