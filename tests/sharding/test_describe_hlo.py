"""``describe``'s gathered column against the compiled program.

A training step with Adam (moments tagged like their weights) is mapped over
'data' and laid out FSDP (every weight and moment split over the lane axis)
or tensor parallel (weights and moments split over 'model', Megatron style),
on meshes of Auto and of Explicit axes. For each shape, the number of
all-gathers in XLA's optimised HLO whose result is a whole state of that
shape equals the number of such states ``describe`` says a call gathers: the
weights the lanes read (FSDP), and never the moments, which only the
lane-invariant tail reads, nor a weight split over 'model'.
"""

from __future__ import annotations

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sharding
import smap

B, D, H = 16, 16, 32  # lanes, width, hidden width (every split divides them)

RULES = {
    "fsdp": {smap.ParamState: P("data"), "moment": P("data")},
    "tensor parallel": {"column": P(None, "model"), "row": P("model", None), "column_bias": P("model")},
}


@functools.cache
def mesh(layout: str, kind: str):
    shape, names = ((8,), ("data",)) if layout == "fsdp" else ((4, 2), ("data", "model"))
    return jax.make_mesh(shape, names, axis_types=(getattr(jax.sharding.AxisType, kind),) * len(names))


class Net(smap.nn.Module):
    def __init__(self):
        rng = np.random.default_rng(0)
        self.w1 = smap.ParamState(jnp.asarray(rng.normal(size=(D, H)) / 4, jnp.float32), tag="column")
        self.b1 = smap.ParamState(jnp.zeros(H), tag="column_bias")
        self.w2 = smap.ParamState(jnp.asarray(rng.normal(size=(H, D)) / 6, jnp.float32), tag="row")

    def __call__(self, x):
        return jnp.tanh(x @ self.w1.value + self.b1.value) @ self.w2.value


class Adam(smap.nn.Module):
    def __init__(self, params: dict):
        moment = lambda p: smap.LongTermState(jnp.zeros(p.value.shape), tag=("moment", *p.tags))  # noqa: E731
        self.mu = {k: moment(p) for k, p in params.items()}
        self.nu = {k: moment(p) for k, p in params.items()}

    def update(self, params: dict, grads: dict) -> None:
        for k, p in params.items():
            self.mu[k].value = 0.9 * self.mu[k].value + 0.1 * grads[k]
            self.nu[k].value = 0.999 * self.nu[k].value + 0.001 * grads[k] ** 2
            p.value = p.value - 0.01 * self.mu[k].value / (jnp.sqrt(self.nu[k].value) + 1e-8)


def build(layout: str, kind: str):
    net = Net()
    params = net.states(smap.ParamState)
    adam = Adam(params)

    def lane(x):
        grads = smap.grad(lambda: jnp.mean((net(x) - x) ** 2), grad_states=params)()
        adam.update(params, jax.lax.pmean(grads, "batch"))

    m = mesh(layout, kind)
    step = smap.StatefulMapping(lane, axis_name="batch", mapping_fn=sharding.shard_map(m, axis="data"))
    states = {**{f"net.{k}": v for k, v in net.states().items()}, **{f"adam.{k}": v for k, v in adam.states().items()}}
    sharding.place(states, step, rules=RULES[layout])
    x = jax.device_put(
        jnp.asarray(np.random.default_rng(1).normal(size=(B, D)), jnp.float32), NamedSharding(m, P("data"))
    )
    return states, step, x


def gathered_shapes(hlo: str) -> collections.Counter:
    """The result shapes of the all-gathers in the HLO (each part of a tuple all-gather once)."""
    found: collections.Counter = collections.Counter()
    for line in hlo.splitlines():
        m = re.search(r"=\s*(\(.*?\)|\S+)\s+all-gather(?:-start)?\(", line)
        if m:
            for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
                found[tuple(int(d) for d in dims.split(",") if d)] += 1
    return found


@pytest.mark.parametrize("kind", ["Auto", "Explicit"])
@pytest.mark.parametrize("layout", sorted(RULES))
def test_gathered_column_matches_the_optimised_hlo(layout, kind):
    states, step, x = build(layout, kind)
    step(x)
    table = {row.path: row for row in sharding.describe(states, step)}
    said: collections.Counter = collections.Counter(
        row.shape for row in table.values() if row.gathered.startswith("over")
    )
    in_hlo = gathered_shapes(step.lower(x).compile().as_text())
    shapes = {s.value.shape for s in states.values()}
    assert {s: in_hlo[s] for s in shapes} == {s: said[s] for s in shapes}
    moments = [row for path, row in table.items() if path.startswith("adam.")]
    assert moments and all(row.gathered == "no" for row in moments)
    if layout == "fsdp":  # the lanes read every weight whole: gathered over the lane axis, once each
        assert {table[f"net.{k}"].gathered for k in ("w1", "b1", "w2")} == {"over data"}
        assert sum(said.values()) == 3
    else:  # split over 'model', which the lanes leave to XLA
        assert sum(said.values()) == 0


def test_before_the_first_call_every_state_counts_as_read_by_the_lanes():
    states, step, x = build("fsdp", "Auto")
    assert {row.gathered for row in sharding.describe(states, step)} == {"over data"}
    step(x)
    assert sharding.describe(states, step)[-1].gathered == "no"  # a moment, once the program is known
