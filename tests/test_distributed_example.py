"""The distributed example and the distributed step benchmark run as documented (torchrun, 2 gloo
ranks), and an interrupted-and-resumed training run ends with the same weights, to the bit, as an
uninterrupted one."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300


def torchrun(*args: str, processes: int = 2) -> str:
    """``torchrun --standalone`` (a free rendezvous port) from the repository root; returns stdout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout


def _digest(output: str) -> str:
    found = re.findall(r"weights sha256 ([0-9a-f]{16})", output)
    assert found, output
    return found[-1]


def test_fsdp_tensor_parallel_example_resumes_bit_exact(tmp_path):
    common = ["-m", "benchmarks.distributed_train", "--parallel", "fsdp-tp", "--tp", "2", "--log-every", "2", "--width", "32"]
    first = torchrun(*common, "--steps", "3", "--checkpoint-dir", str(tmp_path / "interrupted"))
    assert "saved step 3" in first
    resumed = torchrun(*common, "--steps", "6", "--checkpoint-dir", str(tmp_path / "interrupted"))
    assert "resumed from step 3" in resumed and "saved step 6" in resumed
    uninterrupted = torchrun(*common, "--steps", "6", "--checkpoint-dir", str(tmp_path / "uninterrupted"))
    assert "data-parallel 1 x tensor-parallel 2" in uninterrupted
    assert _digest(resumed) == _digest(uninterrupted)
    losses = re.findall(r"step +6 +loss ([0-9.]+)", resumed) + re.findall(r"step +6 +loss ([0-9.]+)", uninterrupted)
    assert len(losses) == 2 and losses[0] == losses[1]


def test_fsdp_example_trains():
    output = torchrun("-m", "benchmarks.distributed_train", "--parallel", "fsdp", "--steps", "4", "--log-every", "1", "--width", "32")
    assert "fsdp: 2 ranks (gloo), data-parallel 2" in output
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", output)]
    assert len(losses) == 4 and losses[-1] < losses[0]


@pytest.mark.skipif(os.environ.get("NDADAM_NO_EXTENSION") == "1", reason="the benchmark times the native backend")
def test_distributed_step_benchmark_quick_mode(tmp_path):
    output = torchrun("-m", "benchmarks.step_distributed", "--quick", "--out", str(tmp_path))
    rows = list(csv.DictReader(open(tmp_path / "step_cpu_distributed.csv")))
    assert {(r["layout"], r["candidate"]) for r in rows} == {
        (layout, candidate) for layout in ("fsdp", "rows-split") for candidate in ("ndadam-native", "adam-fused", "adam-foreach")
    }
    for row in rows:
        assert float(row["median_ms"]) > 0 and row["ranks"] == "2" and row["torch"] and row["date"]
        if row["candidate"] != "ndadam-native" or row["layout"] == "fsdp":
            assert row["all_reduces_per_step"] == "0"  # FSDP2 rows are whole: NDAdam communicates nothing
    split = next(r for r in rows if r["layout"] == "rows-split" and r["candidate"] == "ndadam-native")
    assert split["all_reduces_per_step"] == "1" and float(split["bytes_per_local_row"]) == 24.0
    assert "wrote" in output


def test_torchrun_scripts_finish_with_their_exit_code_and_all_their_output():
    """benchmarks.torchrun_exit.finish leaves without interpreter finalization (a gloo worker
    thread releasing tensors during it aborted the process): the exit code and the buffered
    output must still come out, with a process group (one gloo rank) destroyed first."""
    script = (
        "import torch.distributed as dist\n"
        "from benchmarks.torchrun_exit import finish\n"
        "dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)\n"
        "print('buffered line', end='')\n"
        "finish(3)\n"
    )
    # Block-buffered stdout, as under torchrun writing to a file or a pipe.
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stderr
    assert result.stdout == "buffered line"

