"""Read a step-benchmark CSV and say whether the performance targets of the issues are met.

    python -m benchmarks.check_targets benchmarks/results/step_cuda.csv

Targets (GPU, fp32, GPT-2-medium-shaped set): a fused ND-Adam step reaches at least 85% of the
copy kernel's bandwidth and takes at most 0.8x the time of torch.optim.Adam(fused=True); the
native kernel is no slower than the Triton one. On CPU (GPT-2 small): native at most 0.8x fused
Adam's time and at least 5x faster than the reference. Prints one line per target; the exit
status is 0 when every target that could be measured is met.
"""

from __future__ import annotations

import csv
import sys


def _row(rows, set_name, candidate):
    match = [r for r in rows if r["set"] == set_name and r["candidate"] == candidate]
    return match[0] if match else None


def check(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    results = []
    device = rows[0]["device"] if rows else "?"
    if device == "cuda":
        for candidate in ("ndadam-triton", "ndadam-native"):
            row = _row(rows, "gpt2-medium", candidate)
            if row is None:
                results.append((f"{candidate} on gpt2-medium", None, "not measured"))
                continue
            fraction = float(row["copy_fraction"])
            results.append((f"{candidate}: >= 85% of copy bandwidth", fraction >= 0.85, f"{fraction:.1%}"))
            ratio = 1 / float(row["speedup_vs_adam-fused"])
            results.append((f"{candidate}: <= 0.8x Adam(fused=True) time", ratio <= 0.8, f"{ratio:.2f}x"))
        triton_row, native_row = _row(rows, "gpt2-medium", "ndadam-triton"), _row(rows, "gpt2-medium", "ndadam-native")
        if triton_row and native_row:
            ratio = float(native_row["median_ms"]) / float(triton_row["median_ms"])
            results.append(("native no slower than triton", ratio <= 1.0, f"native/triton time {ratio:.2f}"))
    else:
        row = _row(rows, "gpt2-small", "ndadam-native")
        if row is None:
            results.append(("ndadam-native on gpt2-small (CPU)", None, "not measured"))
        else:
            ratio = 1 / float(row["speedup_vs_adam-fused"])
            results.append(("native CPU <= 0.8x Adam(fused=True) time", ratio <= 0.8, f"{ratio:.2f}x"))
            speedup = float(row["speedup_vs_ndadam-reference"])
            results.append(("native CPU >= 5x faster than reference", speedup >= 5, f"{speedup:.1f}x"))
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    rows = list(csv.DictReader(open(argv[0])))
    ok = True
    for name, met, value in check(rows):
        verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[met]
        print(f"{verdict:>13}  {name}: {value}")
        ok &= met is not False
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
