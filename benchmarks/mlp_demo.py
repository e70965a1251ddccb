"""Main job (until the paper's experiment lands): train a small MLP with NDAdam and watch the loss fall.

    python -m benchmarks.mlp_demo [--steps 300] [--backend auto]

The task is a fixed synthetic one (three interleaved spirals, 2-D inputs), so it needs no
download. The script exits with status 1 if the final loss is not below the first one.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from ndadam_fused import NDAdam


def spirals(points_per_class: int, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    radius = torch.linspace(0.05, 1.0, points_per_class)
    xs, ys = [], []
    for c in range(classes):
        angle = radius * 4.0 + 2 * math.pi * c / classes + 0.2 * torch.randn(points_per_class, generator=generator)
        xs.append(torch.stack([radius * angle.sin(), radius * angle.cos()], dim=1))
        ys.append(torch.full((points_per_class,), c))
    return torch.cat(xs), torch.cat(ys)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    x, y = spirals(300)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    # The official code's settings: vector lr 50x the scalar lr, betas (0.9, 0.99).
    opt = NDAdam(model.parameters(), lr=1e-3, vector_lr=0.05, betas=(0.9, 0.99), backend=args.backend)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    losses = []
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
        if step == 1 or step % 50 == 0:
            accuracy = (model(x).argmax(1) == y).float().mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  train accuracy {accuracy:.3f}")
    print(f"loss went from {losses[0]:.4f} to {losses[-1]:.4f}")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    raise SystemExit(main())
