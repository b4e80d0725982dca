"""`tvmnet run/bench/verify --rpc-tracker` and `tvmnet.load(..., remote=)`: a real tracker and real servers
on 127.0.0.1 run a compiled artifact, and what comes back is compared with onnxruntime run here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import tvmnet
from tvmnet import remote, rpc
from tvmnet.errors import ArtifactError, InputError, TvmnetError
from tvmnet.verify import verify

from conftest import ATOL, RTOL, ort_run

KEY = "tvmnet-test-board"
EMU_KEY = "tvmnet-test-emulated"




def tvmnet_cli(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "tvmnet.cli", *args], capture_output=True, text=True,
                          timeout=timeout)
    return done, time.monotonic() - started


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    errors = [line for line in done.stderr.splitlines() if line.startswith("tvmnet: error:")]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return errors[0]


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    log = tmp_path_factory.mktemp("rpc") / "tracker.log"
    with rpc.start_tracker(port=rpc.free_port(), log=log) as process:
        yield process


@pytest.fixture(scope="module")
def board(tracker, tmp_path_factory):
    """A plain TVM RPC server (no tvmnet.server_info), registered under KEY."""
    log = tmp_path_factory.mktemp("rpc") / "server.log"
    with rpc.start_server(tracker.address, KEY, log=log) as process:
        yield process


EMULATED_SERVER = textwrap.dedent("""
    import json, multiprocessing, sys
    import tvm_ffi
    from tvm.rpc import server

    tracker_host, tracker_port, key, port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

    @tvm_ffi.register_global_func("tvmnet.server_info", override=True)
    def _info():
        return json.dumps({"emulated": True, "arch": "x86_64", "emulator": "fake-qemu"})

    multiprocessing.set_start_method("fork", force=True)  # sessions are forks: they keep the function
    state = server.PopenRPCServerState("127.0.0.1", port, port + 1, tracker_addr=(tracker_host, tracker_port),
                                       key=key)
    print("serving", state.port, flush=True)
    state.thread.join()
""")


@pytest.fixture(scope="module")
def emulated_board(tracker, tmp_path_factory):
    """A server that says it is emulated through "tvmnet.server_info", as `tvmnet emulate` servers do."""
    log = tmp_path_factory.mktemp("rpc") / "emulated.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", EMULATED_SERVER, tracker.host, str(tracker.port), EMU_KEY,
                                 str(rpc.free_port())], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while EMU_KEY not in rpc.query_tracker(tracker.host, tracker.port):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "emulated server did not register: " + log.read_text()
            time.sleep(0.5)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def _reference(artifact: Path, x: np.ndarray) -> np.ndarray:
    expected = ort_run(artifact / "model.onnx", {"input": x})[0]
    assert np.abs(expected).max() > 1e-3, "degenerate reference output: the comparison would prove nothing"
    return expected


def _seeded_input(artifact: Path, seed: int = 3) -> np.ndarray:
    shape = json.loads((artifact / "manifest.json").read_text())["inputs"][0]["shape"]
    return np.random.default_rng(seed).standard_normal(shape).astype("float32")


@pytest.mark.timeout(600)
def test_cli_run_on_board_matches_onnxruntime(tiny_v2_artifact, tracker, board, tmp_path):
    x = _seeded_input(tiny_v2_artifact)
    np.save(tmp_path / "x.npy", x)
    done, _ = tvmnet_cli("run", str(tiny_v2_artifact), "--input", str(tmp_path / "x.npy"),
                         "-o", str(tmp_path / "y.npy"), "--json",
                         "--rpc-tracker", tracker.address, "--rpc-key", KEY)
    assert done.returncode == 0, done.stderr
    assert f"running on key '{KEY}' at tracker {tracker.address}" in done.stderr
    assert "emulated" not in done.stderr.lower()
    got = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(got, _reference(tiny_v2_artifact, x), rtol=RTOL, atol=ATOL)
    assert len(json.loads(done.stdout)) == 5
    # it really went through the server: the uploaded library was loaded there
    assert "tvmnet-" in board.output() and ".so" in board.output(), board.output()[-2000:]


@pytest.mark.timeout(600)
def test_python_api_on_board(tiny_v2_artifact, tracker, board):
    session = remote.connect(tracker.address, KEY, timeout_s=60)
    assert session.server_info == {} and not session.emulated  # a plain TVM server has no tvmnet.server_info
    assert session.arch == "x86_64"
    assert rpc.query_tracker(tracker.host, tracker.port)[KEY] == 0  # the board is ours now
    with tvmnet.load(tiny_v2_artifact, remote=session) as model:
        assert isinstance(model, tvmnet.RemoteModel) and isinstance(model, tvmnet.CompiledModel)
        assert not model.emulated and model.inputs == tvmnet.load(tiny_v2_artifact).inputs
        x = _seeded_input(tiny_v2_artifact, seed=5)
        got = model.run({"input": x})
        assert isinstance(got, np.ndarray)
        np.testing.assert_allclose(got, _reference(tiny_v2_artifact, x), rtol=RTOL, atol=ATOL)
        # the same input checks as a local model, before anything goes over the wire
        with pytest.raises(InputError, match="looks like NHWC"):
            model.run(x.transpose(0, 2, 3, 1).copy())
        stats = model.benchmark(number=2, repeat=3, warmup=1)
        assert stats.repeat == 3 and 0 < stats.min_ms <= stats.median_ms
        reports = verify(model)  # the board's outputs against onnxruntime run here
        assert reports and all(r.passed for r in reports), reports
    with pytest.raises(TvmnetError, match="closed"):
        model.run(x)
    _wait_until_free(tracker, KEY)  # closing gave the board back


def _wait_until_free(tracker, key: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while rpc.query_tracker(tracker.host, tracker.port).get(key, 0) < 1:
        assert time.monotonic() < deadline, f"the server '{key}' did not come back to the tracker"
        time.sleep(0.5)


@pytest.mark.timeout(600)
def test_cli_bench_and_verify_on_board(tiny_v2_artifact, tracker, board):
    done, _ = tvmnet_cli("bench", str(tiny_v2_artifact), "--number", "2", "--repeat", "4", "--json",
                         "--rpc-tracker", tracker.address, "--rpc-key", KEY)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["repeat"] == 4 and stats["median_ms"] > 0
    assert stats["remote"] == {"tracker": tracker.address, "key": KEY, "arch": "x86_64", "emulated": False}

    done, _ = tvmnet_cli("bench", str(tiny_v2_artifact), "--number", "1", "--repeat", "3",
                         "--rpc-tracker", tracker.address, "--rpc-key", KEY)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("median ") and f"on board '{KEY}'" in done.stdout

    done, _ = tvmnet_cli("bench", str(tiny_v2_artifact), "--per-kernel", "--rpc-tracker", tracker.address,
                         "--rpc-key", KEY)
    assert done.returncode == 3 and "cannot run over RPC" in _one_error_line(done)

    done, _ = tvmnet_cli("verify", str(tiny_v2_artifact), "--rpc-tracker", tracker.address, "--rpc-key", KEY)
    assert done.returncode == 0, done.stderr
    assert "PASS" in done.stdout and "FAIL" not in done.stdout


@pytest.mark.timeout(300)
def test_unknown_key_and_tracker_down_fail_fast_in_one_line(tiny_v2_artifact, tracker):
    done, seconds = tvmnet_cli("run", str(tiny_v2_artifact), "--rpc-tracker", tracker.address, "--rpc-key", "nope")
    assert done.returncode == 1
    assert "no RPC server with key 'nope'" in _one_error_line(done)
    assert seconds < 60, seconds

    down = f"127.0.0.1:{rpc.free_port()}"
    done, seconds = tvmnet_cli("bench", str(tiny_v2_artifact), "--rpc-tracker", down, "--rpc-key", KEY)
    assert done.returncode == 1
    assert f"cannot reach the RPC tracker at {down}" in _one_error_line(done)
    assert seconds < 60, seconds

    done, _ = tvmnet_cli("verify", str(tiny_v2_artifact), "--rpc-tracker", "no-port-here", "--rpc-key", KEY)
    assert done.returncode == 3 and "write HOST:PORT" in _one_error_line(done)

    # no --rpc-key: the default is the target's rpc_key ("x86"), which no server here has
    done, _ = tvmnet_cli("verify", str(tiny_v2_artifact), "--rpc-tracker", tracker.address)
    assert done.returncode == 1 and "no RPC server with key 'x86'" in _one_error_line(done)


@pytest.mark.timeout(300)
def test_busy_board_gives_up_after_rpc_timeout(tiny_v2_artifact, tracker, board):
    held = remote.connect(tracker.address, KEY)  # the only server with KEY is now busy
    try:
        started = time.monotonic()
        with pytest.raises(TvmnetError, match=r"within 2 s .*busy"):
            remote.connect(tracker.address, KEY, timeout_s=2)
        assert time.monotonic() - started < 10
        done, seconds = tvmnet_cli("run", str(tiny_v2_artifact), "--rpc-tracker", tracker.address,
                                   "--rpc-key", KEY, "--rpc-timeout", "3")
        assert done.returncode == 1
        assert "within 3 s" in _one_error_line(done)
        assert seconds < 60, seconds
    finally:
        held.close()
    _wait_until_free(tracker, KEY)


@pytest.mark.timeout(600)
def test_emulated_board_warns_that_timings_mean_nothing(tiny_v2_artifact, tracker, emulated_board):
    done, _ = tvmnet_cli("bench", str(tiny_v2_artifact), "--number", "1", "--repeat", "2",
                         "--rpc-tracker", tracker.address, "--rpc-key", EMU_KEY)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "emulated" in line.lower()]
    assert any(line.startswith("[tvmnet] warning:") and "timings" in line and "fake-qemu" in line
               for line in warnings), done.stderr
    assert "EMULATED by fake-qemu" in done.stdout and "median" in done.stdout

    with remote.connect(tracker.address, EMU_KEY) as session:
        assert session.emulated and session.server_info["emulator"] == "fake-qemu"
        with tvmnet.load(tiny_v2_artifact, remote=session) as model:
            assert model.emulated and model.server_info["arch"] == "x86_64"


@pytest.mark.timeout(300)
def test_artifact_for_another_arch_is_refused_by_the_board(tiny_v2_artifact, tracker, board, tmp_path):
    other = tmp_path / "aarch64-artifact"
    shutil.copytree(tiny_v2_artifact, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["target"]["arch"] = "aarch64"
    (other / "manifest.json").write_text(json.dumps(manifest))
    done, _ = tvmnet_cli("run", str(other), "--rpc-tracker", tracker.address, "--rpc-key", KEY)
    assert done.returncode == 5
    line = _one_error_line(done)
    assert "compiled for aarch64" in line and "is x86_64" in line


def test_tampered_library_is_refused_before_any_board_is_asked(tiny_v2_artifact, tmp_path):
    other = tmp_path / "tampered"
    shutil.copytree(tiny_v2_artifact, other)
    with open(other / "model.so", "ab") as handle:
        handle.write(b"\0")
    down = f"127.0.0.1:{rpc.free_port()}"  # never contacted: the sha256 check comes first
    done, _ = tvmnet_cli("run", str(other), "--rpc-tracker", down, "--rpc-key", KEY)
    assert done.returncode == 5 and "sha256" in _one_error_line(done)
    with pytest.raises(ArtifactError, match="sha256"):
        remote.connect_and_load(other, down, KEY)


def test_artifact_records_its_board_key(tiny_v2_artifact):
    """Remote commands default to the key the artifact was compiled for, even where its target file is unknown."""
    manifest = json.loads((tiny_v2_artifact / "manifest.json").read_text())
    assert manifest["target"]["rpc_key"] == "x86"
    assert remote.default_key({"target": {"name": "a-board-this-machine-has-no-file-for", "rpc_key": "lab-7"}}) == "lab-7"
