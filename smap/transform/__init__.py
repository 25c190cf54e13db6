"""State-aware transforms: ``jit``, ``grad`` and the mapping ``StatefulMapping``/``vmap2``."""

from ._grad import grad
from ._jit import jit
from ._mapping import BatchAxisError, StatefulMapping, vmap2

__all__ = ["StatefulMapping", "vmap2", "jit", "grad", "BatchAxisError"]
