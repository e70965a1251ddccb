"""CPU step time of the native backend against torch's Adam and the reference backend.

    python -m benchmarks.native_cpu [--repeats 7] [--layers 12] [--output FILE]

The parameters are shaped like GPT-2 small's weight matrices: per layer c_attn 2304x768, attn
c_proj 768x768, c_fc 3072x768, mlp c_proj 768x3072 (85M elements for 12 layers), plus wte
50257x768 and wpe 1024x768 (124M elements in all), fp32, every one a vector tensor. All methods
step the SAME param and grad tensors, each with its own optimizer state:

- native:       NDAdam(backend="native"), the C++ CPU kernel; 20 bytes per element
- reference:    NDAdam(backend="reference"), Algorithm 1 in PyTorch ops, one tensor at a time
- adam_fused:   torch.optim.Adam(fused=True); 28 bytes per element (it keeps v per element)
- adam_foreach, adam_forloop: torch.optim.Adam's other two implementations
- copy:         dst.copy_(src) over the same element count; 8 bytes per element, the bandwidth
                yardstick measured in the same run

Methods are timed round-robin, one step each per round, so that a noisy machine slows all of
them alike; the median over rounds is reported, with GB/s (at the bytes per element above), the
fraction of the copy's GB/s, and the ratio to adam_fused. The CSV (one row per method) carries
the machine description: CPU model, core count, torch threads, torch version, date, load.

On a machine shared with other work, run it with --threads 1 as well: with every core busy, each
OpenMP parallel region waits until all its threads are scheduled, which costs the per-tensor
baselines (one region per tensor) far more than the native kernel (one region per step).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ndadam_fused import NDAdam
from ndadam_fused.backends import unavailable_reason

RESULTS = Path(__file__).resolve().parent / "results"
# Bytes moved per element and step by an implementation at its traffic floor.
BYTES_PER_ELEMENT = {
    "native": 20, "reference": 20, "adam_fused": 28, "adam_foreach": 28, "adam_forloop": 28, "copy": 8,
}
METHODS = list(BYTES_PER_ELEMENT)


def gpt2_small_shapes(layers: int) -> list[tuple[int, int]]:
    per_layer = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
    return per_layer * layers + [(50257, 768), (1024, 768)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_steppers(shapes: list[tuple[int, int]], methods: list[str]) -> dict[str, Callable[[], None]]:
    """One zero-argument step function per method, all over the same params and grads."""
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).mul_(1e-2)
    steppers: dict[str, Callable[[], None]] = {}
    for method in methods:
        if method in ("native", "reference"):
            optimizer = NDAdam([{"params": params, "vector": True}], lr=0.01, betas=(0.9, 0.99), backend=method)
        elif method.startswith("adam_"):
            kind = method.removeprefix("adam_")
            optimizer = torch.optim.Adam(
                params, lr=1e-3, betas=(0.9, 0.99), fused=kind == "fused", foreach=kind == "foreach"
            )
        else:  # copy: the bandwidth yardstick
            sources = [p.detach() for p in params]
            targets = [torch.empty_like(p) for p in params]

            def copy(sources=sources, targets=targets) -> None:
                for source, target in zip(sources, targets):
                    target.copy_(source)

            steppers[method] = copy
            continue
        steppers[method] = optimizer.step
    return steppers


def time_round_robin(steppers: dict[str, Callable[[], None]], repeats: int) -> dict[str, list[float]]:
    for step in steppers.values():  # warm-up: allocates state, faults pages in
        step()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    names = list(steppers)
    for round_index in range(repeats):
        # Rotate the order so that no method always runs after the same neighbour.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            steppers[name]()
            times[name].append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds (the median is reported)")
    parser.add_argument("--layers", type=int, default=12, help="transformer layers (GPT-2 small: 12)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=None, help="CSV path (default: benchmarks/results/native_cpu_<date>.csv)")
    args = parser.parse_args(argv)

    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    if "native" in methods:
        reason = unavailable_reason("native", "cpu")
        if reason is not None:
            parser.error(f"the native backend is not available: {reason}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    shapes = gpt2_small_shapes(args.layers)
    elements = sum(rows * columns for rows, columns in shapes)
    now = datetime.datetime.now(datetime.timezone.utc)
    machine = {
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        # Other processes on a small machine change absolute times (and a parallel region per
        # tensor waits for every thread to be scheduled): the 1-minute load average says how busy.
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    print(f"{elements / 1e6:.1f}M fp32 elements in {len(shapes)} tensors; {machine}")

    times = time_round_robin(make_steppers(shapes, methods), args.repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    copy_gbps = elements * BYTES_PER_ELEMENT["copy"] / medians["copy"] / 1e9 if "copy" in medians else None

    rows = []
    for name in methods:
        gbps = elements * BYTES_PER_ELEMENT[name] / medians[name] / 1e9
        rows.append({
            **machine,
            "method": name,
            "elements": elements,
            "bytes_per_element": BYTES_PER_ELEMENT[name],
            "repeats": args.repeats,
            "median_ms": round(medians[name] * 1e3, 2),
            "min_ms": round(min(times[name]) * 1e3, 2),
            "gb_per_s": round(gbps, 2),
            "fraction_of_copy": round(gbps / copy_gbps, 3) if copy_gbps else "",
            "time_vs_adam_fused": round(medians[name] / medians["adam_fused"], 3) if "adam_fused" in medians else "",
        })

    output = args.output or RESULTS / f"native_cpu_{now.strftime('%Y%m%d-%H%M%S')}.csv"
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    print("| method | median ms | GB/s | x copy GB/s | time / adam_fused |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['method']} | {row['median_ms']} | {row['gb_per_s']} | {row['fraction_of_copy']} | {row['time_vs_adam_fused']} |")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
