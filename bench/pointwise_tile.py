#!/usr/bin/env python3
"""Whether another register tile would make a pointwise convolution faster, padded or not: a probe.

MetaSchedule splits loops only into factors that divide them, so a 1x1 convolution on 7x7 pixels gets a
register tile of 7 pixels x one vector (49 = 7 x 7; 7 x 2 vectors needs more than AVX2's 16 registers). This
script writes one fixed schedule of the same convolution as a matmul (pixels x input channels, weights packed
per vector of output channels, bias and ReLU) for several pixel counts and tiles, by default 49 as it is and
padded to 50 or 56, and times each alone (warm) in alternating rounds against the task's fastest tuned record
from the log. GFLOP/s count only the real pixels. A measure of the lever, not a kernel to ship (bench/README.md
items 22 and 35). ``--tiles`` takes other tiles, for any 1x1 task (item 35: four vectors of AVX-512).

    TVM_NUM_THREADS=2 python bench/pointwise_tile.py [--model mobilenet_v1] [--task fused_conv2d18_add9]
    TVM_NUM_THREADS=2 python bench/pointwise_tile.py --model mobilenet_v2 --task fused_conv2d20_add16 \
        --tiles 196,7,32 196,7,64 196,4,64
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import tvm
from tvm import te
from tvm.s_tir import Schedule

from tvmnet import pipeline, tune
from tvmnet.frontend import load_onnx
from tvmnet.runtime import use_physical_cores
from tvmnet.targets import get_target

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import export_onnx, parse_models  # noqa: E402 - the bench scripts share compare.py's helpers

TILES = ["49,7,8", "50,5,16", "56,4,16"]
"""The default ``--tiles``: pixels after padding, pixels per register tile, floats per register tile (a
power-of-two count of vectors: LLVM made a 48-float tile 30-40x slower)."""


def matmul_kernel(pixels: int, inputs: int, outputs: int, tile_pixels: int, tile_floats: int, target):
    """ReLU(a @ w + b) with ``w`` packed as [outputs / tile_floats, inputs, tile_floats]; one register tile of
    ``tile_pixels`` x ``tile_floats`` accumulators per (output-channel block, pixel block), the inputs
    reduced innermost but for the tile, the output-channel blocks in parallel."""
    a = te.placeholder((pixels, inputs), name="a")
    w = te.placeholder((outputs // tile_floats, inputs, tile_floats), name="w")
    b = te.placeholder((outputs,), name="b")
    k = te.reduce_axis((0, inputs), "k")
    acc = te.compute((pixels, outputs), lambda i, j: te.sum(a[i, k] * w[j // tile_floats, k, j % tile_floats], axis=k),
                     name="acc")
    out = te.compute((pixels, outputs), lambda i, j: te.max(acc[i, j] + b[j], 0.0), name="out")
    sch = Schedule(te.create_prim_func([a, w, b, out]))
    block = sch.get_sblock("acc")
    i, j, reduce = sch.get_loops(block)
    i_outer, i_inner = sch.split(i, [pixels // tile_pixels, tile_pixels])
    j_outer, j_inner = sch.split(j, [outputs // tile_floats, tile_floats])
    sch.reorder(j_outer, i_outer, reduce, i_inner, j_inner)
    sch.parallel(j_outer)
    sch.set_scope(block, 0, "local")
    epilogue = sch.get_sblock("out")
    sch.reverse_compute_at(epilogue, i_outer)
    sch.unroll(i_inner)
    sch.vectorize(j_inner)
    sch.decompose_reduction(block, reduce)
    sch.vectorize(sch.get_loops(epilogue)[-1])
    shapes = [(pixels, inputs), (outputs // tile_floats, inputs, tile_floats), (outputs,), (pixels, outputs)]
    return tvm.compile(sch.mod, target=target), shapes


def evaluator(lib, shapes: list) -> Callable[[], float]:
    """Seconds per call of ``lib`` on random arguments, 50 calls in a row (warm caches)."""
    module = lib.mod if hasattr(lib, "mod") else lib
    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(shape).astype("float32"), tvm.cpu()) for shape in shapes]
    timer = module.time_evaluator(module.entry_name, tvm.cpu(), number=50, repeat=1)
    return lambda: timer(*args).mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mobilenet_v1")
    parser.add_argument("--task", default="fused_conv2d18_add9", help="a 1x1 convolution task (name prefix)")
    parser.add_argument("--tiles", nargs="+", default=TILES, metavar="PIXELS,ROWS,FLOATS",
                        help="register tiles to time; PIXELS may exceed the task's (padding)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--work-dir", default=str(Path(__file__).resolve().parent / ".work"))
    args = parser.parse_args()
    use_physical_cores()
    spec = get_target("x86")
    target = spec.tvm_target()
    fused = pipeline.fuse(load_onnx(str(export_onnx(parse_models(args.model)[0], Path(args.work_dir), 0))).to_relax(),
                          target)
    task = next(t for t in tune.extract_tasks(fused, target) if t.task_name.startswith(args.task))
    record = tune.fastest_here(tune.open_database(tune.default_log_dir(fused, spec)), [task], tune.cpu_of(target), 1)[0][0][1]
    sch = Schedule(record.workload.mod)
    record.trace.apply_to_schedule(sch, remove_postproc=False)
    arg_shapes = [[int(d) for d in arg.shape] for arg in tune._ms().arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True)]
    _, height, width, inputs = arg_shapes[0]
    outputs = arg_shapes[-1][-1]
    variants = {f"tuned record ({tune._record_seconds(record) * 1e6:.0f} µs in the database)":
                evaluator(tune._build(sch.mod, target, None), arg_shapes)}
    for pixels, tile_pixels, tile_floats in (tuple(int(n) for n in tile.split(",")) for tile in args.tiles):
        if pixels < height * width or pixels % tile_pixels or outputs % tile_floats:
            raise SystemExit(f"bench: tile {pixels},{tile_pixels},{tile_floats} does not fit {height * width} pixels "
                             f"and {outputs} output channels")
        lib, shapes = matmul_kernel(pixels, inputs, outputs, tile_pixels, tile_floats, target)
        variants[f"{pixels} pixels, tile {tile_pixels} x {tile_floats} floats"] = evaluator(lib, shapes)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds):
        for name, timer in (list(variants.items()) if round_ % 2 else list(variants.items())[::-1]):
            samples[name].append(timer())
    useful_flop = 2 * height * width * inputs * outputs
    print(f"{task.task_name}: {height}x{width}, {inputs} -> {outputs} channels, {args.rounds} alternating rounds, medians")
    for name, seconds in samples.items():
        median = statistics.median(seconds)
        print(f"  {name:48s} {median * 1e6:8.1f} µs  {useful_flop / median / 1e9:6.1f} GFLOP/s on the {height * width} pixels")


if __name__ == "__main__":
    main()
