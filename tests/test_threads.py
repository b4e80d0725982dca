"""TVM runs one thread per physical core: in a loaded model, in the tuning runner, on an RPC server.

TVM's own default on x86 is half the logical CPUs (it assumes two-way SMT). On a machine without SMT,
like this project's 2-core VM, that is one thread: inference ran on half the cores and every tuning
measurement was single-threaded, so the search preferred schedules that do not parallelise.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tvmnet.runtime import THREADS_ENV, physical_cores

LOAD_SCRIPT = """
import json, sys
import tvm, tvmnet
tvmnet.load(sys.argv[1])
print(json.dumps(tvm.runtime.num_threads()))
"""


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (THREADS_ENV, "OMP_NUM_THREADS")}
    return {**env, **extra}


def _threads_after_load(artifact: Path, env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(artifact)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_physical_cores_counts_smt_siblings_once():
    """Checked against /proc/cpuinfo's (physical id, core id) pairs where that file has them (x86)."""
    pairs, current = set(), {}
    for line in Path("/proc/cpuinfo").read_text().splitlines() + [""]:
        if ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            current[key] = value
        elif current:
            pairs.add((current.get("physical id"), current.get("core id")))
            current = {}
    if platform.machine() != "x86_64" or (None, None) in pairs:
        pytest.skip("no core ids in /proc/cpuinfo here")
    if len(os.sched_getaffinity(0)) != os.cpu_count():
        pytest.skip("this process may not run on every CPU")
    assert physical_cores() == len(pairs)


def test_load_uses_one_thread_per_physical_core_unless_told(tiny_v2_artifact):
    assert _threads_after_load(tiny_v2_artifact, _clean_env()) == physical_cores()
    assert _threads_after_load(tiny_v2_artifact, _clean_env(**{THREADS_ENV: "1"})) == 1  # the user's choice stands


def test_tuning_measures_with_the_threads_load_runs_with(monkeypatch):
    """The LocalRunner's worker (where candidates are timed) runs TVM with ``physical_cores()`` threads."""
    import tvm

    from tvmnet import tune
    from tvmnet.targets import get_target

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    runner, _ = tune.make_runner(get_target("x86"), rpc_tracker=None, rpc_key=None, timeout_s=120, number=1,
                                 repeat=1, min_repeat_ms=0)
    assert runner.pool.submit(tvm.runtime.num_threads).result() == physical_cores()


def test_rpc_server_runs_one_thread_per_physical_core(monkeypatch):
    """Candidates tuned through ``tvmnet rpc server`` are timed in its process."""
    from tvmnet import remote, rpc

    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with rpc.start_tracker() as tracker, rpc.start_server(tracker.address, "threads"):
        board = remote.connect(tracker.address, "threads")
        assert board.rpc.get_function("runtime.NumThreads")() == physical_cores()
