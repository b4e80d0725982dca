"""`tvmnet rpc tracker/server/status` as a user runs them: real processes on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time



def _free_port_above_9199() -> int:
    """A free port in 9200-9999: above 9199 (TVM's tracker refuses those without --port-end) and below the
    ephemeral range, where a client probing a closed port can connect to itself."""
    for port in range(9200, 10000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 9200-9999")


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tvmnet.cli", "rpc", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _status(tracker: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvmnet.cli", "rpc", "status", "--tracker", tracker, "--json"],
                          capture_output=True, text=True, timeout=120)


def test_tracker_server_status_and_clean_stop():
    """A user's tracker on a port above 9199 and a board server register; SIGTERM stops both cleanly."""
    port = _free_port_above_9199()
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


def test_status_of_absent_tracker_is_one_line_error():
    done = _status(f"127.0.0.1:{_free_port_above_9199()}")
    assert done.returncode == 1
    assert done.stderr.strip().startswith("tvmnet: error: cannot reach the RPC tracker")
    assert "Traceback" not in done.stderr
