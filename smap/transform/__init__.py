"""State-aware transforms: ``jit``, ``grad`` and the mapping ``StatefulMapping``/``vmap2``."""

from ._grad import grad
from ._jit import jit
from ._mapping import MappingFn, StatefulMapping, vmap2
from ._plan import BatchAxisError

__all__ = ["StatefulMapping", "vmap2", "jit", "grad", "BatchAxisError", "MappingFn"]
