"""A small transformer trained with NDAdam under FSDP2, or FSDP2 + tensor parallelism; DCP checkpoints.

Run with torchrun (gloo on CPU, NCCL on GPU)::

    torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed_train --parallel fsdp --steps 40 \\
        --checkpoint-dir /tmp/ndadam-ckpt
    torchrun --standalone --nproc_per_node 2 -m benchmarks.distributed_train --parallel fsdp-tp --tp 2 ...

``--parallel fsdp``: every block and the whole model under ``fully_shard`` on a 1-D mesh of all
ranks (rows whole: NDAdam steps each rank's rows, no communication). ``--parallel fsdp-tp``: a
``(world / tp, tp)`` mesh; each block's attention and MLP are tensor parallel over ``tp``
(q, k, v and the MLP's first layer ColwiseParallel: rows whole; the attention output and the
MLP's second layer RowwiseParallel: rows split, so NDAdam runs its two-phase step with one
all-reduce of 24 bytes per row), then FSDP2 over the data-parallel dim.

The optimizer is plain ``NDAdam(param_groups(model, ...))`` over the DTensors the model holds.
With ``--checkpoint-dir`` the run saves model and optimizer with ``torch.distributed.checkpoint``
every ``--save-every`` steps and at the end, and a run that finds a checkpoint there resumes
from it. At the end rank 0 prints a SHA-256 of all weights: an interrupted-and-resumed run
prints the same one as an uninterrupted run of the same total steps (bit-exact resume).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from benchmarks.torchrun_exit import finish
from ndadam_fused import NDAdam, param_groups

VOCAB = 64


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads  # heads on this rank: divided by the tensor-parallel degree
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (f(x).view(batch, length, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Transformer(nn.Module):
    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, context: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        # Logits as [tokens, VOCAB]: a fresh tensor, not a view (FSDP2 warns about returned views).
        return self.head(self.norm(x).flatten(0, 1))


def batch(step: int, data_rank: int, size: int, context: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of a fixed affine recurrence mod VOCAB from random starts: learnable, and the
    same batches whatever the rank layout (seeded by step and data-parallel rank)."""
    generator = torch.Generator().manual_seed(1000 * step + data_rank)
    starts = torch.randint(0, VOCAB, (size, 1), generator=generator)
    offsets = torch.arange(context + 1)
    tokens = (starts * 5 ** (offsets % 4) + 3 * offsets) % VOCAB
    tokens = tokens.to(device)
    return tokens[:, :-1], tokens[:, 1:]


def build(args, device: torch.device):
    """The model laid out on its mesh, its data-parallel rank and degree."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    torch.manual_seed(args.seed)
    model = Transformer(width=args.width, depth=args.depth, heads=args.heads, context=args.context).to(device)
    if args.parallel == "fsdp":
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
        dp_mesh = mesh["dp"]
    else:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        if world % args.tp or args.heads % args.tp:
            raise SystemExit(f"--tp {args.tp} must divide the world size ({world}) and --heads ({args.heads})")
        mesh = init_device_mesh(device.type, (world // args.tp, args.tp), mesh_dim_names=("dp", "tp"))
        dp_mesh = mesh["dp"]
        plan = {
            "attention.q": ColwiseParallel(), "attention.k": ColwiseParallel(), "attention.v": ColwiseParallel(),
            "attention.out": RowwiseParallel(), "up": ColwiseParallel(), "down": RowwiseParallel(),
        }
        for block in model.blocks:
            parallelize_module(block, mesh["tp"], plan)
            block.attention.heads = args.heads // args.tp
    for block in model.blocks:
        fully_shard(block, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model, dp_mesh.get_local_rank(), dp_mesh.size()


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of every weight's full value (gathered), in parameter order."""
    from torch.distributed.tensor import DTensor

    # Gathering FSDP2-over-TP weights takes two all-gathers, which torch logs as suboptimal: it is
    # done once, for this digest.
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    digest = hashlib.sha256()
    for _, param in sorted(model.named_parameters()):
        full = param.detach().full_tensor() if isinstance(param, DTensor) else param.detach()
        digest.update(full.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parallel", choices=("fsdp", "fsdp-tp"), default="fsdp")
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel degree for --parallel fsdp-tp")
    parser.add_argument("--steps", type=int, default=40, help="train until this step (counted from the start)")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--save-every", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="sequences per data-parallel rank and step")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--backend", default="auto", help="NDAdam backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank = dist.get_rank()

    model, dp_rank, dp_size = build(args, device)
    # Vectors: every Linear weight (rows whole, or split by RowwiseParallel); scalars: the rest.
    groups = param_groups(model, lr=3e-3, vector_lr=0.05, exclude=(nn.Embedding,), exclude_names=("position",))
    opt = NDAdam(groups, betas=(0.9, 0.99), backend=args.backend)

    start = 0
    checkpoint = args.checkpoint_dir and os.path.exists(os.path.join(args.checkpoint_dir, ".metadata"))
    if checkpoint:
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=args.checkpoint_dir)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from step {start} of {args.checkpoint_dir}", flush=True)

    if rank == 0:
        print(
            f"{args.parallel}: {dist.get_world_size()} ranks ({dist.get_backend()}), data-parallel {dp_size}"
            + (f" x tensor-parallel {args.tp}" if args.parallel == "fsdp-tp" else "")
            + f", NDAdam backend {args.backend}, {sum(p.numel() for p in model.parameters()):,} parameters",
            flush=True,
        )

    # Saving over the previous checkpoint of this run is the point of --save-every.
    warnings.filterwarnings("ignore", message="Detected an existing checkpoint")

    def save(step: int) -> None:
        model_state, optim_state = get_state_dict(model, opt)
        dcp.save(
            {"model": model_state, "optim": optim_state, "step": torch.tensor(step)},
            storage_writer=dcp.FileSystemWriter(args.checkpoint_dir, overwrite=True),
        )
        if rank == 0:
            print(f"saved step {step} to {args.checkpoint_dir}", flush=True)

    began = time.perf_counter()
    for step in range(start + 1, args.steps + 1):
        inputs, targets = batch(step, dp_rank, args.batch, args.context, device)
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps:
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            if rank == 0:
                print(f"step {step:4d}  loss {mean_loss.item() / dist.get_world_size():.4f}", flush=True)
        if args.checkpoint_dir and (step % args.save_every == 0 or step == args.steps):
            save(step)
    elapsed = time.perf_counter() - began
    digest = weights_digest(model)
    if rank == 0 and args.steps > start:
        print(f"{(args.steps - start) / elapsed:.1f} steps/s; weights sha256 {digest[:16]}", flush=True)
    return 0


if __name__ == "__main__":
    finish(main())
