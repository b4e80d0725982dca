#!/usr/bin/env python3
"""How much of a model's time is the cache state the model itself leaves: each kernel timed in model order
against the same kernel timed alone.

Runs one inference with the VM's instrument hook to capture every kernel call and the tensors the VM passed
it, then replays those calls outside the VM: ``--rounds`` times in model order (each kernel finds the caches
as the kernels before it left them, as inside the model), and each kernel ``--rounds`` times in a row after a
warm-up (warm caches, as MetaSchedule measures). A kernel that is much slower in order than alone is limited
by data that the rest of the model pushed out of the caches (its weights, or an input written by another
core), which more tuning trials cannot see.

    TVM_NUM_THREADS=2 python bench/kernels_alone.py ARTIFACT [--top 15]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

import tvmnet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import timed_calls  # noqa: E402 - the bench scripts share compare.py's helpers


def capture_calls(model: tvmnet.CompiledModel) -> list[tuple[str, object, tuple]]:
    """(symbol, function, arguments) of every kernel one inference calls, in order (VM builtins left out)."""
    x = np.random.default_rng(0).random(model.inputs[0].shape, dtype=np.float32)
    for _ in range(10):
        model.run(x)
    calls = []

    def instrument(func, symbol: str, before: bool, _ret, *args) -> int:
        if before and not symbol.startswith("vm.builtin"):
            calls.append((symbol, func, args))
        return 0  # run the call as usual

    with model.instrumented(instrument):
        model.run(x)
    return calls


def replay_in_order(calls: list[tuple[str, object, tuple]], samples: list[list[float]],
                    instead: Mapping[int, Callable[[], object] | None] | None = None) -> None:
    """Run one inference's ``calls`` once, in model order, appending each call's seconds to its list in
    ``samples``. ``instead[i]`` runs in call i's place (None: call i is left out and gets no sample)."""
    instead = instead or {}
    clock = time.perf_counter
    for index, (_symbol, func, call_args) in enumerate(calls):
        if index in instead:
            if instead[index] is None:
                continue
            func, call_args = instead[index], ()
        start = clock()
        func(*call_args)
        samples[index].append(clock() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--top", type=int, default=15, help="kernels to list, most time lost in order first")
    args = parser.parse_args()
    calls = capture_calls(tvmnet.load(args.artifact))
    in_order: list[list[float]] = [[] for _ in calls]
    for _ in range(args.rounds):
        replay_in_order(calls, in_order)
    alone = [statistics.median(timed_calls(lambda: func(*call_args), args.rounds, warmup=5))
             for _symbol, func, call_args in calls]
    rows = [(statistics.median(o) * 1e6, a * 1e6, i, symbol)
            for i, (o, a, (symbol, _f, _a)) in enumerate(zip(in_order, alone, calls))]
    print(f"{len(rows)} kernel calls: {sum(r[0] for r in rows):.0f} µs in model order, "
          f"{sum(r[1] for r in rows):.0f} µs each alone (medians of {args.rounds})")
    print(f"{'call':>4} {'in order µs':>11} {'alone µs':>9} {'ratio':>6}  kernel")
    for in_order_us, alone_us, index, symbol in sorted(rows, key=lambda r: r[1] - r[0])[:args.top]:
        print(f"{index:4d} {in_order_us:11.1f} {alone_us:9.1f} {in_order_us / alone_us:6.2f}  {symbol}")


if __name__ == "__main__":
    main()
