"""`tvmnet rpc tracker/server/status` as a user runs them: real processes on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from tvmnet import rpc


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tvmnet.cli", "rpc", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _status(tracker: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvmnet.cli", "rpc", "status", "--tracker", tracker, "--json"],
                          capture_output=True, text=True, timeout=120)


def test_tracker_server_status_and_clean_stop():
    """A user's tracker on a port above 9199 and a board server register; SIGTERM stops both cleanly."""
    port = rpc.free_port()
    tracker = f"127.0.0.1:{port}"
    tracker_proc = _start("tracker", "--port", str(port))
    server_proc = None
    try:
        deadline = time.monotonic() + 90
        while _status(tracker).returncode != 0:
            assert tracker_proc.poll() is None, tracker_proc.stderr.read()
            assert time.monotonic() < deadline, "tracker did not come up"
            time.sleep(1)
        server_proc = _start("server", "--tracker", tracker, "--key", "board-under-test")
        while "board-under-test" not in json.loads(_status(tracker).stdout or "{}"):
            assert server_proc.poll() is None, server_proc.stderr.read()
            assert time.monotonic() < deadline, "server did not register"
            time.sleep(1)
    finally:
        for proc in (server_proc, tracker_proc):
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    assert server_proc.returncode == 0 and tracker_proc.returncode == 0  # SIGTERM is a clean stop
    assert "warning" not in tracker_proc.stderr.read() + server_proc.stderr.read()  # loopback: nothing to warn of


def test_public_bind_warns_before_serving():
    """TVM RPC runs any code it is sent: binding beyond loopback must say so."""
    port = rpc.free_port("0.0.0.0")
    proc = _start("tracker", "--host", "0.0.0.0", "--port", str(port))
    try:
        deadline = time.monotonic() + 90
        while _status(f"127.0.0.1:{port}").returncode != 0:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "tracker did not come up"
            time.sleep(1)
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    warning = stderr.splitlines()[0]
    assert warning.startswith("[tvmnet] warning: binding to 0.0.0.0: TVM RPC has no authentication"), stderr


def test_stopping_a_server_stops_its_session_workers():
    """TVM's server forks a worker per session; stop() must not leave it running code for a client."""
    import psutil
    import tvm.rpc

    with rpc.start_tracker() as tracker, rpc.start_server(tracker.address, "worker-check") as server:
        session = tvm.rpc.connect_tracker(tracker.host, tracker.port).request("worker-check", session_timeout=60)
        workers = psutil.Process(server.proc.pid).children(recursive=True)
        assert workers, "no session worker was forked: nothing to check"
        server.stop()
        _, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, [w.cmdline() for w in alive]
        del session


def test_status_of_absent_tracker_is_one_line_error():
    done = _status(f"127.0.0.1:{rpc.free_port()}")
    assert done.returncode == 1
    assert done.stderr.strip().startswith("tvmnet: error: cannot reach the RPC tracker")
    assert "Traceback" not in done.stderr
