"""Start TVM RPC trackers and servers as subprocesses, and ask a tracker which device keys it has.

Everything binds to 127.0.0.1 unless told otherwise: an RPC server runs any code it is sent.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import TvmnetError
from .runtime import THREADS_ENV, physical_cores

LOCALHOST = "127.0.0.1"
PORT_RANGE = range(9200, 10000)
"""Where free_port looks: above 9199 (TVM's tracker refuses those without --port-end) and below the
ephemeral range, where a client probing a closed port can connect to itself (TCP simultaneous open)."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port in PORT_RANGE that was free a moment ago, scanned from a random start so that
    concurrent callers rarely pick the same one."""
    start = random.randrange(len(PORT_RANGE))
    for offset in range(len(PORT_RANGE)):
        port = PORT_RANGE[(start + offset) % len(PORT_RANGE)]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    raise TvmnetError(f"no free TCP port on {host} in {PORT_RANGE.start}-{PORT_RANGE.stop - 1}; pass --port")


@dataclass
class Process:
    """A started tracker or server; use as a context manager or call ``stop()``."""

    proc: subprocess.Popen
    host: str
    port: int
    log: Path | None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the process and every worker it forked (TVM's server forks one per session)."""
        _stop_group(self.proc, timeout)

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_group(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the child's process group, then SIGKILL what is left after ``timeout``.

    The child leads its own group (see _spawn), so its forked workers go with it instead of outliving us.
    """
    def signal_group(sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    signal_group(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass
    signal_group(signal.SIGKILL)  # workers that ignored SIGTERM, or whose parent already exited
    proc.wait()


def _spawn(args: list[str], log: Path | None, threads: int | None = None) -> subprocess.Popen:
    """The TVM process in a new session: its own process group, so stopping it stops its workers too.

    ``threads``: TVM's thread count in it, unless ``TVM_NUM_THREADS`` is set here (see
    ``runtime.use_physical_cores``): a board server measures tuning candidates with it."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.setdefault(THREADS_ENV, str(threads))
    try:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    finally:
        if log:
            out.close()


def _wait(condition, proc: subprocess.Popen, what: str, timeout: float, log: Path | None) -> None:
    """Poll ``condition`` until it holds; the child is terminated if it never does or we are interrupted."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
                raise TvmnetError(f"{what} exited with status {proc.returncode}" + (f":\n{tail}" if tail else ""))
            try:
                if condition():
                    return
            except (OSError, TvmnetError):
                pass
            time.sleep(0.25)
        raise TvmnetError(f"{what} did not come up within {timeout:.0f} s")
    except BaseException:
        _stop_group(proc, 10)
        raise


def start_tracker(host: str = LOCALHOST, port: int | None = None, *, log: str | os.PathLike | None = None,
                  timeout: float = 60.0) -> Process:
    """``python -m tvm.exec.rpc_tracker`` on ``host:port`` (a free port by default); waits until it answers.

    ``--port-end`` is always passed: TVM's tracker refuses ports above 9199 without it.
    """
    port = port or free_port(host)
    log_path = Path(log) if log else None
    proc = _spawn(["tvm.exec.rpc_tracker", "--host", host, "--port", str(port), "--port-end", str(port + 1)],
                  log_path)
    _wait(lambda: query_tracker(host, port) is not None, proc, f"RPC tracker on {host}:{port}", timeout, log_path)
    return Process(proc, host, port, log_path)


def start_server(tracker: str, key: str, *, host: str = LOCALHOST, port: int | None = None,
                 log: str | os.PathLike | None = None, timeout: float = 60.0) -> Process:
    """``python -m tvm.exec.rpc_server`` registered at ``tracker`` (HOST:PORT) under ``key``; waits until the
    tracker lists the key."""
    tracker_host, _, tracker_port = tracker.rpartition(":")
    port = port or free_port(host)
    log_path = Path(log) if log else None
    proc = _spawn(["tvm.exec.rpc_server", "--tracker", tracker, "--key", key, "--host", host,
                   "--port", str(port), "--port-end", str(port + 1)], log_path, threads=physical_cores())
    _wait(lambda: key in query_tracker(tracker_host, int(tracker_port)), proc,
          f"RPC server '{key}' at tracker {tracker}", timeout, log_path)
    return Process(proc, host, port, log_path)


def query_tracker(host: str, port: int) -> dict[str, int]:
    """The device keys registered at the tracker and how many free servers each has."""
    from tvm import rpc

    try:  # TVM's connect_tracker retries for a minute on a refused connection: probe first
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise TvmnetError(f"cannot reach the RPC tracker at {host}:{port}: {exc.strerror or exc}") from None
    try:
        client = rpc.connect_tracker(host, int(port))
        summary = client.summary()
    except Exception as exc:  # TVM raises RuntimeError/TVMError for refused connections
        raise TvmnetError(f"cannot reach the RPC tracker at {host}:{port}: {str(exc).strip().splitlines()[-1]}") \
            from None
    keys: dict[str, int] = {}
    for item in summary.get("queue_info", {}).items():
        name, info = item
        keys[name] = int(info.get("free", 0))
    for server in summary.get("server_info", []):
        key = str(server.get("key", ""))
        # server_info keys look like "server:KEY"
        name = key.split(":", 1)[1] if key.startswith("server:") else key
        if name:
            keys.setdefault(name, 0)
    return keys
