"""Baselines the backends are measured against, in the same run and on the same tensors.

- :class:`UnfusedNDAdam`: ND-Adam's vector step written as well as eager PyTorch allows (in-place
  ops, no bias-corrected copies), one tensor at a time: what a user gets without a fused kernel.
- :func:`copy_bytes`: a plain copy moving the same bytes as an ND-Adam step: the bandwidth ceiling.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam


class UnfusedNDAdam:
    """ND-Adam with per-tensor torch ops: vectors row-wise in place, scalars with foreach Adam."""

    def __init__(self, params: list[Tensor], lr: float, vector_lr: float, betas=(0.9, 0.99), eps: float = 1e-8):
        # NDAdam's automatic split: 2+ dims and rows longer than 1.
        self.vectors = [p for p in params if p.dim() >= 2 and p.numel() > p.shape[0]]
        self.scalars = [p for p in params if not (p.dim() >= 2 and p.numel() > p.shape[0])]
        self.lr, self.vector_lr, self.betas, self.eps = lr, vector_lr, betas, eps
        state_dtype = lambda p: torch.float64 if p.dtype == torch.float64 else torch.float32  # noqa: E731
        self.exp_avgs = [torch.zeros(p.shape, dtype=state_dtype(p), device=p.device) for p in self.vectors]
        self.exp_avg_sqs = [torch.zeros(p.shape[0], dtype=state_dtype(p), device=p.device) for p in self.vectors]
        self.scalar_exp_avgs = [torch.zeros_like(p) for p in self.scalars]
        self.scalar_exp_avg_sqs = [torch.zeros_like(p) for p in self.scalars]
        self.scalar_steps = [torch.zeros((), dtype=torch.float32) for _ in self.scalars]
        self.t = 0
        with torch.no_grad():
            for p in self.vectors:
                w = p.view(p.shape[0], -1)
                w.div_(torch.linalg.vector_norm(w, dim=1, keepdim=True))

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.t += 1
        bias_correction1 = 1 - beta1**self.t
        bias_correction2 = 1 - beta2**self.t
        for p, m, v in zip(self.vectors, self.exp_avgs, self.exp_avg_sqs):
            rows = p.shape[0]
            w = p.view(rows, -1)
            g_bar = p.grad.view(rows, -1)
            if w.dtype != m.dtype:
                w, g_bar = w.to(m.dtype), g_bar.to(m.dtype)
            m2 = m.view(rows, -1)
            radial = (g_bar * w).sum(dim=1, keepdim=True)
            g = torch.addcmul(g_bar, radial, w, value=-1)
            m2.mul_(beta1).add_(g, alpha=1 - beta1)
            v.mul_(beta2).add_(torch.linalg.vector_norm(g, dim=1).square_(), alpha=1 - beta2)
            step_size = (v / bias_correction2).sqrt_().add_(self.eps).reciprocal_().mul_(self.vector_lr / bias_correction1)
            w.addcmul_(m2, step_size.unsqueeze(1), value=-1)
            w.div_(torch.linalg.vector_norm(w, dim=1, keepdim=True))
            if w.data_ptr() != p.data_ptr():
                p.copy_(w.view(p.shape))
        if self.scalars:
            adam(
                self.scalars, [p.grad for p in self.scalars], self.scalar_exp_avgs, self.scalar_exp_avg_sqs, [],
                self.scalar_steps, foreach=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=self.lr,
                weight_decay=0.0, eps=self.eps, maximize=False,
            )

    def state_bytes(self) -> int:
        tensors = self.exp_avgs + self.exp_avg_sqs + self.scalar_exp_avgs + self.scalar_exp_avg_sqs
        return sum(t.numel() * t.element_size() for t in tensors)


def copy_bytes(source: Tensor, destination: Tensor) -> None:
    destination.copy_(source)
