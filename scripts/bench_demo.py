"""Examples per second of the demo's training step at several device and process counts.

    python scripts/bench_demo.py            # 1, 2, 4, 8 emulated devices; 1 and 2 processes
    python scripts/bench_demo.py --quick

Each configuration runs scripts/demo.py in a fresh process (devices are fixed
when JAX starts) and reports the throughput of its last epoch (the first one
includes compilation), next to the single-device jax.vmap run of the same
program in the same session.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys

DEMO = pathlib.Path(__file__).with_name("demo.py")

CONFIGS = [
    ("vmap, 1 device", ["--mapping", "vmap", "--devices", "1"]),
    ("shard_map, 1 device", ["--mapping", "shard_map", "--devices", "1"]),
    ("shard_map, 2 devices", ["--mapping", "shard_map", "--devices", "2"]),
    ("shard_map, 4 devices", ["--mapping", "shard_map", "--devices", "4"]),
    ("shard_map, 8 devices", ["--mapping", "shard_map", "--devices", "8"]),
    ("pmap, 8 devices", ["--mapping", "pmap", "--devices", "8"]),
    ("shard_map, 2 processes x 1 device", ["--processes", "2", "--devices", "1"]),
    ("shard_map, 2 processes x 4 devices", ["--processes", "2", "--devices", "4"]),
]


def run(options: list[str], epochs: int) -> tuple[float, float]:
    result = subprocess.run(
        [sys.executable, str(DEMO), *options, "--epochs", str(epochs)], capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise RuntimeError(f"demo {' '.join(options)} failed:\n{result.stdout}\n{result.stderr}")
    rates = re.findall(r"([\d,]+) examples/s", result.stdout)
    accuracy = float(re.search(r"test accuracy: (\S+)", result.stdout).group(1))
    return float(rates[-1].replace(",", "")), accuracy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs per configuration")
    args = parser.parse_args()
    epochs = 2 if args.quick else 4
    rows = []
    for name, options in CONFIGS:
        rate, accuracy = run(options, epochs)
        rows.append((name, rate, accuracy))
        print(f"{name:36s} {rate:>10,.0f} examples/s   test accuracy {accuracy:.3f}", flush=True)
    base = rows[0][1]
    print("\n| configuration | examples/s (last epoch) | vs vmap, 1 device | test accuracy |")
    print("|---|---:|---:|---:|")
    for name, rate, accuracy in rows:
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} | {accuracy:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
