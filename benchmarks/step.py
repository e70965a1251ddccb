"""Time one optimizer step: every available ND-Adam backend against the unfused baselines.

    python -m benchmarks.step [--device cpu|cuda] [--dtype float32] [--sets a,b] [--repeats N]
                              [--quick] [--out benchmarks/results] [--tag NAME]
    python -m benchmarks.step --dtype bfloat16 [--sets a,b]     # master weights, stochastic rounding
    python -m benchmarks.step --host-only [--sets many-small] [--repeats N]

For every parameter set (benchmarks/param_sets.py) and every candidate it reports the median
step time and its spread over repeats (warm-up excluded; CUDA timed with events, the L2 cache
flushed before each step), achieved GB/s under DESIGN.md section 5's bytes model, the fraction
of a plain copy's bandwidth measured in the same run, the speedup over each baseline measured in
the same run, the optimizer-state bytes against Adam's, and on CUDA the kernel launches per step
(from the profiler). Results go to ``<out>/step_<device>[_<tag>].csv`` with the machine
description on every row, and a plot ``<out>/step_<device>[_<tag>].png``.

``--host-only`` measures what the Triton backend's host code costs per step, on the CPU and
without a GPU (it restarts itself with ``TRITON_INTERPRET=1``, which the Triton backend needs for
CPU tensors; no kernel runs): a whole ``NDAdam.step`` with the Triton kernel launch stubbed out (the optimizer's
own work and the scalars' Adam included), in steady state, once with gradients updated in place
and once with fresh gradient tensors at every step (as FSDP2 or ``zero_grad(set_to_none=True)``
give), next to the native backend's whole step (its C++ kernel included) on the same tensors. Results go to ``<out>/step_cpu_host[_<tag>].csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks import param_sets
from benchmarks.baselines import UnfusedNDAdam, copy_bytes
from ndadam_fused import NDAdam
from ndadam_fused import backends as nd_backends

BASELINES = ("ndadam-reference", "unfused", "adam-foreach", "adam-fused")
#: The same step on weights stored [in, out] (Hugging Face's Conv1D: unit_dim 1), which the
#: backends step through a transposed work copy: the cost of that layout, in the same run.
UNIT_DIM_1 = ("ndadam-native-unit-dim-1", "ndadam-triton-unit-dim-1")
#: bf16/fp16 params kept from stalling (issue 12): an fp32 master copy in the state, or bf16
#: stochastic rounding. Timed with ``--dtype bfloat16`` (or float16: master copies only).
LOW_PRECISION_MODES = {"master": dict(master_weights=True), "stochastic-rounding": dict(stochastic_rounding=True)}
MIXED = tuple(f"ndadam-{backend}-{mode}" for backend in ("native", "triton") for mode in LOW_PRECISION_MODES)
CANDIDATES = ("ndadam-native", "ndadam-triton") + UNIT_DIM_1 + MIXED + BASELINES + ("copy",)
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Candidate:
    name: str
    step: Callable[[], None]
    bytes_per_step: int
    state_bytes: int
    cleanup: list = field(default_factory=list)


def is_vector(p: torch.Tensor) -> bool:
    """NDAdam's automatic split: 2+ dims, rows longer than 1."""
    return p.dim() >= 2 and p.numel() > p.shape[0]


def _bytes_ndadam(params: list[torch.Tensor], mode: str | None = None) -> int:
    """DESIGN.md section 5: vectors read w, ḡ, m and write w, m (20 B per fp32 element) plus
    v per row; scalars are Adam's (read p, g, m, v; write p, m, v).

    ``mode`` (bf16/fp16 params): "master" also reads and writes the fp32 master copy (8 B per
    element); with it or "stochastic-rounding" the scalars' moments are fp32. Stochastic
    rounding moves no extra byte: its random bits are a hash of the element's index.
    """
    total = 0
    for p in params:
        size = p.element_size()
        state = 8 if p.dtype == torch.float64 else 4
        master = 8 if mode == "master" else 0
        if is_vector(p):
            total += p.numel() * (3 * size + 2 * state + master) + p.shape[0] * 2 * state
        elif mode is not None:
            total += p.numel() * (3 * size + 4 * 4 + master)
        else:
            total += p.numel() * 7 * size
    return total


def _bytes_adam(params: list[torch.Tensor]) -> int:
    return sum(p.numel() * 7 * p.element_size() for p in params)


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for key, t in state.items()
        if key != "step" and isinstance(t, torch.Tensor)
    )


def _adam_state_bytes(params: list[torch.Tensor]) -> int:
    return sum(2 * p.numel() * p.element_size() for p in params)


def make_candidate(name: str, params: list[torch.nn.Parameter], device: torch.device) -> Candidate | str:
    """The candidate ready to step, or why it cannot run here."""
    if name in UNIT_DIM_1:
        backend = name.removeprefix("ndadam-").removesuffix("-unit-dim-1")
        if backend == "triton" and device.type != "cuda":
            return "the Triton backend runs CPU tensors only in its interpreter, which is not a speed path"
        reason = nd_backends.unavailable_reason(backend, device)
        if reason is not None:
            return reason
        # The set's vector weights stored with units along dim 1, as Conv1D stores them.
        stored = []
        for p in params:
            if is_vector(p):
                q = torch.nn.Parameter(p.detach().movedim(0, 1).contiguous())
                q.grad = p.grad.movedim(0, 1).contiguous()
                stored.append(q)
        scalars = [p for p in params if not is_vector(p)]
        opt = NDAdam(
            [{"params": stored, "vector": True, "unit_dim": 1, "lr": 0.05}, {"params": scalars, "vector": False}],
            lr=1e-3, betas=(0.9, 0.99), backend=backend,
        )
        opt.step()
        return Candidate(name, opt.step, _bytes_ndadam(params), _state_bytes(opt), [opt, stored])
    if name in MIXED:
        backend, mode = name.removeprefix("ndadam-").split("-", 1)
        if backend == "triton" and device.type != "cuda":
            return "the Triton backend runs CPU tensors only in its interpreter, which is not a speed path"
        reason = nd_backends.unavailable_reason(backend, device)
        if reason is not None:
            return reason
        dtype = params[0].dtype
        if dtype not in (torch.bfloat16, torch.float16) or (mode == "stochastic-rounding" and dtype != torch.bfloat16):
            wanted = "bfloat16" if mode == "stochastic-rounding" else "bfloat16 or float16"
            return f"{mode} applies to {wanted} params: run with --dtype {wanted.split()[0]}"
        opt = NDAdam(params, lr=1e-3, vector_lr=0.05, betas=(0.9, 0.99), backend=backend, **LOW_PRECISION_MODES[mode])
        opt.step()  # lazy state, the master copies included
        return Candidate(name, opt.step, _bytes_ndadam(params, mode), _state_bytes(opt), [opt])
    if name.startswith("ndadam-"):
        backend = name.removeprefix("ndadam-")
        if backend == "triton" and device.type != "cuda":
            return "the Triton backend runs CPU tensors only in its interpreter, which is not a speed path"
        reason = nd_backends.unavailable_reason(backend, device)
        if reason is not None:
            return reason
        opt = NDAdam(params, lr=1e-3, vector_lr=0.05, betas=(0.9, 0.99), backend=backend)
        opt.step()  # lazy state
        return Candidate(name, opt.step, _bytes_ndadam(params), _state_bytes(opt), [opt])
    if name == "unfused":
        opt = UnfusedNDAdam(params, lr=1e-3, vector_lr=0.05)
        opt.step()
        return Candidate(name, opt.step, _bytes_ndadam(params), opt.state_bytes(), [opt])
    if name in ("adam-foreach", "adam-fused"):
        fused = name == "adam-fused"
        opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.99), foreach=not fused, fused=fused)
        opt.step()
        return Candidate(name, opt.step, _bytes_adam(params), _state_bytes(opt), [opt])
    if name == "copy":
        moved = _bytes_ndadam(params)
        source = torch.empty(moved // 2, dtype=torch.uint8, device=device).random_(0, 255)
        destination = torch.empty_like(source)
        return Candidate(name, lambda: copy_bytes(source, destination), 2 * source.numel(), 0, [source, destination])
    raise ValueError(f"unknown candidate {name!r}; choose from {', '.join(CANDIDATES)}")


MIN_REPEATS = 3


class _Timer:
    """Times single steps: CUDA events with the L2 cache flushed first, or the CPU clock.

    On CUDA it also takes the host's time to issue the step (the clock around the call, which
    returns once the work is queued): a step whose host time exceeds its device time leaves the
    GPU waiting.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.host_times: dict[str, list[float]] = {}
        if device.type == "cuda":
            # Larger than any L2 cache: each step starts with its tensors in HBM, as in training.
            self.flush = torch.empty(512 * 2**20, dtype=torch.uint8, device=device)
            self.pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def time(self, name: str, step: Callable[[], None], times: dict[str, list[float]]) -> None:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.flush.zero_()
            start.record()
            begin = time.perf_counter()
            step()
            self.host_times.setdefault(name, []).append(time.perf_counter() - begin)
            end.record()
            self.pending.append((name, start, end))
        else:
            begin = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - begin)

    def collect(self, times: dict[str, list[float]]) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            for name, start, end in self.pending:
                times[name].append(start.elapsed_time(end) / 1e3)
            self.pending.clear()


def time_round_robin(candidates: list[Candidate], device: torch.device, repeats: int, warmup: int,
                     budget_s: float = math.inf) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Seconds per step for each candidate, one step of each per round, after ``warmup`` rounds,
    and (CUDA) the host's seconds to issue each step.

    Round robin, so that a machine that is busy with other work slows every candidate alike.
    A candidate stops repeating once it has spent ``budget_s`` (after MIN_REPEATS steps), so
    that a slow baseline on a large set cannot hold the run for minutes.
    """
    for _ in range(warmup):
        for candidate in candidates:
            candidate.step()
    timer = _Timer(device)
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    for round_index in range(repeats):
        for candidate in candidates:
            spent = times[candidate.name]
            if round_index >= MIN_REPEATS and spent and sum(spent) > budget_s:
                continue
            timer.time(candidate.name, candidate.step, times)
        timer.collect(times)
    return times, timer.host_times


def count_launches(step: Callable[[], None], device: torch.device) -> int | None:
    """Kernels and memory operations one step puts on the GPU (None off CUDA)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _versions() -> tuple[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return torch.__version__, triton_version


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch_version, triton_version = _versions()
    machine = machine_description(device)
    date = datetime.date.today().isoformat()
    sets = args.sets
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a convenience, not a dependency
        def tqdm(iterable, **_):
            return iterable

    rows: list[dict] = []
    progress = tqdm(sets, desc="step benchmark", unit="set", file=sys.stderr)
    for set_name in progress:
        params = param_sets.build(set_name, device, dtype)
        # The copy first and alone: its buffers are as large as everything else together.
        names = [c for c in args.candidates if c != "copy"]
        groups = ([["copy"]] if "copy" in args.candidates else []) + [names]
        for group in groups:
            candidates = []
            for name in group:
                if hasattr(progress, "set_postfix_str"):
                    progress.set_postfix_str(f"{set_name}: preparing {name}")
                candidate = make_candidate(name, params, device)
                if isinstance(candidate, str):
                    print(f"  skip {name} on {set_name}: {candidate}", file=sys.stderr)
                else:
                    candidates.append(candidate)
            if hasattr(progress, "set_postfix_str"):
                progress.set_postfix_str(f"{set_name}: timing {', '.join(c.name for c in candidates)}")
            times, host_times = time_round_robin(candidates, device, args.repeats, args.warmup, args.budget_s)
            for candidate in candidates:
                launches = count_launches(candidate.step, device)
                row = _row(set_name, candidate, times[candidate.name], launches, params, args, device.type)
                if candidate.name in host_times:
                    row["host_ms"] = statistics.median(host_times[candidate.name]) * 1e3
                rows.append(row)
            del candidates, candidate
            gc.collect()
        del params
        gc.collect()
    for row in rows:
        row.update(machine=machine, torch=torch_version, triton=triton_version, date=date)
    _add_ratios(rows)
    return rows


def _row(set_name, candidate, times, launches, params, args, device_type) -> dict:
    quantiles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    median = statistics.median(times)
    return {
        "set": set_name, "device": device_type, "dtype": args.dtype, "candidate": candidate.name,
        "tensors": len(params), "elements": sum(p.numel() for p in params),
        "median_ms": median * 1e3, "p10_ms": quantiles[0] * 1e3, "p90_ms": quantiles[-1] * 1e3,
        "repeats": len(times), "threads": torch.get_num_threads() if device_type == "cpu" else "",
        "bytes_per_step": candidate.bytes_per_step, "gb_per_s": candidate.bytes_per_step / median / 1e9,
        "state_bytes": candidate.state_bytes,
        "state_vs_adam": candidate.state_bytes / _adam_state_bytes(params) if candidate.state_bytes else "",
        "launches_per_step": "" if launches is None else launches,
    }


def _add_ratios(rows: list[dict]) -> None:
    """Copy fraction and speedups, each against the baseline measured on the same set."""
    by_set: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_set.setdefault(row["set"], {})[row["candidate"]] = row
    for row in rows:
        same_set = by_set[row["set"]]
        copy = same_set.get("copy")
        row["copy_fraction"] = row["gb_per_s"] / copy["gb_per_s"] if copy else ""
        for baseline in BASELINES:
            other = same_set.get(baseline)
            row[f"speedup_vs_{baseline}"] = other["median_ms"] / row["median_ms"] if other else ""


COLUMNS = [
    "set", "device", "dtype", "candidate", "tensors", "elements", "median_ms", "p10_ms", "p90_ms", "host_ms", "repeats", "threads",
    "bytes_per_step", "gb_per_s", "copy_fraction", *(f"speedup_vs_{b}" for b in BASELINES),
    "state_bytes", "state_vs_adam", "launches_per_step", "machine", "torch", "triton", "date",
]


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _format(row.get(k, "")) for k in COLUMNS})


def print_table(rows: list[dict]) -> None:
    header = f"{'set':<17}{'candidate':<26}{'median ms':>11}{'p10-p90 ms':>19}{'GB/s':>9}{'of copy':>9}" \
             f"{'x ref':>8}{'x unfused':>10}{'x Adam fe':>10}{'x Adam fu':>10}{'state/Adam':>11}{'launches':>9}" \
             f"{'host ms':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        def ratio(key):
            value = r.get(key, "")
            return f"{value:.2f}" if isinstance(value, float) else "-"

        spread = f"{r['p10_ms']:.3g}-{r['p90_ms']:.3g}"
        print(
            f"{r['set']:<17}{r['candidate']:<26}{r['median_ms']:>11.3f}{spread:>19}{r['gb_per_s']:>9.1f}"
            f"{ratio('copy_fraction'):>9}{ratio('speedup_vs_ndadam-reference'):>8}{ratio('speedup_vs_unfused'):>10}"
            f"{ratio('speedup_vs_adam-foreach'):>10}{ratio('speedup_vs_adam-fused'):>10}"
            f"{ratio('state_vs_adam'):>11}{str(r['launches_per_step']) or '-':>9}"
            f"{(format(r['host_ms'], '.3f') if 'host_ms' in r else '-'):>9}"
        )


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Step time per candidate and set (log scale), the copy of the same bytes drawn as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(r["set"] for r in rows))
    names = [c for c in CANDIDATES if c != "copy" and any(r["candidate"] == c for r in rows)]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(sets)), 4.5))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, set_name in enumerate(sets):
            match = [r for r in rows if r["set"] == set_name and r["candidate"] == name]
            if match:
                xs.append(j - 0.4 + (i + 0.5) * width)
                ys.append(match[0]["median_ms"])
        ax.bar(xs, ys, width=width, label=name)
    for j, set_name in enumerate(sets):
        copy = [r for r in rows if r["set"] == set_name and r["candidate"] == "copy"]
        if copy:
            ax.hlines(copy[0]["median_ms"], j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                      label="copy of the same bytes" if j == 0 else None)
    ax.set_xticks(range(len(sets)), sets)
    ax.set_yscale("log")
    ax.set_ylabel("median step time (ms, log scale)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


HOST_CANDIDATES = ("ndadam-triton-host", "ndadam-triton-host-fresh-grads", "ndadam-native")


def run_host_only(args: argparse.Namespace) -> list[dict]:
    """Host time per step of the Triton backend (launch stubbed) against the native backend's
    whole CPU step, on the same float32 tensors; medians over ``args.repeats`` steps, round robin."""
    from unittest import mock

    from ndadam_fused.backends import native, triton_backend

    dtype = getattr(torch, args.dtype)
    torch_version, triton_version = _versions()
    machine = machine_description(torch.device("cpu"))
    rows: list[dict] = []
    for set_name in args.sets:
        params = param_sets.build(set_name, "cpu", dtype)
        vectors = [p for p in params if is_vector(p)]

        def triton_host(fresh: bool):
            # The whole NDAdam.step (optimizer, scalars, vector host code), the kernel stubbed out.
            twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
            for twin, p in zip(twins, params):
                twin.grad = p.grad.clone()
            opt = NDAdam(twins, lr=1e-3, vector_lr=0.05, betas=(0.9, 0.99), backend="triton")

            def step():
                if fresh:
                    for twin in twins:
                        twin.grad = torch.randn_like(twin)
                begin = time.perf_counter()
                opt.step()
                return time.perf_counter() - begin
            return step

        candidates = {"ndadam-triton-host": triton_host(False), "ndadam-triton-host-fresh-grads": triton_host(True)}
        reason = nd_backends.unavailable_reason("native", "cpu")
        if reason is None:
            native_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
            for p, q in zip(native_params, params):
                p.grad = q.grad
            opt = NDAdam(native_params, lr=1e-3, vector_lr=0.05, betas=(0.9, 0.99), backend="native")
            opt.step()

            def native_step():
                begin = time.perf_counter()
                opt.step()
                return time.perf_counter() - begin

            candidates["ndadam-native"] = native_step
        else:
            print(f"  skip ndadam-native on {set_name}: {reason}", file=sys.stderr)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        with mock.patch.object(triton_backend, "_launch", lambda part, grads_aligned: None):
            for step in candidates.values():  # first steps: tables, lazy state
                step()
            builds = triton_backend.table_builds
            for _ in range(args.repeats):
                for name, step in candidates.items():
                    times[name].append(step())
            rebuilt = triton_backend.table_builds - builds
        if rebuilt:
            raise RuntimeError(f"the Triton backend rebuilt {rebuilt} tables in steady state")
        for name, spent in times.items():
            quantiles = statistics.quantiles(spent, n=10, method="inclusive") if len(spent) > 1 else [spent[0]] * 9
            rows.append({
                "set": set_name, "device": "cpu", "dtype": args.dtype, "candidate": name,
                "tensors": len(params), "elements": sum(p.numel() for p in params),
                "median_ms": statistics.median(spent) * 1e3, "p10_ms": quantiles[0] * 1e3, "p90_ms": quantiles[-1] * 1e3,
                "repeats": len(spent), "threads": torch.get_num_threads(),
                "machine": machine, "torch": torch_version, "triton": triton_version, "date": datetime.date.today().isoformat(),
            })
    return rows


def print_host_table(rows: list[dict]) -> None:
    print(f"{'set':<14}{'candidate':<34}{'tensors':>8}{'median ms':>11}{'p10-p90 ms':>17}{'x native':>10}")
    for r in rows:
        native_row = next((o for o in rows if o["set"] == r["set"] and o["candidate"] == "ndadam-native"), None)
        ratio = f"{r['median_ms'] / native_row['median_ms']:.3f}" if native_row else "-"
        spread = f"{r['p10_ms']:.3g}-{r['p90_ms']:.3g}"
        print(f"{r['set']:<14}{r['candidate']:<34}{r['tensors']:>8}{r['median_ms']:>11.3f}{spread:>17}{ratio:>10}")
    print("ndadam-triton-host*: the Triton backend's vector step, kernel launch stubbed out (host work only);"
          " ndadam-native: the native backend's whole step (C++ kernel included) on all the set's tensors.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--sets", default=None,
                        help="comma-separated: " + ", ".join([*param_sets.SETS, *param_sets.ROW_LENGTH_SETS]))
    parser.add_argument("--candidates", default=None,
                        help="comma-separated subset of " + ", ".join(CANDIDATES) + " (default: all; the "
                        "master/stochastic-rounding ones only with --dtype bfloat16 or float16)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=20.0, help="CPU: stop repeating a case after this many seconds (at least 3 repeats)")
    parser.add_argument("--quick", action="store_true", help="small sets, few repeats: under a minute on a CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS)))
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="CPU: torch.set_num_threads (default: torch's)")
    parser.add_argument("--host-only", action="store_true",
                        help="the Triton backend's host time per step (launch stubbed, CPU) next to the native backend's whole step")
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    if args.host_only:
        args.device = "cpu"  # the kernel launch is stubbed out: host work only, on the CPU
        if args.sets is None:
            args.sets = "many-small"
    if args.sets is None:
        if args.quick:
            args.sets = "many-small,wrn-16-4"
        elif on_gpu:
            args.sets = ",".join(param_sets.SETS)
        else:
            args.sets = ",".join(s for s in param_sets.SETS if s not in param_sets.GPU_ONLY | {"wrn-16-4"})
    args.sets = [s for s in args.sets.split(",") if s]
    for name in args.sets:
        param_sets.shapes(name)  # unknown names fail here, before anything runs
    if args.candidates is None:
        low_precision = args.dtype in ("bfloat16", "float16")
        args.candidates = ",".join(c for c in CANDIDATES if low_precision or c not in MIXED)
    args.candidates = [c for c in args.candidates.split(",") if c]
    unknown = set(args.candidates) - set(CANDIDATES)
    if unknown:
        parser.error(f"unknown candidates {sorted(unknown)}; choose from {', '.join(CANDIDATES)}")
    if args.repeats is None:
        args.repeats = 3 if args.quick else (50 if args.host_only else (20 if on_gpu else 7))
    if args.warmup is None:
        # Every candidate has taken one step to create its state: on CPU that is the warm-up.
        args.warmup = 3 if on_gpu else 0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.host_only:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--host-only needs TRITON_INTERPRET=1 set before triton is imported (the Triton backend "
                             "takes CPU tensors only under its interpreter): run `python -m benchmarks.step --host-only`, "
                             "which sets it, or set it yourself")
        rows = run_host_only(args)
        path = args.out / f"step_cpu_host{'_' + args.tag if args.tag else ''}.csv"
        write_csv(rows, path)
        print_host_table(rows)
        print(f"\n{rows[0]['machine']}; torch {rows[0]['torch']}, triton {rows[0]['triton']}; {rows[0]['date']}")
        print(f"wrote {path}")
        return 0
    rows = run(args)
    if not rows:
        print("nothing ran", file=sys.stderr)
        return 1
    suffix = f"_{args.tag}" if args.tag else ("_quick" if args.quick else "")
    if args.threads is not None and not args.tag:
        suffix += f"_{args.threads}thread{'s' if args.threads > 1 else ''}"
    stem = f"step_{torch.device(args.device).type}{suffix}"
    write_csv(rows, args.out / f"{stem}.csv")
    print_table(rows)
    print(f"\n{rows[0]['machine']}; torch {rows[0]['torch']}, triton {rows[0]['triton']}; {rows[0]['date']}")
    print(f"wrote {args.out / (stem + '.csv')}")
    if not args.no_plot:
        title = f"{rows[0]['machine']}, {args.dtype}, torch {rows[0]['torch']} ({rows[0]['date']})"
        plot(rows, args.out / f"{stem}.png", title)
        print(f"wrote {args.out / (stem + '.png')}")
    return 0


if __name__ == "__main__":
    if "--host-only" in sys.argv[1:] and os.environ.get("TRITON_INTERPRET") != "1":
        # The Triton backend takes CPU tensors only under its interpreter, which must be chosen
        # before triton is imported (this module imported it): start again with it chosen. The
        # launch is stubbed out, so the interpreter never runs a kernel.
        os.environ["TRITON_INTERPRET"] = "1"
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.step", *sys.argv[1:]])
    raise SystemExit(main())
