"""Repeat the step benchmark and report the median and spread of each ratio over the runs.

    python -m benchmarks.repeat_runs --runs 5 [--candidate ndadam-native] [--baseline adam-fused]
                                     [step.py arguments, e.g. --sets gpt2-small,wrn-28-10]

A ratio from one run of a noisy machine is a result, not a conclusion: this runs
``python -m benchmarks.step`` ``--runs`` times (each run round robin over its candidates, as
usual) and, per parameter set, reports the candidate's time over the baseline's time: the median
over the runs and its range. Writes ``<out>/step_<device>_runs[_<tag>].csv`` (every run's ratio)
and prints the summary.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from benchmarks import step


def summarize(run_rows: list[list[dict]], candidate: str, baseline: str) -> list[dict]:
    """Per set: the candidate's time / the baseline's time in each run, their median and range."""
    ratios: dict[str, list[float]] = {}
    for rows in run_rows:
        by_key = {(r["set"], r["candidate"]): r for r in rows}
        for set_name in dict.fromkeys(r["set"] for r in rows):
            mine, theirs = by_key.get((set_name, candidate)), by_key.get((set_name, baseline))
            if mine and theirs:
                ratios.setdefault(set_name, []).append(float(mine["median_ms"]) / float(theirs["median_ms"]))
    return [
        {"set": set_name, "candidate": candidate, "baseline": baseline, "runs": len(values),
         "median_ratio": statistics.median(values), "min_ratio": min(values), "max_ratio": max(values),
         "ratios": " ".join(f"{v:.3f}" for v in values)}
        for set_name, values in ratios.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--candidate", default="ndadam-native")
    parser.add_argument("--baseline", default="adam-fused")
    args, step_args = parser.parse_known_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    step_parsed = step.parse_args(step_args + ["--candidates", f"{args.candidate},{args.baseline}"])
    run_rows = []
    for run in range(args.runs):
        rows = step.run(step_parsed)
        run_rows.append(rows)
        print(f"run {run + 1}/{args.runs}: " + ", ".join(
            f"{r['set']} {r['candidate']} {r['median_ms']:.2f} ms" for r in rows), file=sys.stderr)
    summary = summarize(run_rows, args.candidate, args.baseline)
    machine = run_rows[0][0]["machine"] if run_rows and run_rows[0] else ""
    suffix = f"_{step_parsed.tag}" if step_parsed.tag else ""
    out = Path(step_parsed.out) / f"step_{step_parsed.device.split(':')[0]}_runs{suffix}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*summary[0].keys(), "machine", "torch", "date"] if summary else ["set"])
        writer.writeheader()
        for row in summary:
            writer.writerow({**{k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()},
                             "machine": machine, "torch": run_rows[0][0]["torch"], "date": run_rows[0][0]["date"]})
    for row in summary:
        print(f"{row['set']:<14} {args.candidate} / {args.baseline} time: median {row['median_ratio']:.3f} "
              f"over {row['runs']} runs (range {row['min_ratio']:.3f}-{row['max_ratio']:.3f})")
    print(f"wrote {out}")
    return 0 if summary else 1


if __name__ == "__main__":
    raise SystemExit(main())
