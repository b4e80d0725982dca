"""Load: a compiled model run thousands of times keeps flat memory and bit-identical outputs, from one
thread and from four at once.

``CompiledModel`` is thread-safe with calls serialised (a per-model lock around TVM's VirtualMachine,
which keeps per-call state); models loaded once per thread run in parallel. Default run: 2,000 calls
from one thread, then 4 threads x 250 calls on one shared model, then 4 threads x 100 calls on a model
each (about a minute on 2 busy cores). The full soak is 10,000 calls::

    TVMNET_SOAK_RUNS=10000 TVMNET_SOAK_THREAD_RUNS=2500 python3 -m pytest -q -s tests/test_soak.py

RSS is measured with psutil after a warm-up; growth over the soak must stay under ``RSS_BOUND``: a leak
of the input copy (110 KiB) or of the output (4 KiB) on every call would exceed it within ~150 or
~4,000 calls.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import psutil
import pytest

import tvmnet
from tvmnet.runtime import random_input

RUNS = int(os.environ.get("TVMNET_SOAK_RUNS", "2000"))
THREAD_RUNS = int(os.environ.get("TVMNET_SOAK_THREAD_RUNS", "250"))
THREADS = 4
WARMUP = 100
RSS_BOUND = 16 * 2**20
"""Allowed RSS growth after warm-up, in bytes (16 MiB), for any number of runs."""


def _rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


def _report(what: str, runs: int, seconds: float, growth: int | None = None) -> None:
    rss = "" if growth is None else f", RSS growth after warm-up {growth / 2**20:+.2f} MiB (bound {RSS_BOUND / 2**20:.0f} MiB)"
    print(f"\nsoak: {what}: {runs} runs in {seconds:.1f} s ({seconds / runs * 1e3:.2f} ms/run){rss}")


@pytest.mark.timeout(1800)
def test_many_runs_keep_memory_flat_and_outputs_identical(tiny_v2_artifact):
    model = tvmnet.load(tiny_v2_artifact)
    x = random_input(model.inputs[0])
    first = model.run(x).tobytes()
    for _ in range(WARMUP):
        model.run(x)
    before = _rss()
    peak = before
    started = time.monotonic()
    for i in range(RUNS):
        out = model.run(x)
        assert out.tobytes() == first, f"run {i} differs from the first"
        if i % 500 == 0:
            peak = max(peak, _rss())
    seconds = time.monotonic() - started
    growth = max(peak, _rss()) - before
    _report("1 thread", RUNS, seconds, growth)
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB over {RUNS} runs"


def _hammer(models, inputs, expected, runs):
    """Each thread runs its own input ``runs`` times; returns (per-thread error lists, seconds)."""
    errors: list[list[str]] = [[] for _ in models]
    barrier = threading.Barrier(len(models))

    def work(k: int) -> None:
        barrier.wait()
        for i in range(runs):
            try:
                out = models[k].run(inputs[k])
            except Exception as exc:  # reported by the main thread
                errors[k].append(f"run {i}: {type(exc).__name__}: {exc}")
                return
            if out.tobytes() != expected[k]:
                errors[k].append(f"run {i}: output differs from the single-threaded one")
                return

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(models))]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=900)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    return errors, time.monotonic() - started


@pytest.mark.timeout(1800)
def test_four_threads_share_one_model(tiny_v2_artifact):
    """Calls are serialised, so every thread gets exactly its own input's output, every time."""
    model = tvmnet.load(tiny_v2_artifact)
    inputs = [random_input(model.inputs[0], seed=k) for k in range(THREADS)]
    expected = [model.run(x).tobytes() for x in inputs]
    assert len(set(expected)) == THREADS
    _hammer([model] * THREADS, inputs, expected, WARMUP // THREADS)  # warm every thread's TVM pool
    before = _rss()
    errors, seconds = _hammer([model] * THREADS, inputs, expected, THREAD_RUNS)
    growth = _rss() - before
    _report(f"{THREADS} threads, one shared model", THREADS * THREAD_RUNS, seconds, growth)
    assert errors == [[]] * THREADS, errors
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"


@pytest.mark.timeout(900)
def test_four_threads_with_a_model_each(tiny_v2_artifact):
    """What the docstring advises for concurrent inference: one ``tvmnet.load`` per thread."""
    models = [tvmnet.load(tiny_v2_artifact) for _ in range(THREADS)]
    inputs = [random_input(models[0].inputs[0], seed=k) for k in range(THREADS)]
    expected = [models[0].run(x).tobytes() for x in inputs]
    errors, seconds = _hammer(models, inputs, expected, 100)
    _report(f"{THREADS} threads, a model each", THREADS * 100, seconds)
    assert errors == [[]] * THREADS, errors
