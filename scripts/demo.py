"""Data-parallel training of an MLP on handwritten digits, with smap.

    python scripts/demo.py                      # 8 emulated CPU devices, shard_map
    python scripts/demo.py --mapping pmap --devices 4
    python scripts/demo.py --processes 2 --devices 4
    python scripts/demo.py --checkpoint-dir ckpt --stop-after-epoch 5   # stopped after epoch 5 ...
    python scripts/demo.py --checkpoint-dir ckpt --resume --devices 4   # ... resumed, on 4 devices

The network is an ordinary stateful module: parameters are ``ParamState``s,
Adam's moments live in a ``LongTermState``, dropout draws from
``smap.random``. One ``StatefulMapping`` maps the per-example training step
over the batch, averages gradients with ``jax.lax.pmean`` over the batch axis
and updates the shared parameters; smap computes that average of
per-example gradients as one matrix product over the batch per weight (see
``fuse_lane_sums`` in docs/vectorization.md), so the step costs what a
hand-written batch step costs. Whichever ``--mapping``, ``--devices`` and
``--processes``, the same seed gives the same parameters (to float round-off).
With ``--checkpoint-dir`` every state (parameters, Adam's moments, the random
key) is saved after each epoch with ``smap.checkpoint``, in the background
while the next epoch trains; ``--resume`` goes on
from the latest epoch saved there, on any number of devices or processes, and
ends with the parameters of an uninterrupted run.
Needs the ``demo`` extra (scikit-learn for the data set, optax).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

import sharding
import smap

MAPPINGS = ("vmap", "pmap", "shard_map")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Data-parallel MLP training on the digits data set with smap.")
    parser.add_argument(
        "--devices",
        type=int,
        default=8,
        help="emulated CPU devices per process (default 8; on GPU/TPU the accelerators are used)",
    )
    parser.add_argument("--mapping", choices=MAPPINGS, default="shard_map", help="mapping_fn (default shard_map)")
    parser.add_argument(
        "--processes", type=int, default=1, help="processes, through scripts/launch_local.py (default 1)"
    )
    parser.add_argument("--epochs", type=int, default=12, help="passes over the training set (default 12)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step, over all devices (default 64)")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="Adam's learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of parameters, dropout and shuffling (default 0)")
    parser.add_argument("--save", metavar="PATH", help="save the final parameters to PATH (.npz)")
    parser.add_argument(
        "--checkpoint-dir", metavar="DIR", help="save every state after each epoch, in the background (the last 3 kept)"
    )
    parser.add_argument("--resume", action="store_true", help="go on from the latest checkpoint in --checkpoint-dir")
    parser.add_argument("--stop-after-epoch", type=int, metavar="K", help="stop after epoch K, as if interrupted")
    args = parser.parse_args(argv)
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        parser.error(f"--stop-after-epoch must be at least 1, got {args.stop_after_epoch}")
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if args.devices < 1:
        parser.error(f"--devices must be at least 1, got {args.devices}")
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be at least 1")
    if args.processes > 1 and args.mapping != "shard_map":
        parser.error(f"--mapping {args.mapping} runs in one process; use --mapping shard_map with --processes")
    lanes_per_step = args.devices * args.processes if args.mapping != "vmap" else 1
    if args.batch_size % lanes_per_step:
        parser.error(
            f"--batch-size {args.batch_size} cannot be split evenly over {lanes_per_step} devices; "
            f"use a multiple of {lanes_per_step}"
        )
    return args


class MLP(smap.nn.Module):
    """Two dense layers with dropout between them."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, dropout: float = 0.1):
        self.w1 = smap.ParamState(smap.random.normal(0.0, np.sqrt(2 / n_in), (n_in, n_hidden)))
        self.b1 = smap.ParamState(np.zeros(n_hidden, np.float32))
        self.w2 = smap.ParamState(smap.random.normal(0.0, np.sqrt(1 / n_hidden), (n_hidden, n_out)))
        self.b2 = smap.ParamState(np.zeros(n_out, np.float32))
        self.dropout = dropout

    def __call__(self, x, train: bool = True):
        import jax

        h = jax.nn.relu(x @ self.w1.value + self.b1.value)
        if train:
            keep = smap.random.bernoulli(1 - self.dropout, h.shape)
            h = np.float32(1 / (1 - self.dropout)) * h * keep
        return h @ self.w2.value + self.b2.value


def load_digits(seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def build(args: argparse.Namespace):
    import jax
    import jax.numpy as jnp
    import optax

    smap.random.seed(args.seed)
    model = MLP(64, 128, 10)
    params = model.states(smap.ParamState)
    optimizer = optax.adam(args.learning_rate)
    opt_state = smap.LongTermState(optimizer.init({k: p.value for k, p in params.items()}), tag="optimizer")

    def train_example(x, y):
        def loss_fn():
            logits = model(x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y), logits

        grads, loss, logits = smap.grad(loss_fn, grad_states=params, has_aux=True, return_value=True)()
        grads = jax.lax.pmean(grads, "batch")
        values = {k: p.value for k, p in params.items()}
        updates, opt_state.value = optimizer.update(grads, opt_state.value, values)
        for name, update in updates.items():
            params[name].value = values[name] + update
        return loss, jnp.argmax(logits) == y

    mesh = None
    if args.mapping == "vmap":
        mapping_fn = jax.vmap
    elif args.mapping == "pmap":
        mapping_fn = jax.pmap
    else:
        mesh = sharding.make_mesh(data=jax.device_count())
        mapping_fn = sharding.shard_map(mesh, axis="data")
    step = smap.StatefulMapping(train_example, axis_name="batch", mapping_fn=mapping_fn, name="train_step")
    states = {**{f"model.{k}": v for k, v in model.states().items()}, "adam": opt_state, "random": smap.random.DEFAULT}
    if mesh is not None:
        sharding.place(list(states.values()), step)
    return model, step, states, mesh


def accuracy(params: dict, x: np.ndarray, y: np.ndarray) -> float:
    h = np.maximum(x @ params["w1"] + params["b1"], 0)
    return float(np.mean(np.argmax(h @ params["w2"] + params["b2"], axis=1) == y))


def train(args: argparse.Namespace) -> int:
    import jax

    process, n_processes = jax.process_index(), jax.process_count()
    say = print if process == 0 else (lambda *a, **k: None)
    if args.mapping != "vmap" and args.batch_size % jax.device_count():
        print(
            f"--batch-size {args.batch_size} cannot be split evenly over {jax.device_count()} devices", file=sys.stderr
        )
        return 2
    if args.checkpoint_dir and not args.resume and smap.checkpoint.steps(args.checkpoint_dir):
        print(
            f"{args.checkpoint_dir} already holds checkpoints (epochs {smap.checkpoint.steps(args.checkpoint_dir)}); "
            f"pass --resume to go on from them, or choose another --checkpoint-dir",
            file=sys.stderr,
        )
        return 2
    x_train, y_train, x_test, y_test = load_digits(args.seed)
    model, step, states, mesh = build(args)
    say(f"devices: {jax.device_count()} ({n_processes} process(es)), mapping: {args.mapping}")
    say(
        f"mesh: {mesh}"
        if mesh is not None
        else f"mesh: none ({args.mapping} over {jax.local_device_count()} local device(s))"
    )
    say(sharding.describe(states))

    steps = len(x_train) // args.batch_size
    rows = args.batch_size // n_processes
    shuffle = np.random.default_rng(args.seed + 1)
    done = 0
    if args.resume and smap.checkpoint.steps(args.checkpoint_dir):
        done = smap.checkpoint.restore(args.checkpoint_dir, states)  # onto the devices build placed them on
        say(f"resumed from {args.checkpoint_dir} after epoch {done}")
    elif args.resume:
        say(f"no checkpoint in {args.checkpoint_dir} yet: starting from epoch 1")
    last = min(args.epochs, args.stop_after_epoch or args.epochs)
    pending = None
    for epoch in range(1, last + 1):
        order = shuffle.permutation(len(x_train))
        if epoch <= done:
            continue  # trained before the checkpoint; the shuffle advances all the same
        start, losses, correct = time.perf_counter(), [], []
        for i in range(steps):
            batch = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, y = x_train[batch], y_train[batch]
            if mesh is not None:  # each process feeds its own rows of the global batch
                x, y = sharding.global_batch(
                    (x[process * rows : (process + 1) * rows], y[process * rows : (process + 1) * rows]), mesh
                )
            # Waiting for each step keeps few programs in flight: XLA's CPU collectives
            # can deadlock when many queue up on emulated devices.
            loss, hit = jax.block_until_ready(step(x, y))
            losses.append(loss)
            correct.append(hit)
        losses, correct = sharding.to_host((losses, correct))
        seconds = time.perf_counter() - start
        say(
            f"epoch {epoch:2d}  loss {np.mean(losses):.4f}  train accuracy {np.mean(correct):.3f}  "
            f"{steps * args.batch_size / seconds:,.0f} examples/s"
        )
        if args.checkpoint_dir:  # written in the background while the next epoch trains
            pending = smap.checkpoint.save(args.checkpoint_dir, states, step=epoch, keep=3, wait=False)
    if pending is not None:
        pending.wait()  # the last checkpoint is on disk (a failed save raises here)
    params = sharding.to_host({k: s.value for k, s in model.states(smap.ParamState).items()})
    test_accuracy = accuracy(params, x_test, y_test)
    say(f"test accuracy: {test_accuracy:.3f}")
    if args.save and process == 0:
        np.savez(args.save, **params)
    return 0


def relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this script as ``args.processes`` processes through launch_local.py."""
    launcher = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launch_local.py")
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--processes":
            skip = True
        elif not item.startswith("--processes="):
            rest.append(item)
    command = [
        sys.executable,
        launcher,
        "--processes",
        str(args.processes),
        "--devices",
        str(args.devices),
        "--",
        sys.executable,
        os.path.abspath(__file__),
        *rest,
    ]
    return subprocess.call(command)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.processes > 1 and not os.environ.get("SMAP_COORDINATOR_ADDRESS"):
        return relaunch(args, argv)
    if not sharding.initialize():
        sharding.emulate_cpu_devices(args.devices)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
