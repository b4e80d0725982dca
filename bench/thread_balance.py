#!/usr/bin/env python3
"""How evenly an artifact's parallel kernels share their work between threads, and whether sharing it at run
time would make the model faster: a probe of TVM's static split (bench/README.md item 35).

TVM's thread pool runs each parallel kernel as one contiguous chunk per thread, fixed when the kernel was
compiled. On a VM whose host gives one core less time than the other, or for a loop of 7 chunks on 2
threads, the faster thread waits at the end of every kernel. ``bench/thread_balance.c`` is loaded beside the
artifact and takes over its parallel launches (the library's ``__TVMBackendParallelLaunch`` pointer):

1. With TVM's own split (one task per thread), it times each thread of every launch: busy time, start lag,
   the gap between the first and the last thread to finish, and which thread finished last.
2. With ``--slices`` S > 1, each thread owns S smaller tasks of its chunk and, once done, takes what is left of
   the other threads' from the back. The variants are timed in one process, in alternating blocks of
   ``--calls`` inferences (the same runtime and memory in every block, so no cross-process bias); 0 is TVM's
   own launch, 1 the same split through the probe.

    TVM_NUM_THREADS=2 python bench/thread_balance.py ARTIFACT [--slices 0,1,8,12] [--blocks 60]

A measure of the lever, not part of the runtime: stop every other job first.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import build_c, timed_calls  # noqa: E402 - the bench scripts share compare.py's helpers

SOURCE = Path(__file__).resolve().parent / "thread_balance.c"
LAUNCH_POINTER = "__TVMBackendParallelLaunch"


def load(artifact: Path):
    """The artifact's library (by its own path: ctypes must find the same mapping TVM loaded) and a VM call
    on a fixed random input."""
    import tvm
    from tvm import relax

    from tvmnet.runtime import use_physical_cores

    use_physical_cores()
    library = artifact / "model.so"
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(library)), tvm.cpu())
    shape = json.loads((artifact / "manifest.json").read_text())["inputs"][0]["shape"]
    image = tvm.runtime.tensor(np.random.default_rng(0).random(shape, dtype=np.float32))
    main = vm["main"]
    return ctypes.CDLL(str(library)), lambda: main(image)


def first_output(result) -> np.ndarray:
    return (result if hasattr(result, "numpy") else result[0]).numpy()


def per_thread_report(probe, call, calls: int) -> None:
    """Part 1: each thread's share of every launch under TVM's split, per inference."""
    stats = (ctypes.c_double * (4 + 3 * 64))()
    for _ in range(5):
        call()
    probe.tvmnet_stats(stats)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    per_call_ms = (time.perf_counter() - start) / calls * 1e3
    probe.tvmnet_stats(stats)
    launches, threads = stats[0], int(stats[1])
    if threads < 2:
        raise SystemExit("bench: the thread pool ran one thread; set TVM_NUM_THREADS=2 (or more)")
    print(f"TVM's split, {calls} inferences: {per_call_ms:.3f} ms each, {launches / calls:.0f} parallel launches, "
          f"{stats[2] / calls * 1e3:.3f} ms in them; the first thread to finish waited "
          f"{stats[3] / calls * 1e3:.3f} ms per inference for the last")
    for t in range(threads):
        busy, lag, last = stats[4 + 3 * t], stats[5 + 3 * t], stats[6 + 3 * t]
        print(f"  thread {t}: busy {busy / calls * 1e3:.3f} ms, started {lag / launches * 1e6:.1f} µs after the "
              f"launch on average, last to finish in {last / launches:.0%} of launches")


def alternate(probe, slot, call, variants: list[int], blocks: int, calls: int) -> None:
    """Part 2: the variants in alternating blocks, medians and each block's ratio to the first variant."""
    medians: dict[int, list[float]] = {v: [] for v in variants}
    outputs = {}
    for block in range(blocks):
        for variant in variants if block % 2 == 0 else variants[::-1]:
            probe.tvmnet_install(ctypes.byref(slot), variant)
            medians[variant].append(statistics.median(timed_calls(call, calls, warmup=3)))
            if variant not in outputs:
                outputs[variant] = first_output(call())
    probe.tvmnet_install(ctypes.byref(slot), 0)
    base = variants[0]
    print(f"{blocks} alternating blocks of {calls} inferences, medians; ratio = block by block against {base}")
    for variant in variants:
        ratios = [a / b for a, b in zip(medians[variant], medians[base])]
        name = "TVM's launch" if variant == 0 else f"{variant} task(s) per thread"
        differs = float(np.abs(outputs[variant] - outputs[base]).max())
        print(f"  {name:24s} {statistics.median(medians[variant]) * 1e3:7.3f} ms  ratio {statistics.median(ratios):.3f} "
              f"(faster in {sum(r < 1 for r in ratios)} of {blocks})  output max |diff| {differs:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--slices", default="0,1,8,12",
                        help="tasks per thread to compare, comma-separated; 0 = TVM's own launch")
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--calls", type=int, default=20, help="timed inferences per block")
    args = parser.parse_args()
    variants = [int(v) for v in args.slices.split(",")]
    library, call = load(args.artifact)
    if hasattr(library, "__TVMBackendParallelBarrier"):
        raise SystemExit(f"bench: {args.artifact} has kernels that synchronize inside a parallel loop; "
                         "slicing their tasks would break them")
    if not hasattr(library, LAUNCH_POINTER):
        raise SystemExit(f"bench: {args.artifact} runs no kernel in parallel (an untuned build?): nothing to share")
    slot = ctypes.c_void_p.in_dll(library, LAUNCH_POINTER)
    with tempfile.TemporaryDirectory(prefix="tvmnet-thread-balance-") as folder:
        probe_path = Path(folder) / "thread_balance.so"
        build_c(SOURCE, probe_path, "-shared", "-fPIC")
        probe = ctypes.CDLL(str(probe_path))
        probe.tvmnet_install(ctypes.byref(slot), 1)
        per_thread_report(probe, call, 10 * args.calls)
        alternate(probe, slot, call, variants, args.blocks, args.calls)


if __name__ == "__main__":
    main()
