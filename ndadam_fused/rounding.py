"""Stochastic rounding of fp32 values to bf16, from a counter-based hash (no random state).

With ``stochastic_rounding=True`` a bf16 parameter's new value ``x`` (computed in fp32) is
rounded up or down to a neighbouring bf16 value with probabilities proportional to closeness,
so that updates smaller than half a bf16 ulp survive on average instead of being rounded away.
The random bits come from a hash of (the tensor's seed, the step, the element's index), so a
run is reproducible and a resumed run (the seed and the step are in the state dict) rounds as
the uninterrupted one did. Every backend computes exactly this:

    key  = fmix32(seed32 ^ (t · 0x85EBCA77 mod 2³²))              per tensor and step t
    r    = fmix32((i · 0x9E3779B1 mod 2³²) ^ key) & 0xFFFF        per element, i = row-major index
    bf16 = upper 16 bits of ((fp32 bits of x) + r)

with ``fmix32`` MurmurHash3's finalizer (x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13;
x *= 0xC2B2AE35; x ^= x >> 16, all mod 2³²). Adding ``r`` to the 16 bits that truncation drops
carries into the kept bits with probability (dropped bits) / 2¹⁶: that is the stochastic rounding
of the magnitude (the sign bit is untouched).

This module is the specification in torch ops (int64 arithmetic kept below 2⁶³), used by the
reference backend and the tests; the kernels implement the same integer steps.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["tensor_seed", "stochastic_round_to_bfloat16"]

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
_STEP_MULTIPLIER = 0x85EBCA77
_FMIX1 = 0x85EBCA6B
_FMIX2 = 0xC2B2AE35


def _mul32(x: Tensor, constant: int) -> Tensor:
    """x · constant mod 2³² for 0 <= x < 2³², in int64 without overflow (16-bit halves)."""
    high = ((x >> 16) * constant) & 0xFFFF
    return ((high << 16) + (x & 0xFFFF) * constant) & _MASK32


def _fmix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX1)
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX2)
    return x ^ (x >> 16)


def _fmix32_int(x: int) -> int:
    x ^= x >> 16
    x = (x * _FMIX1) & _MASK32
    x ^= x >> 13
    x = (x * _FMIX2) & _MASK32
    return x ^ (x >> 16)


def tensor_seed(group_index: int, param_index: int) -> int:
    """The 32-bit seed of a tensor: its place in the optimizer, mixed (stable across resumes)."""
    return _fmix32_int((_fmix32_int(group_index & _MASK32) ^ ((param_index * _GOLDEN) & _MASK32)) & _MASK32)


def random_bits(seed: Tensor, step: Tensor, numel: int) -> Tensor:
    """The 16 random bits of each of ``numel`` elements (int64 in [0, 2¹⁶)) for this seed and step."""
    device = seed.device
    t = step.to(torch.int64) & _MASK32
    key = _fmix32((seed.to(torch.int64) & _MASK32) ^ _mul32(t, _STEP_MULTIPLIER))
    index = torch.arange(numel, dtype=torch.int64, device=device) & _MASK32
    return _fmix32(_mul32(index, _GOLDEN) ^ key) & 0xFFFF


def stochastic_round_to_bfloat16(values: Tensor, seed: Tensor, step: Tensor) -> Tensor:
    """``values`` (fp32, any shape; element i in row-major order) rounded stochastically to bf16."""
    flat = values.to(torch.float32).reshape(-1)
    bits = flat.view(torch.int32).to(torch.int64) & _MASK32
    rounded = (bits + random_bits(seed, step, flat.numel())) & 0xFFFF0000
    # Back to a signed int32 pattern, then to the bf16 those upper 16 bits are.
    signed = torch.where(rounded >= 2**31, rounded - 2**32, rounded).to(torch.int32)
    return signed.view(torch.float32).to(torch.bfloat16).reshape(values.shape)
