#!/usr/bin/env python3
"""What fusing a pointwise convolution with the depthwise one next to it would save inside the model: a probe.

tvmnet's pipeline runs each depthwise and each pointwise convolution as its own kernel, so the activation between
them (at 112x112 and 56x56, megabytes) goes out to the caches and comes back. This script hand-schedules one
kernel for a pair, replays a tuned artifact's kernel calls in model order (``kernels_alone.capture_calls``), once
as built and once with the fused kernel in place of the pair, and prints both times for each pair, plus the fused
kernel timed alone. Two kinds of pair, told apart by their kernels' shapes:

- a depthwise 3x3 (+ bias, ReLU) and the pointwise 1x1 (+ bias, ReLU) it feeds: the depthwise output computed for
  a tile of output rows inside the parallel loop and fed straight to the pointwise (bench/README.md item 17);
- an expanding pointwise 1x1 (+ bias, ReLU6) and the depthwise 3x3 (+ bias, ReLU6) it feeds, as in MobileNetV2's
  blocks: per band of output rows, the expanded rows the band's taps read (halo rows computed twice), then the
  depthwise on them while they are in L2 (item 33).

    TVM_NUM_THREADS=2 python bench/separable_fusion.py ARTIFACT --pair 2 [--pair 4] [--tile A B C D]

``--pair N`` names the first kernel's call index (``kernels_alone.py --top 1000`` lists them); call N+1 must be
the other convolution of the pair, neither with a residual input. The fused kernel uses its own random weights
(the artifact's are prepacked in each kernel's order) and the epilogues above whatever the model has there (an
epilogue costs little next to a convolution), is checked against numpy, and writes the pair's output tensor, so
the rest of the replay finds the caches as it would. The loop structure is fixed; its tile sizes are ``--tile``
or, with ``--trials N``, the fastest of N candidates MetaSchedule measures alone. A measure of the lever, not a
kernel to ship (MetaSchedule's default rules never compute a producer convolution inside its consumer's tiles;
item 17).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

import tvmnet
from tvmnet import pipeline
from tvmnet.expand_fusion import TILE, define_expand, schedule_expand, vector_lanes, vectors_per_tile
from tvmnet.targets import get_target

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import timed_calls  # noqa: E402 - the bench scripts share compare.py's helpers
from kernels_alone import capture_calls, replay_in_order  # noqa: E402


def define(height: int, width: int, channels: int, outputs: int, stride: int) -> tvm.tirx.PrimFunc:
    """NHWC depthwise 3x3 (pad 1, ``stride``) + bias + ReLU, then 1x1 to ``outputs`` channels + bias + ReLU."""
    out_h, out_w = height // stride, width // stride
    data = te.placeholder((1, height, width, channels), name="data")
    dw_weight = te.placeholder((3, 3, channels), name="dw_weight")
    dw_bias = te.placeholder((channels,), name="dw_bias")
    pw_weight = te.placeholder((channels, outputs), name="pw_weight")
    pw_bias = te.placeholder((outputs,), name="pw_bias")
    pad = te.compute((1, height + 2, width + 2, channels), lambda n, h, w, c: tvm.tirx.if_then_else(
        tvm.tirx.all(h >= 1, h <= height, w >= 1, w <= width), data[n, h - 1, w - 1, c], 0.0), name="pad")
    # the nine taps written out (a spatial block, not a reduction), so that the channel loop vectorizes
    mid = te.compute((1, out_h, out_w, channels), lambda n, h, w, c: te.max(sum(
        pad[n, h * stride + ry, w * stride + rx, c] * dw_weight[ry, rx, c] for ry in range(3) for rx in range(3))
        + dw_bias[c], 0.0), name="mid")
    rc = te.reduce_axis((0, channels), "rc")
    pw = te.compute((1, out_h, out_w, outputs), lambda n, h, w, k: te.sum(mid[n, h, w, rc] * pw_weight[rc, k], axis=rc),
                    name="pw")
    out = te.compute((1, out_h, out_w, outputs), lambda n, h, w, k: te.max(pw[n, h, w, k] + pw_bias[k], 0.0),
                     name="out")
    return te.create_prim_func([data, dw_weight, dw_bias, pw_weight, pw_bias, out])


def _fuse_pair(sch: Schedule, rows, width_tile, out_blocks, vector: int) -> None:
    """Parallel over tiles of ``rows`` output rows; per tile, the padded input rows, then the depthwise output
    (vectorized over channels), then the pointwise one in register tiles of ``width_tile`` pixels by ``vector``
    channels, ``out_blocks`` vectors of output channels at a time. The sizes are ints or sampled variables."""
    pw, out, mid, pad = (sch.get_sblock(name) for name in ("pw", "out", "mid", "pad"))
    n, h, w, k, rc = sch.get_loops(pw)
    h0, h1 = sch.split(h, [None, rows])
    w0, w1 = sch.split(w, [None, width_tile])
    k0, k1, k2 = sch.split(k, [None, out_blocks, vector])
    sch.reorder(h0, k0, h1, w0, k1, rc, w1, k2)
    sch.parallel(sch.fuse(n, h0))
    sch.vectorize(k2)
    sch.unroll(w1)
    init = sch.decompose_reduction(pw, rc)
    sch.reverse_compute_at(out, w0)
    sch.vectorize(sch.get_loops(out)[-1])
    sch.compute_at(mid, sch.get_loops(init)[1])
    sch.vectorize(sch.get_loops(mid)[-1])
    sch.compute_at(pad, sch.get_loops(mid)[1])  # the tile's padded rows: the taps need no bounds checks
    sch.vectorize(sch.get_loops(pad)[-1])


def _divisor(sch: Schedule, extent: int, low: int, high: int):
    """A tile size drawn from the divisors of ``extent`` in [low, high] (``extent`` itself when there are none)."""
    options = [f for f in range(low, high + 1) if extent % f == 0] or [extent]
    return sch.sample_categorical(options, [1.0 / len(options)] * len(options))


def _sampled_tiles(sch: Schedule) -> None:
    """The separable structure with each tile size drawn from the divisors of its loop (rows and pixels 2-8, so
    that no loop of extent 1 changes the loop nest between candidates): the space ``--trials`` searches."""
    _n, h, w, k, _rc = (int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("pw")))
    vector = vector_lanes(k)
    _fuse_pair(sch, _divisor(sch, h, 2, 8), _divisor(sch, w, 2, 8), _divisor(sch, k // vector, 1, 8), vector)


def _sampled_expand_tiles(sch: Schedule) -> None:
    """The expand structure's space: rows 2-8 of the output, 1x1 tiles of 2-8 pixels of the padded width by 1-3
    vectors (at most 24 accumulators), depthwise tiles of 2-8 pixels."""
    _n, h, w, c = (int(sch.get(loop).extent) for loop in sch.get_loops(sch.get_sblock("out")))
    padded_width = int(sch.get(sch.get_loops(sch.get_sblock("pw"))[2]).extent)
    schedule_expand(sch, _divisor(sch, h, 2, 8), _divisor(sch, padded_width, 2, 8),
                    _divisor(sch, c // vector_lanes(c), 1, 3), _divisor(sch, w, 2, 8))


@dataclass(frozen=True)
class Fusion:
    """One kind of pair: how to define, schedule (fixed or sampled tiles) and check its fused kernel."""

    name: str
    define: Callable[..., tvm.tirx.PrimFunc]
    fixed: Callable[..., None]
    sampled: Callable[[Schedule], None]
    reference: Callable[..., np.ndarray]
    weight_shapes: Callable[[int, int], list[tuple[int, ...]]]
    default_tile: Callable[[int, int], list[int]]
    tile_names: str


def _depthwise_reference(data: np.ndarray, weight: np.ndarray, stride: int) -> np.ndarray:
    """NHWC depthwise 3x3, pad 1, in numpy (no bias)."""
    height, width = data.shape[1:3]
    padded = np.pad(data, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, ry:ry + height:stride, rx:rx + width:stride, :] * weight[ry, rx]
               for ry in range(3) for rx in range(3))


def reference(data, dw_weight, dw_bias, pw_weight, pw_bias, stride: int) -> np.ndarray:
    dw = np.maximum(_depthwise_reference(data, dw_weight, stride) + dw_bias, 0)
    return np.maximum(dw @ pw_weight + pw_bias, 0)


def reference_expand(data, pw_weight, pw_bias, dw_weight, dw_bias, stride: int) -> np.ndarray:
    expanded = np.clip(data @ pw_weight + pw_bias, 0, 6)
    return np.clip(_depthwise_reference(expanded, dw_weight, stride) + dw_bias, 0, 6)


SEPARABLE = Fusion(
    "depthwise+pointwise", define,
    lambda sch, rows, width, vector, out_tile: _fuse_pair(sch, rows, width, out_tile // vector, vector),
    _sampled_tiles, reference,
    lambda channels, outputs: [(3, 3, channels), (channels,), (channels, outputs), (outputs,)],
    lambda channels, outputs: [2, 4, vector_lanes(outputs), 64 if outputs % 64 == 0 else outputs],
    "ROWS W KV KT: rows per parallel task, pixels x vector lanes per register tile, output channels per pass")
EXPAND = Fusion(
    "pointwise+depthwise", define_expand, schedule_expand, _sampled_expand_tiles, reference_expand,
    lambda inputs, channels: [(inputs, channels), (channels,), (3, 3, channels), (channels,)],
    lambda inputs, channels: [TILE[0], TILE[1], vectors_per_tile(channels), TILE[2]],
    "ROWS PW CV DW: output rows per band, 1x1 tile pixels and vectors, depthwise tile pixels")


def _is_depthwise(call) -> bool:
    data, weight, _bias, out = call[2]
    return data.shape[-1] == out.shape[-1] and math.prod(weight.shape) == 9 * out.shape[-1]


def _is_pointwise(call) -> bool:
    data, weight, _bias, out = call[2]
    return tuple(data.shape[1:3]) == tuple(out.shape[1:3]) and math.prod(weight.shape) == data.shape[-1] * out.shape[-1]


def pair_kind(first, second) -> Fusion:
    """Which fusion calls ``first`` and ``second`` (kernel calls in model order) make, or exit saying why none."""
    if len(first[2]) == 4 and len(second[2]) == 4:
        if _is_depthwise(first) and _is_pointwise(second):
            return SEPARABLE
        if _is_pointwise(first) and _is_depthwise(second):
            return EXPAND
    raise SystemExit(f"calls {first[0]} and {second[0]} are not a depthwise and a pointwise convolution (either "
                     "order) without a residual input: pick another --pair")


def search(fusion: Fusion, func: tvm.tirx.PrimFunc, trials: int) -> tvm.IRModule:
    """The fastest of ``trials`` candidates of the fusion's sampled tiles, measured alone by MetaSchedule with
    the builder and runner ``tvmnet tune`` uses."""
    import shutil
    import tempfile

    from tvm.s_tir import meta_schedule as ms

    from tvmnet import tune

    spec = get_target("x86")
    target = spec.tvm_target()
    mod = tvm.IRModule({"main": func})
    work_dir = tempfile.mkdtemp(prefix="tvmnet-fusion-")
    try:
        runner, _name = tune.make_runner(spec, rpc_tracker=None, rpc_key=None, timeout_s=60, number=3, repeat=1,
                                         min_repeat_ms=100)
        database = ms.tune_tir(mod, target, work_dir, max_trials_global=trials, num_trials_per_iter=16,
                               builder=tune.make_builder(spec, 120, 2), runner=runner,
                               space=ms.space_generator.ScheduleFn(fusion.sampled), strategy="replay-trace")
        best = ms.tir_integration.compile_tir(database, mod, target)
        if best is None:
            raise SystemExit(f"none of the {trials} fused candidates built and ran: see MetaSchedule's log above")
        return best.mod
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def probe(calls: list, pair: int, rounds: int, tile: list[int] | None, trials: int = 0) -> None:
    first, second = calls[pair], calls[pair + 1]
    fusion = pair_kind(first, second)
    data, output = first[2][0], second[2][-1]
    _, height, width, channels = data.shape
    outputs = output.shape[-1]
    stride = height // output.shape[1]
    tile = tile or fusion.default_tile(channels, outputs)
    rng = np.random.default_rng(0)
    weights = [(rng.standard_normal(shape) * 0.1).astype("float32")
               for shape in fusion.weight_shapes(channels, outputs)]
    func = fusion.define(height, width, channels, outputs, stride)
    for position in (0, len(func.params) - 1):  # the VM's tensors may sit off their storage's start
        func = pipeline.with_param_buffer(func, position, any_offset=True)
    if trials:
        mod = search(fusion, func, trials)
    else:
        sch = Schedule(func)
        fusion.fixed(sch, *tile)
        mod = sch.mod
    fused = tvm.compile(mod, target=get_target("x86").tvm_target())["main"]
    device_weights = [tvm.runtime.tensor(w) for w in weights]
    check = tvm.runtime.tensor(np.zeros(output.shape, "float32"))
    fused(data, *device_weights, check)
    error = float(np.abs(check.numpy() - fusion.reference(data.numpy(), *weights, stride)).max())
    run_fused = functools.partial(fused, data, *device_weights, output)  # writes the pair's output tensor
    as_built: list[list[float]] = [[] for _ in calls]
    with_fused: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):  # alternating, one inference each
        replay_in_order(calls, as_built)
        replay_in_order(calls, with_fused, {pair: run_fused, pair + 1: None})
    alone = timed_calls(lambda: fused(data, *device_weights, check), rounds, warmup=5)
    us = [statistics.median(samples) * 1e6
          for samples in (as_built[pair], as_built[pair + 1], with_fused[pair], alone)]
    print(f"pair {pair}: {first[0]} + {second[0]}, {fusion.name}, {height}x{width}x{channels} -> {outputs} "
          f"channels, stride {stride}, "
          f"{f'tiles searched ({trials} trials)' if trials else 'tile ' + ' '.join(map(str, tile))}: "
          f"max abs error {error:.1e}")
    print(f"  in model order: {us[0]:.1f} + {us[1]:.1f} = {us[0] + us[1]:.1f} µs as built, {us[2]:.1f} µs fused "
          f"({us[2] / (us[0] + us[1]):.2f}x); fused alone {us[3]:.1f} µs (medians of {rounds})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact")
    parser.add_argument("--pair", type=int, action="append", required=True,
                        help="call index of a pair's first kernel; the next call must be the other one (repeatable)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tile", type=int, nargs=4, metavar=("A", "B", "C", "D"),
                        help=f"tile sizes. {SEPARABLE.name}: {SEPARABLE.tile_names} (default 2 4 16|8 64|all); "
                             f"{EXPAND.name}: {EXPAND.tile_names} (default 4 6 2|1 7)")
    parser.add_argument("--trials", type=int, default=0,
                        help="search the tile sizes with MetaSchedule for this many candidates instead of --tile")
    args = parser.parse_args()
    calls = capture_calls(tvmnet.load(args.artifact))
    for pair in args.pair:
        probe(calls, pair, args.rounds, args.tile, args.trials)


if __name__ == "__main__":
    main()
