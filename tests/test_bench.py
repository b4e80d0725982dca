"""Smoke test of bench/compare.py: structure only (the numbers of a 2-core busy machine mean nothing).

Runs the script in a subprocess on MobileNetV2 α=0.25 ρ=96 with a handful of runs, into a temporary
work and results directory, with tuning-log roots that hold nothing (so the tuned rows, ``--before-logs``'
too, must say "no tuning log" and no task extraction is paid for).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
RUNS, ROUNDS = 5, 2


@pytest.mark.timeout(300)
def test_compare_smoke(tmp_path):
    work, results, logs = tmp_path / "work", tmp_path / "results", tmp_path / "no-logs"
    logs.mkdir()
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "compare.py"), "--models", "mobilenet_v2:0.25:96",
         "--runs", str(RUNS), "--rounds", str(ROUNDS), "--warmup", "2", "--pause", "0.05", "--threads", "2",
         "--settle", "0", "--work-dir", str(work), "--results-dir", str(results), "--tuning-logs", str(logs),
         "--before-logs", str(logs), "--goal", "mobilenet_v2-0.25-96=0.8"],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = results.glob("*.json")
    (md_path,) = results.glob("*.md")
    result = json.loads(json_path.read_text())
    ctx = result["context"]
    assert ctx["threads"] == 2 and ctx["cpu_model"] and ctx["versions"]["tvm"] and ctx["versions"]["onnxruntime"]
    assert all(len(ctx[key]["loadavg"]) == 3 for key in ("load_before", "load_at_timing", "load_after"))
    assert any("smoke run" in w for w in result["warnings"])

    (model,) = result["models"]
    assert model["model"] == "mobilenet_v2-0.25-96"
    rows = {row["runtime"]: row for row in model["runtimes"]}
    assert {"onnxruntime", "tvmnet-untuned"} <= set(rows)
    assert "no tuning log" in model["skipped"]["tvmnet-tuned"] and "tvmnet-tuned" not in rows
    assert "no tuning log" in model["skipped"]["tvmnet-tuned-before"] and "tvmnet-tuned-before" not in rows
    assert ("openvino" in rows) != ("openvino" in model["skipped"])
    # every block ran in alternation, each runtime once per round
    assert sorted(model["block_order"]) == sorted(list(rows) * ROUNDS)
    # the host's share of the cores was probed before every round
    peaks = model["fma_peak_gflops_by_round"]
    assert len(peaks) == ROUNDS and all(peak > 1 for peak in peaks)
    for name, row in rows.items():
        assert row["n"] == RUNS * ROUNDS, name
        assert len(row["round_medians_ms"]) == ROUNDS, name
        for key in ("median_ms", "p90_ms", "min_ms", "max_ms", "ratio_to_onnxruntime"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
        assert row["min_ms"] <= row["median_ms"] <= row["p90_ms"] <= row["max_ms"], name
        assert math.isclose(row["ratio_to_onnxruntime"], row["median_ms"] / rows["onnxruntime"]["median_ms"])
        assert math.isclose(row["fastest_round_ratio_to_onnxruntime"],
                            min(row["round_medians_ms"]) / min(rows["onnxruntime"]["round_medians_ms"]))
        low, high = row["ratio_interval_to_onnxruntime"]
        assert 0 < low <= high, name
        if name != "onnxruntime":
            check = row["check"]
            assert check["passed"] and check["shape"] == [1, 1000], (name, check)
            assert 0 <= check["max_abs_error"] <= 1e-3, name
    untuned = rows["tvmnet-untuned"]["schedules"]
    assert untuned["tuned"] == 0 and untuned["total"] > 0 and untuned["database"] is None

    # the goal asked for is reported, and says why it could not be judged
    (goal,) = result["goals"]
    assert goal["model"] == "mobilenet_v2-0.25-96" and goal["verdict"].startswith("not measured: no tuning log"), goal

    table = md_path.read_text()
    assert "| model | runtime | median ms | p90 ms | × onnxruntime |" in table
    assert "- mobilenet_v2-0.25-96 ≤ 0.80×: **not measured: no tuning log" in table
    assert "| mobilenet_v2-0.25-96 | tvmnet-untuned |" in table and "no tuning log" in table
    assert table.strip() in proc.stdout


def test_ratio_interval_pairs_rounds_and_brackets_the_ratio(monkeypatch):
    """compare.py's bootstrap keeps each round's two blocks together: a host state that slowed both runtimes in
    a round must cancel out, and the interval must bracket the ratio of the whole run's medians."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from compare import ratio_interval

    rng = np.random.default_rng(0)
    host = [1.0, 1.6, 0.9, 2.2, 1.1, 1.3]  # each round's slowdown, shared by both runtimes
    reference = [[h * t for t in 1 + 0.01 * rng.standard_normal(10)] for h in host]
    faster = [[0.8 * t for t in block] for block in reference]
    assert ratio_interval(faster, reference) == pytest.approx((0.8, 0.8))
    noisy = [[t * f for t, f in zip(block, 1 + 0.2 * rng.standard_normal(10))] for block in faster]
    low, high = ratio_interval(noisy, reference)
    flat = lambda blocks: float(np.median([t for b in blocks for t in b]))  # noqa: E731
    assert low < flat(noisy) / flat(reference) < high and high - low < 0.4


@pytest.mark.parametrize("interval, verdict", [((0.70, 0.79), "met"), ((0.75, 0.85), "undecided"),
                                               ((0.81, 0.95), "not met")])
def test_goal_verdict_needs_the_whole_interval(interval, verdict, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from compare import goal_verdicts

    tuned = {"runtime": "tvmnet-tuned", "ratio_to_onnxruntime": sum(interval) / 2,
             "ratio_interval_to_onnxruntime": list(interval), "round_medians_ms": [1.0] * 10,
             "fastest_round_ratio_to_onnxruntime": 0.85}
    model = {"model": "mobilenet_v2-1-224", "skipped": {}, "runtimes": [tuned]}
    (result,) = goal_verdicts([model], {"mobilenet_v2-1-224": 0.8})
    assert result["verdict"] == verdict and result["fastest_round_ratio"] == 0.85
    tuned["round_medians_ms"] = [1.0] * 2  # two rounds: no verdict, whatever the interval says
    (result,) = goal_verdicts([model], {"mobilenet_v2-1-224": 0.8})
    assert result["verdict"] == "undecided: fewer than 5 rounds"
    (absent,) = goal_verdicts([model], {"mobilenet_v1-1-224": 1.0})
    assert absent["verdict"] == "not measured: not in this run"


@pytest.mark.timeout(300)
def test_breakdown_accounts_for_every_convolution(tmp_path):
    """bench/breakdown.py joins both runtimes' profiles on conv shapes: every Conv of the model must land in
    exactly one row on both sides (a join that drops or double-counts layers would misplace the blame)."""
    import onnx

    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "breakdown.py"), "--model", "mobilenet_v2:0.25:96", "--rounds", "1",
         "--runs", "3", "--warmup", "1", "--threads", "1", "--work-dir", str(tmp_path / "work"),
         "--results-dir", str(results), "--goal", "0.8", "--goal", "1.0"],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = results.glob("breakdown-*-mobilenet_v2-0.25-96.json")
    assert json_path.with_name(json_path.name.replace(".json", ".md")).is_file()
    result = json.loads(json_path.read_text())
    (onnx_path,) = (tmp_path / "work" / "onnx").glob("*.onnx")
    convs = [n for n in onnx.load(str(onnx_path)).graph.node if n.op_type == "Conv"]
    assert result["unmatched_tvm_kernels"] == []
    assert sum(row["calls"] for row in result["rows"]) == len(convs) == 52
    assert {row["class"] for row in result["rows"]} == {"pointwise", "depthwise", "full conv"}
    for row in result["rows"]:
        assert row["onnxruntime_us"] > 0 and row["tvmnet_us"] > 0 and row["kernels"], row
    for name, entry in [*result["classes"].items(), *result["overall"].items()]:
        assert entry["onnxruntime_us"] > 0 and entry["tvmnet_us"] > 0, name
    assert set(result["overall"]) == {"profiled sum", "end to end, no profiler"}
    # the roofline: every convolution's FLOPs counted once, against a measured FMA peak
    from tvmnet.summary import summarize

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    classifier_mflop = 2 * 1280 * 1000 / 1e6  # V2 keeps 1280 channels before its classifier for α < 1
    conv_mflop = sum(row["mflop"] for row in result["rows"])
    assert conv_mflop == pytest.approx(summarize(model)["flops"] / 1e6 - classifier_mflop, rel=1e-4)
    samples = result["context"]["fma_peak_samples"]
    assert len(samples) == 2 and result["context"]["fma_peak_gflops"] == max(samples) > 1
    assert [goal["goal"] for goal in result["goals"]] == [0.8, 1.0]
    tighter, parity = result["goals"]
    assert tighter["budget_us"] < parity["budget_us"] and tighter["dense_mflop"] == parity["dense_mflop"] > 0


def test_breakdown_counts_convolutions_inside_a_fused_kernel_as_other(monkeypatch):
    """A convolution tvmnet runs inside another kernel (tvmnet.expand_fusion) gets no row of its own, where it
    would read as 0 µs for tvmnet, and both runtimes' time for it lands under other."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from breakdown import join

    alone, fused = ((16, 8, 1, 1), (56, 56), (56, 56)), ((96, 16, 1, 1), (112, 112), (112, 112))
    ort = [{"profile": {"conv_a": 50.0, "conv_b": 300.0, "gemm": 20.0}, "end_to_end_us": 400.0}]
    kernels = {"fused_conv2d_a": {"calls": 1, "us": 40.0}, "fused_expand_depthwise0": {"calls": 1, "us": 250.0}}
    tvm = [{"profile": kernels, "end_to_end_us": 300.0}]
    result = join(ort, tvm, {"conv_a": alone, "conv_b": fused}, {"fused_conv2d_a": alone})
    assert [(row["weight"], row["tvmnet_us"]) for row in result["rows"]] == [([16, 8, 1, 1], 40.0)]
    assert result["in_fused_kernels"] == [{"weight": [96, 16, 1, 1], "in_hw": [112, 112], "out_hw": [112, 112]}]
    assert result["classes"]["other"]["onnxruntime_us"] == 320.0 and result["classes"]["other"]["tvmnet_us"] == 250.0
    assert result["classes"]["pointwise"]["onnxruntime_us"] == 50.0


@pytest.mark.timeout(120)
def test_kernels_alone_replays_every_kernel_call(tiny_v2_artifact):
    """bench/kernels_alone.py replays each kernel of one inference in model order and alone: every fused
    kernel of the model must be captured (one call per convolution in V2-0.25), with positive times."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "kernels_alone.py"), str(tiny_v2_artifact),
                           "--rounds", "3", "--top", "1000"], capture_output=True, text=True, timeout=110, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    head, _columns, *rows = proc.stdout.strip().splitlines()
    calls = int(head.split()[0])
    assert calls == len(rows) and sum("conv2d" in row for row in rows) == 52
    for row in rows:
        index, in_order, alone, ratio, symbol = row.split()
        assert float(in_order) > 0 and float(alone) > 0 and not symbol.startswith("vm.builtin"), row


@pytest.mark.timeout(180)
def test_builds_ab_times_both_load_orders_and_checks_outputs(tiny_v2_artifact, tmp_path):
    """bench/builds_ab.py on one build against itself: both load orders timed, every block counted, both
    builds checked against onnxruntime, and no verdict for a build over itself beyond what noise allows."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "builds_ab.py"), str(tiny_v2_artifact),
                           str(tiny_v2_artifact), "--blocks", "6", "--runs", "3", "--results-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=170, cwd=REPO,
                          env={**os.environ, "TVM_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (written,) = tmp_path.glob("builds-ab-*.json")
    result = json.loads(written.read_text())
    assert [o["loaded_first"] for o in result["orders"]] == ["new", "old"]
    for order in result["orders"]:
        low, high = order["interval"]
        assert low <= order["new_over_old"] <= high and 0.5 < order["new_over_old"] < 2.0
        assert order["blocks"] == 6 and 0 <= order["new_won"] <= 6
        assert max(order["max_abs_error"].values()) < 1e-3
    assert result["verdict"] in proc.stdout and (tmp_path / written.name.replace(".json", ".md")).is_file()


@pytest.mark.parametrize("intervals, verdict", [([(0.95, 0.99), (0.96, 0.99)], "new faster"),
                                                ([(1.01, 1.04), (1.02, 1.03)], "old faster"),
                                                ([(0.95, 0.99), (0.98, 1.02)], "undecided")])
def test_builds_ab_verdict_needs_both_load_orders(intervals, verdict, monkeypatch):
    """Items 46-47 of bench/README.md: one pair read 0.989 in one load order and 1.093 in the other."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from builds_ab import verdict as builds_verdict

    assert builds_verdict([{"interval": list(pair)} for pair in intervals]).startswith(verdict)


@pytest.mark.timeout(360)
def test_separable_fusion_probe_matches_numpy(tiny_v2_artifact):
    """bench/separable_fusion.py's hand-fused kernels for V2-0.25's pairs, both kinds (a depthwise and the
    pointwise it feeds, an expanding pointwise and the depthwise it feeds), stride 1 and 2, with fixed tiles and
    with tiles searched by MetaSchedule: each must compute what numpy does and replay in place of its pair."""
    script = [sys.executable, str(REPO / "bench" / "separable_fusion.py"), str(tiny_v2_artifact), "--rounds", "2"]
    separable, expand = "depthwise+pointwise", "pointwise+depthwise"
    for options, pairs in (
            (["--pair", "32", "--pair", "5", "--pair", "4", "--pair", "7"],
             [(separable, "stride 1"), (separable, "stride 2"), (expand, "stride 2"), (expand, "stride 1")]),
            (["--pair", "32", "--pair", "4", "--trials", "4"], [(separable, "stride 1"), (expand, "stride 2")])):
        proc = subprocess.run(script + options, capture_output=True, text=True, timeout=170, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        heads = [line for line in proc.stdout.splitlines() if line.startswith("pair ")]
        assert [(h.split(",")[1].strip(), h.split(",")[3].strip()) for h in heads] == pairs, proc.stdout
        assert all(float(h.rsplit("max abs error ", 1)[1]) < 1e-5 for h in heads), proc.stdout
        assert proc.stdout.count("tiles searched (4 trials)") == (len(pairs) if "--trials" in options else 0), \
            proc.stdout
        assert proc.stdout.count("µs fused") == len(pairs), proc.stdout


def test_separable_fusion_probe_names_a_pair_it_cannot_fuse(tiny_v2_artifact):
    """A --pair that is not a depthwise and a pointwise convolution (here the image transpose and the first
    convolution) stops with a message saying so, not a TVM schedule error."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "separable_fusion.py"), str(tiny_v2_artifact),
                           "--pair", "0"], capture_output=True, text=True, timeout=110, cwd=REPO)
    assert proc.returncode != 0
    assert "are not a depthwise and a pointwise convolution" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("pixels, tile_pixels, tile_floats", [(49, 7, 8), (50, 5, 16), (56, 4, 16)])
def test_pointwise_tile_probe_kernel_matches_numpy(pixels, tile_pixels, tile_floats, monkeypatch):
    """bench/pointwise_tile.py's hand-scheduled pointwise convolution (as a matmul with packed weights, bias and
    ReLU) for each pixel count and register tile it times: it must compute what numpy does, or its times say
    nothing about the tuned kernel it stands beside."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import tvm
    from pointwise_tile import matmul_kernel

    from tvmnet.targets import get_target

    inputs, outputs = 64, 32
    lib, shapes = matmul_kernel(pixels, inputs, outputs, tile_pixels, tile_floats, get_target("x86").tvm_target())
    rng = np.random.default_rng(0)
    a, packed, bias = (rng.standard_normal(shape).astype("float32") for shape in shapes[:3])
    out = tvm.runtime.tensor(np.zeros(shapes[3], "float32"), tvm.cpu())
    module = lib.mod if hasattr(lib, "mod") else lib
    module[module.entry_name](*(tvm.runtime.tensor(x, tvm.cpu()) for x in (a, packed, bias)), out)
    weights = packed.transpose(1, 0, 2).reshape(inputs, outputs)  # [blocks, inputs, floats] -> [inputs, outputs]
    np.testing.assert_allclose(out.numpy(), np.maximum(a @ weights + bias, 0), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the probe compares how two or more threads share a kernel")
def test_thread_balance_probe_slices_compute_the_same_output(tiny_v2_artifact, tmp_path):
    """bench/thread_balance.py takes over the artifact's parallel launches and runs each kernel's chunks as smaller
    tasks that threads take from each other: whatever the split, every task must still run once, so the output
    must not change by a bit, or its times compare different work. An untuned build has no parallel kernel and
    is refused with a message."""
    import tvmnet
    from tvmnet import zoo

    from conftest import log_of_design_spaces

    script = [sys.executable, str(REPO / "bench" / "thread_balance.py")]
    options = ["--slices", "0,1,3,8", "--blocks", "2", "--calls", "2"]
    env = {**os.environ, "TVM_NUM_THREADS": "2"}
    proc = subprocess.run(script + [str(tiny_v2_artifact)] + options, capture_output=True, text=True, timeout=110,
                          cwd=REPO, env=env)
    assert proc.returncode != 0 and "runs no kernel in parallel" in proc.stderr, proc.stderr[-2000:]

    model = zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96)
    log_of_design_spaces(model, tmp_path / "log")
    artifact = tvmnet.compile(model, output=tmp_path / "parallel", tuning_logs=tmp_path / "log")
    proc = subprocess.run(script + [str(artifact)] + options, capture_output=True, text=True, timeout=170, cwd=REPO,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "thread 1: busy" in proc.stdout, proc.stdout
    variants = [line for line in proc.stdout.splitlines() if "output max |diff|" in line]
    assert len(variants) == 4 and all(line.endswith("output max |diff| 0.0e+00") for line in variants), proc.stdout


def test_runs_pools_compare_results_by_cpu_and_counts_goals(tmp_path, monkeypatch, capsys):
    """bench/runs.py pools every compare.py result by CPU: ratios of runs on a scratch log, and files that are not
    compare.py's, must stay out, and the goal column counts the runs at or under it. Each run's fastest-round ratio
    is pooled beside its median one. With --steady-host, a timing whose FMA peak samples show another tenant on the
    cores (or that has none) stays out too."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import runs

    def result(date: str, cpu: str, root: str, ratio: float, peaks: list[float] | None) -> dict:
        # onnxruntime's fastest round takes 4 ms, tvmnet's 4 * (ratio + 0.1): a fastest-round ratio of ratio + 0.1
        ort = {"runtime": "onnxruntime", "ratio_to_onnxruntime": 1.0, "round_medians_ms": [5.0, 4.0, 9.0]}
        tuned = {"runtime": "tvmnet-tuned", "ratio_to_onnxruntime": ratio,
                 "round_medians_ms": [4 * (ratio + 0.1), 7.0, 5.0]}
        model = {"model": "mobilenet_v2-1-224", "tuning": {"root": root}, "runtimes": [ort, tuned]}
        if peaks is not None:
            model["fma_peak_gflops_by_round"] = peaks
        return {"context": {"date_utc": date, "llvm_cpu": cpu}, "models": [model]}

    steady, contended = [300.0, 290.0, 310.0], [300.0, 200.0, 310.0]
    for name, date, cpu, root, ratio, peaks in [("a", "2026-12-01T01:00:00Z", "znver3", "/r/tuning_logs", 0.78, None),
                                                ("b", "2026-12-02T01:00:00Z", "znver3", "/x/tuning_logs", 0.90, steady),
                                                ("c", "2026-12-03T01:00:00Z", "znver3", "/tmp/scratch", 0.50, steady),
                                                ("d", "2026-12-03T02:00:00Z", "znver5", "/r/tuning_logs", 1.10,
                                                 contended)]:
        (tmp_path / f"{name}.json").write_text(json.dumps(result(date, cpu, root, ratio, peaks)))
    (tmp_path / "breakdown-x.json").write_text(json.dumps({"rows": []}))
    assert runs.main(["--results-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| znver3 | mobilenet_v2-1-224 | 2 | 0.84 | 0.78-0.90 | 0.80 | 1 of 2 | 0.94 | 0.88-1.00 | b |" in table
    assert "| znver5 | mobilenet_v2-1-224 | 1 | 1.10 | 1.10-1.10 | 0.80 | 0 of 1 | 1.20 | 1.20-1.20 | d |" in table
    assert "Left out: 1 run(s)" in table
    assert runs.main(["--results-dir", str(tmp_path), "--cpu", "znver3", "--since", "2026-12-02"]) == 0
    assert "| znver3 | mobilenet_v2-1-224 | 1 | 0.90 |" in capsys.readouterr().out
    assert runs.main(["--results-dir", str(tmp_path), "--steady-host"]) == 0
    table = capsys.readouterr().out
    assert "| znver3 | mobilenet_v2-1-224 | 1 | 0.90 | 0.90-0.90 | 0.80 | 0 of 1 | 1.00 | 1.00-1.00 | b |" in table
    assert "znver5" not in table and "Left out: 2 model timing(s) on a contended or unsampled host" in table
    with pytest.raises(SystemExit, match="no compare.py run"):
        runs.main(["--results-dir", str(tmp_path), "--cpu", "armv8"])
