"""A small transformer language model, trained data-parallel with FSDP or tensor parallel, with smap.

    python scripts/lm.py                                   # 8 emulated CPU devices, FSDP
    python scripts/lm.py --tensor-parallel                 # a 4 x 2 (data x model) mesh, Megatron layout
    python scripts/lm.py --per-example                     # a lane is one sequence
    python scripts/lm.py --checkpoint-dir ckpt --stop-after-step 200   # stopped after step 200 ...
    python scripts/lm.py --checkpoint-dir ckpt --resume                # ... resumed

The model is a character-level GPT: token and position embeddings, pre-norm
blocks of causal multi-head attention and an MLP, layer norms, dropout drawn
from ``smap.random``. Parameters are ``ParamState``s; Adam's moments are
``LongTermState``s that carry their weight's tags, so one table of placement
rules lays out a weight and its moments alike. The text is made here from a
small grammar (no download); its unigram entropy is what a model that ignores
context would reach, and the loss falls well below it.

One ``StatefulMapping`` maps the training step over the lanes: by default a
lane is one device's block of sequences (the whole step mapped), with
``--per-example`` a lane is one sequence. Each lane takes the gradient of its
loss with ``smap.grad``, averages it over the lanes with ``jax.lax.pmean``
and applies Adam. Placement:

- default (FSDP): every weight and moment is split along its first axis over
  the ``data`` mesh axis, which also splits the lanes;
- ``--tensor-parallel``: lanes over ``data``, and the attention and MLP weights
  split over ``model`` in the Megatron layout (queries, keys, values and the
  first MLP layer by output columns, the projections back by input rows), so
  XLA partitions each lane's products over ``model``.

With ``--checkpoint-dir`` every state (parameters, moments, step count, the
random key) is saved every ``--checkpoint-every`` steps with
``smap.checkpoint``; ``--resume`` goes on from the latest step saved there
and ends with the parameters of an uninterrupted run (the batch of step ``k``
depends only on the seed and ``k``). Needs only JAX and NumPy.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import sharding
import smap

WORDS = {
    "det": ["the", "a", "every", "no", "one", "some"],
    "adj": ["small", "quick", "lazy", "green", "old", "bright", "quiet", "heavy"],
    "noun": ["fox", "dog", "cat", "bird", "river", "stone", "garden", "wizard", "baker", "ship"],
    "verb": ["sees", "follows", "finds", "carries", "watches", "paints", "guards", "likes"],
    "link": ["and", "but", "while", "because"],
}


def make_text(n_sentences: int = 6000, seed: int = 1234) -> str:
    """Sentences from a small grammar: ``det [adj] noun verb det [adj] noun [link ...] .``"""
    rng = np.random.default_rng(seed)

    def pick(kind: str) -> str:
        return WORDS[kind][rng.integers(len(WORDS[kind]))]

    def phrase() -> str:
        return " ".join([pick("det"), *([pick("adj")] if rng.random() < 0.5 else []), pick("noun")])

    def clause() -> str:
        return f"{phrase()} {pick('verb')} {phrase()}"

    sentences = []
    for _ in range(n_sentences):
        sentence = clause()
        if rng.random() < 0.3:
            sentence += f" {pick('link')} {clause()}"
        sentences.append(sentence + " .\n")
    return "".join(sentences)


def encode(text: str) -> tuple[np.ndarray, int]:
    """The text as symbol ids, and a vocabulary size padded to a multiple of 64 (divisible by every mesh axis)."""
    symbols = sorted(set(text))
    ids = np.array([symbols.index(c) for c in text], np.int32)
    return ids, -(-len(symbols) // 64) * 64


def unigram_entropy(ids: np.ndarray) -> float:
    """Entropy of the symbol frequencies, in nats: the loss of the best model that ignores context."""
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a small transformer language model with smap.")
    parser.add_argument("--devices", type=int, default=8, help="emulated CPU devices (default 8)")
    parser.add_argument(
        "--tensor-parallel", action="store_true", help="a data x model mesh (model of size 2), Megatron layout"
    )
    parser.add_argument("--per-example", action="store_true", help="a lane is one sequence (default: one per device)")
    parser.add_argument("--steps", type=int, default=250, help="training steps (default 250)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step, over all devices (default 32)")
    parser.add_argument("--context", type=int, default=64, help="tokens per sequence (default 64)")
    parser.add_argument("--width", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    parser.add_argument("--dropout", type=float, default=0.1, help="dropout rate (default 0.1)")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="Adam's learning rate (default 3e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of parameters, dropout and batches (default 0)")
    parser.add_argument("--log-every", type=int, default=50, help="a progress line every N steps (default 50)")
    parser.add_argument("--save", metavar="PATH", help="save the final parameters to PATH (.npz)")
    parser.add_argument("--checkpoint-dir", metavar="DIR", help="save every state every --checkpoint-every steps")
    parser.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    parser.add_argument("--resume", action="store_true", help="go on from the latest checkpoint in --checkpoint-dir")
    parser.add_argument("--stop-after-step", type=int, metavar="K", help="stop after step K, as if interrupted")
    args = parser.parse_args(argv)
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")
    for name in ("devices", "steps", "batch_size", "context", "width", "heads", "layers", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.checkpoint_every < 1:
        parser.error(f"--checkpoint-every must be at least 1, got {args.checkpoint_every}")
    if args.stop_after_step is not None and args.stop_after_step < 1:
        parser.error(f"--stop-after-step must be at least 1, got {args.stop_after_step}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.width % args.heads:
        parser.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    if args.tensor_parallel and (args.devices % 2 or args.heads % 2):
        parser.error("--tensor-parallel splits the heads over 2 devices: --devices and --heads must be even")
    data = args.devices // 2 if args.tensor_parallel else args.devices
    if args.batch_size % data:
        parser.error(f"--batch-size {args.batch_size} cannot be split evenly over the {data} devices of the data axis")
    if not args.tensor_parallel and (args.width % data or args.context % data):
        parser.error(f"FSDP splits every weight over {data} devices: --width and --context must be multiples of {data}")
    return args


def dropout(x, rate: float, train: bool):
    """Zero each entry with probability ``rate`` (a draw from ``smap.random``), scale the rest up."""
    import jax.numpy as jnp

    if not train or rate == 0:
        return x
    keep = smap.random.bernoulli(1 - rate, x.shape)
    return jnp.where(keep, x / (1 - rate), 0)


class LayerNorm(smap.nn.Module):
    def __init__(self, width: int):
        self.scale = smap.ParamState(np.ones(width, np.float32))
        self.bias = smap.ParamState(np.zeros(width, np.float32))

    def __call__(self, x):
        import jax

        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale.value + self.bias.value


def dense(n_in: int, n_out: int, tag: str | None = None) -> smap.ParamState:
    return smap.ParamState(smap.random.normal(0.0, n_in**-0.5, (n_in, n_out)), tag=tag)


class Attention(smap.nn.Module):
    """Causal multi-head self-attention; heads are contiguous column blocks of the query, key and value weights."""

    def __init__(self, width: int, heads: int):
        self.heads = heads
        self.query, self.key, self.value = (dense(width, width, "column") for _ in range(3))
        self.out = dense(width, width, "row")

    def __call__(self, x):
        import jax
        import jax.numpy as jnp

        batch, length, width = x.shape
        split = (batch, length, self.heads, width // self.heads)
        q, k, v = ((x @ w.value).reshape(split) for w in (self.query, self.key, self.value))
        scores = jnp.einsum("bqhc,bkhc->bhqk", q, k) / np.float32(np.sqrt(width // self.heads))
        causal = jnp.tril(jnp.ones((length, length), bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
        return jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(x.shape) @ self.out.value


class Block(smap.nn.Module):
    """Pre-norm residual block: attention, then a two-layer MLP, each with dropout on its output."""

    def __init__(self, width: int, heads: int, rate: float):
        self.norm1, self.attention = LayerNorm(width), Attention(width, heads)
        self.norm2 = LayerNorm(width)
        self.up = dense(width, 4 * width, "column")
        self.up_bias = smap.ParamState(np.zeros(4 * width, np.float32), tag="column_bias")
        self.down = dense(4 * width, width, "row")
        self.rate = rate

    def __call__(self, x, train: bool):
        import jax

        x = x + dropout(self.attention(self.norm1(x)), self.rate, train)
        hidden = jax.nn.gelu(self.norm2(x) @ self.up.value + self.up_bias.value)
        return x + dropout(hidden @ self.down.value, self.rate, train)


class GPT(smap.nn.Module):
    """Token and position embeddings, ``layers`` blocks, a final norm and a linear read-out."""

    def __init__(self, vocab: int, context: int, width: int, heads: int, layers: int, rate: float):
        self.tokens = smap.ParamState(smap.random.normal(0.0, 0.02, (vocab, width)))
        self.positions = smap.ParamState(smap.random.normal(0.0, 0.02, (context, width)))
        self.blocks = [Block(width, heads, rate) for _ in range(layers)]
        self.norm = LayerNorm(width)
        self.head = dense(width, vocab)
        self.rate = rate

    def __call__(self, ids, train: bool = True):
        """Logits of the next token at every position of ``ids`` (batch, length)."""
        x = self.tokens.value[ids] + self.positions.value[: ids.shape[-1]]
        x = dropout(x, self.rate, train)
        for block in self.blocks:
            x = block(x, train)
        return self.norm(x) @ self.head.value


def moment_of(p: smap.ParamState) -> smap.LongTermState:
    """Zeros shaped like ``p``, tagged ``'moment'`` and with ``p``'s tags (so its placement rule applies)."""
    return smap.LongTermState(np.zeros(p.value.shape, np.float32), tag=("moment", *p.tags))


class Adam(smap.nn.Module):
    """Adam, written out: a first and second moment per weight (with the weight's tags) and a step count."""

    def __init__(self, params: dict[str, smap.ParamState], learning_rate: float, b1=0.9, b2=0.999, eps=1e-8):
        self.mu = {k: moment_of(p) for k, p in params.items()}
        self.nu = {k: moment_of(p) for k, p in params.items()}
        self.count = smap.LongTermState(np.zeros((), np.int32))
        self.learning_rate, self.b1, self.b2, self.eps = learning_rate, b1, b2, eps

    def update(self, params: dict[str, smap.ParamState], grads: dict) -> None:
        import jax.numpy as jnp

        count = self.count.value + 1
        t = count.astype(jnp.float32)
        step = self.learning_rate * jnp.sqrt(1 - self.b2**t) / (1 - self.b1**t)
        for name, p in params.items():
            mu = self.b1 * self.mu[name].value + (1 - self.b1) * grads[name]
            nu = self.b2 * self.nu[name].value + (1 - self.b2) * grads[name] ** 2
            p.value = p.value - step * mu / (jnp.sqrt(nu) + self.eps)
            self.mu[name].value, self.nu[name].value = mu, nu
        self.count.value = count


def rules_for(args: argparse.Namespace) -> dict:
    """Placement rules: FSDP splits every weight and moment over ``data``; tensor parallel, by tag over ``model``."""
    from jax.sharding import PartitionSpec as P

    if args.tensor_parallel:
        return {"column": P(None, "model"), "row": P("model", None), "column_bias": P("model")}
    return {smap.ParamState: P("data"), "moment": P("data")}


def build(args: argparse.Namespace, vocab: int, mesh=None):
    """The model, the optimizer, the mapped step, every state by name, and the mesh.

    ``mesh`` defaults to ``sharding.make_mesh`` (Auto axes) of ``data`` (and ``model`` of 2 with
    ``--tensor-parallel``); scripts/bench_lm.py passes meshes of Explicit axes too.
    """
    import jax
    import jax.numpy as jnp

    smap.random.seed(args.seed)
    model = GPT(vocab, args.context, args.width, args.heads, args.layers, args.dropout)
    params = model.states(smap.ParamState)
    adam = Adam(params, args.learning_rate)

    def train_lane(ids):
        ids = ids.reshape(-1, ids.shape[-1])  # (1, context + 1) per example, or the lane's block of sequences

        def loss_fn():
            logits = model(ids[:, :-1], train=True)
            log_p = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(log_p, ids[:, 1:, None], axis=-1).mean()

        grads, loss = smap.grad(loss_fn, grad_states=params, return_value=True)()
        adam.update(params, jax.lax.pmean(grads, "batch"))
        return loss

    if mesh is None and args.tensor_parallel:
        mesh = sharding.make_mesh(data=args.devices // 2, model=2)
    elif mesh is None:
        mesh = sharding.make_mesh(data=args.devices)
    # donate_states: the step updates the weights and moments in place (the old arrays are not kept)
    step = smap.StatefulMapping(
        train_lane,
        axis_name="batch",
        mapping_fn=sharding.shard_map(mesh, axis="data"),
        name="train_step",
        donate_states=True,
    )
    states = {
        **{f"model.{k}": v for k, v in model.states().items()},
        **{f"adam.{k}": v for k, v in adam.states().items()},
        "random": smap.random.DEFAULT,
    }
    sharding.place(list(states.values()), step, rules=rules_for(args))
    return model, step, states, mesh


def batch_at(ids: np.ndarray, step: int, args: argparse.Namespace) -> np.ndarray:
    """The sequences of training step ``step`` (they depend only on the seed and the step), laid out in lanes."""
    rng = np.random.default_rng([args.seed, step])
    starts = rng.integers(0, len(ids) - args.context - 1, args.batch_size)
    batch = ids[starts[:, None] + np.arange(args.context + 1)]
    if args.per_example:
        return batch
    lanes = args.devices // 2 if args.tensor_parallel else args.devices
    return batch.reshape(lanes, args.batch_size // lanes, args.context + 1)


def train(args: argparse.Namespace) -> int:
    import jax

    if args.checkpoint_dir and not args.resume and smap.checkpoint.steps(args.checkpoint_dir):
        print(
            f"{args.checkpoint_dir} already holds checkpoints (steps {smap.checkpoint.steps(args.checkpoint_dir)}); "
            f"pass --resume to go on from them, or choose another --checkpoint-dir",
            file=sys.stderr,
        )
        return 2
    text = make_text()
    ids, vocab = encode(text)
    entropy = unigram_entropy(ids)
    model, step, states, mesh = build(args, vocab)
    layout = "tensor parallel (Megatron)" if args.tensor_parallel else "FSDP"
    lane = "one sequence" if args.per_example else "one device's block of sequences"
    print(f"text: {len(text):,} characters, {len(set(text))} symbols, unigram entropy {entropy:.3f} nats")
    print(f"mesh: {mesh}, {layout}, a lane is {lane}")
    print(sharding.describe(model, step))  # Adam's moments are laid out like their weights

    done = 0
    if args.resume and smap.checkpoint.steps(args.checkpoint_dir):
        done = smap.checkpoint.restore(args.checkpoint_dir, states, mapping=step, rules=rules_for(args))
        print(f"resumed from {args.checkpoint_dir} after step {done}")
    elif args.resume:
        print(f"no checkpoint in {args.checkpoint_dir} yet: starting from step 1")
    last = min(args.steps, args.stop_after_step or args.steps)
    losses, start, loss = [], time.perf_counter(), float("nan")
    pending = None
    for k in range(done + 1, last + 1):
        batch = sharding.global_batch(batch_at(ids, k, args), mesh)
        # Waiting for each step keeps few programs in flight: XLA's CPU collectives
        # can deadlock when many queue up on emulated devices.
        losses.append(jax.block_until_ready(step(batch)))
        if k % args.log_every == 0 or k == last:
            seconds = time.perf_counter() - start
            loss = float(np.mean(sharding.to_host(losses)))
            tokens = len(losses) * args.batch_size * args.context
            print(f"step {k:5d}  loss {loss:.4f}  {tokens / seconds:,.0f} tokens/s", flush=True)
            losses, start = [], time.perf_counter()
        if args.checkpoint_dir and (k % args.checkpoint_every == 0 or k == last):
            # written in the background while the next steps train (a second save waits for the first)
            pending = smap.checkpoint.save(args.checkpoint_dir, states, step=k, keep=3, wait=False)
    if pending is not None:
        pending.wait()  # the last checkpoint is on disk (a failed save raises here)
    print(f"final loss {loss:.4f} nats per token, unigram entropy {entropy:.3f}")
    if args.save:
        np.savez(args.save, **sharding.to_host({k: s.value for k, s in model.states(smap.ParamState).items()}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    sharding.emulate_cpu_devices(args.devices)
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
