"""ndadam_fused: ND-Adam (normalized direction-preserving Adam) for PyTorch.

    from ndadam_fused import NDAdam, param_groups
    opt = NDAdam(param_groups(model, lr=1e-3, vector_lr=0.05), betas=(0.9, 0.99))

The paper's regularized softmax (logit L2 penalty, BN-Softmax) is in :mod:`ndadam_fused.nn`.
"""

from . import nn
from .backends import BACKEND_NAMES, available_backends
from .grouping import param_groups
from .optimizer import NDAdam, ndadam
from .rows import normalize_rows_

__all__ = ["NDAdam", "ndadam", "normalize_rows_", "param_groups", "BACKEND_NAMES", "available_backends"]
__version__ = "0.1.0"
