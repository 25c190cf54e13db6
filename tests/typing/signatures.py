"""Type-level checks, run by mypy (``[tool.mypy] files``), not by pytest.

The transforms keep the signature of the function they wrap, so editors and
type checkers see its parameters and result: a wrong call below is an error
that the ``# type: ignore[...]`` comment expects (``warn_unused_ignores``
turns a call that no longer fails into an error of its own).
"""

from typing import Any, assert_type

import jax
import jax.numpy as jnp

import sharding
import smap
from smap.transform import MappingFn


def scale(x: jax.Array, factor: float = 1.0) -> jax.Array:
    return x * factor


jitted = smap.jit(scale)
assert_type(jitted(jnp.ones(2), factor=2.0), jax.Array)
jitted(jnp.ones(2), factor="2")  # type: ignore[arg-type]
jitted()  # type: ignore[call-arg]

assert_type(smap.jit(static_argnums=1)(scale)(jnp.ones(2), 3.0), jax.Array)

mapped = smap.vmap(scale, in_axes=(0, None))
assert_type(mapped(jnp.ones(2), 2.0), jax.Array)
mapped(jnp.ones(2), unknown=1)  # type: ignore[call-arg]


@smap.vmap(axis_name="i")
def lane(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return x, jax.lax.psum(x, "i")


assert_type(lane(jnp.ones(2)), tuple[jax.Array, jax.Array])

smap.grad(scale)(jnp.ones(()), None)  # type: ignore[arg-type]

# jax.vmap and the sharding adapters are MappingFns; jax.shard_map is not (sharding.adapt adapts it).
mapping_fns: list[MappingFn] = [jax.vmap, sharding.shard_map(), sharding.pmap()]
not_a_mapping_fn: MappingFn = jax.shard_map  # type: ignore[assignment]
smap.StatefulMapping(scale, mapping_fn=jax.shard_map, mapping_kwargs={"mesh": None})
any_result: Any = smap.grad(scale)(jnp.ones(()))
