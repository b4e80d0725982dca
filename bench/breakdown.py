#!/usr/bin/env python3
"""Where tvmnet loses to onnxruntime, convolution by convolution.

Times one model layer by layer in both runtimes and joins the two on each convolution's shape (weight
shape, input and output size), so a repeated MobileNet block is one row: onnxruntime's per-node
profiler on one side, tvmnet's per-kernel profile (``CompiledModel.profile``: the VM's calls timed
through ``set_instrument``) on the other. Each runtime runs in its own process, alternating
``--rounds`` times (thread pools that spin slow each other down), and each row is the median over
rounds. Rows are grouped into pointwise (1x1), depthwise, full convolutions and everything else, so
the table says which kind of kernel the tuned build is short on.

It also measures this CPU's peak fp32 multiply-add rate on the same threads (``bench/fma_peak.c``) and
sets each class's GFLOP/s against it, and for each ``--goal`` ratio says how fast the pointwise and full
convolutions would have to run to reach it: whether a goal is a matter of tuning or above the hardware.

    python bench/breakdown.py                                   # MobileNetV2-1.0-224, shipped x86 log
    python bench/breakdown.py --model mobilenet_v3_large --artifact build/v3l --goal 1.0

Writes bench/results/breakdown-<date>-<cpu>-<model>.json/.md. Stop every other job first: these are
timings. Neither profiler is free, nor equally costly: the table's last two rows set each profile's sum
beside the same runtime's plain median run. Read the rows for where each runtime spends its time, and the
"end to end" row, or bench/compare.py, for which is faster.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import (  # noqa: E402 - the bench scripts share compare.py's helpers
    FmaPeak, _env, _host_note, cpu_model, export_onnx, load_state, ort_session, parse_models, physical_cores, say, slug,
    timed_calls,
)

CLASSES = ("pointwise", "depthwise", "full conv", "other")
Key = tuple  # (weight shape, input H x W, output H x W)
EPILOGUES = {"Clip", "Relu", "Add", "HardSigmoid", "HardSwish"}
"""Ops both runtimes fuse into the convolution before them (tvmnet's fused kernel holds them too)."""


def conv_class(weight: tuple[int, ...]) -> str:
    """pointwise (1x1), depthwise (one input channel per group) or full, from an OIHW weight shape."""
    if weight[1] == 1 and weight[2] * weight[3] > 1:
        return "depthwise"
    return "pointwise" if weight[2] * weight[3] == 1 else "full conv"


def conv_mflop(weight: tuple[int, ...], out_hw: tuple[int, ...], calls: int) -> float:
    """Million floating-point operations of ``calls`` runs of one convolution (a multiply-add is two)."""
    out_channels, in_per_group, kernel_h, kernel_w = weight
    return 2 * out_channels * in_per_group * kernel_h * kernel_w * out_hw[0] * out_hw[1] * calls / 1e6


def goal_budget(result: dict[str, Any], goal: float) -> dict[str, float | None]:
    """What running end to end at ``goal`` × onnxruntime's time would take from the dense convolutions.

    Generous to tvmnet on purpose: the depthwise convolutions and everything else are taken at the faster
    runtime's profiled time, scaled down by onnxruntime's profiler overhead (its plain run against its
    profile's sum); whatever is left of the goal is the pointwise and full convolutions' budget.
    """
    classes, overall = result["classes"], result["overall"]
    plain_us = overall["end to end, no profiler"]["onnxruntime_us"]
    profiler_scale = min(1.0, plain_us / overall["profiled sum"]["onnxruntime_us"])
    rest_us = profiler_scale * sum(min(classes[c]["onnxruntime_us"], classes[c]["tvmnet_us"])
                                   for c in ("depthwise", "other"))
    dense_mflop = classes["pointwise"]["mflop"] + classes["full conv"]["mflop"]
    budget_us = goal * plain_us - rest_us
    needed = dense_mflop / budget_us * 1e3 if budget_us > 0 else None  # None: the rest alone overruns the goal
    return {"goal": goal, "goal_us": round(goal * plain_us, 1), "rest_us": round(rest_us, 1),
            "dense_mflop": round(dense_mflop, 1), "budget_us": round(budget_us, 1),
            "needed_gflops": None if needed is None else round(needed, 1),
            "needed_share_of_peak": None if needed is None else round(needed / result["context"]["fma_peak_gflops"], 3)}


# ----------------------------------------------------------------------------------------------
# Worker processes: one profile each, JSON on stdout


def _median_call_us(call, runs: int, warmup: int) -> float:
    return statistics.median(timed_calls(call, runs, warmup)) * 1e6


def _profile_ort(onnx_path: str, threads: int, runs: int, warmup: int) -> dict[str, Any]:
    """ONNX node -> median µs per run (nodes onnxruntime fused are reported under the fused node's name),
    and the median run without the profiler."""
    import numpy as np

    plain = ort_session(onnx_path, threads)
    spec = plain.get_inputs()[0]
    feed = {spec.name: np.random.default_rng(0).random(spec.shape, dtype=np.float32)}
    end_to_end = _median_call_us(lambda: plain.run(None, feed), runs, warmup)
    del plain
    with tempfile.TemporaryDirectory(prefix="tvmnet-breakdown-") as tmp:
        session = ort_session(onnx_path, threads, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[event["name"][: -len("_kernel_time")]].append(float(event["dur"]))
    return {"end_to_end_us": end_to_end,
            "profile": {name: statistics.median(times[warmup:] or times) for name, times in per_node.items()}}


def _profile_tvmnet(artifact: str, runs: int, warmup: int) -> dict[str, Any]:
    """Kernel -> {calls, us (all calls in one run)}, and the median run without the profiler."""
    import numpy as np

    import tvmnet

    model = tvmnet.load(artifact)
    x = np.random.default_rng(0).random(model.inputs[0].shape, dtype=np.float32)
    end_to_end = _median_call_us(lambda: model.run(x), runs, warmup)
    return {"end_to_end_us": end_to_end,
            "profile": {k.name: {"calls": k.calls, "us": k.us} for k in model.profile(runs=runs, warmup=warmup)}}


def _run_worker(kind: str, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--path", str(path),
               "--threads", str(args.threads), "--runs", str(args.runs), "--warmup", str(args.warmup)]
    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"breakdown: the {kind} worker failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Joining the two profiles on convolution shapes


def onnx_conv_keys(onnx_path: Path) -> dict[str, Key]:
    """ONNX node name -> conv key, for each Conv and for the Clip/Relu/add node onnxruntime fuses into it
    (its profiler reports a fused conv under the last fused node's name)."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    dims = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
            for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    weights = {t.name: tuple(t.dims) for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    keys: dict[str, Key] = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in weights:
            keys[node.name] = (weights[node.input[1]], dims[node.input[0]][2:], dims[node.output[0]][2:])
        elif node.op_type in EPILOGUES and node.input[0] in producer and producer[node.input[0]].name in keys:
            keys[node.name] = keys[producer[node.input[0]].name]
    return keys


def tvm_conv_keys(onnx_path: Path, target: str) -> dict[str, Key]:
    """Fused kernel name -> conv key, from the very module ``tvmnet compile`` schedules."""
    from tvm import tirx
    from tvm.s_tir import meta_schedule as ms

    from tvmnet import pipeline
    from tvmnet.frontend import load_onnx
    from tvmnet.targets import get_target

    tvm_target = get_target(target).tvm_target()
    fused = pipeline.fuse(load_onnx(str(onnx_path)).to_relax(), tvm_target)
    data_layout, weight_layout = pipeline.CONV_LAYOUTS[pipeline.conv_layout(tvm_target)[0]]

    def reorder(shape: tuple[int, ...], layout: str, to: str) -> tuple[int, ...]:
        return tuple(shape[layout.index(axis)] for axis in to)

    keys = {}
    for gv, func in fused.functions.items():
        if isinstance(func, tirx.PrimFunc) and "conv2d" in gv.name_hint:
            data, weight, *_, out = [tuple(int(d) for d in info.shape)
                                     for info in ms.arg_info.ArgInfo.from_prim_func(func)]
            keys[gv.name_hint] = (reorder(weight, weight_layout, "OIHW"), reorder(data, data_layout, "HW"),
                                  reorder(out, data_layout, "HW"))
    return keys


def join(ort_rounds: list[dict[str, float]], tvm_rounds: list[dict[str, dict[str, float]]],
         onnx_keys: dict[str, Key], tvm_keys: dict[str, Key]) -> dict[str, Any]:
    """Per conv key: both runtimes' µs per run (median over rounds); the rest summed per runtime as other."""
    from tvmnet import pipeline

    def median_over_rounds(rounds: list[dict[str, float]]) -> dict[str, float]:
        return {name: statistics.median(r.get(name, 0.0) for r in rounds) for name in rounds[0]}

    ort = median_over_rounds([r["profile"] for r in ort_rounds])
    tvm = median_over_rounds([{name: k["us"] for name, k in r["profile"].items()} for r in tvm_rounds])
    calls = {name: k["calls"] for name, k in tvm_rounds[0]["profile"].items()}
    rows: dict[Key, dict[str, Any]] = {}
    for name, us in ort.items():
        key = onnx_keys.get(name.removesuffix("_nchwc"))
        if key is None:
            continue
        row = rows.setdefault(key, {"ort_us": 0.0, "tvm_kernels": [], "tvm_us": 0.0, "calls": 0})
        row["ort_us"] += us
    unmatched = []
    for name, us in tvm.items():
        key = tvm_keys.get(pipeline.fused_name(name))
        if key is None or key not in rows:
            if key is not None:
                unmatched.append(name)
            continue
        rows[key]["tvm_kernels"].append(name)
        rows[key]["tvm_us"] += us
        rows[key]["calls"] += calls[name]
    # convolutions tvmnet runs inside a kernel of more than one (tvmnet.expand_fusion's): no row of their own,
    # both runtimes' time for them counted under other
    in_fused_kernels = {key for key, row in rows.items() if not row["tvm_kernels"]}
    table = []
    for (weight, size_in, size_out), row in rows.items():
        if (weight, size_in, size_out) in in_fused_kernels:
            continue
        table.append({"class": conv_class(weight), "weight": list(weight), "in_hw": list(size_in),
                      "out_hw": list(size_out), "calls": row["calls"], "kernels": row["tvm_kernels"],
                      "mflop": round(conv_mflop(weight, size_out, row["calls"]), 4),
                      "onnxruntime_us": round(row["ort_us"], 1), "tvmnet_us": round(row["tvm_us"], 1),
                      "ratio": round(row["tvm_us"] / row["ort_us"], 2) if row["ort_us"] else None,
                      "lost_us": round(row["tvm_us"] - row["ort_us"], 1)})
    table.sort(key=lambda r: -r["lost_us"])
    matched_ort = {n for n in ort if onnx_keys.get(n.removesuffix("_nchwc")) not in (None, *in_fused_kernels)}
    matched_tvm = {k for row in table for k in row["kernels"]}
    totals = {c: {"onnxruntime_us": 0.0, "tvmnet_us": 0.0, "mflop": 0.0} for c in CLASSES}
    for row in table:
        for field in ("onnxruntime_us", "tvmnet_us", "mflop"):
            totals[row["class"]][field] += row[field]
    totals["other"]["onnxruntime_us"] = sum(us for n, us in ort.items() if n not in matched_ort)
    totals["other"]["tvmnet_us"] = sum(us for n, us in tvm.items() if n not in matched_tvm)
    for entry in totals.values():
        entry["ratio"] = round(entry["tvmnet_us"] / entry["onnxruntime_us"], 2) if entry["onnxruntime_us"] else None
        for runtime in ("onnxruntime", "tvmnet"):  # MFLOP per µs is TFLOP/s
            us = entry[f"{runtime}_us"]
            entry[f"{runtime}_gflops"] = round(entry["mflop"] / us * 1e3, 1) if entry["mflop"] and us else None
        for field in ("onnxruntime_us", "tvmnet_us", "mflop"):
            entry[field] = round(entry[field], 1)
    # what each profiler adds: the sum of its rows against the same runtime's median run without it
    overall = {"profiled sum": (sum(ort.values()), sum(tvm.values())),
               "end to end, no profiler": tuple(statistics.median(r["end_to_end_us"] for r in rounds)
                                                for rounds in (ort_rounds, tvm_rounds))}
    return {"rows": table, "classes": totals, "unmatched_tvm_kernels": unmatched,
            "in_fused_kernels": [{"weight": list(w), "in_hw": list(i), "out_hw": list(o)}
                                 for w, i, o in sorted(in_fused_kernels)],
            "overall": {name: {"onnxruntime_us": round(ort_us, 1), "tvmnet_us": round(tvm_us, 1),
                               "ratio": round(tvm_us / ort_us, 2) if ort_us else None}
                        for name, (ort_us, tvm_us) in overall.items()}}


def markdown(result: dict[str, Any]) -> str:
    ctx = result["context"]
    peak = ctx["fma_peak_gflops"]
    lines = [f"# Layer by layer: tvmnet vs onnxruntime — {ctx['model']}, {ctx['date_utc']}", "",
             f"- CPU: {ctx['cpu_model']}, {ctx['threads']} thread(s) each; artifact {ctx['artifact']} "
             f"(tuned functions: {ctx['tuned_functions']})",
             f"- {ctx['rounds']} alternating rounds × {ctx['runs']} profiled runs per runtime; µs per inference, "
             f"median over rounds; load at start {ctx['load_before']['loadavg'][0]:.2f}",
             "- onnxruntime: its per-node profiler; tvmnet: `CompiledModel.profile()`. Each adds time per call, and not "
             "the same: the last two rows set each profile's sum beside the same runtime's median run without a "
             "profiler (each round times plain runs first).",
             f"- This CPU's fp32 FMA peak on {ctx['threads']} thread(s): {peak:.0f} GFLOP/s (`bench/fma_peak.c`, "
             f"the best of {len(ctx['fma_peak_samples'])} half-second runs, one before each round and one "
             f"after; lowest {min(ctx['fma_peak_samples']):.0f}: {_host_note(ctx['fma_peak_samples'])}); GFLOP/s columns give each "
             "class's rate and its share of that peak.",
             "", "| class | MFLOP | onnxruntime µs | tvmnet µs | tvmnet / onnxruntime | onnxruntime GFLOP/s | "
             "tvmnet GFLOP/s |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def rate(entry: dict[str, Any], runtime: str) -> str:
        gflops = entry.get(f"{runtime}_gflops")
        return f"{gflops:.0f} ({gflops / peak:.0%})" if gflops else "–"

    for name, entry in [*result["classes"].items(), *result["overall"].items()]:
        mflop = f"{entry['mflop']:.0f}" if entry.get("mflop") else "–"
        lines.append(f"| {name} | {mflop} | {entry['onnxruntime_us']:.0f} | {entry['tvmnet_us']:.0f} | "
                     f"{entry['ratio'] or '–'} | {rate(entry, 'onnxruntime')} | {rate(entry, 'tvmnet')} |")
    if result.get("in_fused_kernels"):
        shapes = ", ".join(f"{'x'.join(map(str, c['weight']))} at {'x'.join(map(str, c['in_hw']))}"
                           for c in result["in_fused_kernels"])
        lines.append(f"\nConvolutions tvmnet runs inside one kernel with another (`tvmnet/expand_fusion.py`), counted "
                     f"under other in both runtimes: {shapes}.")
    lines.append("")
    for goal in result["goals"]:
        head = (f"- **Goal {goal['goal']}× onnxruntime** ({goal['goal_us']:.0f} µs end to end): with the depthwise "
                f"convolutions and the rest as fast as the faster runtime's ({goal['rest_us']:.0f} µs, scaled by "
                f"onnxruntime's profiler overhead), the pointwise and full convolutions ({goal['dense_mflop']:.0f} "
                f"MFLOP) get {goal['budget_us']:.0f} µs")
        if goal["needed_gflops"] is None:
            lines.append(head + ": nothing, so the goal is out of reach whatever they do.")
        else:
            lines.append(head + f", which takes {goal['needed_gflops']:.0f} GFLOP/s: "
                         f"{goal['needed_share_of_peak']:.0%} of the FMA peak.")
    lines += ["", "Convolutions, most time lost first (calls: how often the model runs that shape):", "",
              "| class | weight (OIHW) | in → out | calls | onnxruntime µs | tvmnet µs | ratio | lost µs |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        size = f"{'x'.join(map(str, row['in_hw']))} → {'x'.join(map(str, row['out_hw']))}"
        lines.append(f"| {row['class']} | {'x'.join(map(str, row['weight']))} | {size} | {row['calls']} | "
                     f"{row['onnxruntime_us']:.0f} | {row['tvmnet_us']:.0f} | {row['ratio']} | {row['lost_us']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v2", help="NAME[:ALPHA[:RESOLUTION]] (default: %(default)s)")
    parser.add_argument("--artifact", type=Path, help="a compiled tvmnet artifact of that model (default: compile it "
                        "with the repo's tuning log)")
    parser.add_argument("--target", default="x86")
    parser.add_argument("--threads", type=int, default=None, help="threads for both runtimes (default: physical cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=30, help="profiled runs per round (default: 30)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--goal", type=float, action="append", help="a tvmnet / onnxruntime end-to-end ratio to "
                        "check against the FMA peak (repeatable; default: 1.0)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / ".work")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--worker", choices=("onnxruntime", "tvmnet"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.threads = args.threads or physical_cores()
    if args.worker == "onnxruntime":
        print(json.dumps(_profile_ort(args.path, args.threads, args.runs, args.warmup)))
        return 0
    if args.worker == "tvmnet":
        print(json.dumps(_profile_tvmnet(args.path, args.runs, args.warmup)))
        return 0
    if min(args.rounds, args.runs, args.threads) < 1 or args.warmup < 0:
        raise SystemExit("breakdown: --rounds, --runs and --threads must be ≥ 1, --warmup ≥ 0")

    (config,) = parse_models(args.model)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(config, args.work_dir, args.seed)
    artifact = args.artifact
    if artifact is None:
        import tvmnet

        artifact = Path(tempfile.mkdtemp(prefix="tvmnet-breakdown-", dir=args.work_dir)) / config.slug
        say(f"{config.slug}: compiling for {args.target} with the repo's tuning log")
        with _env("TVMNET_TUNING_LOGS", str(REPO / "tuning_logs")):
            tvmnet.compile(str(onnx_path), output=artifact, target=args.target)
    manifest = json.loads((artifact / "manifest.json").read_text())
    onnx_keys = onnx_conv_keys(onnx_path)
    tvm_keys = tvm_conv_keys(onnx_path, args.target)
    load_before = load_state()
    ort_rounds, tvm_rounds, peaks = [], [], []
    with FmaPeak() as fma:
        for round_ in range(args.rounds):
            say(f"round {round_ + 1}/{args.rounds}: this CPU's FMA peak, then profiling onnxruntime and tvmnet "
                f"({args.runs} runs each)")
            peaks.append(fma.sample(args.threads))
            ort_rounds.append(_run_worker("onnxruntime", onnx_path, args))
            tvm_rounds.append(_run_worker("tvmnet", artifact, args))
        peaks.append(fma.sample(args.threads))
    result = join(ort_rounds, tvm_rounds, onnx_keys, tvm_keys)
    now = _dt.datetime.now(_dt.timezone.utc)
    result["context"] = {
        "model": config.slug, "date_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "cpu_model": cpu_model(),
        "threads": args.threads, "rounds": args.rounds, "runs": args.runs, "warmup": args.warmup,
        "artifact": str(artifact), "tuned_functions": len(manifest.get("schedules", {}).get("tuned", [])),
        "load_before": load_before, "load_after": load_state(),
        "fma_peak_gflops": max(peaks), "fma_peak_samples": peaks,
    }
    result["goals"] = [goal_budget(result, goal) for goal in args.goal or [1.0]]
    text = markdown(result)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    base = f"breakdown-{now:%Y-%m-%d}-{slug(cpu_model())}-{config.slug}"
    (args.results_dir / f"{base}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.results_dir / f"{base}.md").write_text(text)
    print(text)
    say(f"wrote {args.results_dir / base}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
