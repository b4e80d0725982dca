"""The MetaSchedule search space tvmnet tunes CPU tasks in: the target's default rules plus pixel padding.

MetaSchedule splits a loop only into factors that divide it. A 1x1 convolution on MobileNet's last 7x7
feature maps has 49 pixels = 7 x 7, so its register tile is 7 pixels by one vector of output channels (7 x 2
vectors would need more than AVX2's 16 registers) and it runs at about 80% of the FMA peak where larger ones
reach 90-97%. Computing 50 pixels, the last one zeros and discarded, allows a 5 x 2-vector tile: 23-27% faster
alone (bench/README.md item 22). :class:`PadPixels` adds that padded variant of each such block to the design
spaces beside the unpadded one, so the search, not a rule of thumb, decides per task and per CPU.

The padding is a schedule, not a change to the task: records of both variants live under the same workload,
so logs tuned before it still apply, and applying a record replays its trace with no tvmnet code involved.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import tvm
from tvm.s_tir import Schedule
from tvm.s_tir.schedule import SBlockRV, ScheduleError, Trace
from tvm.s_tir.meta_schedule.postproc import PyPostproc
from tvm.s_tir.meta_schedule.schedule_rule import PyScheduleRule
from tvm.sym.analyzer import Analyzer
from tvm.ir.utils import derived_object

TILE_ROWS = (4, 5, 6)
"""Pixel counts per register tile that fill 16 vector registers with 2-3 vectors of output channels."""

SEED_FLOATS = (8, 16, 32)
"""Output channels per register tile in :func:`padded_seeds`: one or more vectors of AVX2, AVX-512 or NEON."""

MAX_WASTE = 1 / 8
"""The largest share of extra (discarded) pixels a padding may add."""


def padded_pixels(pixels: int) -> int | None:
    """The pixel count to compute instead of ``pixels`` (the fewest extra ones that one of the
    :data:`TILE_ROWS` divides), or None if ``pixels`` already tiles well or padding would waste too much."""
    if any(pixels % rows == 0 for rows in TILE_ROWS):
        return None
    for padded in range(pixels + 1, pixels + int(pixels * MAX_WASTE) + 1):
        if any(padded % rows == 0 for rows in TILE_ROWS):
            return padded
    return None


def _extents(block) -> list[int] | None:
    extents = [iv.dom.extent for iv in block.iter_vars]
    return [int(e) for e in extents] if all(isinstance(e, tvm.tirx.IntImm) for e in extents) else None


def pad_pointwise(sch: Schedule, block: SBlockRV) -> bool:
    """Turn an NHWC 1x1 stride-1 convolution ``block`` into a matmul over flattened pixels, padded to
    :func:`padded_pixels`: the input rows are copied into a zero-padded buffer, the extra output rows are
    never read, and the epilogues (bias, activation, residual) iterate over flattened pixels too, so
    MultiLevelTiling can fuse them into the tile. False, with ``sch`` unusable, if ``block`` is not one."""
    stmt = sch.get(block)
    extents = _extents(stmt)
    kinds = [iv.iter_type for iv in stmt.iter_vars]
    spatial, reduce = tvm.tirx.IterVar.DataPar, tvm.tirx.IterVar.CommReduce
    if (extents is None or len(extents) != 7 or kinds != [spatial] * 4 + [reduce] * 3
            or len(stmt.writes) != 1 or len(stmt.reads) != 2 or extents[0] != 1 or extents[4:6] != [1, 1]):
        return False
    _, height, width, channels = extents[:4]
    padded = padded_pixels(height * width)
    if padded is None:
        return False
    input_copy = sch.reindex(block, ("read", 0))
    output_copy = sch.reindex(block, ("write", 0))
    if _extents(sch.get(input_copy)) != [1, height, width, extents[6]]:
        return False  # the input is not read pixel for pixel: a strided or dilated window

    def flatten(n, h, w, c):
        return n, h * width + w, c

    sch.transform_layout(block, ("read", 0), flatten)
    sch.transform_layout(block, ("write", 0), flatten)
    sch.transform_block_layout(block, lambda n, h, w, f, ry, rx, rc: (n, h * width + w, f, ry, rx, rc))
    sch.pad_einsum(block, [1, padded, 1, 1, 1, 1])
    sch.compute_inline(input_copy)
    sch.compute_inline(sch.get_producers(output_copy)[0])  # the copy of the real rows out of the padded result
    if sch.get_consumers(output_copy):
        sch.compute_inline(output_copy)
    for epilogue in sch.get_consumers(block):
        if _extents(sch.get(epilogue)) != [1, height, width, channels]:
            return False
        sch.transform_block_layout(epilogue, flatten)
    return True


@derived_object
class PadPixels(PyScheduleRule):
    """Offer a pixel-padded variant (:func:`pad_pointwise`) of each 1x1 convolution whose pixel count
    tiles badly, beside the block as it is. Placed after AutoInline and before MultiLevelTiling."""

    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, sch: Schedule, block: SBlockRV) -> list[Schedule]:
        padded = sch.copy()
        try:
            applies = pad_pointwise(padded, block)
        except ScheduleError:  # a block of another shape than the ones checked above
            applies = False
        return [sch, padded] if applies else [sch]

    def clone(self) -> "PadPixels":
        return PadPixels()


MIN_SPLIT_ROWS = 28
"""Feature maps of at least this many rows are split across threads by rows (:class:`SplitRows`). Smaller
maps are left to the search: there a layer's weights outweigh its activations (V2's 14x14 layers hold up
to 450 KB of activations and 1.3 MB of weights) and splitting output channels divides the weights."""

MIN_PREFERRED_ROWS = 14
"""Maps of this many rows up to :data:`MIN_SPLIT_ROWS` stay free in the search, but ``compile`` prefers a
record that splits their rows when one is nearly as fast alone (``tune.SMALL_MAP_SLOWDOWN``): V1's ten 14x14
kernels in a row ran 2% faster in the model so, each up to 7% slower alone; where only some kernels of a
chain can, or only much slower ones, the model gains nothing or loses (bench/README.md item 43)."""


def loops_and_blocks(stmt, loops: tuple = (), found: list | None = None) -> list:
    """(block realize, the loops around it) for every block under ``stmt``."""
    found = [] if found is None else found
    if isinstance(stmt, tvm.tirx.For):
        loops_and_blocks(stmt.body, (*loops, stmt), found)
    elif isinstance(stmt, tvm.tirx.SeqStmt):
        for part in stmt.seq:
            loops_and_blocks(part, loops, found)
    elif isinstance(stmt, tvm.s_tir.SBlockRealize):
        found.append((stmt, loops))
        loops_and_blocks(stmt.block.body, loops, found)
    elif isinstance(stmt, tvm.tirx.IfThenElse):
        loops_and_blocks(stmt.then_case, loops, found)
        if stmt.else_case is not None:
            loops_and_blocks(stmt.else_case, loops, found)
    elif hasattr(stmt, "body"):
        loops_and_blocks(stmt.body, loops, found)
    return found


def _output_writer(func: tvm.tirx.PrimFunc):
    """(block realize, its loops) of the last block that writes ``func``'s output, or None."""
    output = str(func.params[-1])
    writers = [(realize, loops) for realize, loops in loops_and_blocks(func.body)
               if any(str(region.source) == output for region in realize.block.writes)]
    return writers[-1] if writers else None


def thread_rows(func: tvm.tirx.PrimFunc, threads: int) -> list[tuple[int, int] | None] | None:
    """The first and last output row each of ``threads`` threads writes in a scheduled NHWC kernel (None for
    a thread left without work): TVM's CPU runtime gives thread t the iterations [t*c, (t+1)*c) of the
    outermost parallel loop, c its extent / threads rounded up. None if the output is not written by a 4-D
    block inside a parallel loop of at least ``threads`` iterations."""
    return _thread_rows(_output_writer(func), threads)


def _thread_rows(writer, threads: int) -> list[tuple[int, int] | None] | None:
    """:func:`thread_rows` of the kernel whose output ``writer`` (from :func:`_output_writer`) writes."""
    if writer is None or len(writer[0].iter_values) != 4:
        return None
    realize, loops = writer
    parallel = next((loop for loop in loops if loop.kind == tvm.tirx.ForKind.PARALLEL), None)
    if parallel is None or int(parallel.extent) < threads:
        return None
    rows = []
    for iterations in row_bands(int(parallel.extent), threads):
        if iterations is None:
            rows.append(None)
            continue
        first, last = iterations
        analyzer = Analyzer()
        for loop in loops:
            if not loop.same_as(parallel):
                analyzer.bind(loop.loop_var, tvm.ir.Range.from_min_extent(loop.min, loop.extent))
        analyzer.bind(parallel.loop_var, tvm.ir.Range.from_min_extent(first, last - first + 1))
        bound = analyzer.const_int_bound(realize.iter_values[1])
        rows.append((int(bound.min_value), int(bound.max_value)))
    return rows


def _split_height(writer, threads: int, min_rows: int = MIN_SPLIT_ROWS, uneven: bool = False) -> int | None:
    """The output rows of the kernel whose output ``writer`` writes (scheduled or not) where :class:`SplitRows`
    would split them, or None where the rule leaves it free: one thread, fewer than ``min_rows`` rows, rows
    that ``threads`` does not divide (unless ``uneven``), an output that is not 4-D."""
    shape = _extents(writer[0].block) if writer is not None else None
    if shape is None or len(shape) != 4 or shape[1] < max(min_rows, threads):
        return None
    if shape[1] % threads and not uneven:
        return None
    return shape[1]


def row_bands(height: int, threads: int) -> list[tuple[int, int] | None]:
    """The first and last row each thread writes when a parallel loop runs over ``height`` rows (the first and
    last iteration of any parallel loop, which :func:`thread_rows` maps to rows): TVM's CPU runtime gives each
    thread ceil(height / threads) iterations, the last one fewer (4 and 3 of 7), and a thread past the end none."""
    share = math.ceil(height / threads)
    return [(first, min(height, first + share) - 1) if first < height else None
            for first in range(0, share * threads, share)]


def splits_rows(func: tvm.tirx.PrimFunc, threads: int, min_rows: int = MIN_SPLIT_ROWS,
                uneven: bool = False) -> bool:
    """Whether a scheduled kernel follows :class:`SplitRows`: true for kernels the rule leaves free, and for
    kernels that run on one thread (the fastest schedule of a MobileNetV3 squeeze-excitation's scaling of
    a 28x28 map is serial, 5 µs, against 30 µs for the fastest parallel one)."""
    if threads < 2:
        return True
    writer = _output_writer(func)
    height = _split_height(writer, threads, min_rows, uneven)
    rows = _thread_rows(writer, threads) if height is not None else None
    return rows is None or rows == row_bands(height, threads)


def constrains(workload: tvm.IRModule, threads: int, min_rows: int = MIN_SPLIT_ROWS, uneven: bool = False) -> bool:
    """Whether :class:`SplitRows` constrains the schedules of ``workload`` on ``threads`` threads (with
    ``min_rows`` or ``uneven``: whether it would, were those maps split by rows too)."""
    return threads >= 2 and _split_height(_output_writer(workload["main"]), threads, min_rows, uneven) is not None


def halves_a_split_map(workload: tvm.IRModule, threads: int) -> bool:
    """Whether ``workload`` is a stride-2 layer that reads a map :class:`SplitRows` or ``compile`` splits by rows
    (its first argument, at least :data:`MIN_PREFERRED_ROWS` rows that the threads divide) and writes a smaller
    one. Split by rows too, in TVM's bands (rows 0-3 and 4-6 of 7 from 14), each thread reads its input from
    its own core but for one row; split by channels, half of it from the other core."""
    func = workload["main"]
    shape = getattr(func.params[0].ty, "shape", ())
    writer = _output_writer(func)
    out = _extents(writer[0].block) if writer is not None else None
    if threads < 2 or len(shape) != 4 or out is None or len(out) != 4:
        return False
    rows = int(shape[1])
    return rows >= MIN_PREFERRED_ROWS and rows % threads == 0 and out[1] < MIN_PREFERRED_ROWS


def trace_splits_rows(trace: Trace, workload: tvm.IRModule, threads: int, min_rows: int = MIN_SPLIT_ROWS,
                      uneven: bool = False) -> bool:
    """Whether a record's schedule of ``workload`` follows :class:`SplitRows` (false if it does not replay)."""
    sch = Schedule(workload)
    try:
        trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception:  # noqa: BLE001 - TVM reports a failed replay as ScheduleError or an internal error
        return False
    return splits_rows(sch.mod["main"], threads, min_rows, uneven)


@derived_object
class SplitRows(PyPostproc):
    """Keep only schedules whose threads split a large feature map's rows evenly: thread t of T writes
    the t-th band of H/T rows in every such kernel, so the bands line up from layer to layer (a stride-2
    layer's band reads the band of twice the rows before it).

    Each thread then reads what it wrote in the layer before from its own core's cache, where a kernel
    split by columns or channels reads half its input from the other core's. Searches time kernels alone,
    with the whole input warm in both cores' caches, so they cannot see this, and the rule has to be part
    of the space. Measured in V2 on an Intel Xeon (bench/README.md item 28): its 56x56 depthwise
    convolution, split by columns, took 227-233 µs in the model against 59 µs alone; split by rows, as
    searched with this rule (55.6 against 53.7 µs alone), 96-103 µs."""

    def __init__(self, threads: int):
        self.threads = threads

    def _initialize_with_tune_context(self, context) -> None:
        pass

    def apply(self, sch: Schedule) -> bool:
        return splits_rows(sch.mod["main"], self.threads)

    def clone(self) -> "SplitRows":
        return SplitRows(self.threads)


def space_for(mod: tvm.IRModule, target: tvm.target.Target):
    """The space generator for tuning ``mod`` on ``target``: on CPUs, PostOrderApply with MetaSchedule's
    defaults for the target, :class:`PadPixels` after AutoInline and :class:`SplitRows` after the default
    postprocessors; elsewhere MetaSchedule's own default."""
    from tvm.s_tir import meta_schedule as ms

    if "cpu" not in target.keys:
        return "post-order-apply"
    defaults = ms.TuneContext(mod=mod, target=target, space_generator="post-order-apply", task_name="defaults")
    generator = defaults.space_generator
    rules = list(generator.sch_rules)
    after = next(i for i, rule in enumerate(rules) if isinstance(rule, ms.schedule_rule.AutoInline)) + 1
    rules.insert(after, PadPixels())
    postprocs = [*generator.postprocs, SplitRows(threads_of(target))]
    return ms.space_generator.PostOrderApply(sch_rules=rules, postprocs=postprocs,
                                             mutator_probs=dict(generator.mutator_probs))


def threads_of(target: tvm.target.Target) -> int:
    """The threads a CPU target's kernels run on: its ``num-cores`` (MetaSchedule requires it)."""
    return int(target.attrs.get("num-cores", 1))


def is_padded(trace) -> bool:
    """Whether a schedule's trace is one of :class:`PadPixels`'s padded variants."""
    return any(inst.kind.name == "PadEinsum" for inst in trace.insts)


def padded_seeds(workload: tvm.IRModule, target: tvm.target.Target) -> list:
    """Postprocessed traces of ``workload``'s padded design spaces with the register tiles the padding is
    for: a tile row of :data:`TILE_ROWS` pixels dividing the padded count, :data:`SEED_FLOATS` output
    channels, the input channels reduced outside the tile, fully unrolled (9 for a convolution at 7x7).
    Empty if the workload has no padded variant or ``target`` is not a CPU.

    Tuning measures these first. Measured on V1's 1024->1024 convolution at 7x7, the 5 x 16 one ran 29%
    faster than the best of 1,097 unpadded trials, while 67 padded trials of the evolutionary search,
    warm-started from those 1,097, found none faster than the unpadded best (bench/README.md item 23): its
    cost model has seen no padded schedule and the tile is one of thousands of ways to split 50 pixels,
    1024 outputs and 1024 inputs. Once measured, the seeds join the search's initial population."""
    from tvm.s_tir import meta_schedule as ms

    if "cpu" not in target.keys:
        return []
    context = ms.TuneContext(mod=workload, target=target, space_generator=space_for(workload, target),
                             task_name="padded seeds")
    seeds = []
    for space in context.generate_design_space():
        trace = space.trace
        if not is_padded(trace):
            continue
        # MultiLevelTiling samples one tile per loop of the padded block: batch, pixels, output channels,
        # the two unit loops of the 1x1 window, input channels
        tiles = [inst for inst in trace.insts if inst.kind.name == "SamplePerfectTile"]
        unroll = [inst for inst in trace.insts if inst.kind.name == "SampleCategorical"]
        if len(tiles) != 6 or len(unroll) != 1:
            continue
        pixels, channels, inputs = (math.prod(int(d) for d in trace.decisions[tiles[i]]) for i in (1, 2, 5))
        for rows in (rows for rows in TILE_ROWS if pixels % rows == 0):
            for floats in (floats for floats in SEED_FLOATS if channels % floats == 0):
                seed = trace.with_decision(tiles[1], [1, pixels // rows, 1, rows], True)
                seed = seed.with_decision(tiles[2], [channels // floats, 1, 1, floats], True)
                seed = seed.with_decision(tiles[5], [inputs, 1], True)
                seed = seed.with_decision(unroll[0], len(unroll[0].attrs[0]) - 1, True)
                sch = _postprocessed(seed, workload, context.space_generator.postprocs)
                if sch is not None:
                    seeds.append(sch.trace)  # as the search stores a candidate: its postprocessing included
    return seeds


def runs_serially(trace) -> bool:
    """Whether a postprocessed schedule runs on one thread: its postprocessing parallelized no loop."""
    return not any(inst.kind.name == "Parallel" for inst in trace.insts)


def spatial_tiles(trace) -> list:
    """``trace``'s tile samples of spatial loops, in loop order: MultiLevelTiling splits each spatial loop into
    4 tiles (the outermost shared with the epilogue and parallelized) and each reduction loop into 2."""
    return [inst for inst in trace.insts if inst.kind.name == "SamplePerfectTile" and len(trace.decisions[inst]) == 4]


def split_seeds(trace, workload: tvm.IRModule, target: tvm.target.Target) -> list:
    """Postprocessed variants of a serial schedule ``trace`` of ``workload`` that split one spatial loop's
    outermost tile :func:`threads_of` ways (the factor taken from the next tile level it divides), so that
    the thread pool has that loop to share; the register tile is left as it is. Empty for a schedule that
    runs in parallel already, or when ``target`` is not a CPU of two or more threads.

    MetaSchedule parallelizes the loops a tiled block shares with the epilogue computed at its outermost
    tile. In MobileNetV3's squeeze-and-excitation kernels (a 1x1 convolution on one pixel that then scales
    the feature map) that tile had extent 1 in every record the shipped logs held for the `emeraldrapids`
    Xeon, so they ran on one core. Split two ways, V3-Large's 240->960 one ran in 0.56x the time of its
    fastest record alone (bench/README.md item 35)."""
    threads = threads_of(target)
    if "cpu" not in target.keys or threads < 2 or not runs_serially(trace):
        return []
    postprocs = space_for(workload, target).postprocs
    seeds = []
    for inst in spatial_tiles(trace):
        factors = [int(f) for f in trace.decisions[inst]]
        level = next((level for level in (1, 2) if factors[level] % threads == 0), None)
        if level is None:
            continue
        factors[0] *= threads
        factors[level] //= threads
        sch = _postprocessed(trace.with_decision(inst, factors, True), workload, postprocs)
        if sch is not None and not runs_serially(sch.trace):
            seeds.append(sch.trace)
    return seeds


def row_seeds(trace, workload: tvm.IRModule, target: tvm.target.Target) -> list:
    """Postprocessed variants of ``trace`` (a schedule of an NHWC convolution ``workload``) whose pixel tile
    between the two reduction tiles spans a whole row of the output: the column loop's two outer tiles are
    folded into it, so a chunk of weights loaded for one row of pixels serves every column before the next
    chunk. Empty if the columns already tile so, for other blocks than an NHWC convolution's (four spatial
    loops of four tiles each), or when ``target`` is not a CPU.

    In V1's 512->512 convolution at 14x14 (5 calls), the fastest record on the `emeraldrapids` Xeon ran
    half a row (7 pixels) per chunk; the whole row ran 0.97x its time side by side in ``tune`` (0.89x in a
    hand-written timer), and V1 with it ran about 0.96x as long (bench/README.md items 37 and 38). The search
    had found 51 such schedules for the task, none faster than that record: it changes its tiles together,
    and a single change to the one it ranks first is rare."""
    if "cpu" not in target.keys:
        return []
    tiles = spatial_tiles(trace)
    if len(tiles) != 4:  # batch, rows, columns, output channels
        return []
    columns = [int(f) for f in trace.decisions[tiles[2]]]
    if columns[0] == columns[1] == 1:
        return []
    widened = [1, 1, math.prod(columns[:3]), columns[3]]
    sch = _postprocessed(trace.with_decision(tiles[2], widened, True), workload, space_for(workload, target).postprocs)
    return [sch.trace] if sch is not None else []


def _postprocessed(trace, workload: tvm.IRModule, postprocs) -> Schedule | None:
    """``trace`` replayed on ``workload`` as the search replays a record: without its postprocessing,
    then ``postprocs`` run again after the ``EnterPostproc`` marker. None if a postprocessor refuses."""
    sch = Schedule(workload)
    trace.apply_to_schedule(sch, remove_postproc=True)
    sch.enter_postproc()
    return sch if all(postproc.apply(sch) for postproc in postprocs) else None


def has_postproc_marker(trace) -> bool:
    """Whether ``trace`` marks where its postprocessing starts (``EnterPostproc``).

    The evolutionary search replays a task's fastest records without their postprocessing and runs the
    postprocessors again. A trace without the marker keeps its postprocessing, so RewriteLayout rewrites
    the weights' layout a second time and TVM aborts the whole tune on an internal check
    (``args.size() == initial_indices_orig.size()``). Seeds made before 2026-12-04 lack it."""
    return any(inst.kind.name == "EnterPostproc" for inst in trace.insts)


def postproc_marker(workload: tvm.IRModule, target: tvm.target.Target) -> Callable[[Trace], Trace | None]:
    """A function that gives a padded seed's trace of ``workload`` on ``target`` with the ``EnterPostproc``
    marker put back where its postprocessing starts (after the instructions of the padded design space it
    was made from), or None if no such place gives a trace that replays the way the search replays it.
    The design spaces are generated once here, so that a log's many seeds of one task share them."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.schedule import Instruction, InstructionKind

    context = ms.TuneContext(mod=workload, target=target, space_generator=space_for(workload, target),
                             task_name="padded seeds")
    spaces = [[inst.kind.name for inst in space.trace.insts]
              for space in context.generate_design_space() if is_padded(space.trace)]
    marker = Instruction(InstructionKind.get("EnterPostproc"), [], [], [])

    def mark(trace: Trace) -> Trace | None:
        kinds = [inst.kind.name for inst in trace.insts]
        for start in sorted({len(space) for space in spaces if kinds[:len(space)] == space}):
            marked = Trace(list(trace.insts[:start]) + [marker] + list(trace.insts[start:]), dict(trace.decisions))
            try:
                if _postprocessed(marked, workload, context.space_generator.postprocs) is not None:
                    stored = Schedule(workload)
                    marked.apply_to_schedule(stored, remove_postproc=False)
                    return stored.trace  # made by TVM, so it serializes like any record's trace
            except Exception:  # noqa: BLE001 - TVM reports a failed replay as ScheduleError or an internal error
                pass
        return None

    return mark
