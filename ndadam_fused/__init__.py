"""ndadam_fused: ND-Adam (normalized direction-preserving Adam) for PyTorch.

    from ndadam_fused import NDAdam
    opt = NDAdam(model.parameters(), lr=1e-3, vector_lr=0.05, betas=(0.9, 0.99))
"""

from .backends import BACKEND_NAMES, available_backends
from .optimizer import NDAdam, ndadam

__all__ = ["NDAdam", "ndadam", "BACKEND_NAMES", "available_backends"]
__version__ = "0.1.0"
