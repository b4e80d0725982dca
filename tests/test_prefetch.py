"""Software prefetch of weights (tvmnet/prefetch.py): where it goes, which lines it fetches, and that the
kernels it rewrites still compute the same thing through the shared build pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import tirx as T
from tvm.sym.analyzer import Analyzer

from tvmnet import pipeline, prefetch
from tvmnet.search_space import loops_and_blocks
from tvmnet.targets import get_target

ROWS, K, F = 4, 512, 128
WEIGHT_SHAPE = (F // 16, K // 64, 64, 16)  # 256 KB: the smallest weight the pass takes


@T.prim_func(private=True, s_tir=True)
def rows_times_weights(x: T.Buffer((4, 512), "float32"), w: T.Buffer((8, 8, 64, 16), "float32"),
                       out: T.Buffer((4, 128), "float32")):
    """A tuned 1x1 convolution's shape, scaled down: output channels split over the threads, the reduction
    in steps of 64 channels, each step's weights (4 KB) reused by every pixel row."""
    for f0 in T.parallel(8):
        for k0 in range(8):
            for r in range(4):
                for k1 in range(64):
                    for f3 in T.vectorized(16):
                        with T.sblock("update"):
                            vr = T.axis.spatial(4, r)
                            vf = T.axis.spatial(128, f0 * 16 + f3)
                            vk = T.axis.reduce(512, k0 * 64 + k1)
                            with T.init():
                                out[vr, vf] = T.float32(0)
                            out[vr, vf] = out[vr, vf] + x[vr, vk] * w[vf // 16, vk // 64, vk % 64, vf % 16]


@T.prim_func(private=True, s_tir=True)
def weights_reread_per_row(x: T.Buffer((4, 512), "float32"), w: T.Buffer((8, 8, 64, 16), "float32"),
                           out: T.Buffer((4, 128), "float32")):
    """The same product with the rows outside the reduction: every row reads all the weights again."""
    for f0 in T.parallel(8):
        for r in range(4):
            for k0 in range(8):
                for k1 in range(64):
                    for f3 in T.vectorized(16):
                        with T.sblock("update"):
                            vr = T.axis.spatial(4, r)
                            vf = T.axis.spatial(128, f0 * 16 + f3)
                            vk = T.axis.reduce(512, k0 * 64 + k1)
                            with T.init():
                                out[vr, vf] = T.float32(0)
                            out[vr, vf] = out[vr, vf] + x[vr, vk] * w[vf // 16, vk // 64, vk % 64, vf % 16]


def _module(kernel, weights: np.ndarray) -> tvm.IRModule:
    """A Relax ``main`` calling ``kernel`` with constant weights, as the fused and scheduled model does."""
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((ROWS, K), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            gv = builder.add_func(kernel, "kernel")
            out = builder.emit_output(relax.call_tir(gv, (x, relax.const(weights)),
                                                     relax.TensorType((ROWS, F), "float32")))
        builder.emit_func_output(out)
    return builder.get()


def _reference(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    dense = weights.transpose(1, 2, 0, 3).reshape(K, F)  # [k0, k1, f0, f3] -> [k, f]
    return x @ dense


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(WEIGHT_SHAPE).astype(np.float32)


def test_prefetch_goes_in_front_of_the_accumulation_loop_and_builds_the_same_result(weights):
    target = get_target("x86").tvm_target()
    mod = _module(rows_times_weights, weights)
    rewritten, changed = prefetch.prefetch_weights(tvm.IRModule(dict(mod.functions)), target)
    assert changed == ["kernel"]
    assert rewritten["kernel"].script().count("T.prefetch(") == 1
    # in the row loop, just before the loop over k1 (which keeps the accumulators in registers), not inside it
    row_loop = next(s for s in _statements(rewritten["kernel"].body)
                    if isinstance(s, tvm.tirx.For) and s.loop_var.name == "r")
    assert [part.loop_var.name for part in row_loop.body.seq] == ["prefetch_line", "k1"]

    x = np.random.default_rng(1).standard_normal((ROWS, K)).astype(np.float32)
    built = pipeline.build(mod, target)
    vm = relax.VirtualMachine(built.executable, tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), _reference(x, weights),
                               rtol=1e-5, atol=1e-4)


def _prefetched_lines(func: tvm.tirx.PrimFunc) -> dict[tuple[int, int], set[int]]:
    """For each (parallel iteration, step), the 64-byte lines of the weights the kernel prefetches, found
    by evaluating the inserted address and condition at every iteration of the loops around them."""
    stmt = next(s for s in _statements(func.body) if isinstance(s, tvm.tirx.For)
                and s.loop_var.name == "prefetch_line")
    condition, call = stmt.body.condition, stmt.body.then_case.value
    offset = call.args[0].args[1]
    loops = next(found for realize, found in loops_and_blocks(func.body) if realize.block.name_hint == "update")
    f0, k0, r = (loop.loop_var for loop in loops[:3])
    lines: dict[tuple[int, int], set[int]] = {}
    for f, k, row, line in itertools.product(range(8), range(8), range(4), range(int(stmt.extent))):
        analyzer = Analyzer()
        for var, value in ((f0, f), (k0, k), (r, row), (stmt.loop_var, line)):
            analyzer.bind(var, tvm.tirx.const(value, "int32"))
        if int(analyzer.simplify(condition)):
            lines.setdefault((f, k), set()).add(int(analyzer.simplify(offset)) // prefetch.LINE_BYTES)
    return lines


def _statements(stmt):
    yield stmt
    for child in ("body", "then_case", "else_case", "block"):
        if getattr(stmt, child, None) is not None:
            yield from _statements(getattr(stmt, child))
    for part in getattr(stmt, "seq", []):
        yield from _statements(part)


def test_each_step_prefetches_exactly_the_next_steps_weights(weights):
    mod, _ = prefetch.prefetch_weights(_module(rows_times_weights, weights), get_target("x86").tvm_target())
    lines = _prefetched_lines(mod["kernel"])
    step_lines = 64 * 16 * 4 // prefetch.LINE_BYTES  # one step reads w[f0, k0]: 64 x 16 floats
    for f, k in itertools.product(range(8), range(8)):
        # w[f, k + 1] starts (f * 8 + k + 1) steps into the buffer; the last step has no next one
        first = (f * 8 + k + 1) * step_lines
        expected = set(range(first, first + step_lines)) if k < 7 else set()
        assert lines.get((f, k), set()) == expected, (f, k)


def test_prefetch_leaves_alone_weights_read_again_small_weights_and_non_x86_targets(weights, monkeypatch):
    x86 = get_target("x86").tvm_target()
    assert prefetch.prefetch_weights(_module(weights_reread_per_row, weights), x86)[1] == []
    assert prefetch.prefetch_weights(_module(rows_times_weights, weights), get_target("rasp4b").tvm_target())[1] == []
    monkeypatch.setattr(prefetch, "MIN_WEIGHT_BYTES", weights.nbytes + 1)
    assert prefetch.prefetch_weights(_module(rows_times_weights, weights), x86)[1] == []
