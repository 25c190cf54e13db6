"""Save or restore a checkpoint from several processes; run by test_checkpoint_distributed.py.

    python scripts/launch_local.py -n 2 -d 2 -- python checkpoint_worker.py save DIR
    python scripts/launch_local.py -n 2 -d 2 -- python checkpoint_worker.py restore DIR
    python scripts/launch_local.py -n 2 -d 2 -- python checkpoint_worker.py background DIR

The states (`build`) live on a mesh over every process's devices: a batched
state split over the lanes, a parameter split by a rule, replicated states
and a random state; and a counter each process holds on its own device.
``save`` writes step 1 of ``values(0)``; ``restore`` loads the latest step
into zeros and prints, from each process, the values (as JSON) and the
shards (file and index) that process read. ``background`` saves step 3 of
``values(2)`` with ``wait=False`` while a donating step changes the states,
process 1 writing its part 1 s late; each process prints when its part was
written and process 0 when step 3 became visible.
"""

import json
import sys
import time

import numpy as np
from jax.sharding import PartitionSpec as P

import sharding
import smap

BATCH = 8
RULES = {smap.ParamState: P(None, "data")}


def values(shift):
    """The values saved at a step, a function of ``shift`` only: the tests' reference."""
    return {
        "hidden": np.arange(BATCH * 3, dtype=np.float32).reshape(BATCH, 3) + shift,
        "w": np.arange(4 * BATCH, dtype=np.float32).reshape(4, BATCH) * 0.5 + shift,
        "opt": {"count": np.int32(shift), "mu": np.full((4, BATCH), shift + 0.25, np.float32)},
        "count": np.arange(3, dtype=np.int32) + shift,
    }


def build(init, mesh):
    """The states holding ``init`` (and a random state from seed 5), placed on ``mesh``; and the mapping."""
    states = {
        "hidden": smap.HiddenState(init["hidden"]),
        "w": smap.ParamState(init["w"]),
        "opt": smap.LongTermState(init["opt"]),
        "rng": smap.random.RandomState(5),
        "count": smap.State(init["count"]),  # not placed: a local array in each process
    }
    mapping = smap.StatefulMapping(lambda x: x, state_in_axes=smap.HiddenState, mapping_fn=sharding.shard_map(mesh))
    sharding.place([state for name, state in states.items() if name != "count"], mapping, rules=RULES)
    return states, mapping


def main(mode, directory):
    sharding.initialize()
    import jax

    from smap.checkpoint import _checkpoint

    mesh = sharding.make_mesh(data=jax.device_count())
    if mode == "save":
        states, _ = build(values(0), mesh)
        smap.checkpoint.save(directory, states, step=1)
        print("SAVED", flush=True)
        return 0
    if mode == "background":
        return background(directory, mesh)
    states, mapping = build(jax.tree_util.tree_map(np.zeros_like, values(0)), mesh)
    read = []
    read_shard = _checkpoint._read_shard

    def recording(folder, fds, shard, dtype, what, into=None):
        read.append([shard["file"], what, shard["index"]])
        return read_shard(folder, fds, shard, dtype, what, into)

    _checkpoint._read_shard = recording
    step = smap.checkpoint.restore(directory, states, mapping=mapping, rules=RULES)
    got = sharding.to_host({name: state.value for name, state in states.items()})
    specs = {name: str(state.value.sharding.spec) for name, state in states.items() if name != "opt"}
    assert states["count"].value.sharding.mesh == mesh  # restore placed it on the mesh (replicated)
    draws = sharding.to_host(states["rng"].normal(size=3))
    result = {
        "process": jax.process_index(),
        "step": step,
        "values": jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), got),
        "specs": specs,
        "draws": draws.tolist(),
        "read": read,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def background(directory, mesh):
    import jax

    from smap.checkpoint import _checkpoint, _io

    states, _ = build(values(2), mesh)
    written = []
    write_pieces = _io.write_pieces

    def timed(path, pieces):
        if jax.process_index() == 1:
            time.sleep(1.0)
        placed = write_pieces(path, pieces)
        written.append(time.time())
        return placed

    _checkpoint._io.write_pieces = timed
    bump = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: x + 1, t), donate_argnums=0)
    pending = smap.checkpoint.save(directory, states, step=3, wait=False)
    for name in ("hidden", "w", "opt"):  # the training step goes on, donating the states
        states[name].value = bump(states[name].value)
    visible = None
    while not pending.done():
        if visible is None and smap.checkpoint.steps(directory) == [3]:
            visible = time.time()
        time.sleep(0.002)
    pending.wait()
    if visible is None and jax.process_index() == 0:
        visible = time.time()
    result = {"process": jax.process_index(), "written": written[0], "visible": visible}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
