"""benchmarks/gpu_check.sh must be able to fail: its stages run here without a GPU, one at a time
(GPU_CHECK_STAGES), on inputs whose verdict is known."""

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run(tmp_path, stages, **env):
    environment = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_STAGES": stages, **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)


def _write_csv(path, rows):
    fields = ["set", "device", "candidate", "copy_fraction", "speedup_vs_adam-fused", "median_ms", "speedup_vs_ndadam-reference"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _all_targets_met():
    good = {"device": "cuda", "copy_fraction": "0.9", "speedup_vs_adam-fused": "1.5", "median_ms": "2.0",
            "speedup_vs_ndadam-reference": "30"}
    return [{"set": s, "candidate": c, **good} for s in ("gpt2-medium", "transformer-1.3b", "many-small")
            for c in ("ndadam-native", "ndadam-triton")]


def test_the_targets_stage_fails_when_a_target_is_missed_or_not_measured(tmp_path):
    rows = _all_targets_met()
    _write_csv(tmp_path / "step_cuda.csv", rows)
    result = _run(tmp_path, "targets")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every stage passed" in result.stdout

    rows[0]["copy_fraction"] = "0.5"  # native on gpt2-medium below 85% of the copy bandwidth
    _write_csv(tmp_path / "step_cuda.csv", rows)
    result = _run(tmp_path, "targets")
    assert result.returncode == 1
    assert "failed stages: targets" in result.stdout
    assert "NOT MET" in (tmp_path / "targets_cuda.txt").read_text()

    _write_csv(tmp_path / "step_cuda.csv", rows[2:])  # gpt2-medium not measured at all
    result = _run(tmp_path, "targets")
    assert result.returncode == 1 and "NOT MEASURED" in result.stdout


def test_cuda_home_falls_back_to_the_usual_toolkit_location(tmp_path):
    environment = {k: v for k, v in os.environ.items() if k != "CUDA_HOME"}
    environment["PATH"] = "/usr/bin:/bin"  # no nvcc on the PATH
    result = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**environment, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_STAGES": "none"},
    )
    assert "CUDA_HOME=/usr/local/cuda\n" in (tmp_path / "gpu_env.txt").read_text(), result.stdout
