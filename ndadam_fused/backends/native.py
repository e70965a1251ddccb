"""The native backend: the compiled extension ``ndadam_fused._C`` (csrc/).

Not built in this version yet: the native-extension issue brings the CUDA and C++ CPU kernels.
"""

from __future__ import annotations

import torch


def unavailable_reason(device: torch.device) -> str | None:
    return "the compiled extension backend is not part of this version of ndadam_fused yet"
