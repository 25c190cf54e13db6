"""Save the states of a Module (or of a mapping of States) shard by shard, and restore them onto any mesh."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, SingleDeviceSharding

from .. import nn
from .._state import State, active_frames
from ..devices import placement
from . import _files

__all__ = ["CheckpointError", "save", "restore", "steps"]

FORMAT = "smap.checkpoint"
VERSION = 1

Ranges = tuple[tuple[int, int], ...]


class CheckpointError(Exception):
    """A checkpoint that cannot be saved or restored as asked; no state has changed."""


CheckpointError.__module__ = "smap.checkpoint"


# -- the target's states ------------------------------------------------------


def _states_of(target: Any, what: str) -> dict[str, State]:
    """The states of ``target`` by name; checkpoints are taken outside transforms only."""
    if active_frames():
        raise CheckpointError(f"{what} runs outside transforms (jit, grad, mappings): their states are being traced.")
    if isinstance(target, nn.Module):
        return target.states()
    if isinstance(target, Mapping):
        for name, state in target.items():
            if not isinstance(state, State):
                raise TypeError(f"target[{name!r}]: expected a State, got {type(state).__name__}.")
        return {str(name): state for name, state in target.items()}
    raise TypeError(f"target: expected a Module or a mapping from names to States, got {type(target).__name__}.")


def _leaves(state: State) -> tuple[list[tuple[str, jax.Array]], Any]:
    """The leaves of a state's value with their key paths (``''`` for a bare array), and its tree."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(state.peek())
    for path, x in leaves:
        if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
            raise CheckpointError(
                f"{state.describe()}: leaf {jax.tree_util.keystr(path)!r} is a {type(x).__name__}, not a "
                f"concrete array; save and restore outside transforms."
            )
    return [(jax.tree_util.keystr(path), x) for path, x in leaves], tree


def _type_name(state: State) -> str:
    return f"{type(state).__module__}.{type(state).__qualname__}"


def _is_key(x: jax.Array) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _signature(x: jax.Array) -> dict[str, Any]:
    """What a leaf must be to restore into: shape, dtype, and for typed keys the key implementation."""
    signature: dict[str, Any] = {"shape": list(x.shape), "dtype": str(x.dtype)}
    if _is_key(x):
        signature["key_impl"] = str(jax.random.key_impl(x))
    return signature


def _signature_text(signature: Mapping[str, Any]) -> str:
    impl = f" ({signature['key_impl']})" if "key_impl" in signature else ""
    return f"{signature['dtype']}[{','.join(map(str, signature['shape']))}]{impl}"


def _ranges(index: Any, shape: tuple[int, ...]) -> Ranges:
    """A tuple of slices (as in ``Shard.index``) as ``(start, stop)`` per dimension."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


# -- save --------------------------------------------------------------------


def _plan(data: jax.Array, prefix: str) -> tuple[list[dict], list[tuple[str, jax.Array]]]:
    """The distinct shards of ``data`` (one file each), and those this process writes.

    One device holds each distinct shard with ``replica_id == 0``; its
    process writes it. An array every process holds whole (not global)
    is written by process 0.
    """
    indices = sorted({_ranges(i, data.shape) for i in data.sharding.devices_indices_map(data.shape).values()})
    files = {ranges: f"{prefix}.{k}.npy" for k, ranges in enumerate(indices)}
    shards = [{"file": files[ranges], "index": [list(r) for r in ranges]} for ranges in indices]
    writes = []
    if not data.is_fully_addressable or jax.process_index() == 0:
        writes = [(files[_ranges(s.index, data.shape)], s.data) for s in data.addressable_shards if s.replica_id == 0]
    return shards, writes


def _barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save(directory: str | Path, target: Any, step: int, *, keep: int | None = None, overwrite: bool = False) -> None:
    """Save every state of ``target`` as checkpoint ``step`` of ``directory``.

    When it returns, the step is complete and on disk. It becomes visible
    only once complete, so an interrupted save never loads. Under
    ``jax.distributed`` every process calls ``save`` alike and writes only its
    own shards (the directory must be one that all processes share).

    Arguments:
        directory: where checkpoints live; created if missing.
        target: a Module, or a mapping from names to States.
        step: the step number (an int ``>= 0``); ``restore`` loads the highest by default.
        keep: keep only the ``keep`` highest steps (all by default).
        overwrite: replace the step if it exists (otherwise that is a :class:`CheckpointError`).

    Example:
        >>> import tempfile, jax.numpy as jnp, smap
        >>> directory = tempfile.mkdtemp()
        >>> w = smap.ParamState(jnp.arange(3.0))
        >>> smap.checkpoint.save(directory, {'w': w}, step=1)
        >>> smap.checkpoint.steps(directory)
        [1]
    """
    step = _check_step(step)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"save: keep must be None or a positive int, got {keep!r}.")
    directory = Path(directory)
    states = _states_of(target, "save")
    if not overwrite and step in _files.complete_steps(directory):
        raise CheckpointError(f"{directory}: step {step} exists; pass overwrite=True to replace it.")
    records, writes = _layout(states)

    partial = _files.partial_dir(directory, step)
    if jax.process_index() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        _files.sync_dir(directory.parent)
        if partial.exists():  # left by an interrupted save
            shutil.rmtree(partial)
        partial.mkdir()
    _barrier(f"smap.checkpoint.save {step}: started")
    written = _write_shards(partial, writes)
    _barrier(f"smap.checkpoint.save {step}: shards written")
    if jax.process_index() == 0:
        written.update(_checksums_of_others(partial))
        for record in records.values():
            for entry in record["leaves"]:
                for shard in entry["shards"]:
                    shard.update(written[shard["file"]])
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "processes": jax.process_count(),
            "states": records,
        }
        _files.write_durably(partial / _files.MANIFEST, json.dumps(manifest, indent=1).encode())
        _files.commit(partial, _files.step_dir(directory, step))
        if keep is not None:
            for old in _files.complete_steps(directory)[:-keep]:
                _files.remove(_files.step_dir(directory, old))
    _barrier(f"smap.checkpoint.save {step}: committed")


def _layout(states: Mapping[str, State]) -> tuple[dict, list[tuple[str, jax.Array]]]:
    """The manifest's records of ``states`` (checksums to come), and the shards this process writes."""
    records, writes = {}, []
    for i, (name, state) in enumerate(states.items()):
        leaves, _ = _leaves(state)
        entries = []
        for j, (path, x) in enumerate(leaves):
            signature = _signature(x)
            data = jax.random.key_data(x) if _is_key(x) else x
            if _is_key(x):
                signature.update(data_shape=list(data.shape), data_dtype=str(data.dtype))
            shards, mine = _plan(data, f"{i}.{j}")
            entries.append({"path": path, **signature, "shards": shards})
            writes.extend(mine)
        records[name] = {"type": _type_name(state), "leaves": entries}
    return records, writes


def _write_shards(partial: Path, writes: list[tuple[str, jax.Array]]) -> dict[str, dict]:
    """Write this process's shards durably; their checksums by file name.

    Processes other than 0 also leave them in ``process_<i>.json`` for process 0.
    """
    process = jax.process_index()
    written = {}
    for file, shard in writes:
        data = _files.encode(np.asarray(shard))
        _files.write_durably(partial / file, data)
        written[file] = {"sha256": _files.sha256(data), "process": process}
    if process > 0:
        _files.write_durably(partial / f"process_{process}.json", json.dumps(written).encode())
    _files.sync_dir(partial)
    return written


def _checksums_of_others(partial: Path) -> dict[str, dict]:
    """On process 0, once all have written: the checksums the other processes left (files removed)."""
    written = {}
    for p in range(1, jax.process_count()):
        record = partial / f"process_{p}.json"
        written.update(json.loads(record.read_bytes()))
        record.unlink()
    return written


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}.")
    return int(step)


def steps(directory: str | Path) -> list[int]:
    """The complete steps saved in ``directory``, in increasing order (``[]`` if none or no directory).

    Example:
        >>> import tempfile, smap
        >>> smap.checkpoint.steps(tempfile.mkdtemp())
        []
    """
    return _files.complete_steps(Path(directory))


# -- restore -----------------------------------------------------------------


def _find_step(directory: Path, step: int | None) -> int:
    available = _files.complete_steps(directory)
    if step is None:
        if not available:
            why = "it does not exist" if not directory.exists() else "it holds no complete step"
            raise CheckpointError(f"{directory}: no complete checkpoint to restore ({why}).")
        return available[-1]
    step = _check_step(step)
    if step not in available:
        raise CheckpointError(
            f"{directory}: step {step} was never saved completely; the complete steps are {available}."
        )
    return step


def _read_manifest(folder: Path) -> dict:
    path = folder / _files.MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("states"), dict):
            raise ValueError("not a manifest of smap.checkpoint")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot read the manifest ({error}).") from None
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: format version {manifest.get('version')}; this smap reads version {VERSION}.")
    return manifest


def _mismatches(saved: Mapping[str, dict], states: Mapping[str, State]) -> list[str]:
    """One line per state of the target or the checkpoint that does not match the other."""
    problems = [f"{name!r}: in the checkpoint, not in the target" for name in saved if name not in states]
    for name, state in states.items():
        record = saved.get(name)
        if record is None:
            problems.append(f"{name!r}: in the target, not in the checkpoint")
            continue
        if record["type"] != _type_name(state):
            problems.append(f"{name!r}: a {record['type']} in the checkpoint, a {_type_name(state)} in the target")
            continue
        leaves, _ = _leaves(state)
        saved_paths, paths = [entry["path"] for entry in record["leaves"]], [path for path, _ in leaves]
        if saved_paths != paths:  # (tree structures are compared by their leaves' key paths, which name them stably)
            problems.append(f"{name!r}: leaves {saved_paths} in the checkpoint, {paths} in the target")
            continue
        for (path, x), entry in zip(leaves, record["leaves"]):
            signature, expected = _signature(x), {k: entry[k] for k in ("shape", "dtype", "key_impl") if k in entry}
            if signature != expected:
                problems.append(
                    f"{name + path!r}: {_signature_text(expected)} in the checkpoint, "
                    f"{_signature_text(signature)} in the target"
                )
    return problems


def _placements(name: str, state: State, mesh: Any, mapping: Any, rules: Any) -> list[Any]:
    """The sharding each leaf of ``state`` is restored with (None: uncommitted, on the default device)."""
    leaves, _ = _leaves(state)
    if mesh is None and mapping is None:
        return [x.sharding if x.committed else None for _, x in leaves]
    try:
        return [placement(state, mesh, mapping, rules)] * len(leaves)
    except ValueError as error:
        raise CheckpointError(f"state {name!r} cannot be placed as asked: {error}") from None


def _read_shard(folder: Path, shard: dict, dtype: np.dtype, what: str) -> np.ndarray:
    path = folder / shard["file"]
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read a shard of {what} ({error.strerror}).") from None
    digest = _files.sha256(data)
    if digest != shard["sha256"]:
        raise CheckpointError(
            f"{path}: the shard of {what} is corrupted: its sha256 is {digest}, the manifest says {shard['sha256']}."
        )
    array = _files.decode(data, dtype)
    if list(array.shape) != [b - a for a, b in shard["index"]]:
        raise CheckpointError(
            f"{path}: the shard of {what} has shape {array.shape}, the manifest says {shard['index']}."
        )
    return array


def _overlap(a: Ranges, b: Ranges) -> tuple[tuple[int, int], ...] | None:
    both = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return both if all(lo < hi for lo, hi in both) else None


def _read_leaf(folder: Path, entry: dict, sharding: Any, what: str) -> jax.Array:
    """A leaf from the saved shards that overlap what this process's devices hold under ``sharding``."""
    shape = tuple(entry.get("data_shape", entry["shape"]))
    dtype = np.dtype(jnp.dtype(entry.get("data_dtype", entry["dtype"])))
    if sharding is None:
        wanted = {tuple((0, n) for n in shape)}
    else:
        if "key_impl" in entry and not isinstance(sharding, (NamedSharding, SingleDeviceSharding)):
            raise CheckpointError(
                f"{what}: a typed key array is restored onto a NamedSharding or one device, not {sharding}."
            )
        try:
            sharding.shard_shape(shape)
        except ValueError as error:
            raise CheckpointError(f"{what} cannot be placed as asked: {error}") from None
        wanted = {_ranges(i, shape) for i in sharding.addressable_devices_indices_map(shape).values()}
    saved = [(tuple(map(tuple, s["index"])), s) for s in entry["shards"]]
    pieces = [
        (ranges, _read_shard(folder, shard, dtype, what))
        for ranges, shard in saved
        if any(_overlap(ranges, w) is not None for w in wanted)
    ]
    regions = {}
    for want in wanted:
        region = np.empty([b - a for a, b in want], dtype)
        covered = 0
        for ranges, array in pieces:
            both = _overlap(ranges, want)
            if both is not None:
                region[tuple(slice(lo - w, hi - w) for (lo, hi), (w, _) in zip(both, want))] = array[
                    tuple(slice(lo - r, hi - r) for (lo, hi), (r, _) in zip(both, ranges))
                ]
                covered += math.prod(hi - lo for lo, hi in both)
        if covered != region.size:
            raise CheckpointError(f"{folder / _files.MANIFEST}: the shards of {what} do not cover its region {want}.")
        regions[want] = region
    if sharding is None:
        value = jax.device_put(regions.popitem()[1])
    else:
        value = jax.make_array_from_callback(shape, sharding, lambda index: regions[_ranges(index, shape)])
    if "key_impl" in entry:
        value = jax.random.wrap_key_data(value, impl=entry["key_impl"])
    return value


def _agree(error: BaseException | None) -> None:
    """Raise on every process if reading failed on any (a process may read files the others do not)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None)))
        if error is None and failed.any():
            raise CheckpointError(
                f"processes {np.flatnonzero(failed).tolist()} could not read the checkpoint; see their errors."
            )
    if error is not None:
        raise error


def restore(
    directory: str | Path,
    target: Any,
    mesh: Any = None,
    step: int | None = None,
    rules: Any = None,
    *,
    mapping: Any = None,
) -> int:
    """Load checkpoint ``step`` of ``directory`` into the states of ``target``, in place.

    Each state is placed as :func:`sharding.place` places it: on ``mesh``, with
    ``rules`` (``{selector: PartitionSpec}``) or replicated; with ``mapping`` (a
    ``StatefulMapping`` on a mesh), batched states are split over its lane axes.
    Without ``mesh`` and ``mapping`` each state keeps the placement its value
    has now. The mesh and process count that saved the step do not matter.
    Every process reads only the shards its devices hold.

    Arguments:
        directory: where :func:`save` wrote the checkpoints.
        target: a Module, or a mapping from names to States, with the same
            names, state types, shapes and dtypes as the saved one.
        mesh: the mesh to place the states on (``None``: where they are now).
        step: the step to load (``None``: the highest complete one).
        rules: placement rules, as :func:`sharding.place` takes them.
        mapping: place batched states as this mapping splits them.

    Returns:
        The step loaded.

    Raises:
        CheckpointError: no complete checkpoint, a step never saved, a target
            that does not match (every mismatched state named), a corrupted or
            missing file. No state has changed then.

    Example:
        >>> import tempfile, jax.numpy as jnp, smap
        >>> directory = tempfile.mkdtemp()
        >>> w = smap.ParamState(jnp.arange(3.0))
        >>> smap.checkpoint.save(directory, {'w': w}, step=7)
        >>> w.value = jnp.zeros(3)
        >>> smap.checkpoint.restore(directory, {'w': w})
        7
        >>> w.value
        Array([0., 1., 2.], dtype=float32)
    """
    if rules is not None and mesh is None and mapping is None:
        raise ValueError("restore: rules place states on a mesh; give mesh= (or mapping=) too.")
    directory = Path(directory)
    states = _states_of(target, "restore")
    step = _find_step(directory, step)
    folder = _files.step_dir(directory, step)
    saved = _read_manifest(folder)["states"]
    problems = _mismatches(saved, states)
    if problems:
        raise CheckpointError(
            f"{folder}: the target does not match the checkpoint ({len(problems)} states):\n  " + "\n  ".join(problems)
        )
    placements = {name: _placements(name, state, mesh, mapping, rules) for name, state in states.items()}
    values, error = {}, None
    try:
        for name, state in states.items():
            _, tree = _leaves(state)
            read = [
                _read_leaf(folder, entry, sharding, f"state {name + entry['path']!r}")
                for entry, sharding in zip(saved[name]["leaves"], placements[name])
            ]
            values[name] = jax.tree_util.tree_unflatten(tree, read)
    except Exception as caught:  # every process must learn of it: see _agree
        error = caught
    _agree(error)
    for name, state in states.items():
        state.write_back(values[name])
    return step
