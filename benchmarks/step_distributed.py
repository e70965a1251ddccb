"""The optimizer step under FSDP2 (and with rows split by tensor parallelism), against torch's Adam.

Run with torchrun; every rank times the same steps and the slowest rank counts::

    torchrun --standalone --nproc_per_node 2 -m benchmarks.step_distributed --sets wrn-28-10,gpt2-small

Two layouts of one parameter set (``benchmarks/param_sets.py``), both fp32:

- ``fsdp``: the parameters registered on a module and sharded by FSDP2's ``fully_shard``
  (DTensors, ``Shard(0)``: rows whole on each rank). Candidates: NDAdam (native backend, or
  ``--backends``) and ``torch.optim.Adam(fused=True)`` (and ``foreach=True``) on the same
  DTensors. NDAdam communicates nothing here.
- ``rows-split``: the vector tensors as ``Shard(1)`` DTensors (every row split across ranks,
  as RowwiseParallel leaves them), scalars replicated. NDAdam runs its two-phase step: one
  all-reduce of 6 statistics per local row; the bytes it moves per step are measured (every
  all-reduce's buffer, seen by a dispatch mode) and compared with 24 B x rows (fp32).

Gradients are fixed random DTensors laid out like their parameters (no forward/backward: only
the optimizer step is timed). Candidates run round robin, ``--repeats`` times after
``--warmup``, each step between barriers; a step's time is the slowest rank's, and the figure is
the median over repeats. Ratios are taken within one run (the machine is shared and noisy).
Rank 0 prints a table and writes ``step_<device>_distributed<tag>.csv`` under ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import param_sets
from benchmarks.torchrun_exit import finish
from ndadam_fused import NDAdam

RESULTS = Path(__file__).resolve().parent / "results"


class AllReduceBytes(TorchDispatchMode):
    """Sums the bytes of every all-reduce issued while it is active (c10d.allreduce_)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.c10d.allreduce_.default:
            self.calls += 1
            self.bytes += sum(t.numel() * t.element_size() for t in args[0])
        return func(*args, **(kwargs or {}))


def _holder(shapes: list[tuple[int, ...]], device: torch.device, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    module = nn.Module()
    module.weights = nn.ParameterList(
        nn.Parameter(torch.randn(shape, generator=generator).to(device)) for shape in shapes
    )
    return module


def _random_grads(params: list[torch.Tensor], seed: int) -> None:
    """A fixed random gradient per parameter, laid out like it (built from local pieces: no communication)."""
    from torch.distributed.tensor import DTensor

    generator = torch.Generator().manual_seed(seed + dist.get_rank())
    for param in params:
        local = torch.randn(param.to_local().shape, generator=generator).to(param.device) * 1e-2
        param.grad = DTensor.from_local(
            local, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
        )


def layout_params(layout: str, shapes: list[tuple[int, ...]], device: torch.device) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if layout == "fsdp":
        from torch.distributed.fsdp import fully_shard

        holder = _holder(shapes, device, seed=0)
        fully_shard(holder, mesh=mesh)
        return list(holder.parameters())
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        full = torch.randn(shape, generator=generator).to(device)
        placement = Shard(1) if len(shape) >= 2 and shape[1] > 1 else Replicate()
        params.append(nn.Parameter(distribute_tensor(full, mesh, [placement])))
    return params


def make_optimizer(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if name.startswith("ndadam-"):
        return NDAdam(params, lr=1e-3, vector_lr=0.05, betas=(0.9, 0.99), backend=name.removeprefix("ndadam-"))
    if name == "adam-fused":
        return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.99), fused=True)
    if name == "adam-foreach":
        return torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.99), foreach=True)
    raise ValueError(f"unknown candidate {name!r}")


def time_candidates(optimizers: dict[str, torch.optim.Optimizer], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per step, the slowest rank's, for every repeat; candidates interleaved round robin."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for repeat in range(warmup + repeats):
        for name, optimizer in optimizers.items():
            dist.barrier()
            began = time.perf_counter()
            optimizer.step()
            elapsed = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if repeat >= warmup:
                times[name].append(elapsed.item())
    return times


def run_layout(layout: str, set_name: str, candidates: list[str], args, device: torch.device) -> list[dict]:
    shapes = param_sets.shapes(set_name)
    rows = []
    optimizers = {}
    params_of = {}
    for name in candidates:
        # One copy of the parameters per candidate, so that no candidate steps another's tensors.
        params = layout_params(layout, shapes, device)
        _random_grads(params, seed=1)
        params_of[name] = params
        optimizers[name] = make_optimizer(name, params)
    times = time_candidates(optimizers, args.repeats, args.warmup)

    all_reduce = {}
    for name, optimizer in optimizers.items():
        mode = AllReduceBytes()
        with mode:
            optimizer.step()
        all_reduce[name] = (mode.calls, mode.bytes)
    vector_rows = sum(p.to_local().shape[0] for p in params_of[candidates[0]] if p.dim() >= 2 and p.shape[1] > 1)
    local_elements = sum(p.to_local().numel() for p in params_of[candidates[0]])
    baseline = statistics.median(times["adam-fused"]) if "adam-fused" in times else None
    for name in candidates:
        median = statistics.median(times[name])
        calls, moved = all_reduce[name]
        rows.append({
            "layout": layout, "set": set_name, "candidate": name, "ranks": dist.get_world_size(),
            "median_ms": round(median * 1e3, 3), "min_ms": round(min(times[name]) * 1e3, 3),
            "repeats": len(times[name]),
            "vs_adam_fused": round(median / baseline, 3) if baseline else "",
            "local_elements": local_elements,
            "all_reduces_per_step": calls, "all_reduce_bytes_per_step": moved,
            "bytes_per_local_row": round(moved / vector_rows, 2) if layout == "rows-split" and vector_rows else "",
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="wrn-28-10,gpt2-small", help="comma-separated: " + ", ".join(param_sets.SETS))
    parser.add_argument("--layouts", default="fsdp,rows-split")
    parser.add_argument("--candidates", default="ndadam-native,adam-fused,adam-foreach")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="wrn-16-4, 3 repeats: seconds, for CI")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS)))
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.sets, args.repeats, args.warmup = "wrn-16-4", 3, 1
    unknown = [name for name in args.sets.split(",") if name not in param_sets.SETS]
    if unknown:
        parser.error(f"unknown sets {unknown}; choose from {', '.join(param_sets.SETS)}")

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    candidates = args.candidates.split(",")
    rows = []
    for set_name in args.sets.split(","):
        for layout in args.layouts.split(","):
            rows += run_layout(layout, set_name, candidates, args, device)
    if dist.get_rank() == 0:
        stamp = {
            "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores, {torch.get_num_threads()} thread(s) per rank",
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        }
        rows = [{**row, **stamp} for row in rows]
        print(f"{'layout':<11} {'set':<11} {'candidate':<15} {'median ms':>10} {'vs adam-fused':>14} {'all-reduce B/step':>18} {'B/row':>6}")
        for row in rows:
            print(f"{row['layout']:<11} {row['set']:<11} {row['candidate']:<15} {row['median_ms']:>10.2f} "
                  f"{row['vs_adam_fused']!s:>14} {row['all_reduce_bytes_per_step']:>18} {row['bytes_per_local_row']!s:>6}")
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"step_{device.type}_distributed{args.tag}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    finish(main())
