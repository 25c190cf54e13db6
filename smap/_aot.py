"""Ahead of time: a transform's program traced, lowered and compiled without running it.

Every transform has ``jax.jit``'s verbs: ``f.trace(*args)``, ``f.lower(*args)``
and ``f.lower(*args).compile()``. They go through the transform's own
dispatcher with the states' current values as inputs, so what they show is
exactly what a call runs (the same shardings, the same rewrites), and no
state is written. The compiled object is called as ``jax.jit``'s is, on
arguments of the signature it was lowered for.

Example:
    >>> import jax.numpy as jnp, smap
    >>> scale = smap.ParamState(jnp.full(3, 2.0))
    >>> f = smap.jit(lambda x: x * scale.value)
    >>> lowered = f.lower(jnp.ones(3))
    >>> lowered
    Lowered(smap.jit(<lambda>))
    >>> compiled = lowered.compile()
    >>> compiled.memory_analysis().output_size_in_bytes
    12
    >>> compiled(jnp.arange(3.0))
    Array([0., 2., 4.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.extend.core import ClosedJaxpr

__all__ = ["Traced", "Lowered", "Compiled", "signature_call"]


def signature_call(transform: Any, args: tuple, kwargs: dict) -> Callable:
    """A call of ``transform`` that takes only arguments of the signature of ``args`` and ``kwargs``: what
    calling a :class:`Compiled` does."""
    lowered = transform.signature_key(*args, **kwargs)[0]

    def run(*args: Any, **kwargs: Any) -> Any:
        called = transform.signature_key(*args, **kwargs)[0]
        if _typed(called) != _typed(lowered):  # (a weak type may differ, as for jax.jit's compiled object)
            raise TypeError(
                f"{transform.name}: compiled for arguments {_shown(lowered)}, called with {_shown(called)}; "
                f"call the transform itself for other arguments (it compiles each signature once)."
            )
        return transform(*args, **kwargs)

    return run


def _typed(key: Any) -> Any:
    """An argument signature (``smap._dispatch.ArgSignature``) with each leaf only its shape and dtype: a
    Python scalar its dtype, no weak type."""
    typed = lambda leaf: ((), jax.dtypes.canonicalize_dtype(leaf)) if isinstance(leaf, type) else leaf[:2]  # noqa: E731
    return key._replace(leaves=tuple(map(typed, key.leaves)))


def _shown(key: Any) -> str:
    """An argument signature as a user reads it: its structure and each array's dtype and shape."""
    leaves = [leaf.__name__ if isinstance(leaf, type) else f"{leaf[1]}{list(leaf[0])}" for leaf in key.leaves]
    shown = str(jax.tree_util.tree_unflatten(key.tree, leaves)).replace("'", "")
    return shown + (f" and static {dict(key.static)}" if key.static else "")


class Compiled:
    """A transform's program compiled by XLA for the arguments and states it was lowered with.

    Calling it calls the transform, which reads the states, runs the program
    and writes the states back, on arguments of the signature it was
    compiled for (their structure, shapes and dtypes); other arguments are a
    ``TypeError``, as for ``jax.jit``'s compiled object.
    """

    def __init__(self, compiled: Any, name: str, run: Callable):
        self._compiled = compiled
        self.name = name
        self._run = run

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(*args, **kwargs)

    def as_text(self) -> str:
        """XLA's optimised HLO: the program as it runs (collectives, fusions, buffers)."""
        return self._compiled.as_text()

    def cost_analysis(self) -> Any:
        """XLA's estimate of the program's flops and bytes accessed (``jax.stages.Compiled.cost_analysis``)."""
        return self._compiled.cost_analysis()

    def memory_analysis(self) -> Any:
        """The sizes of the program's arguments, outputs and temporaries (``jax.stages.Compiled.memory_analysis``)."""
        return self._compiled.memory_analysis()

    def __repr__(self) -> str:
        return f"Compiled({self.name})"


class Lowered:
    """A transform's program lowered to StableHLO, before XLA's optimisations."""

    def __init__(self, lowered: Any, name: str, run: Callable):
        self._lowered = lowered
        self.name = name
        self._run = run

    def compile(self) -> Compiled:
        """Compile the program with XLA."""
        return Compiled(self._lowered.compile(), self.name, self._run)

    def as_text(self, dialect: str | None = None) -> str:
        """The lowered program as text (StableHLO unless ``dialect='hlo'``)."""
        return self._lowered.as_text() if dialect is None else self._lowered.as_text(dialect=dialect)

    def cost_analysis(self) -> Any:
        """JAX's estimate of the unoptimised program's cost (``jax.stages.Lowered.cost_analysis``)."""
        return self._lowered.cost_analysis()

    def __repr__(self) -> str:
        return f"Lowered({self.name})"


class Traced:
    """A transform's program traced for some arguments: its jaxpr, and the way to lower it."""

    def __init__(self, traced: Any, name: str, run: Callable):
        self._traced = traced
        self.name = name
        self._run = run

    @property
    def jaxpr(self) -> ClosedJaxpr:
        """What a call runs, as a closed jaxpr: the states' values are its first inputs, then the arguments."""
        return self._traced.jaxpr

    def lower(self) -> Lowered:
        """Lower the traced program (see :meth:`Lowered.compile`)."""
        return Lowered(self._traced.lower(), self.name, self._run)

    def __repr__(self) -> str:
        return f"Traced({self.name})"
