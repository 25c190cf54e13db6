"""Save the states of a Module (or of a mapping of States) shard by shard, and restore them onto any mesh."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from .. import _compat, nn
from .._state import State, active_frames
from ..devices import placement
from . import _files, _io

__all__ = ["CheckpointError", "PendingSave", "save", "restore", "steps"]

FORMAT = "smap.checkpoint"
VERSION = 2

Ranges = tuple[tuple[int, int], ...]
ShardKey = tuple[str, Ranges]  # '<state>/<leaf>' and the shard's index ranges


def _key(leaf: str, index: Any) -> ShardKey:
    return leaf, tuple((int(a), int(b)) for a, b in index)


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


def _plan(data: jax.Array) -> tuple[list[dict], list[tuple[Ranges, jax.Array]]]:
    """The distinct shards of ``data`` (their index ranges), and those this process writes.

    One device holds each distinct shard with ``replica_id == 0``; its
    process writes it. An array every process holds whole (not global)
    is written by process 0.
    """
    indices = sorted({_ranges(i, data.shape) for i in data.sharding.devices_indices_map(data.shape).values()})
    shards = [{"index": [list(r) for r in ranges]} for ranges in indices]
    writes = []
    if not data.is_fully_addressable or jax.process_index() == 0:
        writes = [(_ranges(s.index, data.shape), s.data) for s in data.addressable_shards if s.replica_id == 0]
    return shards, writes


def _barrier(name: str) -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class PendingSave:
    """A save that goes on in the background (``save(..., wait=False)``): ``wait()`` for it, or ask ``done()``.

    Example:
        >>> import tempfile, jax.numpy as jnp, smap
        >>> directory = tempfile.mkdtemp()
        >>> w = smap.ParamState(jnp.arange(3.0))
        >>> pending = smap.checkpoint.save(directory, {'w': w}, step=1, wait=False)
        >>> w.value = w.value + 1  # the checkpoint keeps the value of the call
        >>> pending.wait()
        >>> pending.done(), smap.checkpoint.steps(directory)
        (True, [1])
    """

    def __init__(self, directory: Path, step: int, work: Any) -> None:
        self.directory, self.step = directory, step
        self._error: BaseException | None = None
        self._observed = False
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"smap.checkpoint {step}")
        self._thread.start()

    def _run(self, work: Any) -> None:
        try:
            work()
        except BaseException as error:  # kept for wait(): the thread has no caller to raise to
            self._error = error

    def done(self) -> bool:
        """Whether the save has finished (committed, or failed: then ``wait`` raises).

        Example:
            >>> import tempfile, time, jax.numpy as jnp, smap
            >>> pending = smap.checkpoint.save(tempfile.mkdtemp(), {'w': smap.State(jnp.ones(2))}, step=0, wait=False)
            >>> while not pending.done():
            ...     time.sleep(0.01)
            >>> pending.wait()  # finished: returns at once, raising if the save failed
        """
        return not self._thread.is_alive()

    def wait(self) -> None:
        """Block until the step is committed and durable; raise :class:`CheckpointError` if the save failed.

        Example:
            >>> import tempfile, jax.numpy as jnp, smap
            >>> directory = tempfile.mkdtemp()
            >>> pending = smap.checkpoint.save(directory, {'w': smap.State(jnp.ones(2))}, step=3, wait=False)
            >>> pending.wait()
            >>> smap.checkpoint.steps(directory)
            [3]
        """
        self._thread.join()
        self._observed = True
        if self._error is not None:
            raise _failure(self.directory, self.step, self._error) from self._error


def _failure(directory: Path, step: int, error: BaseException) -> CheckpointError:
    if isinstance(error, CheckpointError):
        return error
    return CheckpointError(f"{directory}: saving step {step} failed ({type(error).__name__}: {error}).")


_pending: dict[Path, PendingSave] = {}  # the last background save of each directory, in this process
_pending_lock = threading.Lock()


@atexit.register
def _finish_pending() -> None:
    """At exit (the interpreter has joined the saves' threads, which are not daemons), print unseen failures."""
    for pending in list(_pending.values()):
        pending._thread.join()
        if pending._error is not None and not pending._observed:
            error = _failure(pending.directory, pending.step, pending._error)
            print(f"smap.checkpoint: a background save failed: {error}", file=sys.stderr)


def _busy_steps(directory: Path) -> list[int]:
    with _pending_lock:
        pending = _pending.get(directory)
    return [] if pending is None or pending.done() else [pending.step]


def save(
    directory: str | Path,
    target: Any,
    step: int,
    *,
    keep: int | None = None,
    overwrite: bool = False,
    wait: bool = True,
) -> PendingSave | None:
    """Save every state of ``target`` as checkpoint ``step`` of ``directory``.

    With ``wait=True``, when it returns the step is complete and on disk.
    With ``wait=False`` it returns once the values are taken (on the CPU
    without a copy, from an accelerator copied to the host): the states may
    change, be written or donated at once, the checkpoint holds their values
    of the call. The files are written in the background; the returned
    :class:`PendingSave` tells when the step is committed. One background save
    per directory goes on at a time (the next ``save`` waits for it), and the
    process waits for them at exit. A step becomes visible only once
    complete, so an interrupted save never loads, and an interrupted
    overwrite leaves the old step or the new one. Under ``jax.distributed``
    every process calls ``save`` alike and writes only its own shards (the
    directory must be one that all processes share).

    Arguments:
        directory: where checkpoints live; created if missing.
        target: a Module, or a mapping from names to States.
        step: the step number (an int ``>= 0``); ``restore`` loads the highest by default.
        keep: keep only the ``keep`` highest steps (all by default).
        overwrite: replace the step if it exists (otherwise that is a :class:`CheckpointError`).
        wait: finish the save before returning (otherwise return a :class:`PendingSave`).

    Raises:
        CheckpointError: the step exists (without ``overwrite``), ``directory``
            is a file, or writing it failed (with ``wait=False``: raised by ``PendingSave.wait``).

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
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"save: {directory} is a file, not a directory of checkpoints.")
    states = _states_of(target, "save")
    records, writes = _layout(states)
    with _pending_lock:
        previous = _pending.get(directory)
    if previous is not None:  # one background save per directory at a time
        previous._thread.join()
    if not overwrite and step in _files.complete_steps(directory):
        raise CheckpointError(f"{directory}: step {step} exists; pass overwrite=True to replace it.")
    for _, shard in writes:
        shard.copy_to_host_async()
    pieces = [(key, np.asarray(shard)) for key, shard in writes]  # the snapshot (no copy on the CPU)

    process, partial = jax.process_index(), _files.partial_dir(directory, step)
    lock = contextlib.ExitStack()
    try:
        if process == 0:
            directory.mkdir(parents=True, exist_ok=True)
            _files.sync_dir(directory.parent)
            lock.enter_context(_files.step_lock(directory, step))
            _files.clean(directory, busy=[step])
            _files.clean_step(directory, step)
            token = uuid.uuid4().hex
            partial.mkdir()
            (partial / _TOKEN).write_text(token)
        _barrier(f"smap.checkpoint.save {step}: started")
        if process > 0:
            token = (partial / _TOKEN).read_text()
    except BaseException:
        lock.close()
        raise

    def work() -> None:
        with lock:
            try:
                _write_part(directory, step, token, records, pieces, keep)
            except BaseException as error:
                with contextlib.suppress(OSError):
                    (partial / f"failed_{process}").write_text(f"{type(error).__name__}: {error}")
                raise

    if wait:
        try:
            work()
        except Exception as error:
            raise _failure(directory, step, error) from error
        return None
    _io.start_workers()  # now: a thread cannot be started once the interpreter exits
    pending = PendingSave(directory, step, work)
    with _pending_lock:
        _pending[directory] = pending
    return pending


_TOKEN = "save_id"
_PEER_TIMEOUT = 600.0  # seconds a process waits for the others' parts of a save


def _write_part(
    directory: Path, step: int, token: str, records: dict, pieces: list[tuple[ShardKey, np.ndarray]], keep: int | None
) -> None:
    """Write this process's shards; process 0 then writes the manifest once every part is on disk, and commits."""
    process, processes = jax.process_index(), jax.process_count()
    partial, final = _files.partial_dir(directory, step), _files.step_dir(directory, step)
    file = f"data_{process}.bin"
    placed = _io.write_pieces(partial / file, [_bytes_of(array) for _, array in pieces])
    written: dict[ShardKey, dict[str, Any]] = {
        key: {
            "file": file,
            "offset": offset,
            "nbytes": nbytes,
            "sha256": digest,
            "process": process,
        }
        for (key, _), (offset, nbytes, digest) in zip(pieces, placed)
    }
    if process > 0:
        part = partial / f"process_{process}.json"
        _files.write_durably(part.with_suffix(".tmp"), json.dumps([[list(k), v] for k, v in written.items()]).encode())
        os.rename(part.with_suffix(".tmp"), part)
        _await(directory, step, lambda: not partial.exists(), "process 0 to commit it")
        manifest = _read_manifest(final)
        if manifest.get("save_id") != token:
            raise CheckpointError(f"{final}: process 0 did not commit this save.")
        return
    _files.sync_dir(partial)
    for p in range(1, processes):
        part = partial / f"process_{p}.json"
        _await(directory, step, part.exists, f"process {p} to write its shards")
        written.update({_key(*k): v for k, v in json.loads(part.read_bytes())})
        part.unlink()
    for name, record in records.items():
        for j, entry in enumerate(record["leaves"]):
            for shard in entry["shards"]:
                shard.update(written[_key(f"{name}/{j}", shard["index"])])
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "processes": processes,
        "save_id": token,
        "states": records,
    }
    (partial / _TOKEN).unlink()
    _files.write_durably(partial / _files.MANIFEST, json.dumps(manifest, indent=1).encode())
    _files.commit(partial, final)
    if keep is not None:
        for old in _files.complete_steps(directory)[:-keep]:
            _files.remove(_files.folder_of(directory, old))


def _bytes_of(array: np.ndarray) -> np.ndarray:
    """The bytes of ``array`` in C order, without a copy when it is contiguous (any dtype, ``bfloat16`` too)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _await(directory: Path, step: int, condition: Any, what: str) -> None:
    """Poll the shared directory until ``condition()``; raise if another process's part failed, or on time-out."""
    partial, deadline, delay = _files.partial_dir(directory, step), time.monotonic() + _PEER_TIMEOUT, 0.001
    while not condition():
        for failed in partial.glob("failed_*"):
            raise CheckpointError(
                f"{directory}: saving step {step} failed in process {failed.name.removeprefix('failed_')}: "
                f"{failed.read_text()}"
            )
        if time.monotonic() > deadline:
            raise CheckpointError(f"{directory}: saving step {step}: waited {_PEER_TIMEOUT:.0f} s for {what}.")
        time.sleep(delay)
        delay = min(2 * delay, 0.05)


def _layout(states: Mapping[str, State]) -> tuple[dict, list[tuple[ShardKey, jax.Array]]]:
    """The manifest's records of ``states`` (files and checksums to come), and the shards this process writes.

    A shard to write is keyed by ``'<state>/<leaf>'`` and its index ranges.
    """
    records: dict[str, dict] = {}
    writes: list[tuple[ShardKey, jax.Array]] = []
    for name, state in states.items():
        leaves, _ = _leaves(state)
        entries = []
        for j, (path, x) in enumerate(leaves):
            signature = _signature(x)
            data = jax.random.key_data(x) if _is_key(x) else x
            if _is_key(x):
                signature.update(data_shape=list(data.shape), data_dtype=str(data.dtype))
            shards, mine = _plan(data)
            entries.append({"path": path, **signature, "shards": shards})
            writes.extend((_key(f"{name}/{j}", ranges), shard) for ranges, shard in mine)
        records[name] = {"type": _type_name(state), "leaves": entries}
    return records, writes


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
            why = (
                "it does not exist"
                if not directory.exists()
                else "it is a file, not a directory"
                if not directory.is_dir()
                else "it holds no complete step"
            )
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
        return jax.tree_util.tree_leaves(placement(state, mesh, mapping, rules))  # one per leaf
    except ValueError as error:
        raise CheckpointError(f"state {name!r} cannot be placed as asked: {error}") from None


def _read_shard(
    folder: Path, fds: Mapping[str, int], shard: dict, dtype: np.dtype, what: str, into: np.ndarray | None = None
) -> np.ndarray:
    """One saved shard, read into ``into`` or a new array (in one of ``_io.parallel``'s threads), its sha256 checked."""
    path = folder / shard["file"]
    array = np.empty([b - a for a, b in shard["index"]], dtype) if into is None else into
    if array.nbytes != shard["nbytes"]:
        raise CheckpointError(f"{path}: the shard of {what} has {shard['nbytes']} bytes, its index {shard['index']}.")
    try:
        digest = _io.read_piece(fds[shard["file"]], shard["offset"], array.reshape(-1).view(np.uint8))
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read a shard of {what} ({error.strerror}).") from None
    if digest != shard["sha256"]:
        raise CheckpointError(
            f"{path}: the shard of {what} is corrupted: its sha256 is {digest}, the manifest says {shard['sha256']}."
        )
    return array


def _overlap(a: Ranges, b: Ranges) -> tuple[tuple[int, int], ...] | None:
    both = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
    return both if all(lo < hi for lo, hi in both) else None


class _Reader:
    """Collects the shards a restore needs, then reads them in parallel, each file opened once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fds: dict[str, int] = {}
        self.tasks: dict[tuple[str, int, int], Any] = {}
        self.arrays: dict[tuple[str, int, int], np.ndarray] = {}

    def read(self, shard: dict, dtype: np.dtype, what: str, into: np.ndarray | None = None) -> tuple[str, int, int]:
        """Ask for ``shard``, into ``into`` (a C-contiguous view) or a new array; ``self.arrays[key]`` after ``run``."""
        file = shard["file"]
        if file not in self.fds:
            try:
                self.fds[file] = os.open(self.folder / file, os.O_RDONLY)
            except OSError as error:
                raise CheckpointError(
                    f"{self.folder / file}: cannot read a shard of {what} ({error.strerror})."
                ) from None
        key = (file, shard["offset"], 0 if into is None else id(into))
        self.tasks.setdefault(key, functools.partial(_read_shard, self.folder, self.fds, shard, dtype, what, into))
        return key

    def run(self) -> None:
        self.arrays = dict(zip(self.tasks, _io.parallel(list(self.tasks.values()))))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _rows_of(ranges: Ranges, want: Ranges) -> bool:
    """Whether the shard ``ranges`` is a block of whole rows of the region ``want`` (read straight into it)."""
    return not want or (want[0][0] <= ranges[0][0] and ranges[0][1] <= want[0][1] and ranges[1:] == want[1:])


def _leaf_reads(reader: _Reader, entry: dict, sharding: Any, what: str) -> Any:
    """Plan the reads of the saved shards that overlap what this process's devices hold under ``sharding``.

    A shard that is whole rows of a device's region is read straight into
    it; others are read whole and the overlap copied. Returns a function
    that builds the leaf once ``reader.run()`` has read them.
    """
    shape = tuple(entry.get("data_shape", entry["shape"]))
    dtype = np.dtype(jnp.dtype(entry.get("data_dtype", entry["dtype"])))
    if sharding is None:
        wanted = {tuple((0, n) for n in shape)}
    else:
        if "key_impl" in entry and not (
            isinstance(sharding, NamedSharding) or _compat.is_single_device_sharding(sharding)
        ):
            raise CheckpointError(
                f"{what}: a typed key array is restored onto a NamedSharding or one device, not {sharding}."
            )
        try:
            sharding.shard_shape(shape)
        except ValueError as error:
            raise CheckpointError(f"{what} cannot be placed as asked: {error}") from None
        wanted = {_ranges(i, shape) for i in sharding.addressable_devices_indices_map(shape).values()}
    saved = [(tuple(map(tuple, s["index"])), s) for s in entry["shards"]]
    regions, copies = {}, []
    for want in wanted:
        region = regions[want] = _io.empty([b - a for a, b in want], dtype)  # on a page: no copy onto a CPU
        covered = 0
        for ranges, shard in saved:
            both = _overlap(ranges, want)
            if both is None:
                continue
            covered += math.prod(hi - lo for lo, hi in both)
            if _rows_of(ranges, want):
                rows = region[ranges[0][0] - want[0][0] : ranges[0][1] - want[0][0]] if want else region
                reader.read(shard, dtype, what, into=rows)
            else:
                copies.append((region, want, ranges, both, reader.read(shard, dtype, what)))
        if covered != region.size:
            raise CheckpointError(f"{reader.folder / _files.MANIFEST}: the shards of {what} do not cover {want}.")

    def build() -> jax.Array:
        for region, want, ranges, both, key in copies:
            region[tuple(slice(lo - w, hi - w) for (lo, hi), (w, _) in zip(both, want))] = reader.arrays[key][
                tuple(slice(lo - r, hi - r) for (lo, hi), (r, _) in zip(both, ranges))
            ]
        if sharding is None:
            value = jax.device_put(regions.popitem()[1])
        else:
            value = jax.make_array_from_callback(shape, sharding, lambda index: regions[_ranges(index, shape)])
        if "key_impl" in entry:
            value = jax.random.wrap_key_data(value, impl=entry["key_impl"])
        return value

    return build


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
    directory = Path(directory).absolute()
    states = _states_of(target, "restore")
    if jax.process_index() == 0:
        _files.clean(directory, busy=_busy_steps(directory))
    step = _find_step(directory, step)
    folder = _files.folder_of(directory, step)
    saved = _read_manifest(folder)["states"]
    problems = _mismatches(saved, states)
    if problems:
        raise CheckpointError(
            f"{folder}: the target does not match the checkpoint ({len(problems)} states):\n  " + "\n  ".join(problems)
        )
    placements = {name: _placements(name, state, mesh, mapping, rules) for name, state in states.items()}
    values, error = {}, None
    reader = _Reader(folder)
    try:
        builds = {
            name: [
                _leaf_reads(reader, entry, sharding, f"state {name + entry['path']!r}")
                for entry, sharding in zip(saved[name]["leaves"], placements[name])
            ]
            for name in states
        }
        reader.run()
        for name, state in states.items():
            _, tree = _leaves(state)
            values[name] = jax.tree_util.tree_unflatten(tree, [build() for build in builds[name]])
    except Exception as caught:  # every process must learn of it: see _agree
        error = caught
    finally:
        reader.close()
    _agree(error)
    for name, state in states.items():
        state.write_back(values[name])
    return step
