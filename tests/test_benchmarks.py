"""The benchmark command runs (quick mode, CPU) and writes what it promises; times are not judged."""

import csv
import math

import pytest
import torch

from benchmarks import param_sets, step


def test_quick_mode_writes_csv_and_plot(tmp_path, capsys):
    assert step.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "step_cpu_quick.csv")))
    assert (tmp_path / "step_cpu_quick.png").stat().st_size > 1000
    assert {r["set"] for r in rows} == {"many-small", "wrn-16-4"}
    for set_name in ("many-small", "wrn-16-4"):
        candidates = {r["candidate"] for r in rows if r["set"] == set_name}
        assert {"ndadam-reference", "unfused", "adam-foreach", "adam-fused", "copy"} <= candidates
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["gb_per_s"]) > 0
        assert r["machine"] and r["torch"] and r["date"]
        if r["candidate"] != "copy":
            assert float(r["speedup_vs_adam-fused"]) > 0
        if r["candidate"].startswith("ndadam") or r["candidate"] == "unfused":
            # ND-Adam keeps one moment per element and one per row: about half of Adam's state.
            assert 0.45 < float(r["state_vs_adam"]) < 0.6
    assert "speedup" not in capsys.readouterr().err.lower()


def test_parameter_sets_have_the_architectures_sizes():
    def vector_elements(name):
        return sum(int(math.prod(s)) for s in param_sets.shapes(name) if len(s) >= 2)

    assert vector_elements("wrn-28-10") == pytest.approx(36.5e6, rel=0.01)  # WRN-28-10: 36.5M parameters
    assert vector_elements("gpt2-small") == pytest.approx(124.3e6, rel=0.01)  # GPT-2 small with embeddings
    assert vector_elements("gpt2-medium") == pytest.approx(354.5e6, rel=0.01)
    assert vector_elements("transformer-1.3b") == pytest.approx(1.31e9, rel=0.01)
    assert len(param_sets.shapes("many-small")) == 2000


def test_unknown_set_or_candidate_is_refused():
    with pytest.raises(ValueError, match="unknown parameter set"):
        step.parse_args(["--sets", "resnet-9000"])
    with pytest.raises(SystemExit):
        step.parse_args(["--candidates", "sgd"])


def _rows(device, per_set):
    return [
        {"set": set_name, "device": device, "candidate": candidate, **values}
        for set_name, candidates in per_set.items()
        for candidate, values in candidates.items()
    ]


def test_targets_are_judged_from_the_csv_rows():
    from benchmarks.check_targets import check

    good = {"copy_fraction": "0.9", "speedup_vs_adam-fused": "1.5", "median_ms": "2.0", "speedup_vs_ndadam-reference": "30"}
    gpu = {name: met for name, met, _ in check(_rows("cuda", {
        "gpt2-medium": {"ndadam-triton": good, "ndadam-native": {**good, "copy_fraction": "0.8", "speedup_vs_adam-fused": "1.2", "median_ms": "2.3"}},
        "transformer-1.3b": {"ndadam-triton": good, "ndadam-native": {**good, "median_ms": "2.1"}},
        "many-small": {"ndadam-triton": good, "ndadam-native": {**good, "speedup_vs_ndadam-reference": "12"}},
    }))}
    assert gpu["ndadam-triton on gpt2-medium: >= 85% of copy bandwidth"] is True
    assert gpu["ndadam-triton on gpt2-medium: <= 0.8x Adam(fused=True) time"] is True
    assert gpu["ndadam-native on gpt2-medium: >= 85% of copy bandwidth"] is False
    assert gpu["ndadam-native on gpt2-medium: <= 0.8x Adam(fused=True) time"] is False
    assert gpu["native and triton within 10% on gpt2-medium"] is False  # 2.3 / 2.0
    assert gpu["native and triton within 10% on transformer-1.3b"] is True  # 2.1 / 2.0
    assert gpu["ndadam-triton on many-small: >= 20x faster than the reference"] is True
    assert gpu["ndadam-native on many-small: >= 20x faster than the reference"] is False
    cpu = check(_rows("cpu", {
        "gpt2-small": {"ndadam-native": {"speedup_vs_adam-fused": "1.4", "speedup_vs_ndadam-reference": "4"}},
        "wrn-28-10": {"ndadam-native": {"speedup_vs_adam-fused": "1.3"}},
    }))
    assert [met for _, met, _ in cpu] == [True, False, False]  # 0.71x, 0.77x, 4x
    assert check(_rows("cpu", {"gpt2-small": {"adam-fused": {}}}))[0][1] is None


def test_a_target_that_was_not_measured_fails_when_all_are_required(tmp_path, capsys):
    from benchmarks.check_targets import main

    path = tmp_path / "step_cuda.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["set", "device", "candidate", "copy_fraction", "speedup_vs_adam-fused", "median_ms"])
        writer.writeheader()
        writer.writerow({"set": "gpt2-medium", "device": "cuda", "candidate": "ndadam-native", "copy_fraction": "0.9",
                         "speedup_vs_adam-fused": "1.5", "median_ms": "2"})
    assert main([str(path)]) == 0
    assert main([str(path), "--require-all"]) == 1
    assert "NOT MEASURED" in capsys.readouterr().out


def test_repeated_runs_report_the_median_ratio_and_its_range():
    from benchmarks.repeat_runs import summarize

    def run(native, adam):
        return [{"set": "s", "candidate": "ndadam-native", "median_ms": str(native)},
                {"set": "s", "candidate": "adam-fused", "median_ms": str(adam)}]

    (row,) = summarize([run(7, 10), run(9, 10), run(6, 10), run(8, 10), run(20, 10)], "ndadam-native", "adam-fused")
    assert row["runs"] == 5 and row["median_ratio"] == pytest.approx(0.8)
    assert (row["min_ratio"], row["max_ratio"]) == (pytest.approx(0.6), pytest.approx(2.0))


def test_repeated_runs_write_one_file_per_tag(tmp_path):
    """A tagged repeat (another set list) does not overwrite the untagged one's file."""
    from benchmarks.repeat_runs import main

    common = ["--runs", "2", "--device", "cpu", "--sets", "wrn-16-4", "--repeats", "3", "--out", str(tmp_path), "--no-plot"]
    assert main(common) == 0 and main(common + ["--tag", "long-rows"]) == 0
    for name in ("step_cpu_runs.csv", "step_cpu_runs_long-rows.csv"):
        (row,) = csv.DictReader(open(tmp_path / name))
        assert row["set"] == "wrn-16-4" and row["runs"] == "2" and float(row["median_ratio"]) > 0


def test_bf16_run_times_master_weights_and_stochastic_rounding(tmp_path):
    """Issue 12: what each way of keeping small bf16 updates costs, in bytes and time, in one run."""
    names = "ndadam-native,ndadam-native-master,ndadam-native-stochastic-rounding,adam-fused"
    assert step.main(["--device", "cpu", "--dtype", "bfloat16", "--sets", "wrn-16-4", "--repeats", "3",
                      "--candidates", names, "--out", str(tmp_path), "--tag", "bf16", "--no-plot"]) == 0
    rows = {r["candidate"]: r for r in csv.DictReader(open(tmp_path / "step_cpu_bf16.csv"))}
    assert set(rows) == set(names.split(","))
    shapes = param_sets.shapes("wrn-16-4")
    vector_elements = sum(math.prod(s) for s in shapes if len(s) >= 2)
    scalar_elements = sum(math.prod(s) for s in shapes if len(s) == 1)
    plain = int(rows["ndadam-native"]["bytes_per_step"])
    # Scalars step in fp32 with either mode: their moments are 4 B, not 2 (16 B against 8).
    assert int(rows["ndadam-native-stochastic-rounding"]["bytes_per_step"]) == plain + 8 * scalar_elements
    assert int(rows["ndadam-native-master"]["bytes_per_step"]) == plain + 16 * scalar_elements + 8 * vector_elements
    # The master copy is state: 4 B per element, where stochastic rounding keeps one int64 seed
    # per tensor.
    master_state = int(rows["ndadam-native-master"]["state_bytes"])
    rounding_state = int(rows["ndadam-native-stochastic-rounding"]["state_bytes"])
    assert master_state - rounding_state == 4 * (vector_elements + scalar_elements) - 8 * len(shapes)
    for r in rows.values():
        assert float(r["median_ms"]) > 0 and r["dtype"] == "bfloat16"


def test_mixed_precision_candidates_need_low_precision_params():
    assert not set(step.MIXED) & set(step.parse_args(["--device", "cpu"]).candidates)
    assert set(step.MIXED) <= set(step.parse_args(["--device", "cpu", "--dtype", "bfloat16"]).candidates)
    params = param_sets.build("many-small", "cpu", torch.float32)[:8]
    reason = step.make_candidate("ndadam-native-master", params, torch.device("cpu"))
    assert isinstance(reason, str) and "--dtype bfloat16" in reason


def test_host_only_mode_runs_from_the_command_line_without_triton_interpret(tmp_path):
    """The Triton backend takes CPU tensors only under its interpreter: the command sets it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks.step", "--host-only", "--sets", "many-small",
                           "--repeats", "2", "--out", str(tmp_path)], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "step_cpu_host.csv")))
    assert {r["candidate"] for r in rows} >= {"ndadam-triton-host", "ndadam-triton-host-fresh-grads"}


def test_row_length_sets_hold_one_row_length_each_and_are_not_run_by_default():
    for name, length in (("rows-768", 768), ("rows-5760", 5760), ("rows-8192", 8192)):
        shapes = param_sets.shapes(name)
        assert {math.prod(s[1:]) for s in shapes} == {length}
        assert sum(math.prod(s) for s in shapes) == pytest.approx(7 * 640 * 5760, rel=0.01)
        assert step.parse_args(["--device", "cpu", "--sets", name]).sets == [name]
    assert param_sets.shapes("rows-5760") == [(640, 5760)] * 7  # WRN-28-10's stage-3 convolutions
    for device in ("cpu", "cuda"):
        assert not set(step.parse_args(["--device", device]).sets) & set(param_sets.ROW_LENGTH_SETS)
