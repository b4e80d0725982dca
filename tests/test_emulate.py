"""`tvmnet emulate rasp4b`: an emulated aarch64 board (qemu-user) on a real tracker runs and tunes aarch64 artifacts.

One tracker and one emulated board serve the whole module (starting a board costs 10-30 s of `import tvm`
under qemu). The sysroot comes from the user's cache (`ci/setup.sh` prepares it with
`tvmnet emulate rasp4b --setup-only`); when it is missing the first test prepares it (~1.5 min).
The board-killing test runs last: it ends the module's board.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tvmnet
from tvmnet import emulate, rpc
from tvmnet.cli import run_cmd
from tvmnet.errors import TvmnetError

from conftest import ATOL, RTOL, ort_run

pytestmark = pytest.mark.skipif(
    bool(emulate.missing_packages(for_setup=emulate.check() is not None)),
    reason=f"needs the Debian packages {' '.join(emulate.missing_packages())} (ci/setup.sh installs them)")

KEY = f"rasp4b-test-{os.getpid()}"
TUNED_TASK = "fused_conv2d1_add_maximum_minimum1"  # see test_tune.TASKS
HAS_REMOTE_CLI = any(p.name == "rpc_tracker" for p in run_cmd.params)  # `tvmnet run/bench --rpc-tracker`




def _tvmnet(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvmnet.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    import psutil

    log = tmp_path_factory.mktemp("tracker") / "tracker.log"
    proc = rpc.start_tracker(port=rpc.free_port(), log=log)
    try:
        yield proc
    finally:
        # TVM's tracker serves from a PopenWorker child that outlives a terminated parent: stop both
        children = psutil.Process(proc.proc.pid).children(recursive=True)
        proc.stop()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def board(tracker):
    started = time.monotonic()
    done = _tvmnet("emulate", "rasp4b", "--tracker", tracker.address, "--key", KEY, "--json", timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    server = json.loads(done.stdout)
    assert f"registered at tracker {tracker.address} as '{KEY}'" in done.stderr
    assert KEY in rpc.query_tracker(tracker.host, tracker.port)
    try:
        yield {**server, "start_seconds": time.monotonic() - started}
    finally:
        emulate.stop(KEY)  # no-op when the kill test already ended it


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """MobileNetV2 α=0.5 ρ=160 cross-compiled for rasp4b (aarch64) by `tvmnet compile`."""
    out = tmp_path_factory.mktemp("emulated") / "mbv2-rasp4b"
    done = _tvmnet("compile", "mobilenet_v2", "--alpha", "0.5", "--resolution", "160", "--target", "rasp4b",
                   "-o", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _session(tracker, key: str = KEY):
    from tvm import rpc as tvm_rpc

    return tvm_rpc.connect_tracker(tracker.host, tracker.port).request(key, session_timeout=600)


def _remote_run(artifact: Path, x: np.ndarray, tracker, tmp_path: Path) -> tuple[np.ndarray, str]:
    """The artifact's output for ``x`` computed on the emulated board, and what the CLI said on stderr."""
    if HAS_REMOTE_CLI:
        np.save(tmp_path / "x.npy", x)
        done = _tvmnet("run", str(artifact), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"),
                       "--rpc-tracker", tracker.address, "--rpc-key", KEY, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return np.load(tmp_path / "y.npy"), done.stderr
    import tvm
    from tvm.runtime.vm import VirtualMachine

    session = _session(tracker)  # the same calls tvmnet's remote runner makes
    session.upload(str(artifact / "model.so"))
    dev = session.cpu()
    vm = VirtualMachine(session.load_module("model.so"), dev)
    return vm["main"](tvm.runtime.tensor(x, dev)).numpy(), ""


@pytest.mark.timeout(900)
def test_emulated_board_runs_mobilenet_v2_like_onnxruntime(board, tracker, artifact, tmp_path):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["target"]["arch"] == "aarch64"
    with pytest.raises(tvmnet.ArtifactError, match="compiled for aarch64"):
        tvmnet.load(artifact)  # not runnable here: only the emulated board can run it

    info = emulate.server_info(_session(tracker))
    assert info is not None and info["emulated"] is True and info["arch"] == "aarch64"
    assert info["emulator"] == "qemu-aarch64"

    import onnx

    model = onnx.load(str(artifact / "model.onnx"))
    spec = manifest["inputs"][0]
    x = np.random.default_rng(0).standard_normal(spec["shape"]).astype(spec["dtype"])
    got, said = _remote_run(artifact, x, tracker, tmp_path)
    expected = ort_run(model, {spec["name"]: x})[0]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert np.abs(expected).max() > 1e-3
    if HAS_REMOTE_CLI:
        assert "emulated" in said and "timings" in said, said  # the CLI warns that emulated timings mean nothing


@pytest.mark.timeout(900)
def test_tune_through_emulated_board_then_compile_with_the_log(board, tracker, tmp_path):
    """MetaSchedule candidates cross-compiled here, measured on the emulated aarch64 board; the log applies."""
    from tvmnet import zoo
    from tvmnet.tune import tune

    model = zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96)
    log_dir = tmp_path / "log"
    result = tune(model, target="rasp4b", trials=2, tasks=[TUNED_TASK], log_dir=log_dir,
                  rpc_tracker=tracker.address, rpc_key=KEY, population_size=64, num_trials_per_iter=2,
                  number=1, repeat=1, min_repeat_ms=0)
    assert result.runner == f"rpc:{tracker.address}:{KEY}"
    assert [t.name for t in result.tasks] == [TUNED_TASK]
    assert result.tasks[0].new_trials == 2 and result.tasks[0].best_us is not None

    lines: list[str] = []
    out = tvmnet.compile(model, output=tmp_path / "tuned", target="rasp4b", tuning_logs=log_dir,
                         progress=lines.append)
    schedules = json.loads((out / "manifest.json").read_text())["schedules"]
    assert schedules["database"] == str(log_dir), schedules
    # compile applies the fastest record: a tuned one, or the untuned floor when 2 random trials lost to it
    floor_won = result.tasks[0].untuned_us is not None and result.tasks[0].untuned_us <= result.tasks[0].best_us
    assert (TUNED_TASK in schedules["fallback" if floor_won else "tuned"]), (result.tasks[0], schedules)
    applied = 0 if floor_won else 1
    assert any(f"tuned schedules: {applied} of" in line for line in lines), lines

    x = np.random.default_rng(1).standard_normal((1, 3, 96, 96)).astype("float32")
    got, _ = _remote_run(out, x, tracker, tmp_path)  # the tuned kernel is right on aarch64 too
    np.testing.assert_allclose(got, ort_run(model, {model.graph.input[0].name: x})[0], rtol=RTOL, atol=ATOL)


@pytest.mark.timeout(300)
def test_unknown_key_absent_tracker_and_stop_fail_clearly(board, tracker, artifact):
    started = time.monotonic()
    if HAS_REMOTE_CLI:
        done = _tvmnet("run", str(artifact), "--rpc-tracker", tracker.address, "--rpc-key", "nope",
                       "--rpc-timeout", "10", timeout=120)
        assert done.returncode != 0 and "Traceback" not in done.stderr
        assert done.stderr.strip().startswith("tvmnet: error: no RPC server with key 'nope'"), done.stderr
    else:
        from tvmnet.targets import get_target
        from tvmnet.tune import make_runner

        with pytest.raises(TvmnetError, match="no RPC server with key 'nope'"):
            make_runner(get_target("rasp4b"), rpc_tracker=tracker.address, rpc_key="nope", timeout_s=10,
                         number=1, repeat=1, min_repeat_ms=0)
    assert time.monotonic() - started < 90

    absent = f"127.0.0.1:{rpc.free_port()}"
    done = _tvmnet("emulate", "rasp4b", "--tracker", absent, "--key", "other", timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("tvmnet: error: cannot reach the RPC tracker"), done.stderr
    assert "Traceback" not in done.stderr

    done = _tvmnet("emulate", "rasp4b", "--stop", "--key", "nope", timeout=60)
    assert done.returncode == 1 and "no emulated board with key 'nope'" in done.stderr, done.stderr

    done = _tvmnet("emulate", "rasp4b", "--status", timeout=60)
    assert done.returncode == 0 and "sysroot: ready" in done.stdout and f"running: '{KEY}'" in done.stdout, done.stdout


def test_broken_cache_is_reported_not_used(tmp_path, monkeypatch):
    """A sysroot whose marker is missing or names other versions is not ready (prepare() would rebuild it)."""
    monkeypatch.setenv(emulate.CACHE_ENV, str(tmp_path))
    assert emulate.check() == "not prepared yet"
    root = emulate.sysroot()
    root.path.mkdir(parents=True)
    assert "no valid marker" in emulate.check()
    marker = {"format": emulate.FORMAT_VERSION, "versions": {**emulate.expected_versions(), "apache-tvm": "0.1"}}
    root.marker.write_text(json.dumps(marker))
    assert emulate.check().startswith("has apache-tvm 0.1")
    root.marker.write_text(json.dumps({**marker, "versions": emulate.expected_versions()}))
    assert emulate.check().endswith("is missing")


@pytest.mark.timeout(600)
def test_board_killed_mid_run_fails_clearly_and_tracker_stays_usable(board, tracker, artifact, tmp_path):
    """Runs last: SIGKILL the emulated board while a remote benchmark runs on it."""
    server = next(s for s in emulate.running(KEY))
    log = Path(server.log)
    loads_before = log.read_text().count("load_module")
    if HAS_REMOTE_CLI:
        cmd = [sys.executable, "-m", "tvmnet.cli", "bench", str(artifact), "--number", "100", "--repeat", "100",
               "--rpc-tracker", tracker.address, "--rpc-key", KEY]
    else:
        cmd = [sys.executable, "-c", BENCH_SCRIPT, tracker.host, str(tracker.port), KEY, str(artifact / "model.so")]
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while log.read_text().count("load_module") == loads_before:
            assert client.poll() is None, client.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the benchmark never reached the board"
            time.sleep(0.5)
        time.sleep(3)  # well inside the benchmark (100 x 100 emulated inferences take many minutes)
        assert client.poll() is None
        os.killpg(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        _out, err = client.communicate(timeout=120)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert time.monotonic() - killed < 120
    assert client.returncode != 0
    if HAS_REMOTE_CLI:
        last = err.strip().splitlines()[-1]  # before it: "running on ...", the emulation warning
        assert last.startswith("tvmnet: error:") and "board" in last and "Traceback" not in err, err[-3000:]
        assert len(last) < 400

    # the tracker forgets the dead board and still serves: a new emulated board registers and runs
    deadline = time.monotonic() + 60
    while emulate._registered(tracker.host, tracker.port, KEY, server.port) or \
            rpc.query_tracker(tracker.host, tracker.port).get(KEY, 0):
        assert time.monotonic() < deadline, "the tracker still lists the killed board"
        time.sleep(1)
    assert emulate.running(KEY) == []  # the dead board's state file is gone
    done = _tvmnet("emulate", "rasp4b", "--tracker", tracker.address, "--key", KEY, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    info = emulate.server_info(_session(tracker))
    assert info is not None and info["emulated"] is True
    done = _tvmnet("emulate", "rasp4b", "--stop", "--key", KEY, timeout=120)
    assert done.returncode == 0 and "stopped the emulated board" in done.stderr, done.stderr
    assert emulate.running(KEY) == []


BENCH_SCRIPT = """
import sys
import numpy as np
import tvm
from tvm import rpc
from tvm.runtime.vm import VirtualMachine
host, port, key, lib = sys.argv[1:]
session = rpc.connect_tracker(host, int(port)).request(key, session_timeout=600)
session.upload(lib)
dev = session.cpu()
vm = VirtualMachine(session.load_module("model.so"), dev)
x = tvm.runtime.tensor(np.zeros((1, 3, 160, 160), "float32"), dev)
vm.time_evaluator("main", dev, number=100, repeat=100)(x)
"""


def test_missing_debian_packages_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(emulate.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(emulate, "find_qemu", lambda arch="aarch64": None)
    monkeypatch.setattr(emulate, "find_debootstrap", lambda: None)
    with pytest.raises(TvmnetError) as info:
        emulate.prepare()
    message = str(info.value)
    assert "\n" not in message and "debootstrap and qemu-user-static" in message
    assert "apt-get install debootstrap qemu-user-static" in message
    assert not emulate.sysroot().path.exists()
