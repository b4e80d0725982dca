#!/usr/bin/env python3
"""Side-by-side latency of tvmnet (untuned and tuned) against onnxruntime, and OpenVINO when installed.

For each model it exports the zoo's ONNX graph (fixed seed), compiles a tvmnet artifact without any
tuning log and one with the log that ``tvmnet compile`` would find under ``tuning_logs/`` (none: the
tuned row says "no tuning log"), and then times every runtime *in its own process*: a thread pool
left spinning by one runtime slows the next one down when they share a process. The processes are
driven in alternating blocks (warm-up, then ``--runs`` timed synchronous calls with
``time.perf_counter`` around each), ``--rounds`` times, so every runtime sees the same machine state;
medians, p90s and ratios come from the runs of that one alternation. Every artifact's output on the
benchmark input is checked against onnxruntime's (tvmnet verify's tolerance, rtol = atol = 1e-4).

    python bench/compare.py                                   # the five default models, all physical cores
    python bench/compare.py --models mobilenet_v2:1.0:224 --threads 1
    python bench/compare.py --models mobilenet_v2:0.25:96 --runs 5 --rounds 2 --warmup 2   # smoke run
    git worktree add /tmp/before HEAD~1 && python bench/compare.py --before-logs /tmp/before/tuning_logs

Each ratio to onnxruntime comes with a 90% bootstrap interval over the rounds, and the run says for each
``--goal MODEL=RATIO`` (by default issue 6's: V2 ≤ 0.8×, V1 and V3-Large ≤ 1.0×) whether tuned tvmnet met
it: met only when the whole interval is at or under the goal, not met when all of it is above. Beside it stands
the ratio of each runtime's fastest round (``fastest_round_ratio``): a busy host slows the runtimes unequally,
and that ratio is what one run says about a quiet one.

``--before-logs ROOT`` adds the artifact compiled with ROOT's log (an earlier commit's ``tuning_logs/``, say) as
one more runtime, ``tvmnet-tuned-before``, in the same alternation: what a change to a log is worth, measured
side by side, where two runs of this script hours apart on a shared host differ by more than that.

Writes ``<results-dir>/<date>-<cpu>.json`` and ``.md`` and prints the markdown. Artifacts, ONNX files
and workload fingerprints are cached in ``--work-dir`` keyed by model, tvmnet's code and the tuning
log's contents, so a rerun only re-times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tvmnet.runtime import physical_cores

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = (
    "mobilenet_v1:1.0:224",
    "mobilenet_v2:1.0:224",
    "mobilenet_v3_large:1.0:224",
    "mobilenet_v3_small:1.0:224",
    "mobilenet_v2:0.5:160",
)
ORT = "onnxruntime"
UNTUNED = "tvmnet-untuned"
TUNED = "tvmnet-tuned"
BEFORE = "tvmnet-tuned-before"
OPENVINO = "openvino"
RUNTIME_ORDER = (ORT, UNTUNED, TUNED, BEFORE, OPENVINO)
TVMNET_RUNTIMES = (UNTUNED, TUNED, BEFORE)
MIN_TIMED_RUNS = 50
LOAD_WARN = 0.5
SCHEMA = 1
GOALS = ("mobilenet_v2-1-224=0.8", "mobilenet_v1-1-224=1.0", "mobilenet_v3_large-1-224=1.0")
"""Issue 6's goals: tuned tvmnet's median at most this many times onnxruntime's."""
INTERVAL_LEVEL = 0.9
MIN_ROUNDS_FOR_VERDICT = 5
"""Fewer rounds than this give an interval from too few draws to judge a goal by (one round gives none)."""


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Worker: one runtime in one process, timed on command


def timed_calls(call: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Seconds of each of ``runs`` calls, after ``warmup`` untimed ones: one block of a runtime."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def ort_session(model: str, threads: int, profile_prefix: str | None = None):
    """onnxruntime as every bench script runs it: CPU provider, ``threads`` intra-op threads, sequential,
    all graph optimizations (its NCHWc convolutions included); ``profile_prefix`` turns on its per-node
    profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _worker(args: argparse.Namespace) -> int:
    """Load one runtime, write its output on the benchmark input, then time blocks on request.

    Speaks JSON lines: the protocol stream is a private copy of stdout, and fd 1 is pointed at
    stderr so that whatever a runtime prints cannot corrupt it.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import numpy as np

    x = np.load(args.input)
    threads = args.threads
    started = time.perf_counter()
    if args.worker == ORT:
        session = ort_session(args.model, threads)
        feed = {session.get_inputs()[0].name: x}

        def call():
            return session.run(None, feed)[0]

    elif args.worker == OPENVINO:
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(args.model, "CPU", {
            "INFERENCE_NUM_THREADS": threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",  # fp32 like the others (no bf16 where the CPU has it)
        })
        request = compiled.create_infer_request()
        output = compiled.output(0)

        def call():
            return np.array(request.infer({0: x})[output], copy=True)

    else:  # tvmnet artifact: the public runtime API, input checks included
        import tvmnet

        model = tvmnet.load(args.model)

        def call():
            return model.run(x)

    first = call()
    np.save(args.output, np.asarray(first))
    ready = {"ready": True, "load_s": round(time.perf_counter() - started, 3)}
    if args.worker in TVMNET_RUNTIMES:
        ready["input_read_in_place"] = model.reads_in_place(x)
    proto.write(json.dumps(ready) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("op") != "block":
            break
        proto.write(json.dumps({"times": timed_calls(call, command["runs"], command["warmup"])}) + "\n")
    return 0


class Worker:
    """The orchestrator's handle on one runtime's process."""

    def __init__(self, runtime: str, model: Path, input_path: Path, output_path: Path, threads: int,
                 log_path: Path) -> None:
        env = dict(os.environ)
        env["TVM_NUM_THREADS"] = str(threads)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.runtime = runtime
        self.output_path = output_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", runtime, "--model", str(model),
             "--input", str(input_path), "--output", str(output_path), "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env, cwd=str(REPO),
        )
        self.load_s: float | None = None
        self.input_read_in_place: bool | None = None

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self._log.flush()
            tail = Path(self._log.name).read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"{self.runtime} worker exited ({self.proc.returncode}): " + " | ".join(tail))
        return json.loads(line)

    def wait_ready(self) -> None:
        ready = self._read()
        self.load_s = ready["load_s"]
        self.input_read_in_place = ready.get("input_read_in_place")

    def block(self, warmup: int, runs: int) -> list[float]:
        self.proc.stdin.write(json.dumps({"op": "block", "warmup": warmup, "runs": runs}) + "\n")
        self.proc.stdin.flush()
        return self._read()["times"]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# ----------------------------------------------------------------------------------------------
# Models, artifacts and the cache


@dataclass(frozen=True)
class ModelConfig:
    name: str
    alpha: float
    resolution: int

    @property
    def slug(self) -> str:
        return f"{self.name}-{self.alpha:g}-{self.resolution}"


def parse_models(text: str) -> list[ModelConfig]:
    from tvmnet import zoo

    configs = []
    for item in re.split(r"[,\s]+", text.strip()):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) > 3 or parts[0] not in zoo.MODEL_NAMES:
            raise SystemExit(f"bench: bad model {item!r}: use NAME[:ALPHA[:RESOLUTION]] with NAME one of "
                             f"{', '.join(zoo.MODEL_NAMES)} (e.g. mobilenet_v2:0.5:160)")
        try:
            alpha = float(parts[1]) if len(parts) > 1 else 1.0
            resolution = int(parts[2]) if len(parts) > 2 else 224
        except ValueError:
            raise SystemExit(f"bench: bad model {item!r}: alpha must be a number and resolution an integer") from None
        configs.append(ModelConfig(parts[0], alpha, resolution))
    if not configs:
        raise SystemExit("bench: --models is empty")
    return configs


def _sha(*parts: Any) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else str(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def code_identity() -> dict[str, Any]:
    """tvmnet's commit, whether its code differs from it, and a hash of the code actually used."""
    import tvmnet

    package = Path(tvmnet.__file__).resolve().parent
    files = sorted(p for p in package.rglob("*") if p.suffix in {".py", ".toml"} and "__pycache__" not in p.parts)
    targets = REPO / "targets"
    if targets.is_dir():
        files += sorted(targets.glob("*.toml"))
    code_hash = _sha(*(item for p in files for item in (p.name, p.read_bytes())))
    status = _git("status", "--porcelain", "--", "tvmnet", "targets")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "code_sha256": code_hash,
        "package": str(package),
    }


def export_onnx(config: ModelConfig, work: Path, seed: int) -> Path:
    from tvmnet import zoo

    path = work / "onnx" / f"{config.slug}-seed{seed}.onnx"
    if not path.is_file():
        say(f"{config.slug}: exporting ONNX (seed {seed})")
        zoo.export_model(config.name, path, alpha=config.alpha, resolution=config.resolution, seed=seed)
    return path


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _compile(onnx_path: Path, out: Path, target: str, tuning_logs: Path | None) -> tuple[Path, float]:
    """Compile into ``out`` (atomic in tvmnet); untuned = a tuning-log root that holds nothing."""
    import tvmnet

    started = time.monotonic()
    if tuning_logs is None:
        with tempfile.TemporaryDirectory(prefix="tvmnet-bench-nologs-") as empty, _env("TVMNET_TUNING_LOGS", empty):
            tvmnet.compile(str(onnx_path), output=out, target=target)
    else:
        tvmnet.compile(str(onnx_path), output=out, target=target, tuning_logs=tuning_logs)
    return out, round(time.monotonic() - started, 1)


def _has_any_database(root: Path, target: str) -> bool:
    from tvmnet import tune

    base = root / target
    return base.is_dir() and any(tune.has_database(p) for p in base.iterdir() if p.is_dir())


def fingerprint(onnx_path: Path, target: str, work: Path, key: str) -> str:
    """The workload fingerprint ``tvmnet compile`` looks its default log up by (cached: it costs an
    extraction of the tuning tasks)."""
    cache = work / "fingerprints" / f"{key[:24]}.txt"
    if cache.is_file():
        return cache.read_text().strip()
    from tvmnet import tune
    from tvmnet.frontend import load_onnx

    value = Path(tune.default_log_dir(load_onnx(str(onnx_path), None), target)).name
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(value + "\n")
    return value


def snapshot_log(log_dir: Path, work: Path) -> tuple[Path, str, dict[str, int]]:
    """Copy the database files once (a tune may be appending to them) and hash what was copied: the
    tuned artifact is compiled from, and cached by, exactly these bytes."""
    from tvmnet import tune

    contents = {name: (log_dir / name).read_bytes() for name in (tune.WORKLOAD_FILE, tune.RECORD_FILE)
                if (log_dir / name).is_file()}
    digest = _sha(*(item for name in sorted(contents) for item in (name, contents[name])))
    snap = work / "logs" / digest[:16]
    if not snap.is_dir():
        snap.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".snap-", dir=snap.parent))
        for name, data in contents.items():
            (staging / name).write_bytes(data)
        os.replace(staging, snap)

    workloads = sum(1 for line in contents.get(tune.WORKLOAD_FILE, b"").splitlines() if line.strip())
    counts = {"workloads": workloads, "records": 0, "trials": 0, "baselines": 0, "tuned_workloads": 0,
              "unreadable_lines": 0, "trials_by_cpu": {}}
    tried: set[int] = set()
    for line in contents.get(tune.RECORD_FILE, b"").splitlines():
        if not line.strip():
            continue
        try:  # [workload index, [trace [insts, decisions], run_secs, target, args]]
            index, (trace, _secs, target, *_rest) = json.loads(line)
            empty = len(trace[0]) == 0
            cpu = tune.cpu_of(target)
        except (ValueError, TypeError, IndexError, AttributeError):
            counts["unreadable_lines"] += 1
            continue
        counts["records"] += 1
        if empty:  # the untuned kernel's measured floor, not a trial
            counts["baselines"] += 1
        else:
            counts["trials"] += 1
            counts["trials_by_cpu"][cpu] = counts["trials_by_cpu"].get(cpu, 0) + 1
            tried.add(index)
    counts["tuned_workloads"] = len(tried)
    return snap, digest, counts


def prepare(config: ModelConfig, args: argparse.Namespace, code: dict[str, Any], tvm_version: str) -> dict[str, Any]:
    """ONNX file, untuned artifact and (when a log exists) tuned artifact for one model, and the one with
    ``--before-logs``' log when given, from cache when the key matches."""
    work: Path = args.work_dir
    onnx_path = export_onnx(config, work, args.seed)
    base_key = _sha(SCHEMA, config.slug, args.seed, args.target, code["code_sha256"], tvm_version)
    entry: dict[str, Any] = {"model": config.slug, "onnx": str(onnx_path), "artifacts": {}}

    untuned = work / "artifacts" / f"{config.slug}-untuned-{_sha(base_key, 'untuned')[:12]}"
    cached = (untuned / "manifest.json").is_file()
    if not cached:
        say(f"{config.slug}: compiling the untuned artifact")
        _, seconds = _compile(onnx_path, untuned, args.target, None)
    entry["artifacts"][UNTUNED] = {"path": str(untuned), "cached": cached,
                                   "compile_s": None if cached else seconds}

    entry["tuning"] = _tuned_artifact(entry, TUNED, args.tuning_logs, onnx_path, args, base_key)
    if args.before_logs is not None:
        entry["tuning_before"] = _tuned_artifact(entry, BEFORE, args.before_logs, onnx_path, args, base_key)
    return entry


def _tuned_artifact(entry: dict[str, Any], runtime: str, root: Path, onnx_path: Path, args: argparse.Namespace,
                    base_key: str) -> dict[str, Any]:
    """Compile (or find in the cache) the artifact with the log under ``root`` that ``tvmnet compile`` would
    find, as ``entry["artifacts"][runtime]``; returns what was found about the log."""
    work: Path = args.work_dir
    tuning: dict[str, Any] = {"root": str(root), "log_dir": None}
    if not _has_any_database(root, args.target):
        tuning["skipped"] = f"no tuning log (nothing under {root / args.target})"
        return tuning
    fp = fingerprint(onnx_path, args.target, work, base_key)
    log_dir = root / args.target / fp
    tuning["fingerprint"] = fp
    from tvmnet import tune

    if not tune.has_database(log_dir):
        tuning["skipped"] = f"no tuning log ({log_dir} does not exist)"
        return tuning
    snap, log_hash, counts = snapshot_log(log_dir, work)
    tuning.update({"log_dir": str(log_dir), "log_sha256": log_hash, "snapshot": str(snap), **counts})
    tuned = work / "artifacts" / f"{entry['model']}-tuned-{_sha(base_key, 'tuned', log_hash)[:12]}"
    cached = (tuned / "manifest.json").is_file()
    if not cached:
        say(f"{entry['model']}: compiling the {runtime} artifact with {log_dir} ({counts['trials']} trials)")
        _, seconds = _compile(onnx_path, tuned, args.target, snap)
    entry["artifacts"][runtime] = {"path": str(tuned), "cached": cached, "compile_s": None if cached else seconds}
    return tuning


def schedule_coverage(artifact: Path) -> dict[str, Any]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    schedules = manifest.get("schedules") or {}
    tuned, total = len(schedules.get("tuned", [])), schedules.get("total")
    return {"tuned": tuned, "total": total, "fallback": len(schedules.get("fallback", [])),
            "database": schedules.get("database")}


# ----------------------------------------------------------------------------------------------
# Timing and statistics


def summarize(seconds: list[float]) -> dict[str, Any]:
    ms = sorted(s * 1e3 for s in seconds)
    p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
    return {"median_ms": statistics.median(ms), "p90_ms": p90, "mean_ms": statistics.fmean(ms),
            "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}


def ratio_interval(blocks: list[list[float]], reference: list[list[float]], level: float = INTERVAL_LEVEL,
                   draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The ``level`` bootstrap interval of median(blocks) / median(reference) over the rounds.

    Each draw takes rounds with replacement, both runtimes' blocks of a round together: the host's state
    changes from round to round, and a round that slowed both runtimes stays one paired sample. It says how
    far this run's ratio could move with other rounds of the same hour, not what another hour would give."""
    rng = random.Random(seed)
    rounds = len(blocks)
    ratios = []
    for _ in range(draws):
        picked = [rng.randrange(rounds) for _ in range(rounds)]
        ratios.append(statistics.median([t for i in picked for t in blocks[i]])
                      / statistics.median([t for i in picked for t in reference[i]]))
    ratios.sort()
    tail = int((1 - level) / 2 * draws)
    return ratios[tail], ratios[draws - 1 - tail]


def fastest_round_ratio(row: dict[str, Any], reference: dict[str, Any]) -> float:
    """min(row's round medians) / min(reference's): each runtime in the round the host slowed it least.

    A neighbour on a shared host only ever slows a runtime, and not each by as much: on the Zen 4 of
    bench/README.md item 51, onnxruntime's V2 ran 1.8-2.3x its fastest round in its five slowest rounds of a
    run, tvmnet's 1.0-1.5x in the same rounds, so that run's median ratio flattered tvmnet. This ratio is the
    nearest one run gets to a quiet host, and only as near as each runtime's quietest round: it has no interval
    (a minimum does not bootstrap), and runs.py pools it over runs."""
    return min(row["round_medians_ms"]) / min(reference["round_medians_ms"])


def parse_goals(items: list[str]) -> dict[str, float]:
    """``MODEL=RATIO`` items (MODEL as a result names it, e.g. mobilenet_v2-1-224) as a dict."""
    goals = {}
    for item in items:
        model, _, ratio = item.partition("=")
        try:
            goals[model.strip()] = float(ratio)
        except ValueError:
            raise SystemExit(f"bench: --goal {item!r} is not MODEL=RATIO (e.g. mobilenet_v2-1-224=0.8)") from None
    return goals


def goal_verdicts(models: list[dict[str, Any]], goals: dict[str, float]) -> list[dict[str, Any]]:
    """For each goal, whether this run's tuned tvmnet met it: met (the whole interval at or under the goal),
    not met (all of it above), or undecided (the interval straddles the goal)."""
    verdicts = []
    by_name = {model["model"]: model for model in models}
    for name, goal in goals.items():
        model = by_name.get(name)
        tuned = next((row for row in model["runtimes"] if row["runtime"] == TUNED), None) if model else None
        if tuned is None:
            why = "not in this run" if model is None else model["skipped"].get(TUNED, "no tuned artifact")
            verdicts.append({"model": name, "goal": goal, "verdict": f"not measured: {why}"})
            continue
        low, high = tuned["ratio_interval_to_onnxruntime"]
        if len(tuned["round_medians_ms"]) < MIN_ROUNDS_FOR_VERDICT:
            verdict = f"undecided: fewer than {MIN_ROUNDS_FOR_VERDICT} rounds"
        else:
            verdict = "met" if high <= goal else "not met" if low > goal else "undecided"
        verdicts.append({"model": name, "goal": goal, "ratio": tuned["ratio_to_onnxruntime"],
                         "interval": [low, high], "verdict": verdict,
                         "fastest_round_ratio": tuned["fastest_round_ratio_to_onnxruntime"]})
    return verdicts


def bench_model(config: ModelConfig, entry: dict[str, Any], args: argparse.Namespace,
                openvino_ok: bool, fma: FmaPeak) -> dict[str, Any]:
    import numpy as np

    from tvmnet import verify

    work: Path = args.work_dir
    run_dir = Path(tempfile.mkdtemp(prefix=f"run-{config.slug}-", dir=work))
    spec_shape = (1, 3, config.resolution, config.resolution)
    x = np.random.default_rng(args.seed).standard_normal(spec_shape).astype("float32")
    input_path = run_dir / "input.npy"
    np.save(input_path, x)

    sources: dict[str, Path] = {ORT: Path(entry["onnx"])}
    for runtime in TVMNET_RUNTIMES:
        if runtime in entry["artifacts"]:
            sources[runtime] = Path(entry["artifacts"][runtime]["path"])
    if openvino_ok:
        sources[OPENVINO] = Path(entry["onnx"])
    runtimes = [r for r in RUNTIME_ORDER if r in sources]

    workers: dict[str, Worker] = {}
    try:
        for runtime in runtimes:  # started one by one: loading is not timed, but it is not overlapped either
            workers[runtime] = Worker(runtime, sources[runtime], input_path, run_dir / f"{runtime}.out.npy",
                                      args.threads, run_dir / f"{runtime}.log")
            workers[runtime].wait_ready()
        times: dict[str, list[list[float]]] = {r: [] for r in runtimes}
        order, peaks = [], []
        for round_ in range(args.rounds):
            peaks.append(fma.sample(args.threads))  # the host's share of the cores, round by round
            sequence = runtimes if round_ % 2 == 0 else runtimes[::-1]  # no runtime always goes first
            for runtime in sequence:
                time.sleep(args.pause)  # let the previous process's pool stop spinning
                times[runtime].append(workers[runtime].block(args.warmup, args.runs))
                order.append(runtime)
    finally:
        for worker in workers.values():
            worker.close()

    outputs = {r: np.load(run_dir / f"{r}.out.npy") for r in runtimes}
    reference = outputs[ORT]
    rows: dict[str, dict[str, Any]] = {}
    for runtime in runtimes:
        flat = [t for block in times[runtime] for t in block]
        row: dict[str, Any] = {"runtime": runtime, **summarize(flat),
                               "round_medians_ms": [statistics.median(b) * 1e3 for b in times[runtime]],
                               "load_s": workers[runtime].load_s, "source": str(sources[runtime]),
                               "input_read_in_place": workers[runtime].input_read_in_place}
        if runtime != ORT:
            report = verify.compare("output", outputs[runtime], reference)
            row["check"] = {"reference": ORT, "max_abs_error": report.max_abs_error,
                            "max_rel_error": report.max_rel_error, "rtol": report.rtol, "atol": report.atol,
                            "passed": report.passed, "shape": list(outputs[runtime].shape)}
        if runtime in TVMNET_RUNTIMES:
            row["schedules"] = schedule_coverage(sources[runtime])
            row["cached_artifact"] = entry["artifacts"][runtime]["cached"]
            row["compile_s"] = entry["artifacts"][runtime]["compile_s"]
        rows[runtime] = row

    def ratio(a: str, b: str) -> float | None:
        if a in rows and b in rows:
            return rows[a]["median_ms"] / rows[b]["median_ms"]
        return None

    def round_ratios(a: str, b: str) -> list[float] | None:
        if a in rows and b in rows:
            return [x / y for x, y in zip(rows[a]["round_medians_ms"], rows[b]["round_medians_ms"])]
        return None

    for runtime, row in rows.items():
        row["ratio_to_onnxruntime"] = ratio(runtime, ORT)
        row["round_ratios_to_onnxruntime"] = round_ratios(runtime, ORT)
        row["ratio_interval_to_onnxruntime"] = list(ratio_interval(times[runtime], times[ORT]))
        row["fastest_round_ratio_to_onnxruntime"] = fastest_round_ratio(row, rows[ORT])
    if TUNED in rows:
        rows[TUNED]["ratio_to_untuned"] = ratio(TUNED, UNTUNED)
    if BEFORE in rows:
        rows[BEFORE]["ratio_to_untuned"] = ratio(BEFORE, UNTUNED)
        rows[TUNED]["ratio_to_before"] = ratio(TUNED, BEFORE)
        rows[TUNED]["round_ratios_to_before"] = round_ratios(TUNED, BEFORE)
        rows[TUNED]["ratio_interval_to_before"] = list(ratio_interval(times[TUNED], times[BEFORE]))
    skipped = {}
    if TUNED not in rows:
        skipped[TUNED] = entry["tuning"].get("skipped", "no tuning log")
    if "tuning_before" in entry and BEFORE not in rows:
        skipped[BEFORE] = entry["tuning_before"].get("skipped", "no tuning log")
    if not openvino_ok:
        skipped[OPENVINO] = args.openvino_note
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"model": config.slug, "name": config.name, "alpha": config.alpha, "resolution": config.resolution,
            "input_shape": list(spec_shape), "seed": args.seed, "onnx": entry["onnx"], "tuning": entry["tuning"],
            **({"tuning_before": entry["tuning_before"]} if "tuning_before" in entry else {}),
            "block_order": order, "runtimes": [rows[r] for r in runtimes], "skipped": skipped,
            "fma_peak_gflops_by_round": peaks}


# ----------------------------------------------------------------------------------------------
# Context and output


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def llvm_cpu() -> str:
    """LLVM's name for this CPU (what ``--target x86`` builds for, and what tuning records are keyed by):
    two machines that both say "AMD EPYC" can be znver3 and znver5."""
    import tvm

    return str(tvm.target.codegen.llvm_get_system_cpu())


def build_c(source: Path, output: Path, *flags: str) -> None:
    """Build a bench probe written in C with the system compiler (-O2 and ``flags``), or exit saying why."""
    built = subprocess.run(["cc", "-O2", *flags, str(source), "-o", str(output)], capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"bench: could not build {source.name} (install a C compiler: apt install gcc): "
                         f"{built.stderr.strip()[-500:]}")


class FmaPeak:
    """This CPU's peak fp32 multiply-add rate (bench/fma_peak.c, built once for this CPU with the system C
    compiler): the ceiling for any kernel, and a probe of the host. On a VM whose cores another tenant
    shares, it drops (to half on the 2-core EPYC VM, 204 -> 102 GFLOP/s within minutes) while the load
    average, which sees only this VM, stays low; every runtime slows with it. A drop proves contention; a
    full peak does not prove quiet: a neighbour can take the shared cache and memory bandwidth without the
    cores (onnxruntime's MobileNetV2 took 5.8 to 9.5 ms in rounds that each began at 200 GFLOP/s).
    """

    SOURCE = Path(__file__).resolve().parent / "fma_peak.c"

    def __enter__(self) -> FmaPeak:
        self._tmp = tempfile.TemporaryDirectory(prefix="tvmnet-fma-peak-")
        self.binary = Path(self._tmp.name) / "fma_peak"
        try:
            build_c(self.SOURCE, self.binary, "-march=native", "-pthread")
        except SystemExit:
            self._tmp.cleanup()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tmp.cleanup()

    def sample(self, threads: int, iterations: int = 300_000_000) -> float:
        """GFLOP/s over ``threads`` threads; the default runs about half a second on a 3 GHz AVX2 core."""
        out = subprocess.run([str(self.binary), str(threads), str(iterations)], capture_output=True, text=True,
                             check=True).stdout
        return float(out)


HOST_STEAL_WARN = 0.85
"""Below this fraction of the run's best FMA peak sample, another tenant had part of this VM's cores."""


def host_was_contended(peaks: list[float]) -> bool:
    """Whether FMA peak samples of one run show another tenant on this VM's cores."""
    return min(peaks) < HOST_STEAL_WARN * max(peaks)


def _host_note(peaks: list[float]) -> str:
    if host_was_contended(peaks):
        return "the host took CPU time from this VM while it ran; the numbers are not clean"
    return "the host left this VM its cores"


def settle_load(seconds: float) -> dict[str, Any]:
    """Wait (up to ``seconds``) for the 1-minute load average to fall to LOAD_WARN: compiling just kept the
    cores busy, and timing should start on a quiet machine. Returns the load state when timing begins."""
    deadline = time.monotonic() + seconds
    if seconds > 0 and os.getloadavg()[0] > LOAD_WARN:
        say(f"waiting up to {seconds:.0f} s for the 1-minute load average ({os.getloadavg()[0]:.2f}) to fall to "
            f"{LOAD_WARN}")
    while os.getloadavg()[0] > LOAD_WARN and time.monotonic() < deadline:
        time.sleep(5)
    return load_state()


def load_state() -> dict[str, Any]:
    uptime = None
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    return {"loadavg": list(os.getloadavg()), "uptime": uptime}


def _version(module: str) -> str | None:
    try:
        imported = __import__(module)
    except Exception:
        return None
    return getattr(imported, "__version__", None)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "cpu"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _interval(bounds: list[float], digits: int = 2) -> str:
    return f"{INTERVAL_LEVEL:.0%} interval {bounds[0]:.{digits}f}-{bounds[1]:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    ctx = result["context"]
    versions = ctx["versions"]
    commit = (versions["tvmnet_commit"] or "?")[:10] + (" (dirty)" if versions.get("tvmnet_dirty") else "")
    lines = [
        f"# tvmnet vs onnxruntime — {ctx['date_utc']}",
        "",
        f"- CPU: {ctx['cpu_model']} ({ctx['physical_cores']} physical / {ctx['logical_cpus']} logical cores, LLVM "
        f"mcpu {ctx.get('llvm_cpu', '?')}), host {ctx['hostname']}",
        f"- threads: {ctx['threads']} for every runtime; fp32, batch 1; each runtime in its own process, "
        f"{ctx['rounds']} alternating rounds × ({ctx['warmup']} warm-up + {ctx['runs']} timed calls)",
        f"- load average (1, 5, 15 min) before compiling / when timing began / after: "
        f"{' '.join(_fmt(v) for v in ctx['load_before']['loadavg'])} / "
        f"{' '.join(_fmt(v) for v in ctx['load_at_timing']['loadavg'])} / "
        f"{' '.join(_fmt(v) for v in ctx['load_after']['loadavg'])}",
        f"- tvmnet {versions['tvmnet']} @ {commit}, TVM {versions['tvm']}, onnxruntime {versions['onnxruntime']}, "
        f"OpenVINO {versions['openvino'] or 'not installed'}",
        "",
        "| model | runtime | median ms | p90 ms | × onnxruntime | × untuned | max abs error | check | tuned tasks |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    notes = []
    for model in result["models"]:
        for row in model["runtimes"]:
            check = row.get("check")
            error = "reference" if check is None else f"{check['max_abs_error']:.1e}"
            sched = row.get("schedules")
            tuned = "–"
            if sched and row["runtime"] in (TUNED, BEFORE):
                log = model["tuning" if row["runtime"] == TUNED else "tuning_before"]
                by_cpu = log.get("trials_by_cpu") or {"?": log.get("trials", "?")}
                tuned = f"{sched['tuned']}/{sched['total']} (trials: " + ", ".join(
                    f"{n:,} on {cpu}" for cpu, n in sorted(by_cpu.items(), key=lambda item: -item[1])) + ")"
            elif sched:
                tuned = f"0/{sched['total']}"
            lines.append(
                f"| {model['model']} | {row['runtime']} | {_fmt(row['median_ms'])} | {_fmt(row['p90_ms'])} | "
                f"{_fmt(row['ratio_to_onnxruntime'])} | {_fmt(row.get('ratio_to_untuned'))} | "
                f"{error} | "
                f"{'–' if check is None else ('pass' if check['passed'] else '**FAIL**')} | {tuned} |")
        tuned_row = next((row for row in model["runtimes"] if row["runtime"] == TUNED), {})
        if tuned_row:
            notes.append(f"- {model['model']}: {TUNED} / {ORT} = {tuned_row['ratio_to_onnxruntime']:.2f}, "
                         f"{_interval(tuned_row['ratio_interval_to_onnxruntime'])}; in each one's fastest round "
                         f"{tuned_row['fastest_round_ratio_to_onnxruntime']:.2f}")
        if tuned_row.get("ratio_to_before") is not None:
            rounds = tuned_row["round_ratios_to_before"]
            notes.append(f"- {model['model']}: {TUNED} / {BEFORE} (the log under {model['tuning_before']['root']}) "
                         f"= {tuned_row['ratio_to_before']:.3f}, {_interval(tuned_row['ratio_interval_to_before'], 3)} "
                         f"(rounds {min(rounds):.2f}-{max(rounds):.2f})")
        in_place = {row["runtime"]: row.get("input_read_in_place") for row in model["runtimes"]
                    if row.get("input_read_in_place") is not None}
        if in_place:
            notes.append(f"- {model['model']}: tvmnet's input " + ", ".join(
                f"{runtime} {'read in place' if flag else 'copied (not aligned as its kernels need)'}"
                for runtime, flag in in_place.items()))
        for runtime, why in model["skipped"].items():
            lines.append(f"| {model['model']} | {runtime} | – | – | – | – | – | – | {why} |")
        peaks = model.get("fma_peak_gflops_by_round")
        if peaks:
            notes.append(f"- {model['model']}: this CPU's FMA peak before each round {min(peaks):.0f}-{max(peaks):.0f} "
                         f"GFLOP/s (`bench/fma_peak.c`, {ctx['threads']} thread(s)): {_host_note(peaks)}")
    if result["warnings"]:
        notes += [f"- warning: {w}" for w in result["warnings"]]
    lines += ["", "Ratios are median / median from the same alternation; check = output vs onnxruntime "
              "on the same seeded input, |Δ| ≤ 1e-4 + 1e-4·|ort|. Intervals: "
              f"{INTERVAL_LEVEL:.0%} bootstrap over the rounds (`ratio_interval`).", *([""] + notes if notes else [])]
    if result.get("goals"):
        lines += ["", f"Goals ({TUNED} / {ORT}, met only when the whole interval is at or under the goal):", ""]
        for goal in result["goals"]:
            measured = (f"{goal['ratio']:.2f}, {_interval(goal['interval'])}: " if "ratio" in goal else "")
            fastest = (f" (fastest rounds: {goal['fastest_round_ratio']:.2f})" if "ratio" in goal else "")
            lines.append(f"- {goal['model']} ≤ {goal['goal']:.2f}×: {measured}**{goal['verdict']}**{fastest}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated NAME[:ALPHA[:RESOLUTION]] (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: physical cores)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating blocks per runtime (default: 5)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timed calls per block (default: enough for 100 timed calls in all)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls at the start of each block (default: 5)")
    parser.add_argument("--settle", type=float, default=240,
                        help="seconds to wait after compiling for the 1-minute load to fall to 0.5 (default: 240)")
    parser.add_argument("--pause", type=float, default=0.25, help="seconds of quiet between blocks (default: 0.25)")
    parser.add_argument("--target", default="x86")
    parser.add_argument("--seed", type=int, default=0, help="weights and input seed (default: 0)")
    parser.add_argument("--work-dir", type=Path, default=REPO / "bench" / ".work")
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--tuning-logs", type=Path, default=REPO / "tuning_logs",
                        help="tuning-log root looked up like tvmnet compile does (default: the repo's tuning_logs/)")
    parser.add_argument("--before-logs", type=Path, default=None,
                        help=f"a second tuning-log root (an earlier commit's tuning_logs/): its artifact is timed "
                             f"as {BEFORE} in the same alternation")
    parser.add_argument("--no-openvino", action="store_true", help="leave OpenVINO out even when it is installed")
    parser.add_argument("--goal", action="append", metavar="MODEL=RATIO",
                        help=f"a ratio tuned tvmnet's median should stay within (repeatable; default: issue 6's "
                             f"{' '.join(GOALS)})")
    parser.add_argument("--worker", choices=RUNTIME_ORDER, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)

    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    load_before = load_state()
    warnings: list[str] = []
    configs = parse_models(args.models)
    args.threads = args.threads or physical_cores()
    goals = parse_goals(args.goal or [g for g in GOALS if g.partition("=")[0] in {c.slug for c in configs}])
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        raise SystemExit("bench: --rounds and --threads must be ≥ 1, --warmup ≥ 0")
    args.runs = args.runs or math.ceil(2 * MIN_TIMED_RUNS / args.rounds)
    if args.runs < 1:
        raise SystemExit("bench: --runs must be ≥ 1")
    if args.runs * args.rounds < MIN_TIMED_RUNS:
        warnings.append(f"{args.runs * args.rounds} timed runs per runtime (< {MIN_TIMED_RUNS}): a smoke run, "
                        "not a measurement")
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.tuning_logs = args.tuning_logs.resolve()
    args.before_logs = args.before_logs.resolve() if args.before_logs is not None else None
    openvino_version = _version("openvino")
    openvino_ok = openvino_version is not None and not args.no_openvino
    args.openvino_note = ("left out (--no-openvino)" if args.no_openvino else
                          "skipped: `import openvino` failed (pip install openvino, or tvmnet[bench])")
    if not openvino_ok:
        say(f"OpenVINO {args.openvino_note}")

    import tvm

    code = code_identity()
    entries = [prepare(config, args, code, tvm.__version__) for config in configs]  # compile everything first
    load_at_timing = settle_load(args.settle)
    if load_at_timing["loadavg"][0] > LOAD_WARN:
        warnings.append(f"1-minute load average was {load_at_timing['loadavg'][0]:.2f} when timing began "
                        f"(> {LOAD_WARN}, after waiting up to {args.settle:.0f} s): something else is using the "
                        "CPU, or compiling just did; the numbers are not clean")
        say(warnings[-1])
    models = []
    with FmaPeak() as fma:
        for config, entry in zip(configs, entries):
            say(f"{config.slug}: timing {args.rounds} rounds × ({args.warmup} + {args.runs}) calls per runtime, "
                f"{args.threads} thread(s)")
            models.append(bench_model(config, entry, args, openvino_ok, fma))
    load_after = load_state()
    peaks = [peak for model in models for peak in model["fma_peak_gflops_by_round"]]
    if host_was_contended(peaks):
        warnings.append(f"this CPU's FMA peak on {args.threads} thread(s), sampled before every round, ranged "
                        f"{min(peaks):.0f}-{max(peaks):.0f} GFLOP/s: {_host_note(peaks)}")
        say(warnings[-1])

    now = _dt.datetime.now(_dt.timezone.utc)
    context = {
        "date_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "llvm_cpu": llvm_cpu(),
        "physical_cores": physical_cores(),
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "threads": args.threads,
        "rounds": args.rounds,
        "runs": args.runs,
        "warmup": args.warmup,
        "pause_s": args.pause,
        "target": args.target,
        "load_before": load_before,
        "load_at_timing": load_at_timing,
        "load_after": load_after,
        "versions": {
            "tvmnet": _version("tvmnet"),
            "tvmnet_commit": code["commit"],
            "tvmnet_dirty": code["dirty"],
            "tvmnet_code_sha256": code["code_sha256"],
            "tvm": tvm.__version__,
            "onnxruntime": _version("onnxruntime"),
            "openvino": openvino_version,
            "numpy": _version("numpy"),
        },
        "timing": "time.perf_counter around each synchronous call: onnxruntime InferenceSession.run, "
                  "tvmnet CompiledModel.run (input checks and output copy included), OpenVINO InferRequest.infer "
                  "plus an output copy",
        "settings": {
            ORT: "CPUExecutionProvider, intra_op_num_threads=threads, inter_op_num_threads=1, sequential, "
                 "ORT_ENABLE_ALL",
            "tvmnet": "TVM_NUM_THREADS=threads",
            OPENVINO: "CPU, INFERENCE_NUM_THREADS=threads, NUM_STREAMS=1, PERFORMANCE_HINT=LATENCY, "
                      "INFERENCE_PRECISION_HINT=f32",
        },
    }
    failed = [f"{m['model']} {r['runtime']}" for m in models for r in m["runtimes"]
              if r.get("check") and not r["check"]["passed"]]
    if failed:
        warnings.append("numerical check FAILED for " + ", ".join(failed))
    result = {"schema": SCHEMA, "context": context, "models": models, "warnings": warnings,
              "goals": goal_verdicts(models, goals)}

    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = args.results_dir / f"{now.strftime('%Y-%m-%d')}-{slug(context['cpu_model'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    print(text)
    say(f"wrote {stem}.json and {stem}.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
