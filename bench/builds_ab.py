#!/usr/bin/env python3
"""Which of two builds of one model is faster here: both in one process, in alternating blocks of calls.

Whether to keep new tuning records is a question about two tvmnet builds, not about onnxruntime: the one
built from the new logs (``NEW``) against the one built before (``OLD``). compare.py times each runtime in its
own process, so two builds land in two processes, each with its own memory layout and its own hour of the
host; here both load into one process and take turns, ``--blocks`` times, on one thread pool, and a block
that a noisy host slowed is one paired sample. The builds' memory lands in the order they load, so the A/B
runs twice, in two processes, once loading each build first (items 46 and 47 of bench/README.md read
0.989 and 1.093 for one pair).

Both builds are first checked against onnxruntime on the same seeded input (``tvmnet.verify``, on each
artifact's copy of the ONNX model). Reports new / old, the ratio of the medians of all timed calls, with the
90% bootstrap interval over the block pairs, and how many blocks each build won, for each load order.

    TVM_NUM_THREADS=2 python bench/builds_ab.py build/v2-new build/v2-old [--blocks 100] [--results-dir DIR]

Stop every other job first: these are timings.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (  # noqa: E402 - the bench scripts share compare.py's helpers
    _interval, cpu_model, llvm_cpu, load_state, ratio_interval, say, slug, timed_calls,
)

ORDERS = (("new", "old"), ("old", "new"))


def _worker(paths: dict[str, str], first: str, blocks: int, runs: int, warmup: int) -> dict[str, Any]:
    """Load both builds, ``first`` first, check each against onnxruntime, then time ``blocks`` alternating
    blocks of ``runs`` calls each (``first``'s block first in every pair)."""
    import tvmnet
    from tvmnet.runtime import random_input
    from tvmnet.verify import verify

    order = [first, next(name for name in paths if name != first)]
    models = {name: tvmnet.load(paths[name]) for name in order}
    shapes = {name: [spec.shape for spec in model.inputs] for name, model in models.items()}
    if shapes["new"] != shapes["old"]:
        raise SystemExit(f"builds_ab: the builds take different inputs: new {shapes['new']}, old {shapes['old']}")
    checks = {name: [report.to_json() for report in verify(model)] for name, model in models.items()}
    failed = [f"{name} ({c['output']}: max abs error {c['max_abs_error']:.2e})"
              for name, reports in checks.items() for c in reports if not c["passed"]]
    if failed:
        raise SystemExit(f"builds_ab: output differs from onnxruntime's: {', '.join(failed)}")
    x = random_input(models["new"].inputs[0])
    times: dict[str, list[list[float]]] = {name: [] for name in order}
    for _ in range(blocks):
        for name in order:
            times[name].append(timed_calls(lambda: models[name].run(x), runs, warmup))
    return {"first": first, "times": times, "checks": checks}


def summarize_order(result: dict[str, Any]) -> dict[str, Any]:
    """new / old for one load order: the ratio of medians, its interval over the block pairs, blocks won."""
    new, old = result["times"]["new"], result["times"]["old"]
    median = {name: statistics.median(t for block in result["times"][name] for t in block) for name in ("new", "old")}
    won = sum(statistics.median(a) < statistics.median(b) for a, b in zip(new, old))
    return {"loaded_first": result["first"], "new_ms": median["new"] * 1e3, "old_ms": median["old"] * 1e3,
            "new_over_old": median["new"] / median["old"], "interval": list(ratio_interval(new, old)),
            "blocks": len(new), "new_won": won,
            "max_abs_error": {name: max(c["max_abs_error"] for c in result["checks"][name]) for name in ("new", "old")}}


def verdict(orders: list[dict[str, Any]]) -> str:
    """'new faster' or 'old faster' only where both load orders' whole intervals agree."""
    if all(o["interval"][1] < 1.0 for o in orders):
        return "new faster in both load orders"
    if all(o["interval"][0] > 1.0 for o in orders):
        return "old faster in both load orders"
    return "undecided: keep the old build unless a longer A/B says otherwise"


def markdown(result: dict[str, Any]) -> str:
    c = result["context"]
    lines = [f"# Two builds in one process — {c['date_utc']}", "",
             f"- CPU: {c['cpu_model']} (LLVM mcpu {c['llvm_cpu']}), {c['threads']} thread(s); load before / after: "
             f"{c['load_before']['loadavg'][0]:.2f} / {c['load_after']['loadavg'][0]:.2f}",
             f"- new: `{c['new']}`", f"- old: `{c['old']}`",
             f"- {c['blocks']} alternating blocks per build and load order, each {c['warmup']} warm-up and "
             f"{c['runs']} timed calls; intervals: 90% bootstrap over the block pairs", "",
             "| loaded first | new ms | old ms | new / old | blocks new won | max abs error new / old |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for o in result["orders"]:
        lines.append(f"| {o['loaded_first']} | {o['new_ms']:.3f} | {o['old_ms']:.3f} | {o['new_over_old']:.3f} "
                     f"({_interval(o['interval'], 3)}) | {o['new_won']} of {o['blocks']} | "
                     f"{o['max_abs_error']['new']:.1e} / {o['max_abs_error']['old']:.1e} |")
    lines += ["", "Both builds matched onnxruntime on one seeded input (|Δ| ≤ 1e-4 + 1e-4·|ort|).",
              "", f"**{result['verdict']}**."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("new", help="the artifact built from the new logs")
    parser.add_argument("old", help="the artifact to keep unless the new one is faster")
    parser.add_argument("--blocks", type=int, default=100, help="block pairs per load order (default: 100)")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per block (default: 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each block (default: 2)")
    parser.add_argument("--results-dir", type=Path, help="also write builds-ab-<date>-<cpu>-<new>.json/.md there")
    parser.add_argument("--worker", choices=("new", "old"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    paths = {"new": str(Path(args.new).resolve()), "old": str(Path(args.old).resolve())}
    if args.worker:
        print(json.dumps(_worker(paths, args.worker, args.blocks, args.runs, args.warmup)))
        return 0
    if min(args.blocks, args.runs) < 1 or args.warmup < 0:
        raise SystemExit("builds_ab: --blocks and --runs must be ≥ 1, --warmup ≥ 0")
    from tvmnet.runtime import physical_cores

    threads = int(os.environ.get("TVM_NUM_THREADS") or physical_cores())
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    load_before, orders = load_state(), []
    for first, _second in ORDERS:
        say(f"{args.blocks} block pairs, the {first} build loaded first")
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), paths["new"], paths["old"],
                               "--worker", first, "--blocks", str(args.blocks), "--runs", str(args.runs),
                               "--warmup", str(args.warmup)], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                             f"builds_ab: the worker exited with {proc.returncode}")
        orders.append(summarize_order(json.loads(proc.stdout.strip().splitlines()[-1])))
    now = _dt.datetime.now(_dt.timezone.utc)
    result = {"context": {"date_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "cpu_model": cpu_model(),
                          "llvm_cpu": llvm_cpu(), "threads": threads, "new": paths["new"], "old": paths["old"],
                          "blocks": args.blocks, "runs": args.runs, "warmup": args.warmup,
                          "load_before": load_before, "load_after": load_state()},
              "orders": orders, "verdict": verdict(orders)}
    text = markdown(result)
    print(text)
    if args.results_dir:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        base = args.results_dir / f"builds-ab-{now:%Y-%m-%d}-{slug(cpu_model())}-{slug(Path(paths['new']).name)}"
        Path(f"{base}.json").write_text(json.dumps(result, indent=2) + "\n")
        Path(f"{base}.md").write_text(text)
        say(f"wrote {base}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
