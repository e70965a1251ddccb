"""Read a step-benchmark CSV and say whether the performance targets of the issues are met.

    python -m benchmarks.check_targets benchmarks/results/step_cuda.csv [--require-all]

Targets, fp32, each a ratio measured within one run:

- CUDA, on GPT-2 medium and the 1.3B set, for each fused backend (native, triton): at least 85%
  of the copy kernel's bandwidth, and at most 0.8x the time of torch.optim.Adam(fused=True);
  native and triton within 10% of each other's time. On the 2,000 small tensors: each fused
  backend at least 20x faster than the reference (launch and host overhead).
- CPU, on GPT-2 small and WRN-28-10: native at most 0.75x fused Adam's time; on GPT-2 small at
  least 5x faster than the reference.

Prints one line per target. The exit status is 0 when every target that was measured is met;
with ``--require-all`` (the GPU check) a target that could not be measured fails too, so that a
missing candidate or set cannot pass for a met target.
"""

from __future__ import annotations

import argparse
import csv

CUDA_LARGE_SETS = ("gpt2-medium", "transformer-1.3b")
CUDA_FUSED = ("ndadam-native", "ndadam-triton")
CPU_SETS = ("gpt2-small", "wrn-28-10")


def _row(rows, set_name, candidate):
    match = [r for r in rows if r["set"] == set_name and r["candidate"] == candidate]
    return match[0] if match else None


def _number(row, key):
    value = row.get(key, "") if row else ""
    return float(value) if value not in ("", None) else None


def check(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when not measured, the measured value) for each target."""
    results: list[tuple[str, bool | None, str]] = []

    def judge(name, value, met, text):
        results.append((name, None, "not measured") if value is None else (name, met(value), text(value)))

    device = rows[0]["device"] if rows else "?"
    if device == "cuda":
        for set_name in CUDA_LARGE_SETS:
            for candidate in CUDA_FUSED:
                row = _row(rows, set_name, candidate)
                judge(f"{candidate} on {set_name}: >= 85% of copy bandwidth", _number(row, "copy_fraction"),
                      lambda f: f >= 0.85, lambda f: f"{f:.1%}")
                speedup = _number(row, "speedup_vs_adam-fused")
                judge(f"{candidate} on {set_name}: <= 0.8x Adam(fused=True) time", speedup and 1 / speedup,
                      lambda r: r <= 0.8, lambda r: f"{r:.2f}x")
            native, triton = (_number(_row(rows, set_name, c), "median_ms") for c in CUDA_FUSED)
            judge(f"native and triton within 10% on {set_name}", native and triton and native / triton,
                  lambda r: abs(r - 1) <= 0.10, lambda r: f"native/triton time {r:.2f}")
        for candidate in CUDA_FUSED:
            judge(f"{candidate} on many-small: >= 20x faster than the reference",
                  _number(_row(rows, "many-small", candidate), "speedup_vs_ndadam-reference"),
                  lambda s: s >= 20, lambda s: f"{s:.1f}x")
    else:
        for set_name in CPU_SETS:
            speedup = _number(_row(rows, set_name, "ndadam-native"), "speedup_vs_adam-fused")
            judge(f"native CPU on {set_name}: <= 0.75x Adam(fused=True) time", speedup and 1 / speedup,
                  lambda r: r <= 0.75, lambda r: f"{r:.2f}x")
        judge("native CPU on gpt2-small: >= 5x faster than the reference",
              _number(_row(rows, "gpt2-small", "ndadam-native"), "speedup_vs_ndadam-reference"),
              lambda s: s >= 5, lambda s: f"{s:.1f}x")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv_path")
    parser.add_argument("--require-all", action="store_true", help="a target that was not measured fails")
    args = parser.parse_args(argv)
    with open(args.csv_path) as handle:
        rows = list(csv.DictReader(handle))
    ok = True
    for name, met, value in check(rows):
        verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[met]
        print(f"{verdict:>13}  {name}: {value}")
        ok &= met is True or (met is None and not args.require_all)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
