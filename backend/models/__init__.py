"""Model builders, the weight table and safe checkpoint loading.

Nothing here loads weights at import time; builders load when called.
"""

from ..store import weights_dir
from .weights import WEIGHTS, MissingWeightError, WeightSpec, get_spec, resolve_weight

__all__ = [
    "WEIGHTS",
    "MissingWeightError",
    "WeightSpec",
    "get_spec",
    "resolve_weight",
    "weights_dir",
]
