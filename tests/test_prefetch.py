"""Software prefetch of weights (tvmnet/prefetch.py): where it goes, which lines it fetches, and that the
kernels it rewrites still compute the same thing through the shared build pipeline."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm import te
from tvm.s_tir import Schedule
from tvm.sym.analyzer import Analyzer

from tvmnet import pipeline, prefetch
from tvmnet.search_space import loops_and_blocks, row_bands
from tvmnet.targets import get_target

ROWS, K, F = 4, 512, 256
WEIGHT_SHAPE = (F // 64, K // 64, 64, 64)  # 512 KB


def _kernel(rows: int, order: str, step: int = 64, name: str = "kernel") -> tvm.tirx.PrimFunc:
    """``rows`` x 512 input times 512 x 256 weights, stored as [f0, k0, k1, f3] (512 KB), scheduled as a tuned
    1x1 convolution is: output channels split over the threads in blocks of 64 (``f0``, vectorized ``f3``), the
    reduction in steps of ``step`` channels (``k0``, then ``k1``). ``order`` names the loops outside in, a loop
    ``p`` being ``f0`` and the first of two row blocks fused into the parallel loop."""
    x = te.placeholder((rows, K), name="x")
    w = te.placeholder(WEIGHT_SHAPE, name="w")
    k = te.reduce_axis((0, K), name="k")
    out = te.compute((rows, F), lambda r, f: te.sum(x[r, k] * w[f // 64, k // 64, k % 64, f % 64], axis=k),
                     name="update")
    sch = Schedule(te.create_prim_func([x, w, out]))
    block = sch.get_sblock("update")
    r, f, k = sch.get_loops(block)
    loops = dict(zip(("f0", "f3"), sch.split(f, [None, 64])))
    loops.update(zip(("k0", "k1"), sch.split(k, [None, step])))
    loops.update(zip(("h", "r"), sch.split(r, [None, 4])) if rows > 4 else {"r": r})
    sch.reorder(*(loops[name] for name in order.replace("p", "f0 h").split()))
    if "p" in order:
        loops["f0"] = sch.fuse(loops["f0"], loops["h"])
    sch.parallel(loops["f0"])
    sch.vectorize(loops["f3"])
    return sch.mod["main"].with_attr("global_symbol", name)


ROWS_TIMES_WEIGHTS = (4, "f0 k0 r k1 f3")
"""Each step's weights (16 KB) reused by every row."""
ROWS_IN_TWO_PASSES = (8, "f0 h k0 r k1 f3")
"""Eight rows in two passes of four: the second pass reads the weights again, from L2."""
ROWS_SPLIT_OVER_THREADS = (8, "p k0 k1 r f3")
"""Rows and output channels split over the threads: two parallel iterations read each weight."""
SHORT_STEPS = (4, "f0 k0 k1 r f3", 8)
"""Steps of 8 channels: 2 KB of weights each, so its prefetches reach :data:`prefetch.AHEAD_BYTES` on."""


def _module(kernel: tuple, weights: np.ndarray) -> tvm.IRModule:
    """A Relax ``main`` calling :func:`_kernel` with constant weights, as the fused and scheduled model does."""
    rows = kernel[0]
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, K), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            gv = builder.add_func(_kernel(*kernel), "kernel")
            out = builder.emit_output(relax.call_tir(gv, (x, relax.const(weights)),
                                                     relax.TensorType((rows, F), "float32")))
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
    mod = _module(ROWS_TIMES_WEIGHTS, weights)
    rewritten, changed = prefetch.prefetch_weights(tvm.IRModule(dict(mod.functions)), target)
    assert changed == ["kernel"]
    assert rewritten["kernel"].script().count("T.prefetch(") == 1
    # in the row loop, just before the loop over k1 (which keeps the accumulators in registers), not inside it
    row_loop = next(s for s in _statements(rewritten["kernel"].body)
                    if isinstance(s, tvm.tirx.For) and s.loop_var.name == "r")
    assert [part.loop_var.name for part in row_loop.body.seq] == ["prefetch_line", "k_1"]

    _assert_builds_the_product(mod, target, weights)


def _assert_builds_the_product(mod: tvm.IRModule, target, weights: np.ndarray) -> None:
    """``mod`` built through the shared pipeline computes its input times ``weights``."""
    rows = int(mod["main"].params[0].ty.shape[0])
    x = np.random.default_rng(1).standard_normal((rows, K)).astype(np.float32)
    vm = relax.VirtualMachine(pipeline.build(mod, target).executable, tvm.cpu())
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), _reference(x, weights),
                               rtol=1e-5, atol=1e-4)


def _prefetched_lines(func: tvm.tirx.PrimFunc, weights: str = "w") -> dict[tuple[int, ...], set[int]]:
    """For each iteration of the loops around the prefetches of ``weights``, the 64-byte lines they fetch,
    found by evaluating the inserted address and condition there."""
    stmt = next(s for s in _statements(func.body) if isinstance(s, tvm.tirx.For)
                and s.loop_var.name == "prefetch_line" and _prefetched_buffer(s) == weights)
    condition, call = stmt.body.condition, stmt.body.then_case.value
    offset = call.args[0].args[1]
    loops = next(found for realize, found in loops_and_blocks(func.body) if realize.block.name_hint == "update")
    around = loops[:[loop.loop_var.name for loop in loops].index("k_1")]
    lines: dict[tuple[int, ...], set[int]] = {}
    for values in itertools.product(*(range(int(loop.extent)) for loop in around)):
        for line in range(int(stmt.extent)):
            analyzer = Analyzer()
            for var, value in [*zip((loop.loop_var for loop in around), values), (stmt.loop_var, line)]:
                analyzer.bind(var, tvm.tirx.const(value, "int32"))
            if int(analyzer.simplify(condition)):
                lines.setdefault(values, set()).add(int(analyzer.simplify(offset)) // prefetch.LINE_BYTES)
    return lines


def _prefetched_buffer(stmt: tvm.tirx.For) -> str:
    """The name of the buffer whose lines a ``prefetch_line`` loop fetches."""
    address = stmt.body.then_case.value.args[0]
    return str(address.args[0].args[0].source)


def _statements(stmt):
    yield stmt
    for child in ("body", "then_case", "else_case", "block"):
        if getattr(stmt, child, None) is not None:
            yield from _statements(getattr(stmt, child))
    for part in getattr(stmt, "seq", []):
        yield from _statements(part)


def _step_lines(f: int, k: int, step: int = 64) -> set[int]:
    """The lines of step ``k`` of output channel block ``f`` (``step`` channels a step; none past the last)."""
    per_step = step * 64 * 4 // prefetch.LINE_BYTES
    first = (f * (K // step) + k) * per_step
    return set(range(first, first + per_step)) if k < K // step else set()


def test_each_step_prefetches_exactly_the_next_steps_weights(weights):
    mod, _ = prefetch.prefetch_weights(_module(ROWS_TIMES_WEIGHTS, weights), get_target("x86").tvm_target())
    lines = _prefetched_lines(mod["kernel"])  # keyed by (f0, k0, r)
    for f, k in itertools.product(range(4), range(8)):
        fetched = set().union(*(lines.get((f, k, r), set()) for r in range(4)))
        assert fetched == _step_lines(f, k + 1), (f, k)


def test_short_steps_prefetch_the_step_ahead_bytes_on_and_build_the_same_result(weights):
    target = get_target("x86").tvm_target()
    mod = _module(SHORT_STEPS, weights)
    rewritten, changed = prefetch.prefetch_weights(tvm.IRModule(dict(mod.functions)), target)
    assert changed == ["kernel"]
    ahead = prefetch.AHEAD_BYTES // (8 * 64 * 4)
    assert ahead > 1
    lines = _prefetched_lines(rewritten["kernel"])  # keyed by (f0, k0)
    for f, k in itertools.product(range(4), range(K // 8)):
        assert lines.get((f, k), set()) == _step_lines(f, k + ahead, step=8), (f, k)

    _assert_builds_the_product(mod, target, weights)


def test_weights_read_again_are_prefetched_on_the_first_pass_only(weights):
    mod, changed = prefetch.prefetch_weights(_module(ROWS_IN_TWO_PASSES, weights),
                                             get_target("x86").tvm_target())
    assert changed == ["kernel"]
    lines = _prefetched_lines(mod["kernel"])  # keyed by (f0, h, k0, r)
    for f, h, k in itertools.product(range(4), range(2), range(8)):
        fetched = set().union(*(lines.get((f, h, k, r), set()) for r in range(4)))
        assert fetched == (_step_lines(f, k + 1) if h == 0 else set()), (f, h, k)


def test_prefetch_leaves_alone_weights_other_threads_read_small_weights_and_non_x86_targets(weights, monkeypatch):
    x86 = get_target("x86").tvm_target()
    assert prefetch.prefetch_weights(_module(ROWS_SPLIT_OVER_THREADS, weights), x86)[1] == []
    assert prefetch.prefetch_weights(_module(ROWS_TIMES_WEIGHTS, weights), get_target("rasp4b").tvm_target())[1] == []
    monkeypatch.setattr(prefetch, "MIN_WEIGHT_BYTES", weights.nbytes + 1)
    assert prefetch.prefetch_weights(_module(ROWS_TIMES_WEIGHTS, weights), x86)[1] == []


def _two_kernels(first: tuple, second: tuple, weights: np.ndarray, next_weights: np.ndarray) -> tvm.IRModule:
    """A Relax ``main`` calling two kernels one after the other on the same input, each with its own constant
    weights."""
    rows = first[0]
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, K), "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            outputs = []
            for name, kernel, values in (("first", first, weights), ("second", second, next_weights)):
                gv = builder.add_func(_kernel(*kernel, name=name), name)
                outputs.append(builder.emit(relax.call_tir(gv, (x, relax.const(values)),
                                                           relax.TensorType((rows, F), "float32"))))
            out = builder.emit_output(relax.Tuple(outputs))
        builder.emit_func_output(out)
    return builder.get()


def test_a_kernel_prefetches_the_next_kernels_weights_that_each_of_its_threads_will_read(weights):
    target = get_target("x86").tvm_target()
    threads = int(target.attrs["num-cores"])
    next_weights = np.random.default_rng(2).standard_normal(WEIGHT_SHAPE).astype(np.float32)
    mod = _two_kernels(ROWS_TIMES_WEIGHTS, ROWS_TIMES_WEIGHTS, weights, next_weights)
    rewritten, changed = prefetch.prefetch_weights(tvm.IRModule(dict(mod.functions)), target)
    carrier = next(name for name in changed if name.startswith("first_"))
    call_tir, called = tvm.ir.Op.get("relax.call_tir"), []
    relax.analysis.post_order_visit(rewritten["main"].body, lambda expr: called.append(expr.args[0].name_hint) if (
        isinstance(expr, relax.Call) and expr.op.same_as(call_tir)) else None)
    assert called == [carrier, "second"]
    assert pipeline.fused_name(carrier) == "first"  # the task a per-kernel profile joins it to
    assert [str(param) for param in rewritten[carrier].params] == ["x", "w", "next_weights", "update"]
    # both kernels split the 4 output channel blocks (128 KB of weights each) over the threads in TVM's bands:
    # what thread t of the first fetches is what thread t of the second reads
    bands = list(filter(None, row_bands(4, threads)))
    thread_of = {f: t for t, (first, last) in enumerate(bands) for f in range(first, last + 1)}
    fetched: dict[int, set[int]] = {}
    for (f, *_), lines in _prefetched_lines(rewritten[carrier], "next_weights").items():
        fetched.setdefault(thread_of[f], set()).update(lines)
    block_lines = next_weights.nbytes // 4 // prefetch.LINE_BYTES
    assert fetched == {t: set(range(first * block_lines, (last + 1) * block_lines))
                       for t, (first, last) in enumerate(bands)}

    x = np.random.default_rng(1).standard_normal((ROWS_TIMES_WEIGHTS[0], K)).astype(np.float32)
    vm = relax.VirtualMachine(pipeline.build(mod, target).executable, tvm.cpu())
    first, second = vm["main"](tvm.runtime.tensor(x))
    np.testing.assert_allclose(first.numpy(), _reference(x, weights), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(second.numpy(), _reference(x, next_weights), rtol=1e-5, atol=1e-4)


def test_no_kernel_prefetches_the_next_ones_weights_inside_its_accumulation_loop_or_past_its_cache(weights,
                                                                                                   monkeypatch):
    target = get_target("x86").tvm_target()
    one_loop = (4, "f0 r k0 k1 f3", K)  # the whole reduction in one loop: the accumulators' registers
    assert prefetch.prefetch_weights(_two_kernels(one_loop, ROWS_TIMES_WEIGHTS, weights, weights), target)[1] == [
        "second"]
    monkeypatch.setattr(prefetch, "NEXT_FOOTPRINT_BYTES", weights.nbytes // 2)  # its own weights fill it
    assert prefetch.prefetch_weights(_two_kernels(ROWS_TIMES_WEIGHTS, ROWS_TIMES_WEIGHTS, weights, weights),
                                     target)[1] == ["first", "second"]
