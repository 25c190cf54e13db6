"""A data-parallel program run by test_distributed.py, in one or several processes.

Run as a script (under scripts/launch_local.py) it trains three steps on a
mesh over all processes' devices and prints the parameters from process 0
as one JSON line. `build` and `batches` are shared with the single-process
jax.vmap reference in the test.
"""

import json
import os
import signal
import sys

import numpy as np

import sharding
import smap

BATCH = 8
STEPS = 3


def batches():
    rng = np.random.default_rng(0)
    return [
        (rng.normal(size=(BATCH, 5)).astype(np.float32), rng.normal(size=(BATCH, 2)).astype(np.float32))
        for _ in range(STEPS)
    ]


def build(mapping_fn):
    import jax
    import jax.numpy as jnp

    smap.random.seed(3)
    w1 = smap.ParamState(smap.random.normal(0.0, 0.5, (5, 16)))
    w2 = smap.ParamState(smap.random.normal(0.0, 0.5, (16, 2)))
    seen = smap.HiddenState(jnp.zeros((BATCH, 2)))
    params = {"w1": w1, "w2": w2}

    def example(x, y):
        def loss():
            h = jnp.tanh(x @ w1.value) * smap.random.bernoulli(0.9, (16,))
            return jnp.sum((h @ w2.value - y) ** 2)

        grads, value = smap.grad(loss, grad_states=params, return_value=True)()
        grads = jax.lax.pmean(grads, "batch")
        for name, g in grads.items():
            params[name].value = params[name].value - 0.1 * g
        seen.value = seen.value + y
        return value

    step = smap.StatefulMapping(example, axis_name="batch", state_in_axes=smap.HiddenState, mapping_fn=mapping_fn)
    return step, {"w1": w1, "w2": w2, "seen": seen}


def main():
    sharding.initialize()
    import jax

    mesh = sharding.make_mesh(data=jax.device_count())
    step, states = build(sharding.shard_map(mesh))
    sharding.place(list(states.values()), step)
    table = sharding.describe(states)
    if jax.process_index() == 0:
        print(table, flush=True)
    rows = BATCH // jax.process_count()
    p = jax.process_index()
    for i, (x, y) in enumerate(batches()):
        if i == 1 and os.environ.get("DP_WORKER_DIE") == str(p):
            os.kill(os.getpid(), signal.SIGKILL)
        step(*sharding.global_batch((x[p * rows : (p + 1) * rows], y[p * rows : (p + 1) * rows]), mesh))
    values = sharding.to_host({k: s.value for k, s in states.items()})
    if p == 0:
        print("RESULT " + json.dumps({k: v.tolist() for k, v in values.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
