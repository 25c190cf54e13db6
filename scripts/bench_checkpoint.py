"""Checkpoints: ``smap.checkpoint`` against Orbax's standard checkpointer, on the same sharded arrays.

Runs on 8 emulated CPU devices (set here, before JAX starts). Needs
``orbax-checkpoint`` installed (smap does not depend on it).

The states are model-like: four float32 matrices split over the rows of an
8-device ``('data',)`` mesh (70 % of the bytes), two replicated matrices
(25 %), 20 small replicated vectors, an int32 counter and a random key,
sized to ``--sizes`` MiB in all. Orbax saves the same arrays (a dict of
``jax.Array``) with ``ocp.StandardCheckpointer``. For each size, in rounds
that alternate which library goes first, it times:

* ``blocking save``: until the step is complete and durable
  (``save(..., wait=True)``; Orbax: ``save`` then ``wait_until_finished``);
* ``background save returns``: until control returns to the caller
  (``save(..., wait=False)``; Orbax: ``save``), then waits for both to finish;
* ``restore, same mesh / 8 -> 2 / 8 -> 1``: until every array is ready on
  the target mesh (smap writes into States placed there; Orbax restores an
  abstract tree of ``ShapeDtypeStruct``s with those shardings), from the page
  cache (``warm``) and with the checkpoint's files dropped from it first
  (``cold``: every file fsynced, then ``posix_fadvise(POSIX_FADV_DONTNEED)``);
* ``bytes on disk``: the sum of the sizes of the step's files.

A small round first warms both libraries up (imports, first compilations).

Every figure is the median over the rounds, with the ratio smap / Orbax
(below 1: smap is faster) and, per round, its min..max as a noise gauge.

    python scripts/bench_checkpoint.py --sizes 64 512 1536 --rounds 5 3 1
    python scripts/bench_checkpoint.py --sizes 1536 --rounds 3 --meshes 8   # restores onto the same mesh only
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import smap

RULES = {smap.ParamState: P("data")}
MiB = 1 << 20


def make_states(total: int, mesh: jax.sharding.Mesh, seed: int) -> dict[str, smap.State]:
    """States of about ``total`` bytes, placed on ``mesh`` (split by ``RULES``, the rest replicated)."""
    rng = np.random.default_rng(seed)
    cols = 1024
    split_rows = max(8, int(total * 0.70 / 4 / 4 / cols) // 8 * 8)
    repl_rows = max(1, int(total * 0.25 / 2 / 4 / cols))
    split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())

    def matrix(rows: int, sharding: NamedSharding) -> jax.Array:
        return jax.device_put(rng.standard_normal((rows, cols), np.float32), sharding)

    states: dict[str, smap.State] = {f"w{i}": smap.ParamState(matrix(split_rows, split)) for i in range(4)}
    states |= {f"moment{i}": smap.LongTermState(matrix(repl_rows, replicated)) for i in range(2)}
    states |= {
        f"bias{i}": smap.LongTermState(jax.device_put(rng.standard_normal(4096, np.float32), replicated))
        for i in range(20)
    }
    states["count"] = smap.State(jax.device_put(np.int32(seed), replicated))
    states["rng"] = smap.random.RandomState(seed)
    states["rng"].value = jax.device_put(states["rng"].value, replicated)
    return states


def placed_like(states: dict[str, smap.State], mesh: jax.sharding.Mesh) -> dict[str, smap.State]:
    """Zeroed states of the same shapes, placed on ``mesh`` as ``restore(..., mesh, rules=RULES)`` places them."""
    out = {}
    for name, state in states.items():
        spec = RULES.get(type(state), P())
        out[name] = type(state)(
            jax.device_put(np.zeros(state.value.shape, state.value.dtype), NamedSharding(mesh, spec))
        )
    return out


def abstract(states: dict[str, smap.State], mesh: jax.sharding.Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    return {
        name: jax.ShapeDtypeStruct(s.value.shape, s.value.dtype, sharding=NamedSharding(mesh, RULES.get(type(s), P())))
        for name, s in states.items()
    }


def drop_from_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(total: int, meshes: dict, work: Path, k: int, smap_first: bool) -> dict[str, tuple[float, float]]:
    import orbax.checkpoint as ocp

    states = make_states(total, jax.make_mesh((8,), ("data",)), seed=abs(k))
    arrays = {name: s.value for name, s in states.items()}
    orbax = ocp.StandardCheckpointer()
    smap_dir, orbax_dir = work / f"smap{k}", work / f"orbax{k}"
    figures: dict[str, dict[str, float]] = {}

    def pair(label: str, smap_fn, orbax_fn) -> None:
        runs = [("smap", smap_fn), ("orbax", orbax_fn)]
        for library, fn in runs if smap_first else runs[::-1]:
            figures.setdefault(label, {})[library] = fn()

    def smap_save() -> float:
        return timed(lambda: smap.checkpoint.save(smap_dir, states, step=1))

    def orbax_save() -> float:
        def run():
            orbax.save(orbax_dir / "1", arrays)
            orbax.wait_until_finished()

        return timed(run)

    pair("blocking save", smap_save, orbax_save)
    bytes_smap, bytes_orbax = disk_bytes(smap_dir / "step_00000001"), disk_bytes(orbax_dir / "1")

    def smap_background() -> float:
        start = time.perf_counter()
        pending = smap.checkpoint.save(smap_dir, states, step=2, wait=False)
        returned = time.perf_counter() - start
        pending.wait()
        return returned

    def orbax_background() -> float:
        start = time.perf_counter()
        orbax.save(orbax_dir / "2", arrays)
        returned = time.perf_counter() - start
        orbax.wait_until_finished()
        return returned

    pair("background save returns", smap_background, orbax_background)

    for cache in ("warm", "cold"):
        for where, mesh in meshes.items():
            target = placed_like(states, mesh)
            shapes = abstract(states, mesh)

            def smap_restore(target=target, mesh=mesh, cold=cache == "cold") -> float:
                if cold:
                    drop_from_cache(smap_dir)
                return timed(
                    lambda: jax.block_until_ready(
                        [smap.checkpoint.restore(smap_dir, target, mesh, step=1, rules=RULES)]
                        + [s.value for s in target.values()]
                    )
                )

            def orbax_restore(shapes=shapes, cold=cache == "cold") -> float:
                if cold:
                    drop_from_cache(orbax_dir)
                return timed(lambda: jax.block_until_ready(orbax.restore(orbax_dir / "1", shapes)))

            pair(f"restore, {where}, {cache}", smap_restore, orbax_restore)
            for name, state in target.items():  # every restore is exact
                np.testing.assert_array_equal(np.asarray(state.value), np.asarray(arrays[name]))
            del target
    orbax.close()
    shutil.rmtree(smap_dir)
    shutil.rmtree(orbax_dir)
    result = {label: (f["smap"], f["orbax"]) for label, f in figures.items()}
    result["bytes on disk"] = (bytes_smap, bytes_orbax)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 512, 1536], help="MiB of states per size")
    parser.add_argument("--rounds", type=int, nargs="+", default=[5, 3, 1], help="rounds per size (one per size)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument(
        "--meshes", nargs="+", choices=["8", "2", "1"], default=["8", "2", "1"], help="restore onto these device counts"
    )
    args = parser.parse_args()
    logging.getLogger("absl").setLevel(logging.ERROR)
    devices = jax.devices()
    names = {"8": "same mesh", "2": "8 -> 2", "1": "8 -> 1"}
    meshes = {names[n]: jax.make_mesh((int(n),), ("data",), devices=devices[: int(n)]) for n in args.meshes}
    print(f"jax {jax.__version__}, {len(devices)} CPU devices, {os.cpu_count()} cores")
    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir))
    try:
        one_round(4 * MiB, meshes, work, -1, smap_first=True)  # warm-up: first calls of both libraries
        for size, rounds in zip(args.sizes, args.rounds + [args.rounds[-1]] * len(args.sizes)):
            results = [one_round(size * MiB, meshes, work, k, smap_first=k % 2 == 0) for k in range(rounds)]
            print(f"\n{size} MiB of states, {rounds} round(s): median smap, median Orbax, smap / Orbax (min..max)")
            for label in results[0]:
                pairs = [r[label] for r in results]
                ratios = [a / b for a, b in pairs]
                smap_median, orbax_median = (statistics.median(x) for x in zip(*pairs))
                unit = (
                    (lambda v: f"{v / MiB:9.1f} MiB") if label == "bytes on disk" else (lambda v: f"{v * 1e3:9.1f} ms")
                )
                print(
                    f"  {label:30s} {unit(smap_median)} {unit(orbax_median)}   {smap_median / orbax_median:5.2f}x"
                    f"  ({min(ratios):.2f}..{max(ratios):.2f})"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
