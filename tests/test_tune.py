"""MetaSchedule tuning: records land where ``compile`` applies them, survive a SIGKILL, resume, lock, RPC.

Budgets are tiny (a few trials on two tasks of MobileNetV2 α=0.25 ρ=96): these tests prove plumbing,
not speed. Most of each test's time is importing the model and MetaSchedule's tensor intrinsics.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tvmnet
from tvmnet.errors import TvmnetError

from conftest import ATOL, RTOL, cpu_flags, ort_run

# the trailing 1: AttachAttrLayoutFreeBuffers (CPU pipeline) re-adds every PrimFunc under a fresh name
TASKS = ["fused_conv2d_add_maximum_minimum1", "fused_conv2d1_add_maximum_minimum1"]
SMALL = {"population_size": 64, "num_trials_per_iter": 4}  # keeps each search step to seconds on 2 cores
REPO = Path(__file__).resolve().parent.parent


def _model():
    from tvmnet import zoo

    return zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96)


def _records(log_dir: Path) -> int:
    path = log_dir / "database_tuning_record.json"
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def _database_records(log_dir: Path) -> list:
    from tvm.s_tir import meta_schedule as ms

    db = ms.database.JSONDatabase(work_dir=str(log_dir), allow_missing=False)
    return list(db.get_all_tuning_records())


def _trials(records: list) -> list:
    """Records minus the untuned-kernel floor (one empty-trace record per task)."""
    from tvmnet.tune import is_baseline

    return [r for r in records if not is_baseline(r)]


def _fastest_per_workload(records) -> dict[int, object]:
    """Each workload's (structural hash's) fastest of ``records``, by its first stored time."""
    from tvmnet.tune import _shash

    fastest: dict[int, object] = {}
    for record in records:
        key = _shash(record.workload.mod)
        if key not in fastest or float(record.run_secs[0]) < float(fastest[key].run_secs[0]):
            fastest[key] = record
    return fastest


def _copy_with_times_scaled(log_dir: Path, copy: Path, factor: float = 1000, *, inverted: bool = False,
                            mcpu: str | None = None) -> Path:
    """A copy of a tuning log with every stored time multiplied by ``factor``: above 1, a log as if measured on
    a far busier host than the one the test runs on; below 1, as if this host were far busier now.
    ``inverted``: each time becomes ``factor`` / time instead, so that the slowest record is the fastest.
    ``mcpu``: every record as if measured on that CPU."""
    import json
    import shutil

    from tvmnet.tune import RECORD_FILE

    shutil.copytree(log_dir, copy, ignore=shutil.ignore_patterns("logs", ".tune.lock"))
    slower = []
    for line in (copy / RECORD_FILE).read_text().splitlines():
        entry = json.loads(line)
        entry[1][1] = [factor / secs if inverted else secs * factor for secs in entry[1][1]]
        if mcpu is not None:
            entry[1][2]["mcpu"] = mcpu
        slower.append(json.dumps(entry, separators=(",", ":")))
    (copy / RECORD_FILE).write_text("\n".join(slower) + "\n")
    return copy


def _two_cpus_log(log_dir: Path, tmp_path: Path, cpus: dict[str, dict]) -> Path:
    """One log holding a copy of ``log_dir``'s records per CPU, each with its times changed as
    :func:`_copy_with_times_scaled` is told by ``cpus[cpu]``."""
    from tvmnet.tune import RECORD_FILE

    copies = [_copy_with_times_scaled(log_dir, tmp_path / cpu, mcpu=cpu, **how) for cpu, how in cpus.items()]
    (copies[0] / RECORD_FILE).write_text("".join((copy / RECORD_FILE).read_text() for copy in copies))
    return copies[0].rename(tmp_path / "two-cpus")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """Two tasks x 4 trials into the default log dir under a temporary $TVMNET_TUNING_LOGS."""
    root = tmp_path_factory.mktemp("tuning_logs")
    old = os.environ.get("TVMNET_TUNING_LOGS")
    os.environ["TVMNET_TUNING_LOGS"] = str(root)
    lines: list[str] = []
    started = time.monotonic()
    try:
        result = tvmnet_tune(_model(), trials=8, trials_per_task=4, tasks=TASKS, progress=lines.append, **SMALL)
        yield result, root, lines, time.monotonic() - started
    finally:
        if old is None:
            os.environ.pop("TVMNET_TUNING_LOGS", None)
        else:
            os.environ["TVMNET_TUNING_LOGS"] = old


def tvmnet_tune(*args, **kwargs):
    from tvmnet.tune import tune

    return tune(*args, **kwargs)


@pytest.mark.timeout(420)
def test_local_tune_records_apply_in_compile(tuned, tmp_path):
    result, root, lines, seconds = tuned
    assert seconds < 300, f"tuning 8 trials took {seconds:.0f} s"
    assert result.log_dir.parent == root / "x86" and result.log_dir.name == result.fingerprint
    assert [t.name for t in result.tasks] == TASKS
    for task in result.tasks:
        assert task.trials == 4 and task.new_trials == 4 and task.best_us is not None and task.best_us > 0
        assert task.untuned_us is not None and task.best_us <= task.untuned_us
    records = _database_records(result.log_dir)
    assert _records(result.log_dir) == 10 and len(records) == 10 and len(_trials(records)) == 8
    assert any("trials" in line and "ETA" in line for line in lines), lines
    assert "best µs" in result.table()

    model = _model()
    artifact = tvmnet.compile(model, output=tmp_path / "tuned", tuning_logs=result.log_dir)
    compiled = tvmnet.load(artifact)
    schedules = compiled.manifest["schedules"]
    # a task whose untuned kernel measured fastest keeps it (the floor); every other one is tuned
    expected = {t.name for t in result.tasks if t.best_us != t.untuned_us}
    assert expected <= set(schedules["tuned"]), schedules
    assert not (set(TASKS) - expected) & set(schedules["tuned"]), schedules
    assert schedules["database"] == str(result.log_dir)
    spec = compiled.inputs[0]
    x = np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
    np.testing.assert_allclose(compiled.run(x), ort_run(model, {spec.name: x})[0], rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(180)
def test_compile_finds_default_log_dir(tuned, tmp_path):
    """No tuning_logs given: compile looks in tuning_logs/<target>/<workload fingerprint>/ itself, and the
    fingerprint ignores the weights (another MobileNetV2 of the same shape finds the same log)."""
    result, _root, _lines, _seconds = tuned
    from tvmnet.frontend import load_onnx
    from tvmnet.tune import default_log_dir

    other = _model()
    weights = [init for init in other.graph.initializer if len(init.dims) > 1 and init.raw_data]
    for init in weights[:5]:  # weights only: the ReLU6 bounds are scalars that shape the kernels themselves
        init.raw_data = bytes(reversed(init.raw_data))
    assert default_log_dir(load_onnx(other), "x86") == result.log_dir
    artifact = tvmnet.compile(other, output=tmp_path / "auto")
    schedules = tvmnet.load(artifact).manifest["schedules"]
    assert schedules["database"] == str(result.log_dir)
    assert {t.name for t in result.tasks if t.best_us != t.untuned_us} <= set(schedules["tuned"])


@pytest.mark.timeout(300)
def test_portable_x86_target_compiles_with_the_x86_log(tuned, tmp_path):
    """x86-avx2 has no log of its own (``logs_from = "x86"``): compile finds the model's x86 log, says so, applies
    its records and still matches onnxruntime. The portable build runs on any x86 CPU with AVX2."""
    result, root, _lines, _seconds = tuned
    assert not (root / "x86-avx2").exists()
    said: list[str] = []
    artifact = tvmnet.compile(_model(), target="x86-avx2", output=tmp_path / "avx2", progress=said.append)
    assert any(f"no tuning log of x86-avx2 for this model: using x86's ({result.log_dir})" in line
               for line in said), said
    compiled = tvmnet.load(artifact)
    schedules = compiled.manifest["schedules"]
    assert schedules["database"] == str(result.log_dir)
    assert {t.name for t in result.tasks if t.best_us != t.untuned_us} <= set(schedules["tuned"])
    if "avx2" not in cpu_flags():
        pytest.skip("this CPU lacks AVX2: the portable build was compiled, not run")
    spec = compiled.inputs[0]
    x = np.random.default_rng(0).standard_normal(spec.shape).astype(np.float32)
    np.testing.assert_allclose(compiled.run(x), ort_run(_model(), {spec.name: x})[0], rtol=RTOL, atol=ATOL)


def test_borrowed_records_come_from_a_cpu_with_the_builds_vector_extension(tuned, tmp_path):
    """A log holding each schedule from an AVX2 CPU and, measured twice as fast, from an AVX-512 one: a build for
    a third AVX2 CPU takes the AVX2 CPU's records, one for a third AVX-512 CPU the faster AVX-512 ones, and one
    for the AVX2 CPU itself its own."""
    import tvm

    from tvmnet.tune import compile_database, cpu_of

    log = _two_cpus_log(tuned[0].log_dir, tmp_path, {"znver3": {"factor": 2.0}, "skylake-avx512": {"factor": 1.0}})

    def applied_cpus(mcpu: str) -> set[str]:
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": 2})
        return {cpu_of(record.target) for record in compile_database(log, target=target).get_all_tuning_records()}

    assert applied_cpus("haswell") == {"znver3"}
    assert applied_cpus("icelake-server") == {"skylake-avx512"}
    assert applied_cpus("znver3") == {"znver3"}


def _x86_log_of_an_avx2_and_an_avx512_cpu(result, root: Path) -> Path:
    """``result``'s log as x86's under ``root``, measured on znver3 (AVX2) and on skylake-avx512, where every
    schedule ran far faster, and the faster the slower it ran on znver3. znver3's untuned floors are left out:
    a haswell build borrows a tuned znver3 record for each task, the kind of record a tune measures again."""
    import json

    from tvmnet.tune import RECORD_FILE

    log = _two_cpus_log(result.log_dir, root, {"znver3": {"factor": 1.0},
                                               "skylake-avx512": {"factor": 1e-12, "inverted": True}})
    x86_log = root / "logs" / "x86" / result.fingerprint
    x86_log.parent.mkdir(parents=True)
    log.rename(x86_log)
    records = (x86_log / RECORD_FILE).read_text().splitlines()
    (x86_log / RECORD_FILE).write_text("".join(f"{line}\n" for line in records
                                               if '"mcpu":"znver3"' not in line or json.loads(line)[1][0][0]))
    return x86_log


def test_a_log_started_from_another_targets_keeps_each_cpus_floor_and_fastest_records(tuned, tmp_path,
                                                                                     monkeypatch):
    """Starting a portable target's log (``logs_from``) keeps, per workload and CPU, the untuned floor and the
    ``SEED_RECORDS_PER_CPU`` fastest records, and leaves a damaged line out; without the other target's log it
    says so and writes nothing."""
    import tvmnet.tune as tune_module
    from tvmnet.tune import RECORD_FILE, _shash, cpu_of, is_baseline

    x86_log = _x86_log_of_an_avx2_and_an_avx512_cpu(tuned[0], tmp_path)
    ranked: dict[tuple, list] = {}
    for r in _database_records(x86_log):
        ranked.setdefault((_shash(r.workload.mod), cpu_of(r.target), is_baseline(r)), []).append(r)
    expected = sorted((*key, str(r.trace)) for key, records in ranked.items()
                      for r in sorted(records, key=lambda r: float(r.run_secs[0]))[:1 if key[2] else 2])
    assert len(expected) == 10, ranked  # each of the 2 workloads: 2 znver3 records, skylake-avx512's floor and 2
    total = sum(map(len, ranked.values())) + 1
    with open(x86_log / RECORD_FILE, "a") as records:
        records.write('[0,[[[],[]],[1e-09],{"mcpu":\n')  # a line cut short: left out
    monkeypatch.setattr(tune_module, "SEED_RECORDS_PER_CPU", 2)
    said: list[str] = []
    started = tmp_path / "started"
    started.mkdir()
    tune_module._start_from(started, x86_log, "x86", said.append)
    kept = sorted((_shash(r.workload.mod), cpu_of(r.target), is_baseline(r), str(r.trace))
                  for r in _database_records(started))
    assert kept == expected
    assert len(said) == 1 and f"started {started} from x86's log ({x86_log}): 10 of its {total} records" in said[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    tune_module._start_from(empty, tmp_path / "no-such-log", "x86", said.append)
    assert said[1:] == [f"x86 has no log of this model ({tmp_path / 'no-such-log'}): {empty} starts empty"]
    assert not list(empty.iterdir())


@pytest.mark.timeout(300)
def test_portable_x86_target_tune_starts_from_the_x86_log(tuned, tmp_path, monkeypatch):
    """A first ``tune --target x86-avx2`` starts its log from the model's x86 log (``logs_from``), then measures
    here, for each task, the record ``compile`` borrowed: the CPU with AVX2's (znver3), not the one an AVX-512
    CPU measured faster. ``compile`` then takes the task measured here from here and the other from znver3."""
    from tvmnet.tune import _shash, compile_database, cpu_of, is_baseline

    if "avx2" not in cpu_flags():
        pytest.skip("this CPU lacks AVX2: an x86-avx2 tune cannot measure here")
    result = tuned[0]
    x86_log = _x86_log_of_an_avx2_and_an_avx512_cpu(result, tmp_path)
    fastest_avx512 = _fastest_per_workload(r for r in _trials(_database_records(x86_log))
                                           if cpu_of(r.target) == "skylake-avx512")
    target = tvmnet.targets.get_target("x86-avx2").tvm_target()
    borrowed = {_shash(r.workload.mod): r for r in compile_database(x86_log, target=target).get_all_tuning_records()}

    monkeypatch.setenv("TVMNET_TUNING_LOGS", str(tmp_path / "logs"))
    lines: list[str] = []
    again = tvmnet_tune(_model(), target="x86-avx2", trials=0, remeasure=1, tasks=TASKS[:1],
                        progress=lines.append, **SMALL)
    own_log = tmp_path / "logs" / "x86-avx2" / result.fingerprint
    assert again.log_dir == own_log
    assert any(f"started {own_log} from x86's log ({x86_log})" in line for line in lines), lines
    mine = [r for r in _database_records(own_log) if cpu_of(r.target) == "haswell"]
    ((workload, trace),) = {(_shash(r.workload.mod), str(r.trace)) for r in mine if not is_baseline(r)}
    assert cpu_of(borrowed[workload].target) == "znver3"
    assert trace == str(borrowed[workload].trace) != str(fastest_avx512[workload].trace)

    applied = {_shash(r.workload.mod): cpu_of(r.target) for r in compile_database(own_log, target=target)
               .get_all_tuning_records()}
    assert sorted(applied.values()) == ["haswell", "znver3"] and applied[workload] == "haswell", applied


@pytest.mark.timeout(120)
def test_second_tune_into_locked_dir_fails_fast(tuned):
    result, _root, _lines, _seconds = tuned
    from tvmnet.tune import _DirLock

    before = _records(result.log_dir)
    with _DirLock(result.log_dir):  # another open file description: flock conflicts even in-process
        with pytest.raises(TvmnetError, match=f"being tuned by another process \\(pid {os.getpid()}\\)"):
            tvmnet_tune(_model(), trials=12, tasks=TASKS, log_dir=result.log_dir, **SMALL)
    assert _records(result.log_dir) == before


KILL_SCRIPT = textwrap.dedent("""
    import sys
    from tvmnet import zoo
    from tvmnet.tune import tune
    tune(zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96), trials=200, tasks=[sys.argv[2]],
         log_dir=sys.argv[1], population_size=64, num_trials_per_iter=4, progress=print)
""")


@pytest.mark.timeout(480)
def test_killed_tune_keeps_records_and_resumes(tmp_path):
    log_dir = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(log_dir), TASKS[1]], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while _records(log_dir) < 2:  # the untuned floor, then at least one measured batch
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no trial reached the disk within 300 s"
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed = _trials(_database_records(log_dir))  # the database still loads after the kill
    assert len(killed) >= 1 and all(r.run_secs is not None for r in killed)
    keys = {str(r.trace) for r in killed}

    resumed = tvmnet_tune(_model(), trials=len(killed) + 4, tasks=[TASKS[1]], log_dir=log_dir, **SMALL)
    after = _database_records(log_dir)
    assert len(_trials(after)) == len(killed) + 4, "the rerun must count the records already there against the budget"
    assert len(after) == len(killed) + 5, "the untuned floor is measured once, not again on resume"
    assert keys <= {str(r.trace) for r in after}
    assert resumed.tasks[0].trials == len(killed) + 4 and resumed.tasks[0].new_trials == 4


@pytest.mark.timeout(480)
def test_ctrl_c_finishes_the_batch_and_stops(tmp_path):
    """Ctrl-C mid-tune: the batch being measured is finished and saved, then tune stops promptly (a
    KeyboardInterrupt raised inside MetaSchedule's loop used to leave the process hung)."""
    log_dir = tmp_path / "log"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(log_dir), TASKS[1]], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while _records(log_dir) < 2:  # the untuned floor, then a measured batch: tuning is under way
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no trial reached the disk within 300 s"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGINT, output[-3000:]  # KeyboardInterrupt, re-raised once saved
    assert "interrupted: finishing the batch" in output and "run the same command again to resume" in output
    trials = _trials(_database_records(log_dir))
    assert 4 <= len(trials) < 200 and len(trials) % 4 == 0, "every batch sent was measured and saved whole"


DOUBLE_SIGNAL_SCRIPT = """
import os, signal, sys, threading, time
from tvmnet.tune import DUPLICATE_SIGNAL_S, _stop_on_interrupt
interrupted = threading.Event()
with _stop_on_interrupt(interrupted, print):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)  # the handler runs between the two deliveries, as it did under timeout
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    print("still here", interrupted.is_set())
    time.sleep(DUPLICATE_SIGNAL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # a real second interrupt
    time.sleep(1)
"""


def test_one_signal_delivered_twice_is_one_interrupt():
    """coreutils ``timeout`` sends its signal to the command and then to the command's process group:
    the tune saw it twice and took it for a second Ctrl-C, quitting without saving the batch. A repeat
    within DUPLICATE_SIGNAL_S is one interrupt; a later one still quits at once."""
    proc = subprocess.run([sys.executable, "-c", DOUBLE_SIGNAL_SCRIPT], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.count("interrupted: finishing the batch") == 1, proc.stdout + proc.stderr
    assert "still here True" in proc.stdout, proc.stdout + proc.stderr
    assert "interrupted again: exiting now" in proc.stdout and proc.returncode == 128 + signal.SIGTERM


@pytest.mark.timeout(420)
def test_rpc_tune_measures_through_server(tmp_path):
    from tvmnet import rpc

    key = "tvmnet-test-x86"
    log_dir = tmp_path / "log"
    with rpc.start_tracker(log=tmp_path / "tracker.log") as tracker:
        assert rpc.query_tracker(tracker.host, tracker.port) == {}
        with rpc.start_server(tracker.address, key, log=tmp_path / "server.log") as server:
            assert key in rpc.query_tracker(tracker.host, tracker.port)
            result = tvmnet_tune(_model(), trials=4, tasks=[TASKS[1]], log_dir=log_dir, rpc_tracker=tracker.address,
                                 rpc_key=key, **SMALL)
            server_log = server.output()
    assert result.runner == f"rpc:{tracker.host}:{tracker.port}:{key}"
    assert result.tasks[0].new_trials == 4 and result.tasks[0].best_us is not None
    assert len(_database_records(log_dir)) == 5 and result.tasks[0].untuned_us is not None
    # every candidate (and the untuned floor) was a shared library linked here and loaded by the server
    assert server_log.count("candidate.so") == 5, server_log[-2000:]


def _kill_on_first_candidate(server, killed: threading.Event, stop: threading.Event) -> None:
    """SIGKILL ``server`` and its session workers as soon as it loads a candidate: it dies mid-measurement."""
    while not stop.is_set():
        if "candidate.so" in server.output():
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
            killed.set()
            return
        time.sleep(0.02)


@pytest.mark.timeout(480)
def test_board_dying_mid_tune_fails_its_trial_and_tuning_goes_on(tmp_path):
    """Two boards share a key; one is killed while it measures. Its trial is recorded as failed, the other
    board measures the rest, and every record measured so far is in the database."""
    from tvmnet import rpc

    key = "tvmnet-test-fleet"
    log_dir = tmp_path / "log"
    lines: list[str] = []
    with rpc.start_tracker(log=tmp_path / "tracker.log") as tracker, \
            rpc.start_server(tracker.address, key, log=tmp_path / "survivor.log") as survivor, \
            rpc.start_server(tracker.address, key, log=tmp_path / "doomed.log") as doomed:
        killed, stop = threading.Event(), threading.Event()
        watcher = threading.Thread(target=_kill_on_first_candidate, args=(doomed, killed, stop), daemon=True)
        watcher.start()
        try:  # min_repeat_ms keeps each measurement running ~0.5 s, so the kill lands inside one
            result = tvmnet_tune(_model(), trials=8, tasks=[TASKS[1]], log_dir=log_dir, rpc_tracker=tracker.address,
                                 rpc_key=key, min_repeat_ms=500, progress=lines.append, **SMALL)
        finally:
            stop.set()
            watcher.join()
        survivor_loads = survivor.output().count("candidate.so")
        assert rpc.query_tracker(tracker.host, tracker.port) == {key: 1}, "the tracker still lists the dead board"
    assert killed.is_set(), "the doomed board never got a candidate: nothing was tested"
    assert any("failed" in line for line in lines), "\n".join(lines)
    assert result.tasks[0].new_trials == 8 and result.tasks[0].best_us is not None
    records = _trials(_database_records(log_dir))
    failed = [r for r in records if min(float(s) for s in r.run_secs) >= 1e9]
    assert len(records) == 8 and 1 <= len(failed) <= 2, [[float(s) for s in r.run_secs] for r in records]
    assert survivor_loads >= 8 - len(failed), "the surviving board did not take over the remaining candidates"


def test_rpc_tune_with_unknown_key_fails_clearly(tmp_path):
    from tvmnet import rpc
    from tvmnet.tune import make_runner
    from tvmnet.targets import get_target

    with rpc.start_tracker() as tracker:
        with pytest.raises(TvmnetError, match="no RPC server with key 'nope'"):
            make_runner(get_target("x86"), rpc_tracker=tracker.address, rpc_key="nope", timeout_s=10, number=1,
                         repeat=1, min_repeat_ms=0)
    with pytest.raises(TvmnetError, match="cannot reach the RPC tracker"):
        rpc.query_tracker("127.0.0.1", rpc.free_port())


@pytest.mark.timeout(300)
def test_floor_is_what_the_database_applies(tuned):
    """compile's database hands out each workload's fastest record, the untuned floor included: that is
    what makes a partial log never slower than no log (TVM's JSONDatabase alone does not: it answers
    from a Pareto front by crowding distance)."""
    result, _root, _lines, _seconds = tuned
    from tvmnet.tune import _record_seconds, _shash, compile_database, is_baseline

    by_workload: dict[int, list] = {}
    for record in _database_records(result.log_dir):
        by_workload.setdefault(_shash(record.workload.mod), []).append(record)
    assert len(by_workload) == 2
    applied = {_shash(r.workload.mod): r for r in compile_database(result.log_dir).get_all_tuning_records()}
    assert applied.keys() == by_workload.keys(), "one record per workload"
    for key, records in by_workload.items():
        assert sum(1 for r in records if is_baseline(r)) == 1
        fastest = min(_record_seconds(r) for r in records if _record_seconds(r) is not None)
        assert _record_seconds(applied[key]) == fastest


def test_prepacked_weights_fold_into_constants(tuned):
    """A tuned CPU schedule reorders its weights (RewriteLayout); building folds the reordering into the
    constants and leaves no tuple of folded weights behind for the VM to build and unpack every call."""
    result, _root, _lines, _seconds = tuned
    import tvm
    from tvm import relax

    from tvmnet import pipeline
    from tvmnet.frontend import load_onnx
    from tvmnet.targets import get_target
    from tvmnet.tune import memory_database

    tvm_target = get_target("x86").tvm_target()
    fused = pipeline.fuse(load_onnx(_model()).to_relax(), tvm_target)
    # searched schedules only: after 4 trials the untuned floor may be fastest, and it has no layout to fold
    searched = memory_database(_trials(_database_records(result.log_dir)))
    scheduled, report = pipeline.schedule(fused, tvm_target, searched)
    kernels = [gv.name_hint for gv, f in scheduled.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    prepacked = {pipeline.fused_name(k) for k in kernels if k != pipeline.fused_name(k)}
    assert prepacked and prepacked <= set(report.tuned), (kernels, report.tuned)
    tuples = [str(binding.var) for block in scheduled["main"].body.blocks for binding in block.bindings
              if isinstance(binding.value, (relax.Tuple, relax.TupleGetItem))]
    assert not tuples, tuples


@pytest.mark.timeout(300)
def test_log_tuned_on_another_cpu_warns(tuned):
    """Records keep the mcpu they were measured for; a build for another CPU is told its log was not made there."""
    import tvm
    from tvmnet.targets import get_target
    from tvmnet.tune import compile_database

    log_dir = tuned[0].log_dir
    here = get_target("x86").tvm_target()
    same: list[str] = []
    compile_database(log_dir, warn=same.append, target=here)
    assert same == []
    elsewhere = "skylake-avx512" if str(here.attrs["mcpu"]) != "skylake-avx512" else "znver3"
    other: list[str] = []
    compile_database(log_dir, warn=other.append,
                     target=tvm.target.Target({"kind": "llvm", "mcpu": elsewhere, "num-cores": 2}))
    assert len(other) == 1 and f"tuned on {here.attrs['mcpu']} and this build is for {elsewhere}" in other[0]


@pytest.mark.timeout(420)
def test_log_from_another_cpu_seeds_a_tune_here(tuned, tmp_path):
    """A log made on another CPU (the machine changed): its records neither count as trials here nor set the
    floor; a tune here first measures that CPU's best schedule of each task on this CPU, and compile then
    prefers this CPU's records, borrowing the other CPU's only for workloads this CPU has none of."""
    import shutil

    from tvmnet.targets import get_target
    from tvmnet.tune import RECORD_FILE, _shash, compile_database, cpu_of, is_baseline

    here = str(get_target("x86").tvm_target().attrs["mcpu"])
    other = "skylake-avx512" if here != "skylake-avx512" else "znver3"
    log = tmp_path / "moved"
    shutil.copytree(tuned[0].log_dir, log, ignore=shutil.ignore_patterns("logs", ".tune.lock"))
    text = (log / RECORD_FILE).read_text()
    assert f'"mcpu":"{here}"' in text
    (log / RECORD_FILE).write_text(text.replace(f'"mcpu":"{here}"', f'"mcpu":"{other}"'))
    theirs = _fastest_per_workload(_trials(_database_records(log)))

    lines: list[str] = []
    again = tvmnet_tune(_model(), trials=1, tasks=TASKS[:1], log_dir=log, progress=lines.append, **SMALL)
    assert any(f"0 trials on {here} already" in line for line in lines), lines
    assert any("measuring the schedules from another CPU of 1 task(s)" in line for line in lines), lines
    (task,) = again.tasks
    assert task.new_trials == 1 and task.trials == 2, (task, lines)  # the other CPU's best, measured here, and 1 new
    assert task.untuned_us is not None and task.best_us <= task.untuned_us

    mine = [r for r in _database_records(log) if cpu_of(r.target) == here]
    assert sum(1 for r in mine if is_baseline(r)) == 1
    ported = [r for r in mine if not is_baseline(r) and str(r.trace) == str(theirs[_shash(r.workload.mod)].trace)]
    assert len(ported) == 1, "the other CPU's best schedule, measured on this one"

    warned: list[str] = []
    applied = compile_database(log, warn=warned.append, target=get_target("x86").tvm_target())
    cpus = {cpu_of(r.target) for r in applied.get_all_tuning_records()}
    assert cpus == {here, other}, "the tuned task's record from here, the other task's from the other CPU"
    assert len(warned) == 1 and f"1 of 2 workloads were tuned on {other} and this build is for {here}" in warned[0]


def test_remeasure_times_each_tasks_next_fastest_records_against_its_fastest(tuned, tmp_path):
    """``remeasure=2, trials=0`` on a log measured under other conditions (its times multiplied by 1000, as
    if measured on a far busier host): each task's 2nd fastest schedule, its row seed (where its fastest
    schedule has one) and, for the task that has one, its fastest schedule from another CPU are timed side
    by side with its fastest record and stored beside the old records, on the log's scale (within 20x of the
    same schedule's earlier stored time, where times stored as measured would be about 1000x below it); the
    fastest is not stored again; nothing is searched."""
    import json
    from collections import Counter

    from tvmnet import search_space
    from tvmnet.targets import get_target
    from tvmnet.tune import RECORD_FILE, _shash, cpu_of

    target = get_target("x86").tvm_target()
    here = str(target.attrs["mcpu"])
    other = "skylake-avx512" if here != "skylake-avx512" else "znver3"
    log = _copy_with_times_scaled(tuned[0].log_dir, tmp_path / "log")
    slower = (log / RECORD_FILE).read_text().splitlines()
    # the last trial of the log, as if the other CPU had measured it: measured here again, it is one more record
    trial = next(line for line in reversed(slower) if json.loads(line)[1][0][0])
    slower.append(trial.replace(f'"mcpu":"{here}"', f'"mcpu":"{other}"'))
    (log / RECORD_FILE).write_text("\n".join(slower) + "\n")
    before = _trials(_database_records(log))
    (theirs,) = [r for r in before if cpu_of(r.target) == other]
    fastest: dict[int, list] = {}
    for record in sorted((r for r in before if cpu_of(r.target) == here), key=lambda r: float(r.run_secs[0])):
        fastest.setdefault(_shash(record.workload.mod), []).append(record)

    lines: list[str] = []
    again = tvmnet_tune(_model(), trials=0, tasks=TASKS, log_dir=log, remeasure=2, progress=lines.append, **SMALL)
    assert sum("side by side with its fastest record, 5 rounds" in line for line in lines) == 2, lines
    assert any("(next fastest records: 1, schedules from another CPU: 1" in line for line in lines), lines
    assert not any("tuning 2 tasks" in line for line in lines), lines
    after = _trials(_database_records(log))
    added = Counter((_shash(r.workload.mod), str(r.trace), cpu_of(r.target)) for r in after)
    added.subtract(Counter((_shash(r.workload.mod), str(r.trace), cpu_of(r.target)) for r in before))
    expected = Counter((key, str(records[1].trace), here) for key, records in fastest.items())
    expected[(_shash(theirs.workload.mod), str(theirs.trace), here)] += 1
    row_seeds = Counter((key, str(seed), here) for key, records in fastest.items()
                        for seed in search_space.row_seeds(records[0].trace, records[0].workload.mod, target))
    assert +added == expected + row_seeds
    old_times = {float(r.run_secs[0]) for r in before}
    new_records = [r for r in after if float(r.run_secs[0]) not in old_times]
    assert len(new_records) == 3 + row_seeds.total()
    stored_before = {(_shash(r.workload.mod), str(r.trace)): float(r.run_secs[0]) for r in before}
    for record in (r for r in new_records if (_shash(r.workload.mod), str(r.trace)) in stored_before):
        # the same schedule's earlier time is on the log's scale too; a time stored as measured would be ~1000x below
        ratio = float(record.run_secs[0]) / stored_before[(_shash(record.workload.mod), str(record.trace))]
        assert 0.05 < ratio < 20, (ratio, lines)
    assert sum(a.trials - t.trials for a, t in zip(again.tasks, tuned[0].tasks)) == 3 + row_seeds.total()


def test_remeasure_stores_nothing_when_the_fastest_record_runs_far_slower_than_the_log_says(tuned, tmp_path):
    """On a host far busier than when the log was measured (here, its times divided by 1000), side by side
    times do not hold (a parallel kernel stalls far more than a serial one): ``remeasure`` says so, per task,
    and stores nothing."""
    from tvmnet.tune import RECORD_FILE

    log = _copy_with_times_scaled(tuned[0].log_dir, tmp_path / "log", factor=1e-3)
    stored = (log / RECORD_FILE).read_text()
    lines: list[str] = []
    tvmnet_tune(_model(), trials=0, tasks=TASKS, log_dir=log, remeasure=2, progress=lines.append, **SMALL)
    assert sum("the host is too busy to compare schedules side by side" in line for line in lines) == 2, lines
    assert (log / RECORD_FILE).read_text() == stored


def test_remeasure_times_the_schedules_that_beat_the_fastest_record_again_before_storing_them(tuned, tmp_path):
    """A log whose fastest record of each task is in truth the task's slowest schedule (its stored time set to
    half the real fastest's): ``remeasure`` finds schedules that beat it, times those again beside it (the
    winner of five rounds is partly luck), and stores each once, with a time under the record's."""
    import json

    from tvmnet.targets import get_target
    from tvmnet.tune import RECORD_FILE

    here = str(get_target("x86").tvm_target().attrs["mcpu"])
    log = _copy_with_times_scaled(tuned[0].log_dir, tmp_path / "log")
    entries = [json.loads(line) for line in (log / RECORD_FILE).read_text().splitlines()]
    by_workload: dict[int, list] = {}
    for entry in entries:
        if entry[1][0][0] and entry[1][2].get("mcpu") == here:  # tuned (a trace), measured here
            by_workload.setdefault(entry[0], []).append(entry)
    fastest = {}  # workload -> (its real fastest trace, the time the slowest now claims)
    for workload, tuned_here in by_workload.items():
        tuned_here.sort(key=lambda entry: entry[1][1][0])
        slowest, real = tuned_here[-1], tuned_here[0]
        # four random candidates of a convolution span 2-7x in the log, 5-11x timed side by side
        assert slowest[1][1][0] > 1.5 * real[1][1][0], ("needs a slow schedule to pose as the fastest", tuned_here)
        slowest[1][1] = [real[1][1][0] / 2]
        fastest[workload] = (json.dumps(real[1][0]), slowest[1][1][0])
    (log / RECORD_FILE).write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries))

    lines: list[str] = []
    tvmnet_tune(_model(), trials=0, tasks=TASKS, log_dir=log, remeasure=2, progress=lines.append, **SMALL)
    assert sum(re.search(r"beat its fastest record \(the best at 0\.\d\dx its time\); timing those again, 5 rounds",
                         line) is not None for line in lines) == 2, lines
    added = [json.loads(line) for line in (log / RECORD_FILE).read_text().splitlines()[len(entries):]]
    for workload, (trace, claimed) in fastest.items():
        stored = [e[1][1][0] for e in added if e[0] == workload and json.dumps(e[1][0]) == trace]
        assert len(stored) == 1 and stored[0] < claimed, (stored, claimed, lines)


def test_recheck_stores_the_searchs_fastest_candidates_again_on_the_logs_scale(tuned, tmp_path):
    """``recheck=1`` on a log measured under other conditions (its times multiplied by 1000): after a short
    search, each task's fastest new candidate is timed side by side with the task's fastest earlier record and
    stored a second time, about 1000x above the time the search stored for it (as measured), where a
    recheck that stored the raw time again would give about 1x. Records are read in the order they were
    appended: the search may measure a schedule the log already holds, so "not stored before" cannot tell
    the new records apart."""
    import json

    from tvmnet.tune import RECORD_FILE

    log = _copy_with_times_scaled(tuned[0].log_dir, tmp_path / "log")
    stored_before = len((log / RECORD_FILE).read_text().splitlines())

    lines: list[str] = []
    result = tvmnet_tune(_model(), trials=len(_trials(_database_records(log))) + 8, tasks=TASKS, log_dir=log,
                         recheck=1, progress=lines.append, **SMALL)
    assert result.new_trials == 8, lines
    rechecked_tasks = len([t for t in result.tasks if t.new_trials])
    assert sum("(this search's fastest) side by side with its fastest record, 5 rounds" in line
               for line in lines) == rechecked_tasks, lines
    new = [json.loads(line) for line in (log / RECORD_FILE).read_text().splitlines()[stored_before:]]
    searched, rechecked = new[:-rechecked_tasks], new[-rechecked_tasks:]  # the recheck stores after the search
    assert len(searched) == 8, new

    def schedule(entry: list) -> tuple:
        return entry[0], json.dumps(entry[1][0])  # workload index, trace

    for entry in rechecked:
        as_measured = [e[1][1][0] for e in searched if schedule(e) == schedule(entry)]
        assert as_measured, ("a rechecked schedule the search did not store", entry, lines)
        assert 50 < entry[1][1][0] / min(as_measured) < 20000, (as_measured, entry[1][1], lines)


def test_undertuned_keeps_only_the_tasks_with_fewer_trials_on_this_cpu(tuned, tmp_path):
    """``undertuned=N``: after ``remeasure`` on a new CPU, a search spent only on the tasks whose records came from
    other CPUs (bench/README.md item 41)."""
    import json
    import shutil

    from tvmnet.tune import RECORD_FILE

    log = tmp_path / "log"
    shutil.copytree(tuned[0].log_dir, log, ignore=shutil.ignore_patterns("logs", ".tune.lock"))
    lines = (log / RECORD_FILE).read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    emptied = next(entry[0] for entry in reversed(entries) if entry[1][0][0])
    # every trial of one workload gone, its untuned floor kept: a task never searched on this CPU
    kept = [line for line, entry in zip(lines, entries) if entry[0] != emptied or not entry[1][0][0]]
    (log / RECORD_FILE).write_text("\n".join(kept) + "\n")

    said: list[str] = []
    result = tvmnet_tune(_model(), trials=0, tasks=TASKS, undertuned=1, log_dir=log, progress=said.append, **SMALL)
    (task,) = result.tasks
    assert task.trials == 0 and task.new_trials == 0, said
    assert any("1 selected (fewer than 1 trials on" in line for line in said), said
    assert (log / RECORD_FILE).read_text().splitlines() == kept, "trials=0: nothing measured"

    (other,) = [name for name in TASKS if name != task.name]
    none = tvmnet_tune(_model(), trials=0, tasks=[other], undertuned=1, log_dir=log, **SMALL)
    assert none.tasks == []


def test_search_leaves_out_the_schedules_the_log_holds(tmp_path):
    """MetaSchedule's search, seeded alike on one thread, proposes the same first batch twice; with that
    batch's traces as the log's records, tvmnet's strategy must leave every one of them out (the search alone
    measured such schedules again on resume), and cut a batch to the budget left."""
    from tvm.s_tir import meta_schedule as ms

    from tvmnet import pipeline, search_space
    from tvmnet.frontend import load_onnx
    from tvmnet.targets import get_target
    from tvmnet.tune import _skipping_stored, extract_tasks

    tvm_target = get_target("x86").tvm_target()
    fused = pipeline.fuse(load_onnx(_model()).to_relax(), tvm_target)
    (task,) = [t for t in extract_tasks(fused, tvm_target) if t.task_name == TASKS[1]]

    def first_batch(stored: set[str], budget: int) -> tuple[list[str], int]:
        skipped = [0]
        strategy = _skipping_stored(64, {task.task_name: stored}, lambda: budget, skipped)
        (context,), _ = ms.relax_integration.extracted_tasks_to_tune_contexts(
            extracted_tasks=[task], work_dir=str(tmp_path), strategy=strategy, seed=7, num_threads=1,
            space=search_space.space_for(task.dispatched[0], tvm_target))
        context.pre_tuning(max_trials=64, num_trials_per_iter=8, design_spaces=context.generate_design_space(),
                           database=ms.database.MemoryDatabase(), cost_model=ms.cost_model.RandomModel(seed=7))
        candidates = context.generate_measure_candidates()
        context.post_tuning()
        return ([] if candidates is None else [str(c.sch.trace) for c in candidates]), skipped[0]

    first, skipped = first_batch(set(), budget=100)
    assert len(first) == 8 and skipped == 0
    again, skipped = first_batch(set(first), budget=100)
    assert skipped == 8, "the search must have proposed the same batch again (seeded alike), all of it left out"
    assert again and not set(again) & set(first), again
    assert len(first_batch(set(), budget=3)[0]) == 3
    assert first_batch(set(), budget=0)[0] == []


@pytest.mark.timeout(300)
def test_tuning_searches_the_stored_workload_so_new_records_load(tmp_path):
    """A log whose workload was stored under other block names (Relax numbering changed with the pipeline):
    structure matches, so tuning adds to it, and its new traces must name the stored blocks, or TVM's loader
    rejects them the next time the log is opened."""
    import re

    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tvmnet import pipeline
    from tvmnet.frontend import load_onnx
    from tvmnet.targets import get_target
    from tvmnet.tune import MODULE_EQUALITY, _shash, extract_tasks, is_baseline

    tvm_target = get_target("x86").tvm_target()
    fused = pipeline.fuse(load_onnx(_model()).to_relax(), tvm_target)
    (task,) = [t for t in extract_tasks(fused, tvm_target) if t.task_name == TASKS[0]]
    script = task.dispatched[0].script()
    assert 'T.sblock("conv2d_nhwc")' in script
    renamed = tvm.script.from_source(script.replace('T.sblock("conv2d_nhwc")', 'T.sblock("conv_earlier")'))
    assert _shash(renamed) == _shash(task.dispatched[0]), "block names are not part of a workload's structure"
    log = tmp_path / "log"
    log.mkdir()
    ms.database.JSONDatabase(work_dir=str(log), module_equality=MODULE_EQUALITY).commit_workload(renamed)

    tvmnet_tune(_model(), trials=1, tasks=TASKS[:1], log_dir=log, **SMALL)
    records = _database_records(log)  # TVM's own loader: fails on a trace naming a block the module lacks
    (trial,) = [r for r in records if not is_baseline(r)]
    assert "conv_earlier" in str(trial.trace) and not re.search(r"\bconv2d_nhwc\b", str(trial.trace))


# Loading replays every record's trace: ~4 ms a record on 2 cores, so the logs above this many records
# (V1, V2, V3-Large: 35-47 s each) are checked in the slow run; the default run checks the smaller ones
# through the same loader, and ci/setup.sh's compile of MobileNetV2 loads V2's log.
SLOW_LOG_RECORDS = 5000


def _shipped_logs() -> list:
    logs = sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("tuning_logs/*/*") if p.is_dir())
    return [pytest.param(log, marks=pytest.mark.slow) if _records(REPO / log) > SLOW_LOG_RECORDS else log
            for log in logs]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("log_dir", _shipped_logs())
def test_shipped_log_loads_with_tvms_own_loader(log_dir):
    """Every record we ship replays on its stored workload: a line TVM's loader rejects would be skipped
    (with a warning) in every user's compile, and its schedule lost."""
    records = _database_records(REPO / log_dir)
    assert len(records) == _records(REPO / log_dir)


def test_damaged_log_lines_are_reported_and_skipped(tuned, tmp_path):
    """A cut-short line, a blank line and a garbled workload: compile warns with file and line numbers,
    skips them, still applies the intact records; tune's repair moves the bad lines aside."""
    import shutil
    import warnings

    from tvmnet.tune import RECORD_FILE, WORKLOAD_FILE, open_database

    result, _root, _lines, _seconds = tuned
    log = tmp_path / "damaged"
    shutil.copytree(result.log_dir, log, ignore=shutil.ignore_patterns("logs", ".tune.lock"))
    records = (log / RECORD_FILE).read_text().splitlines()
    good = records[:]
    records.insert(3, "")
    records.append(records[-1][: len(records[-1]) // 2])  # a write cut short
    (log / RECORD_FILE).write_text("\n".join(records))  # and no final newline
    workloads = (log / WORKLOAD_FILE).read_text().splitlines()
    workloads.append('["123", "not a module"]')
    (log / WORKLOAD_FILE).write_text("\n".join(workloads) + "\n")
    n_workloads = len(workloads)

    messages: list[str] = []
    artifact = tvmnet.compile(_model(), output=tmp_path / "a", tuning_logs=log, progress=messages.append)
    warned = [m for m in messages if "damaged" in m]
    assert any(f"{RECORD_FILE}: skipped 2 damaged line(s): line 4, {len(records)}" in m for m in warned), messages
    assert any(f"{WORKLOAD_FILE}: skipped 1 damaged line(s): line {n_workloads}" in m for m in warned), messages
    tuned = {t.name for t in result.tasks if t.best_us != t.untuned_us}
    assert tuned <= set(tvmnet.load(artifact).manifest["schedules"]["tuned"])
    assert (log / RECORD_FILE).read_text().count("\n") == len(records) - 1, "compile must not edit the log"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        db = open_database(log, repair=True)
    assert any("damaged" in str(w.message) for w in caught)
    assert len(db.get_all_tuning_records()) == len(good)
    assert (log / f"{RECORD_FILE}.corrupt").is_file() and (log / f"{WORKLOAD_FILE}.corrupt").is_file()
    assert len(_database_records(log)) == len(good), "after repair TVM's own loader reads the log again"


def test_the_scheduler_moves_on_from_a_costly_task_that_stopped_improving():
    """Batches go where the time is, but not forever to a task whose best no longer moves: V1's 512x512
    pointwise convolution (5 x 210 µs) took 42 of 46 batches without improving once before this."""
    from tvmnet.tune import PLATEAU_TRIALS, next_task

    weights, best, had = [5, 1, 1], [210e-6, 234e-6, 225e-6], [3000, 150, 100]
    # never-tried tasks first, the costliest (no measurement at all) before the others
    assert next_task([0, 1, 2], weights, [210e-6, None, 225e-6], [0, 0, 0], [0, 0, 0], [0, 0, 0]) == 1
    # a costly task that keeps improving keeps the batches
    assert next_task([0, 1, 2], weights, best, [8, 1, 1], had, [0, 16, 16]) == 0
    # the same task after 8 batches without a better candidate yields to the next costliest
    assert next_task([0, 1, 2], weights, best, [8, 1, 1], had, [8 * 16, 16, 16]) == 1
    assert PLATEAU_TRIALS <= 128  # a plateau is noticed within a few batches
    # terminated tasks are never chosen
    assert next_task([2], weights, best, [8, 1, 1], had, [0, 0, 0]) == 2
