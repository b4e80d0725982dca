"""Software prefetch of large weights in tuned x86 kernels.

Inside a model, a convolution's weights are no longer in the core's L2 when it runs: the rest of the model
pushed them out, so they come from L3. A tuned kernel reads them in bursts (V1's 7x7 1x1 convolutions read
a 16 KB block of weights in their first pixel row, then reuse it from L1 for six more), faster than L3
delivers them, and the hardware prefetchers stop at each 4 KB page. This pass makes such a kernel fetch a
block of weights ahead into L2 while it computes on the current one (the next block, or the one
:data:`AHEAD_BYTES` on), a few cache lines at a time, outside the loop that keeps the accumulators in
registers. V1's 1024->1024 convolution took 500 µs in the model without it and 389 µs with it, its
512->1024 one 256 and 205 µs (bench/README.md, item 30).

A kernel's own prefetches start a block ahead, so its first blocks still come from L3, and a kernel whose
parallel iterations read the same block again (V2's 7x7 960->160 and 960->320 convolutions, seven pixel rows
per block of 32 output channels) gets none. So each kernel with large weights also fetches the next such
kernel's: each of its threads the part that the same thread of the next kernel reads, spread over the slots
in front of its accumulation loop, as far as its own working set leaves room in L2
(:data:`NEXT_FOOTPRINT_BYTES`). A copy of the kernel takes the next weights as one more argument. In V2's
model order, its 960->160 convolutions took 44-54 µs against 54-61 without, its 960->320 one 101-103
against 109-116; V2 and V3-Large ran about 1% faster, V2-0.5-160 2-3% (bench/README.md, item 46).

The rewrite runs on scheduled TIR after the tuned records are applied, so tuning records and their
workloads are unchanged: MetaSchedule measures each kernel alone, with its weights warm, where the prefetch
neither helps nor hurts (338 against 336 µs for that convolution)."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass

import tvm
from tvm import relax
from tvm.sym.analyzer import Analyzer

from .search_space import loops_and_blocks, row_bands

LINE_BYTES = 64
MIN_WEIGHT_BYTES = 256 * 1024
"""Smaller weights are left alone: they fit the L2 beside the activations, and their blocks are too short
for a prefetch to get ahead."""
MAX_BLOCK_BYTES = 128 * 1024
"""A kernel that reads more weights than this per step of its outer reduction loop is left alone: the
next step's weights would push out the current ones."""
MIN_LANES_PER_LINE = 64
"""A kernel doing fewer multiply-adds than this per line of weights it prefetches is left alone: one that
uses each weight once or twice (the classifier's matrix-vector product) reads its weights in order, which
the hardware prefetchers follow, and the prefetches only add instructions (136 -> 145 µs in V1)."""
MIN_LANES_BETWEEN_SLOTS = 4096
"""Prefetches spread between the pixel loops of a step go only where the accumulation loop inside does at
least this many multiply-adds. V1's 14x14 1x1 convolutions (one pixel x 32 channels per slot, 1,024
multiply-adds, 14 slots a step) ran 2.2x slower with them, even with the prefetches skipped on all but the
first pass. Their disassembly says why: without a prefetch, LLVM keeps the 14 pixels' accumulators in
registers and loads each weight vector once for all of them; with one in the step, it runs the pixels one
after another and every multiply-add reads its weights from memory again. A step whose slots hold many
more accumulators than the registers (the 7x7 layers) is stored slot by slot anyway and loses nothing."""
AHEAD_BYTES = 8 * 1024
"""How far ahead of a step's own weights its prefetches reach, at least: a step that reads fewer bytes
fetches the block that many steps on, because one short step ahead is too soon for weights coming from L3.
V2's 320->1280 convolution at 7x7 reads 512 bytes a step: in model order it took 170 µs with its prefetches
one step ahead, 161 at 2 KB ahead, 146 at 8 KB, 156 at 16 KB and 175 at 32 KB (bench/README.md item 44).
Every other kernel the shipped x86 logs prefetch reads 8 KB or more a step, and builds as before."""
PREFETCH_TO_L2 = 2
"""``llvm.prefetch`` locality 2: ``prefetcht1`` on x86, into L2 and not L1, where the current block lives."""
COPY_SUFFIX = "_next"
"""A kernel copied to prefetch the next kernel's weights is named ``<kernel>_next<n>``."""
NEXT_FOOTPRINT_BYTES = 1280 * 1024
"""A kernel prefetches the next kernel's weights only as far as its activations, its own weights (per thread)
and those fit in this much of its core's L2. Set on the CPU it was measured on (2 MB of L2 per core); with
1.5 MB and no room for activations, V1's 14x14 256->512 convolution took 392 against 309 µs alone. On a Zen 4
with 1 MB of L2, V2 built with 640 KB ran as fast as with this (bench/README.md item 47)."""


def copied_from(kernel: str) -> str:
    """The kernel a copy made by this pass came from (``kernel`` itself for any other)."""
    original, _, number = kernel.rpartition(COPY_SUFFIX)
    return original if original and number.isdigit() else kernel


def applies_to(target: tvm.target.Target) -> bool:
    """Only x86 CPUs: the only ones where the gain was measured."""
    if target.kind.name != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "")) or platform.machine()
    return triple.startswith(("x86_64", "amd64", "AMD64"))


def prefetch_weights(mod: tvm.IRModule, target: tvm.target.Target) -> tuple[tvm.IRModule, list[str]]:
    """``mod`` with weight prefetches added to its scheduled kernels, and the kernels that got them."""
    if not applies_to(target):
        return mod, []
    changed = []
    for gv, weights in _constant_arguments(mod).items():
        func = mod[gv]
        rewritten = func
        for index in sorted(weights):
            rewritten = _prefetch_one(rewritten, rewritten.params[index])
        if not rewritten.same_as(func):
            mod.update_func(gv, rewritten)
            changed.append(gv.name_hint)
    mod, copies = _prefetch_next_weights(mod, int(target.attrs.get("num-cores", 1)))
    kept = {gv.name_hint for gv in mod.functions}
    return mod, sorted([name for name in changed if name in kept] + copies)


def _constant_arguments(mod: tvm.IRModule) -> dict[relax.GlobalVar, set[int]]:
    """For each kernel ``main`` calls, the positions of the arguments that are constants at every call."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    found: dict[relax.GlobalVar, set[int]] = {}

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and expr.op.same_as(call_tir) and isinstance(expr.args[1], relax.Tuple):
            gv = expr.args[0]
            constants = {i for i, arg in enumerate(expr.args[1].fields) if isinstance(arg, tvm.ir.expr.Constant)}
            found[gv] = found[gv] & constants if gv in found else constants

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return {gv: positions for gv, positions in found.items() if positions and isinstance(mod[gv], tvm.tirx.PrimFunc)}


def _loads_of(expr, weight) -> list:
    """The loads of the ``weight`` parameter in ``expr``."""
    if isinstance(expr, tvm.ir.expr.TensorLoad):
        here = [expr] if expr.source.same_as(weight) else []
        return here + [load for index in expr.indices for load in _loads_of(index, weight)]
    children = [getattr(expr, name) for name in ("a", "b", "value", "condition", "true_value", "false_value")
                if hasattr(expr, name)]
    children += list(getattr(expr, "args", []))
    return [load for child in children if isinstance(child, tvm.ir.expr.Expr) for load in _loads_of(child, weight)]


def _uses(expr, var) -> bool:
    return any(v.same_as(var) for v in tvm.tirx.analysis.undefined_vars(expr))


def _bound(expr, values: dict) -> tvm.ir.expr.Expr:
    """``expr`` with each var in ``values`` replaced by its value, simplified. A value must not use its own
    var: the analyzer substitutes again until nothing changes."""
    analyzer = Analyzer()
    for var, value in values.items():
        analyzer.bind(var, value)
    return analyzer.simplify(expr)


@dataclass(frozen=True)
class _Nest:
    """The loops around the first reduction block of a kernel that reads a weight, and what it reads there."""

    loops: tuple
    flat: tvm.ir.expr.Expr
    """The element of the flattened weight read, in the loops' variables."""
    reduce_loops: frozenset
    """The ids of the loops the reduction runs over."""
    load: tvm.ir.expr.Expr
    first: int
    """The position of the loop just inside the parallel one (0 without one)."""


def _nest(func: tvm.tirx.PrimFunc, weight) -> _Nest | None:
    """The nest of the first reduction block of ``func`` that reads ``weight``; None without one, or where its
    loops have symbolic or mixed-type bounds (nothing this pass was measured on)."""
    if not hasattr(weight.ty, "shape"):
        return None
    shape = [int(extent) for extent in weight.ty.shape]
    strides = [math.prod(shape[k + 1:]) for k in range(len(shape))]
    for realize, loops in loops_and_blocks(func.body):
        block = realize.block
        reduce_values = [value for iv, value in zip(block.iter_vars, realize.iter_values)
                         if iv.iter_type == tvm.tirx.IterVar.CommReduce]
        loads = _loads_of(getattr(block.body, "value", None), weight) if reduce_values else []
        if not loads:
            continue
        index_types = {str(bound.ty) for loop in loops for bound in (loop.min, loop.extent)}
        if len(index_types) > 1 or not all(isinstance(loop.extent, tvm.tirx.IntImm) for loop in loops):
            return None
        block_values = {iv.var: value for iv, value in zip(block.iter_vars, realize.iter_values)}
        flat = _bound(sum(index * stride for index, stride in zip(loads[0].indices, strides)), block_values)
        reduce_loops = frozenset(id(loop) for loop in loops
                                 if any(_uses(value, loop.loop_var) for value in reduce_values))
        first = next((k + 1 for k, loop in enumerate(loops) if loop.kind == tvm.tirx.ForKind.PARALLEL), 0)
        return _Nest(tuple(loops), flat, reduce_loops, loads[0], first)
    return None


def _prefetchable(weight) -> bool:
    """Whether ``weight`` (a parameter or a constant) is worth prefetching: MIN_WEIGHT_BYTES or more, and
    under 2 GB, since the prefetch addresses are int32 element offsets."""
    return hasattr(weight.ty, "shape") and MIN_WEIGHT_BYTES <= _bytes(weight) < 2**31


def _prefetch_one(func: tvm.tirx.PrimFunc, weight) -> tvm.tirx.PrimFunc:
    """``func`` with prefetches of ``weight`` in the first reduction block that reads it (``func`` itself
    where the weight is small or the loop nest has no place for them)."""
    if not _prefetchable(weight):
        return func
    nest = _nest(func, weight)
    plan = nest and _plan(nest, [int(extent) for extent in weight.ty.shape], _itemsize(weight))
    return func.with_body(_insert_before(func.body, *plan)) if plan else func


def _bytes(value) -> int:
    """The size of a tensor-typed parameter or constant."""
    return math.prod(int(extent) for extent in value.ty.shape) * _itemsize(value)


def _itemsize(value) -> int:
    return tvm.runtime.DataType(str(value.ty.dtype)).itemsize


def _span(flat, loops, depth: int) -> int:
    """How many elements of the flat weight buffer one iteration of ``loops[depth - 1]`` spans: the loops
    inside it run, the loops around it at their start."""
    analyzer = Analyzer()
    for loop in loops[depth:]:
        analyzer.bind(loop.loop_var, tvm.ir.Range.from_min_extent(loop.min, loop.extent))
    bound = analyzer.const_int_bound(_bound(flat, {loop.loop_var: loop.min for loop in loops[:depth]}))
    return int(bound.max_value) - int(bound.min_value) + 1


def _step(nest: _Nest) -> int | None:
    """The step loop: the outermost reduction loop inside the parallel one that moves through the weights."""
    loops = nest.loops
    step = next((k for k in range(nest.first, len(loops)) if id(loops[k]) in nest.reduce_loops
                 and int(loops[k].extent) > 1 and _uses(nest.flat, loops[k].loop_var)), None)
    return step if step is not None and loops[step].kind == tvm.tirx.ForKind.SERIAL else None


def _front(nest: _Nest, step: int) -> int | None:
    """Where prefetches go inside a step: in front of the accumulation loop (the innermost reduction loop)
    and its unit-extent parents. Its accumulators stay in registers only if nothing inside it may write
    memory; None where the step loop is that loop itself, or a loop between them is not serial."""
    loops, reduce_loops = nest.loops, nest.reduce_loops
    inner = [k for k in range(len(loops)) if id(loops[k]) in reduce_loops and int(loops[k].extent) > 1]
    if inner[-1] <= step:
        return None
    front = inner[-1]
    while front - 1 > step and (id(loops[front - 1]) in reduce_loops or int(loops[front - 1].extent) == 1):
        front -= 1
    return None if any(loop.kind != tvm.tirx.ForKind.SERIAL for loop in loops[step + 1:front]) else front


def _plan(nest: _Nest, shape: list[int], itemsize: int):
    """(the loop to put the prefetches in front of, the prefetch statement), or None where the loop nest
    has no step that moves on through the weights without coming back to them."""
    loops, flat, first = nest.loops, nest.flat, nest.first
    step = _step(nest)
    if step is None:
        return None
    # a loop around it that the weights do not depend on reads them again, from L2 after its first pass:
    # only that pass prefetches. A parallel loop whose iterations read the same weights (one output
    # channel block, several pixel rows) has no first pass to tell apart: such kernels are left alone
    rereads = [loop for loop in loops[first:step] if int(loop.extent) > 1 and not _uses(flat, loop.loop_var)]
    if first and _span(flat, loops, first) * int(loops[first - 1].extent) > math.prod(shape):
        return None
    front = _front(nest, step)
    if front is None:
        return None
    slot_loops = loops[step + 1:front]
    step_loop = loops[step]
    span = _span(flat, loops, step + 1) * itemsize  # the weights one step reads
    if span > MAX_BLOCK_BYTES:
        return None
    # one step's advance through the weights; the buffer's layout is affine in the loops, so it is constant
    at_start = {loop.loop_var: loop.min for loop in loops}
    advance = _bound(_bound(flat, {**at_start, step_loop.loop_var: step_loop.min + 1}) - _bound(flat, at_start), {})
    if not isinstance(advance, tvm.tirx.IntImm) or int(advance.value) <= 0:
        return None
    lines = math.ceil(span / LINE_BYTES)
    per_slot = math.ceil(lines / math.prod(int(loop.extent) for loop in slot_loops))
    lanes = math.prod(int(loop.extent) for loop in loops[front:])
    if lanes < MIN_LANES_PER_LINE * per_slot or (per_slot < lines and lanes < MIN_LANES_BETWEEN_SLOTS):
        return None
    index_type = str(step_loop.extent.ty)
    # which of the slots this is, counting the loops between the step loop and the accumulation loop
    slot = tvm.tirx.const(0, index_type)
    for loop in slot_loops:
        slot = slot * loop.extent + (loop.loop_var - loop.min)
    line = tvm.tirx.Var("prefetch_line", index_type)
    position = slot * per_slot + line
    ahead = math.ceil(AHEAD_BYTES / span)  # in steps; at least one
    next_block = _bound(flat, {loop.loop_var: loop.min for loop in loops[step + 1:]}) + advance * ahead
    in_range = tvm.tirx.And(position < lines, step_loop.loop_var + ahead < step_loop.min + step_loop.extent)
    for loop in rereads:
        in_range = tvm.tirx.And(in_range, loop.loop_var == loop.min)
    element = next_block + position * (LINE_BYTES // itemsize)
    return loops[front].loop_var, _prefetch_loop(nest.load.source, element, itemsize, line, per_slot, in_range)


def _prefetch_loop(weights, element, itemsize: int, line, count: int, condition) -> tvm.tirx.For:
    """``for line in range(count): if condition: prefetch(&weights[element])`` into L2, ``element`` counted in
    the flattened buffer. Its address is a byte offset from the buffer's start: affine in the loops, so it
    costs an add, where the element's multi-dimensional index would cost a division per dimension."""
    index_type = str(line.ty)
    address = tvm.tirx.call_intrin(
        "handle", "tirx.handle_add_byte_offset",
        tvm.tirx.address_of(tvm.tirx.BufferLoad(weights, [tvm.tirx.const(0, index_type)] * len(weights.ty.shape))),
        (element * itemsize).astype("int32"))
    prefetch = tvm.tirx.Evaluate(tvm.tirx.call_intrin("void", "tirx.prefetch", address, 0, PREFETCH_TO_L2, 1))
    return tvm.tirx.For(line, tvm.tirx.const(0, index_type), tvm.tirx.const(count, index_type),
                        tvm.tirx.ForKind.SERIAL, tvm.tirx.IfThenElse(condition, prefetch, None))


def _insert_before(stmt, loop_var, statement):
    """``stmt`` with ``statement`` run just before the loop over ``loop_var``, each time that loop starts."""
    if isinstance(stmt, tvm.tirx.For):
        if stmt.loop_var.same_as(loop_var):
            return tvm.tirx.SeqStmt([statement, stmt])
        return tvm.tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind,
                            _insert_before(stmt.body, loop_var, statement), stmt.thread_binding, stmt.annotations)
    if isinstance(stmt, tvm.tirx.SeqStmt):
        return tvm.tirx.SeqStmt([_insert_before(part, loop_var, statement) for part in stmt.seq])
    if isinstance(stmt, tvm.s_tir.SBlockRealize):
        block = stmt.block
        return tvm.s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, tvm.s_tir.SBlock(
            block.iter_vars, block.reads, block.writes, block.name_hint,
            _insert_before(block.body, loop_var, statement), block.init, block.alloc_buffers,
            block.match_buffers, block.annotations))
    if isinstance(stmt, tvm.tirx.IfThenElse):
        return tvm.tirx.IfThenElse(stmt.condition, _insert_before(stmt.then_case, loop_var, statement),
                                   stmt.else_case and _insert_before(stmt.else_case, loop_var, statement))
    return stmt


def _thread_ranges(nest: _Nest | None, threads: int) -> list[tuple[int, int]] | None:
    """The elements of a kernel's weights (first, past the last) that each of its threads reads, ``nest`` being
    :func:`_nest` of the kernel and those weights: TVM's CPU runtime gives each thread one band of its parallel
    loop (:func:`row_bands`)."""
    if nest is None or not nest.first:
        return None
    loops, parallel = nest.loops, nest.loops[nest.first - 1]
    analyzer = Analyzer()
    for loop in loops[nest.first:]:
        analyzer.bind(loop.loop_var, tvm.ir.Range.from_min_extent(loop.min, loop.extent))
    outer = {loop.loop_var: loop.min for loop in loops[:nest.first - 1]}
    reads = []
    for iteration in range(int(parallel.extent)):
        bound = analyzer.const_int_bound(_bound(nest.flat, {**outer, parallel.loop_var: parallel.min + iteration}))
        reads.append((int(bound.min_value), int(bound.max_value) + 1))
    return [(min(lo for lo, _ in reads[a:b + 1]), max(hi for _, hi in reads[a:b + 1]))
            for a, b in filter(None, row_bands(len(reads), threads))]


def _next_weights_plan(nest: _Nest, next_weight, ranges: list[tuple[int, int]], room: int, threads: int):
    """(the loop to put them in front of, the prefetches) that make thread t of a kernel fetch, spread over
    the slots in front of its accumulation loop, up to ``room`` elements of ``ranges[t]`` of ``next_weight``
    (nothing for a thread past the last range); None where the kernel has no such slots."""
    loops, first = nest.loops, nest.first
    step = _step(nest)
    front = None if step is None or not first else _front(nest, step)
    if front is None:
        return None
    elements_per_line = LINE_BYTES // _itemsize(next_weight)
    lines = min(math.ceil(min(hi - lo, room) / elements_per_line) for lo, hi in ranges)
    parallel = loops[first - 1]
    chunk = math.ceil(int(parallel.extent) / threads)  # TVM's iterations per thread (row_bands)
    slots = chunk * math.prod(int(loop.extent) for loop in loops[first:front])  # per thread
    per_slot = math.ceil(lines / slots) if lines > 0 else 0
    lanes = math.prod(int(loop.extent) for loop in loops[front:])
    between = any(int(loop.extent) > 1 for loop in loops[step + 1:front])
    if not per_slot or lanes < MIN_LANES_PER_LINE * per_slot or (between and lanes < MIN_LANES_BETWEEN_SLOTS):
        return None
    index_type = str(parallel.extent.ty)
    thread = (parallel.loop_var - parallel.min) // chunk
    slot = parallel.loop_var - parallel.min - thread * chunk  # this thread's slots, counted in loop order
    for loop in loops[first:front]:
        slot = slot * loop.extent + (loop.loop_var - loop.min)
    start = tvm.tirx.const(ranges[-1][0], index_type)
    for t in reversed(range(len(ranges) - 1)):
        start = tvm.tirx.Select(thread == t, tvm.tirx.const(ranges[t][0], index_type), start)
    line = tvm.tirx.Var("prefetch_line", index_type)
    position = slot * per_slot + line
    due = position < lines
    if len(ranges) < threads:
        due = tvm.tirx.And(thread < len(ranges), due)
    return loops[front].loop_var, _prefetch_loop(next_weight, start + position * elements_per_line,
                                                 _itemsize(next_weight), line, per_slot, due)


def _calls_with_weights(mod: tvm.IRModule) -> list[tuple[relax.Call, int]]:
    """The kernel calls in ``main``, in order, whose largest constant argument is :func:`_prefetchable`, each
    with that argument's position."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    found = []

    def visit(expr: relax.Expr) -> None:
        if (isinstance(expr, relax.Call) and expr.op.same_as(call_tir) and isinstance(expr.args[1], relax.Tuple)
                and isinstance(mod[expr.args[0]], tvm.tirx.PrimFunc)):
            sizes = {i: _bytes(arg) for i, arg in enumerate(expr.args[1].fields)
                     if isinstance(arg, tvm.ir.expr.Constant) and hasattr(arg.ty, "shape")}
            largest = max(sizes, key=sizes.get, default=None)
            if largest is not None and _prefetchable(expr.args[1].fields[largest]):
                found.append((expr, largest))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def _with_next_weights(func: tvm.tirx.PrimFunc, call: relax.Call, own: int, following: tvm.tirx.PrimFunc,
                       theirs: int, threads: int) -> tvm.tirx.PrimFunc | None:
    """``func`` taking the next kernel's weights as one more input, after its own, and prefetching what each of
    its threads will read there, as much as NEXT_FOOTPRINT_BYTES leaves room for; None where it cannot."""
    ranges = _thread_ranges(_nest(following, following.params[theirs]), threads)
    nest = _nest(func, func.params[own])
    own_ranges = _thread_ranges(nest, threads)
    if not ranges or not own_ranges:
        return None
    inputs = len(call.args[1].fields)
    constants = {i for i, arg in enumerate(call.args[1].fields) if isinstance(arg, tvm.ir.expr.Constant)}
    activations = sum(_bytes(param) for i, param in enumerate(func.params)
                      if i not in constants and hasattr(param.ty, "shape"))
    own_bytes = max(hi - lo for lo, hi in own_ranges) * _itemsize(func.params[own])
    next_weight = tvm.ir.expr.Var("next_weights", following.params[theirs].ty)
    room = (NEXT_FOOTPRINT_BYTES - activations - own_bytes) // _itemsize(next_weight)
    plan = _next_weights_plan(nest, next_weight, ranges, room, threads) if room > 0 else None
    if plan is None:
        return None
    params = [*func.params[:inputs], next_weight, *func.params[inputs:]]
    return tvm.tirx.PrimFunc(params, _insert_before(func.body, *plan), func.ret_type, func.attrs)


def _prefetch_next_weights(mod: tvm.IRModule, threads: int) -> tuple[tvm.IRModule, list[str]]:
    """``mod`` where each kernel call with large weights, where it can, also prefetches the next such call's
    weights (a copy of its kernel taking them as an extra argument), and the names of those copies."""
    calls = _calls_with_weights(mod)
    builder = relax.BlockBuilder(mod)
    copies: dict[tuple[str, str, int], relax.GlobalVar | None] = {}
    rewrites: list[tuple[relax.Call, relax.GlobalVar, relax.Expr]] = []
    for (call, own), (following, theirs) in zip(calls, calls[1:]):
        key = (call.args[0].name_hint, following.args[0].name_hint, theirs)
        if key not in copies:
            func = _with_next_weights(mod[call.args[0]], call, own, mod[following.args[0]], theirs, threads)
            copies[key] = func and builder.add_func(func, f"{key[0]}{COPY_SUFFIX}{len(copies)}")
        if copies[key] is not None:
            rewrites.append((call, copies[key], following.args[1].fields[theirs]))
    if not rewrites:
        return mod, []
    calls = [(call, relax.Call(call.op, [copy, relax.Tuple([*call.args[1].fields, weights]), *call.args[2:]],
                               call.attrs, call.ty_args)) for call, copy, weights in rewrites]
    return replace_calls(builder.get(), calls), sorted({copy.name_hint for _, copy, _ in rewrites})


def replace_calls(mod: tvm.IRModule, replacements: list[tuple[relax.Call, relax.Call]]) -> tvm.IRModule:
    """``mod`` with each call of ``main`` that is the first of a pair in ``replacements`` (the very object) replaced
    by the second, and the functions and bindings no call uses any more removed. Shared with
    :mod:`tvmnet.expand_fusion`."""

    @relax.expr_functor.mutator
    class ReplaceCalls(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            new = next((new for old, new in replacements if old.same_as(call)), None)
            return new if new is not None else super().visit_call_(call)

    mutator = ReplaceCalls(mod)
    main = mutator.builder_.get().get_global_var("main")
    mutator.builder_.update_func(main, mutator.visit_expr(mutator.builder_.get()[main]))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get())
