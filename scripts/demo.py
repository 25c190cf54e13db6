"""The smap demo: a stateful module, one jitted training step, its states.

Run: python scripts/demo.py
"""

import jax.numpy as jnp

import smap


class Linear(smap.nn.Module):
    def __init__(self, n_in: int, n_out: int):
        self.weight = smap.ParamState(smap.random.normal(0.0, 0.5, (n_in, n_out)))
        self.bias = smap.ParamState(jnp.zeros(n_out))
        self.calls = smap.LongTermState(jnp.zeros((), jnp.int32))

    def __call__(self, x):
        self.calls.value = self.calls.value + 1
        return x @ self.weight.value + self.bias.value


def main() -> None:
    smap.random.seed(0)
    model = Linear(3, 2)
    params = model.states(smap.ParamState)

    @smap.jit
    def train_step(x, y):
        grads, loss = smap.grad(
            lambda: jnp.mean((model(x) - y) ** 2), grad_states=params, return_value=True
        )()
        for name, g in grads.items():
            params[name].value = params[name].value - 0.1 * g
        return loss

    x = smap.random.normal(size=(16, 3))
    y = x @ jnp.array([[1.0, -1.0], [2.0, 0.0], [0.0, 3.0]])
    for step in range(5):
        print(f"step {step}: loss {float(train_step(x, y)):.4f}")
    for path, state in model.states().items():
        print(f"{path:8s} {state!r}")


if __name__ == "__main__":
    main()
