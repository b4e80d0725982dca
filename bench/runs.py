#!/usr/bin/env python3
"""Every compare.py run in bench/results, pooled by CPU: how often tuned tvmnet met each goal.

One run's interval covers its own rounds; on a shared host the hours between runs move a model by more than
that (bench/README.md items 34 and 36), so a goal is judged over runs too. This reads every ``compare.py``
result whose tuned artifacts came from a repo's ``tuning_logs/`` (runs on a scratch log are left out and
counted) and prints, per CPU (LLVM's name for it) and model, how many runs timed the model, the median and
range of their tuned tvmnet / onnxruntime ratios, and in how many of them the ratio was at or under the goal;
then the same median and range of each run's fastest-round ratio (compare.py's ``fastest_round_ratio``): a busy
host slows the runtimes unequally, and each one's fastest round is the nearest a run gets to a quiet host.

    python bench/runs.py                                    # every CPU, issue 6's goals
    python bench/runs.py --cpu emeraldrapids --since 2026-12-05
    python bench/runs.py --steady-host                      # only timings the host left its cores to

``--steady-host`` leaves out each model's timing whose FMA peak samples (one per round) show another tenant on
this VM's cores, compare.py's own "not clean" check, and timings from before compare.py sampled the peak.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (  # noqa: E402 - one definition, in compare.py
    GOALS, ORT, TUNED, fastest_round_ratio, host_was_contended, parse_goals)

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Pool:
    """One CPU's tuned / onnxruntime ratios of one model, a run each, oldest first: median over median, and
    fastest round over fastest round."""

    ratios: list[float] = field(default_factory=list)
    fastest: list[float] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)


def read_runs(results: Path, cpu: str | None, since: str | None,
              steady_host: bool = False) -> tuple[dict[tuple[str, str], Pool], int, int]:
    """The pooled ratios by (CPU, model), how many runs used a log outside a repo's tuning_logs/, and (with
    ``steady_host``) how many model timings were left out for a contended or unsampled host."""
    pools: dict[tuple[str, str], Pool] = {}
    scratch = unsteady = 0
    runs = []
    for path in results.glob("*.json"):
        result = json.loads(path.read_text())
        if "models" in result and "context" in result:  # compare.py's, not breakdown.py's or layout_lever.py's
            runs.append((result["context"]["date_utc"], path.stem, result))
    for date, name, result in sorted(runs):
        run_cpu = result["context"].get("llvm_cpu") or "?"
        if (cpu and run_cpu != cpu) or (since and date < since):
            continue
        if any(Path(model["tuning"].get("root", "")).name != "tuning_logs" for model in result["models"]):
            scratch += 1
            continue
        for model in result["models"]:
            rows = {row["runtime"]: row for row in model["runtimes"]}
            tuned = rows.get(TUNED)
            if tuned is None:
                continue
            peaks = model.get("fma_peak_gflops_by_round")
            if steady_host and (not peaks or host_was_contended(peaks)):
                unsteady += 1
                continue
            pool = pools.setdefault((run_cpu, model["model"]), Pool())
            pool.ratios.append(tuned["ratio_to_onnxruntime"])
            pool.fastest.append(fastest_round_ratio(tuned, rows[ORT]))
            pool.runs.append(name)
    return pools, scratch, unsteady


def markdown(pools: dict[tuple[str, str], Pool], goals: dict[str, float], scratch: int, unsteady: int = 0) -> str:
    lines = ["| CPU (LLVM) | model | runs | median | range | goal | runs at or under it | fastest rounds: median | "
             "range | last run |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for (cpu, model), pool in sorted(pools.items()):
        goal = goals.get(model)
        met = "–" if goal is None else f"{sum(r <= goal for r in pool.ratios)} of {len(pool.ratios)}"
        lines.append(f"| {cpu} | {model} | {len(pool.ratios)} | {statistics.median(pool.ratios):.2f} | "
                     f"{min(pool.ratios):.2f}-{max(pool.ratios):.2f} | {'–' if goal is None else f'{goal:.2f}'} | "
                     f"{met} | {statistics.median(pool.fastest):.2f} | "
                     f"{min(pool.fastest):.2f}-{max(pool.fastest):.2f} | {pool.runs[-1]} |")
    lines += ["", "Ratios: tuned tvmnet / onnxruntime, median over median within each run; fastest rounds: each "
              "runtime's fastest round median over the other's."
              + (f" Left out: {scratch} run(s) on a log outside a repo's tuning_logs/." if scratch else "")
              + (f" Left out: {unsteady} model timing(s) on a contended or unsampled host." if unsteady else "")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--cpu", help="only runs on this CPU (LLVM's name, e.g. emeraldrapids)")
    parser.add_argument("--since", help="only runs at or after this UTC date (e.g. 2026-12-05)")
    parser.add_argument("--goal", action="append", metavar="MODEL=RATIO",
                        help=f"repeatable (default: issue 6's {' '.join(GOALS)})")
    parser.add_argument("--steady-host", action="store_true",
                        help="only model timings whose FMA peak samples show no other tenant on the cores")
    args = parser.parse_args(argv)
    pools, scratch, unsteady = read_runs(args.results_dir, args.cpu, args.since, args.steady_host)
    if not pools:
        raise SystemExit(f"bench: no compare.py run in {args.results_dir} matches")
    print(markdown(pools, parse_goals(args.goal or list(GOALS)), scratch, unsteady), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
