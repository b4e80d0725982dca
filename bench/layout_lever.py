#!/usr/bin/env python3
"""Layout levers, one kernel at a time: MobileNetV2's costliest convolutions tuned as NCHW (the ONNX
model's layout), as NHWC (Relax ``ConvertLayout``), and either with weight prepacking (weights marked
layout-free, so MetaSchedule's ``RewriteLayout`` may store them in the order its schedule reads them; a
build folds that transform into the constants). NHWC+prepack is what tvmnet's pipeline does on CPUs.
Same trials, same machine, best measured µs side by side.

Each case is conv2d + bias, fused by tvmnet's pipeline (``tvmnet.pipeline.fuse``); only the fused
convolution task is tuned (the layout transforms ConvertLayout adds at a module's edges are left
out: inside a whole NHWC model they appear once, at the input). Tuning uses tvmnet's own builder and
runner (warm workers, same timeouts, same evaluator settings as ``tvmnet tune``).

    python bench/layout_lever.py --trials 96             # writes bench/results/layout-<date>-<cpu>.json/.md
    python bench/layout_lever.py --variants NCHW,NCHW+prepack

Stop every other job first: these are timings.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (name, input channels, output channels, spatial size, kernel, groups): MobileNetV2-1.0-224's costliest
# kernels in the tuned x86 build (`tvmnet bench --per-kernel`), and one depthwise for contrast
VARIANTS = ("NCHW", "NHWC", "NCHW+prepack", "NHWC+prepack")
CASES = (
    ("pw 160->960 @7x7", 160, 960, 7, 1, 1),
    ("pw 96->576 @14x14", 96, 576, 14, 1, 1),
    ("pw 24->144 @56x56", 24, 144, 56, 1, 1),
    ("dw 960 3x3 @7x7", 960, 960, 7, 3, 960),
)


def conv_block(cin: int, cout: int, size: int, kernel: int, groups: int):
    """conv2d + bias in NCHW, as the ONNX frontend imports it."""
    import numpy as np
    from tvm import relax
    from tvm.script import relax as R

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((cout, cin // groups, kernel, kernel)).astype("float32")
    bias = rng.standard_normal((1, cout, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, cin, size, size), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(weight), padding=kernel // 2, groups=groups))
            out = bb.emit_output(relax.op.add(y, relax.const(bias)))
        bb.emit_func_output(out)
    return bb.get()


def tune_conv_task(mod, spec, trials: int, work_dir: str, layout: str, prepack: bool) -> tuple[str, float, float | None]:
    """(task name, best µs, untuned µs) of the module's convolution task.

    The builder measures a prepacked kernel without its weight transform (tvmnet's builder drops the
    layout-rewrite block, as MetaSchedule's default builder does), which is what a build that folds the
    transform into the constants would run."""
    from tvm.s_tir import meta_schedule as ms

    from tvmnet import pipeline, tune

    target = spec.tvm_target()
    fused = pipeline.fuse(mod, target, layout=layout, prepack=prepack)
    tasks = [t for t in tune.extract_tasks(fused, target) if "conv2d" in t.task_name]
    assert len(tasks) == 1, [t.task_name for t in tasks]
    builder = tune.make_builder(spec, 120.0, 2)
    runner, _ = tune.make_runner(spec, rpc_tracker=None, rpc_key=None, timeout_s=60.0, number=3, repeat=1,
                                  min_repeat_ms=100)
    database = ms.database.JSONDatabase(work_dir=work_dir)
    tune.measure_schedules(tasks, builder, runner, database, target, lambda _m: None)
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted_tasks=tasks, work_dir=work_dir,
        strategy=ms.search_strategy.EvolutionarySearch(population_size=512), seed=0)
    ms.tune_tasks(tasks=contexts, task_weights=[float(w) for w in weights], work_dir=work_dir,
                  max_trials_global=trials, num_trials_per_iter=64, builder=builder, runner=runner,
                  database=database, task_scheduler="round-robin")
    _, best, untuned = tune.task_stats(database, tasks[0])
    return tasks[0].task_name, best * 1e6, (untuned * 1e6 if untuned is not None else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=128, help="trials per case and layout (default: 128)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    parser.add_argument("--cases", default=None, help="comma-separated subset of the case names, e.g. "
                        f"'{CASES[0][0]}' (default: all)")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    cases = CASES
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        cases = [case for case in CASES if case[0] in wanted]
        if len(cases) != len(wanted):
            parser.error(f"unknown case in {args.cases!r}; choose from {', '.join(c[0] for c in CASES)}")

    from tvmnet.targets import get_target

    spec = get_target("x86")
    rows = []
    for name, cin, cout, size, kernel, groups in cases:
        for layout in variants:
            with tempfile.TemporaryDirectory(prefix="tvmnet-layout-") as work_dir:
                module = conv_block(cin, cout, size, kernel, groups)
                task, best, untuned = tune_conv_task(module, spec, args.trials, work_dir, layout.split("+")[0],
                                                     "prepack" in layout)
            flops = 2 * cout * (cin // groups) * kernel * kernel * size * size
            rows.append({"case": name, "layout": layout, "task": task, "trials": args.trials,
                         "best_us": round(best, 1), "untuned_us": round(untuned, 1) if untuned else None,
                         "gflops": round(flops / best / 1e3, 1)})
            print(f"[layout] {name} {layout}: best {best:.1f} µs ({rows[-1]['gflops']} GFLOP/s), "
                  f"untuned {untuned:.1f} µs", file=sys.stderr, flush=True)

    cpu = platform.processor() or "cpu"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    stamp = _dt.datetime.now(_dt.timezone.utc)
    meta = {"date": stamp.isoformat(timespec="seconds"), "cpu": cpu, "mcpu": str(spec.tvm_target().attrs["mcpu"]),
            "cores": os.cpu_count(), "load_average": os.getloadavg()}
    lines = [f"# Layout lever: NCHW vs NHWC, one kernel at a time — {meta['date']}", "",
             f"- CPU: {cpu} (LLVM mcpu {meta['mcpu']}), {meta['cores']} cores; load average {meta['load_average']}",
             f"- {args.trials} MetaSchedule trials per case and layout, tvmnet's builder/runner settings", "",
             "| case | " + " | ".join(f"{v} best µs (GFLOP/s)" for v in variants) + " | "
             + " | ".join(f"{v} / {variants[0]}" for v in variants[1:]) + " |",
             "| --- |" + " ---: |" * (2 * len(variants) - 1)]
    for name, *_ in cases:
        got = [next(r for r in rows if r["case"] == name and r["layout"] == v) for v in variants]
        lines.append(f"| {name} | " + " | ".join(f"{r['best_us']} ({r['gflops']})" for r in got) + " | "
                     + " | ".join(f"{r['best_us'] / got[0]['best_us']:.2f}" for r in got[1:]) + " |")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    tag = "-".join(v.lower().replace("+", "_") for v in variants)
    base = args.results_dir / f"layout-{stamp:%Y-%m-%d}-{cpu.lower().replace(' ', '-')}-{tag}"
    base.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
