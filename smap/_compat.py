"""The one place where smap touches JAX internals.

Tracing discovers states while the function runs, so a state's value must
become an input of the jaxpr under construction at the moment it is first
read. JAX has no public API for adding an input mid-trace; the jaxpr trace
object has one (``new_arg``), whose signature changed across releases.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import jax
from jax._src.array import ArrayImpl

try:  # public since JAX 0.8
    from jax.extend.core import jaxprs_in_params, take_current_trace
except ImportError:
    from jax._src.core import jaxprs_in_params, take_current_trace

# The concrete type of a jax.Array: comparing `type(x) is ArrayImpl` keeps the
# per-call path of a cached transform free of abstract-base-class checks.
ArrayImpl = ArrayImpl

__all__ = ["ArrayImpl", "current_trace", "new_input", "jaxprs_in_params", "without_ambient_mesh"]


def current_trace() -> Any:
    """The trace that is building the current jaxpr."""
    with take_current_trace() as trace:
        return trace


def _new_arg_takes_source_info(trace: Any) -> bool:
    parameters = inspect.signature(type(trace).new_arg).parameters
    return "source_info" in parameters


_TAKES_SOURCE_INFO: dict[type, bool] = {}


def new_input(trace: Any, aval: jax.core.AbstractValue) -> Any:
    """Append an input of type ``aval`` to the jaxpr that ``trace`` builds."""
    kind = type(trace)
    takes_source_info = _TAKES_SOURCE_INFO.get(kind)
    if takes_source_info is None:
        takes_source_info = _TAKES_SOURCE_INFO[kind] = _new_arg_takes_source_info(trace)
    if takes_source_info:
        from jax._src import source_info_util

        return trace.new_arg(aval, source_info_util.current())
    return trace.new_arg(aval)


def without_ambient_mesh() -> Any:
    """A context in which no mesh is set (``jax.set_mesh`` records its mesh in avals).

    A per-lane program must not depend on the mesh it is later run on.
    """
    use = getattr(jax.sharding, "use_abstract_mesh", None)
    if use is None:
        return contextlib.nullcontext()
    return use(jax.sharding.AbstractMesh((), ()))
