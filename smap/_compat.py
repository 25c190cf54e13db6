"""The one place where smap touches JAX internals (JAX 0.9 and 0.10).

Tracing discovers states while the function runs, so a state's value must
become an input of the jaxpr under construction at the moment it is first
read. JAX has no public API for adding an input mid-trace; the jaxpr trace
object has one (``new_arg``).
"""

from __future__ import annotations

from typing import Any

import jax
from jax._src import source_info_util
from jax._src.array import ArrayImpl
from jax.extend.core import take_current_trace

try:  # public since JAX 0.10
    from jax.extend.core import jaxprs_in_params
except ImportError:
    from jax._src.core import jaxprs_in_params

__all__ = ["ArrayImpl", "current_trace", "new_input", "jaxprs_in_params", "without_ambient_mesh"]

# The concrete type of a jax.Array: comparing `type(x) is ArrayImpl` keeps the
# per-call path of a cached transform free of abstract-base-class checks.
ArrayImpl = ArrayImpl


def current_trace() -> Any:
    """The trace that is building the current jaxpr."""
    with take_current_trace() as trace:
        return trace


def new_input(trace: Any, aval: jax.core.AbstractValue) -> Any:
    """Append an input of type ``aval`` to the jaxpr that ``trace`` builds."""
    return trace.new_arg(aval, source_info_util.current())


def without_ambient_mesh() -> Any:
    """A context in which no mesh is set (``jax.set_mesh`` records its mesh in avals).

    A per-lane program must not depend on the mesh it is later run on.
    """
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))
