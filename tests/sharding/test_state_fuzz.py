"""A fuzzer of stateful programs: every mapping function and device count gives plain JAX's values.

``test_differential.py`` runs programs we wrote on every mapping function and
layout; this file draws programs we did not write. Each seed draws a lane over
8 lanes from a small grammar:

- the argument: mapped along axis 0 or 1;
- states: a batched ``HiddenState`` (lanes along axis 0 or 1, or none), a
  shared ``ParamState`` read by every lane and, or not, written with a
  lane-invariant update (after a ``pmean``), a shared step counter, and draws
  from ``smap.random`` (or none);
- 2 to 5 steps: ``tanh``, ``pmean``, ``psum``, ``pmax``, ``pmin``,
  ``all_gather``, ``axis_index``, ``ppermute``, ``all_to_all``, a draw, a ``cond`` on a lane-dependent
  predicate (with or without a collective in its branches), a ``scan`` (with
  or without one), a ``fori_loop``, a ``while_loop`` whose trip count
  differs between lanes around a ``switch``, a sort with a lane-dependent
  slice and scatter, the gradient of a function of the lane's value with
  respect to the shared weight (``smap.grad`` in the lane; or through
  ``jax.checkpoint`` and a ``jax.custom_vjp`` that clips its cotangent), a
  mapping nested in the lane over the value's elements (``smap.vmap``, with a
  ``psum`` over them);
- outputs: the lane's value (mapped along axis 0 or 1) and a lane-invariant
  ``psum`` (``out_axes=None``);
- a buffer State, or none, that each lane writes with its value and never
  reads: selected by ``state_out_axes`` at axis 0 or 1, or left to the
  unexpected-write policy ``'ignore'`` or ``'warn'`` (axis 0; ``'warn'`` warns
  at a mapping's first call);
- the mapping called as it is or inside ``smap.jit``, given only the
  argument or also a Module that holds the States (as Flax NNX passes one);
- the written states donated to the program (``donate_states``), or not;
- a call that fails (an argument whose rows do not fit the weight) before the
  second call, or none: it raises, and every State, the default key included,
  holds the value it had before it;
- the States saved with ``smap.checkpoint`` after the first call, overwritten
  and restored, or not: each holds its value again, placed where it was;
- the shared weight's State backed by a ``jax.Ref`` (where JAX has them), or
  not;
- the States (but the buffer) written as the lane returns, or inside a
  ``jax.lax.scan`` or a ``cond`` of the lane (drawn from a stream of its
  own).

The reference is the same lane in plain JAX: ``jax.vmap`` with the states passed
explicitly, each lane drawing from its key as ``smap.random`` splits it (lane
``i`` holds ``split(key, 8)[i]``, and a draw splits the lane's key). The
program under test keeps its values in smap States and is mapped by
``smap.StatefulMapping``, under ``jax.vmap`` and under a strategy that rotates
with the seed (the sharding adapters on 1, 2, 4 and 8 devices and on a 4 x 2
mesh, ``jax.pmap``, ``jax.shard_map``, ``jax.smap``, meshes of Auto and
Explicit axes), and with its first call under that strategy and its second
under the next one (the States move between the two's devices). Two
consecutive calls: every output, State and the default key must equal the
reference's to float32 round-off (2e-5, widened where the program amplifies
round-off: see :func:`sensitivity`).

A fixed set of seeds runs in CI; ``SMAP_FUZZ_PROGRAMS=N`` runs seeds ``0..N-1``
instead (``SMAP_FUZZ_START`` shifts them), as for the other fuzzers.
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mapping_helpers import fuzz_groups

import sharding
import smap
from smap.filter import OfType, WithTag

AXIS = "batch"
B = 8  # lanes: 1, 2, 4 and 8 devices divide them
STEPS = (
    "tanh",
    "pmean",
    "psum",
    "pmax",
    "pmin",
    "all_gather",
    "axis_index",
    "ppermute",
    "all_to_all",
    "draw",
    "cond",
    "cond_collective",
    "scan",
    "scan_collective",
    "fori",
    "while_switch",
    "sort_index",
    "grad",
    "grad_remat",
    "nested",
)
# The buffer State: none, written back by the unexpected-write policy, or selected by state_out_axes at an axis.
BUFFERS = (None, "ignore", "warn", 0, 1)
# Where the lane writes its States: as it returns, or inside a jax.lax.scan or cond of its own.
WRITES_IN = ("the lane", "scan", "cond")


def _buffer_axis(buffer: str | int | None) -> int:
    """The axis the lanes' buffer rows are written back along."""
    return buffer if isinstance(buffer, int) else 0


def _mesh(shape: tuple[int, ...], explicit: bool = False) -> Any:
    names = ("data", "model")[: len(shape)]
    kind = jax.sharding.AxisType.Explicit if explicit else jax.sharding.AxisType.Auto
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(shape), devices=jax.devices()[: int(np.prod(shape))])


# strategy -> () -> (mapping_fn, mapping_kwargs)
STRATEGIES: dict[str, Callable[[], tuple[Callable, dict]]] = {
    **{
        f"sharding.shard_map-{n}dev": lambda n=n: (sharding.shard_map(_mesh((n,)), axis="data"), {})
        for n in (1, 2, 4, 8)
    },
    **{f"sharding.pmap-{n}dev": lambda n=n: (sharding.pmap(jax.devices()[:n]), {}) for n in (1, 2, 4, 8)},
    "sharding.shard_map-4x2-data": lambda: (sharding.shard_map(_mesh((4, 2)), axis="data"), {}),
    "sharding.shard_map-4x2-data+model": lambda: (sharding.shard_map(_mesh((4, 2)), axis=("data", "model")), {}),
    "jax.pmap": lambda: (jax.pmap, {}),
    "jax.pmap-2dev": lambda: (functools.partial(jax.pmap, devices=jax.devices()[:2]), {}),
    "jax.shard_map-4dev": lambda: (jax.shard_map, {"mesh": _mesh((4,))}),
    "jax.shard_map-explicit-8dev": lambda: (jax.shard_map, {"mesh": _mesh((8,), explicit=True)}),
    "sharding.shard_map-explicit-2dev": lambda: (sharding.shard_map(_mesh((2,), explicit=True), axis="data"), {}),
    "jax.smap-explicit-4dev": lambda: (jax.smap, {"mesh": _mesh((4,), explicit=True), "axis_name": "data"}),
}


@dataclasses.dataclass
class Program:
    """A drawn program: its choices, initial values, the two calls' arguments, and its lane."""

    seed: int
    choices: dict[str, Any]
    w: np.ndarray  # the shared weight, (d,)
    h: np.ndarray | None  # the batched state, lanes along choices["h_axis"]
    xs: tuple[np.ndarray, np.ndarray]  # the two calls' arguments, lanes along choices["x_axis"]
    lane: Callable  # (w, count, h_row, x_row, tools) -> (out, total, w, count, h_row, buffer_row)

    def __str__(self) -> str:
        return f"seed {self.seed}: " + ", ".join(f"{k}={v}" for k, v in self.choices.items())


@dataclasses.dataclass(frozen=True)
class Tools:
    """What a lane's steps call that plain JAX and smap spell differently."""

    normal: Callable  # normal(shape): a draw
    grad_w: Callable  # grad_w(f, w, v): the gradient of f(w, v) with respect to the shared weight w
    vmap: Callable  # jax.vmap or smap.vmap


@jax.custom_vjp
def _clipped_cotangent(u: jax.Array) -> jax.Array:
    """The identity, whose cotangent is clipped to [-0.1, 0.1] (a rule JAX cannot derive)."""
    return u


_clipped_cotangent.defvjp(lambda u: (u, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))


def _step(kind: str, v: jax.Array, w: jax.Array, x: jax.Array, tools: Tools) -> jax.Array:
    """One step of a lane: ``v`` (the lane's value, shape (d,)) after ``kind``."""
    if kind == "tanh":
        return jnp.tanh(v * w + 0.1)
    if kind == "pmean":
        return v - jax.lax.pmean(v, AXIS)
    if kind == "psum":
        return v + 0.1 * jax.lax.psum(v, AXIS)
    if kind == "pmax":
        return v - jax.lax.pmax(v, AXIS)
    if kind == "pmin":
        return v - jax.lax.pmin(v, AXIS)
    if kind == "all_gather":
        gathered = jax.lax.all_gather(v, AXIS)  # (lanes, d)
        return v + 0.1 * jnp.sum(gathered * jnp.arange(1.0, B + 1)[:, None], axis=0)
    if kind == "axis_index":
        return v + 0.01 * jax.lax.axis_index(AXIS)
    if kind == "ppermute":
        return v + 0.5 * jax.lax.ppermute(v, AXIS, [(i, (i + 3) % B) for i in range(B)])
    if kind == "all_to_all":
        rows = jnp.outer(jnp.arange(1.0, B + 1), v) + jnp.sin(jnp.arange(float(B)))[:, None]  # row i goes to lane i
        received = jax.lax.all_to_all(rows, AXIS, 0, 0)  # row j came from lane j
        return v + 0.1 * jnp.sum(received * jnp.arange(1.0, B + 1)[:, None], axis=0) / B
    if kind == "draw":
        return v + 0.1 * tools.normal(v.shape)
    if kind in ("cond", "cond_collective"):
        inner = (lambda u: u - jax.lax.pmean(u, AXIS)) if kind == "cond_collective" else (lambda u: u)
        return jax.lax.cond(jnp.sum(x) > 0, lambda u: inner(u * 2.0), lambda u: inner(1.0 - u), v)
    if kind in ("scan", "scan_collective"):

        def body(c: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
            c = jnp.tanh(c * w) + 0.1 * t
            return (c - jax.lax.pmean(c, AXIS) if kind == "scan_collective" else c), jnp.sum(c)

        v, _ = jax.lax.scan(body, v, jnp.arange(3.0))
        return v
    if kind == "fori":
        return jax.lax.fori_loop(0, 2, lambda i, u: 0.5 * u + x * i, v)
    if kind == "while_switch":
        trips = jnp.where(jnp.sum(x) > 0, 3, 1)  # differs between lanes

        def turn(c: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
            i, u = c
            return i + 1, jax.lax.switch(i % 3, [jnp.sin, jnp.cos, lambda a: 0.5 * a * w], u)

        return jax.lax.while_loop(lambda c: c[0] < trips, turn, (0, v))[1]
    if kind == "sort_index":
        at = jnp.argmax(x)  # differs between lanes
        shifted = jax.lax.dynamic_slice(jnp.concatenate([v, v]), (at,), v.shape)
        return (jnp.sort(v) + 0.5 * shifted).at[at].add(jnp.max(v))
    if kind == "grad":
        return v + 0.1 * tools.grad_w(lambda w, u: jnp.sum(jnp.tanh(w * u) ** 2), w, v)
    if kind == "grad_remat":
        remat = jax.checkpoint(lambda a: jnp.sin(_clipped_cotangent(a)))
        return v + tools.grad_w(lambda w, u: jnp.sum(remat(w * u) ** 2), w, v)
    if kind == "nested":
        return tools.vmap(lambda e: jnp.tanh(e) + 0.1 * jax.lax.psum(e, "inner"), axis_name="inner")(v)
    raise ValueError(kind)


def draw(seed: int) -> Program:
    rng = np.random.default_rng(seed)
    d = int(rng.integers(2, 5))
    choices = {
        "d": d,
        "x_axis": int(rng.integers(0, 2)),
        "h_axis": [None, 0, 1][int(rng.integers(0, 3))],
        "write_w": bool(rng.integers(0, 2)),
        "counter": bool(rng.integers(0, 2)),
        "out_axis": int(rng.integers(0, 2)),
        "steps": [STEPS[i] for i in rng.integers(0, len(STEPS), int(rng.integers(2, 6)))],
        "buffer": BUFFERS[int(rng.integers(0, len(BUFFERS)))],
        "in_jit": bool(rng.integers(0, 2)),
        "donate": bool(rng.integers(0, 2)),
        "fail": bool(rng.integers(0, 2)),
        "checkpoint": bool(rng.integers(0, 2)),
        "ref": bool(rng.integers(0, 2)),
    }
    steps = choices["steps"]

    def lane(w, count, h, x, tools):
        v = x * w if h is None else x * w + h
        for kind in steps:
            v = _step(kind, v, w, x, tools)
        total = jax.lax.psum(jnp.sum(v * v), AXIS)
        if choices["write_w"]:
            w = w - 0.1 * jax.lax.pmean(v, AXIS)
        if choices["counter"]:
            count = count + 1
        return v, total, w, count, (None if h is None else 0.5 * h + v), 2.0 * v

    def per_lane(axis: int) -> np.ndarray:
        shape = (B, d) if axis == 0 else (d, B)
        return rng.normal(size=shape).astype(np.float32)

    # Drawn from streams of their own, so every seed draws the program it drew before these choices.
    choices["writes_in"] = WRITES_IN[int(np.random.default_rng([seed, 1]).integers(0, len(WRITES_IN)))]
    choices["module_argument"] = bool(np.random.default_rng([seed, 2]).integers(0, 2))
    w = rng.normal(size=(d,)).astype(np.float32)
    h = None if choices["h_axis"] is None else per_lane(choices["h_axis"])
    xs = (per_lane(choices["x_axis"]), per_lane(choices["x_axis"]))
    return Program(seed, choices, w, h, xs, lane)


def _key_chain(key: jax.Array) -> Callable:
    """``normal(shape)`` drawing as a ``smap.random.RandomState`` holding ``key`` draws."""
    held = [key]

    def normal(shape: tuple[int, ...]) -> jax.Array:
        held[0], sub = jax.random.split(held[0])
        return jax.random.normal(sub, shape)

    return normal


def reference(program: Program, key: jax.Array) -> list[dict]:
    """The two calls in plain JAX: jax.vmap of the lane, the states passed explicitly."""
    c = program.choices
    h_axis = c["h_axis"]

    def one(h, x, lane_key, w, count):
        tools = Tools(_key_chain(lane_key), lambda f, w, v: jax.grad(f)(w, v), jax.vmap)
        return program.lane(w, count, h, x, tools)

    mapped = jax.jit(
        jax.vmap(
            one,
            in_axes=(h_axis, c["x_axis"], 0, None, None),
            out_axes=(c["out_axis"], None, None, None, h_axis, _buffer_axis(c["buffer"])),
            axis_name=AXIS,
        )
    )
    w, count, h, records = jnp.asarray(program.w), jnp.zeros((), jnp.int32), program.h, []
    draws = "draw" in c["steps"]
    for x in program.xs:
        out, total, w, count, h, buffer = mapped(h, x, jax.random.split(key, B), w, count)
        key = jax.random.split(key, B + 1)[B] if draws else key
        buffer = None if c["buffer"] is None else buffer
        records.append({"out": (out, total), "w": w, "count": count, "h": h, "buffer": buffer, "key": key})
    return records


def under_smap(program: Program, mappings: list[tuple[Callable, dict]]) -> list[dict]:
    """The two calls with the values in smap States, the first mapped by ``mappings[0]``
    (``(mapping_fn, mapping_kwargs)``), the second by ``mappings[-1]``."""
    c = program.choices
    w = jnp.asarray(program.w)
    w = smap.ParamState(jax.new_ref(w) if c["ref"] and smap._compat.HAS_REFS else w)
    count = smap.LongTermState(jnp.zeros((), jnp.int32))
    h = None if program.h is None else smap.HiddenState(jnp.asarray(program.h))
    buffer = None if c["buffer"] is None else smap.State(jnp.zeros(program.w.shape), tag="buffer")

    def step(x):
        tools = Tools(
            lambda shape: smap.random.normal(size=shape),
            lambda f, _, v: smap.grad(lambda v: f(w.value, v), grad_states=w)(v),
            smap.vmap,
        )
        out, total, new_w, new_count, new_h, new_buffer = program.lane(
            w.value, count.value, None if h is None else h.value, x, tools
        )

        def write() -> None:
            w.value, count.value = new_w, new_count
            if h is not None:
                h.value = new_h

        if c["writes_in"] == "scan":
            jax.lax.scan(lambda carry, _: (write(), (carry, None))[1], 0, None, length=1)
        elif c["writes_in"] == "cond":  # a predicate that is traced, the same in every lane, and true
            jax.lax.cond(total >= 0.0, write, lambda: None)
        else:
            write()
        if buffer is not None:  # (which holds the lanes' axis once written: its lanes write rows of it)
            buffer.value = new_buffer
        return out, total

    state_in_axes = None if h is None else {c["h_axis"]: OfType(smap.HiddenState)}
    policy = c["buffer"] if c["buffer"] in ("ignore", "warn") else "raise"
    state_out_axes = {c["buffer"]: WithTag("buffer")} if isinstance(c["buffer"], int) else None

    model = smap.nn.Module()  # passed as an argument, holding the States, where the choice says
    for name, state in (("w", w), ("count", count), ("h", h), ("buffer", buffer)):
        if state is not None and c["module_argument"]:
            setattr(model, name, state)

    def make(mapping_fn: Callable, mapping_kwargs: dict) -> Callable:
        given_model = c["module_argument"]
        mapped = smap.StatefulMapping(
            (lambda m, x: step(x)) if given_model else step,
            in_axes=(None, c["x_axis"]) if given_model else c["x_axis"],
            out_axes=(c["out_axis"], None),
            state_in_axes=state_in_axes,
            state_out_axes=state_out_axes,
            unexpected_out_state_mapping=policy,
            axis_name=AXIS,
            mapping_fn=mapping_fn,
            mapping_kwargs=mapping_kwargs,
            donate_states=c["donate"],
        )
        call = smap.jit(mapped) if c["in_jit"] else mapped
        return functools.partial(call, model) if given_model else call

    held = {"w": w, "count": count, "h": h, "buffer": buffer, "key": smap.random.DEFAULT}

    def values() -> dict:
        """The States' values, copied to the host: a donating call deletes the arrays it was given."""
        return {k: None if s is None else np.asarray(s.value) for k, s in held.items()}

    def assert_unchanged(before: dict, what: str) -> None:
        after = values()
        for k in before:
            assert (before[k] is None) == (after[k] is None), f"{program}: {k}"
            if before[k] is not None:
                np.testing.assert_array_equal(after[k], before[k], err_msg=f"{program}: {k} {what}")

    def checkpoint_round_trip() -> None:
        """Save the States, overwrite them, restore them: the values and placements they had."""
        states = {k: s for k, s in held.items() if s is not None}
        before, placed = values(), {k: s.value.sharding for k, s in states.items()}
        with tempfile.TemporaryDirectory() as directory:
            smap.checkpoint.save(directory, states, step=1)
            for s in states.values():
                s.value = jnp.zeros_like(s.value)
            assert smap.checkpoint.restore(directory, states) == 1
        assert_unchanged(before, "after a checkpoint's round trip")
        for k, s in states.items():
            assert s.value.sharding == placed[k], f"{program}: {k} restored on {s.value.sharding}, not {placed[k]}"

    calls = [make(*mappings[0])]
    calls.append(calls[0] if len(mappings) == 1 else make(*mappings[-1]))
    records = []
    for i, (x, call) in enumerate(zip(program.xs, calls)):
        first = i == 0 or call is not calls[0]
        if i and c["checkpoint"]:
            checkpoint_round_trip()
        if i and c["fail"]:
            before = values()
            rows = np.zeros_like(x, shape=(B, c["d"] + 1) if c["x_axis"] == 0 else (c["d"] + 1, B))
            with pytest.raises(TypeError, match="broadcast"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                call(jnp.asarray(rows))
            assert_unchanged(before, "after a failed call")
        if first and i and policy != "raise" and buffer is not None:
            # Only the mapping that wrote a state per lane by its policy maps it along the lanes' axis after;
            # to another mapping it is shared, with the lanes' axis in its shape. Given its lane shape back:
            buffer.reset(jnp.zeros(program.w.shape))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = call(jnp.asarray(x))
        warned = [w for w in caught if "shared by the lanes but written with a per-lane" in str(w.message)]
        # 'warn' warns when a mapping first writes the state per lane; its later calls map it along axis 0
        assert bool(warned) == (policy == "warn" and first), f"{program}: {[str(w.message) for w in caught]}"
        records.append({"out": jax.device_get(out), **values()})
    return records


def nudged(program: Program) -> Program:
    """``program`` with its float inputs moved by one float32 rounding step (relative 2**-23)."""

    def nudge(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a * np.float32(1 + 2**-23)

    return dataclasses.replace(program, w=nudge(program.w), h=nudge(program.h), xs=tuple(map(nudge, program.xs)))


def sensitivity(want: list[dict], near: list[dict]) -> list[dict]:
    """How far each value of the reference moves when its inputs move by one rounding step.

    smap's program computes the same values in another order (collectives
    spanning devices, fused sums), so the two differ by round-off, which a
    program amplifies as it amplifies a change of its inputs: a chain of
    steps can turn one rounding step into 1e-4 (seeds 2294 and 2494). That
    amplification, at most 1e-3, widens the comparison's tolerance; a
    discontinuity (a branch or a sort that the nudge flips) moves a value by
    more than that and widens it no further.
    """

    def moved(a: Any, b: Any) -> float:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return min(float(np.max(np.abs(a - b), initial=0.0)), 1e-3)

    return jax.tree_util.tree_map(moved, want, near)


def assert_same(got: list[dict], want: list[dict], program: Program, where: str, slack: list[dict]) -> None:
    """``got`` equals ``want`` to float32 round-off: 2e-5, and four times each value's ``slack``
    (:func:`sensitivity`)."""
    for call, (a, b, moved) in enumerate(zip(got, want, slack)):
        a_leaves, a_tree = jax.tree_util.tree_flatten(a)
        b_leaves, b_tree = jax.tree_util.tree_flatten(b)
        assert a_tree == b_tree, f"{program}\n{where}, call {call}: {a_tree} != {b_tree}"
        paths = jax.tree_util.tree_flatten_with_path(b)[0]
        for (path, _), x, y, m in zip(paths, a_leaves, b_leaves, jax.tree_util.tree_leaves(moved)):
            what = f"{program}\n{where}, call {call}, {jax.tree_util.keystr(path)}"
            x, y = np.asarray(x), np.asarray(y)
            assert x.shape == y.shape and x.dtype == y.dtype, f"{what}: {x.shape}/{x.dtype} != {y.shape}/{y.dtype}"
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5 + 4 * m, err_msg=what)


GROUP = 2  # programs per test


def check(index: int) -> None:
    """Seeds ``GROUP * index ...``, each under jax.vmap, under the strategy its seed picks, and with
    its first call under that strategy and its second under the next one (the States, and the
    default key, move from the one's devices to the other's)."""
    names = list(STRATEGIES)
    for seed in range(GROUP * index, GROUP * (index + 1)):
        program = draw(seed)
        key = smap.random.DEFAULT.value
        want = reference(program, key)
        slack = sensitivity(want, reference(nudged(program), key))
        strategy, then = names[seed % len(names)], names[(seed + 1) % len(names)]
        for where, mappings in (
            ("jax.vmap", [(jax.vmap, {})]),
            (strategy, [STRATEGIES[strategy]()]),
            (f"{strategy}, then {then}", [STRATEGIES[strategy](), STRATEGIES[then]()]),
        ):
            smap.random.DEFAULT.value = jnp.array(key)  # a copy: a donating call deletes the array it is given
            assert_same(under_smap(program, mappings), want, program, where, slack)


CI_GROUPS = range(4, 12)  # seeds 8-23: every step, buffer, strategy, with and without smap.jit


@pytest.mark.parametrize("index", fuzz_groups(GROUP, CI_GROUPS))
def test_programs_give_the_plain_jax_values(index):
    check(index)


def test_the_ci_seeds_draw_every_step_and_strategy():
    seeds = range(GROUP * CI_GROUPS.start, GROUP * CI_GROUPS.stop)
    drawn = {kind for seed in seeds for kind in draw(seed).choices["steps"]}
    assert drawn == set(STEPS)
    assert {draw(seed).choices["buffer"] for seed in seeds} == set(BUFFERS)
    for choice in ("in_jit", "donate", "fail", "checkpoint", "ref"):
        assert {draw(seed).choices[choice] for seed in seeds} == {False, True}, choice
    assert {draw(seed).choices["writes_in"] for seed in seeds} == set(WRITES_IN)
    assert {draw(seed).choices["module_argument"] for seed in seeds} == {False, True}
    assert {list(STRATEGIES)[seed % len(STRATEGIES)] for seed in seeds} == set(STRATEGIES)
