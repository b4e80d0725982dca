"""The search space tuning uses: MetaSchedule's defaults plus a pixel-padded variant of badly tiling 1x1 convs.

The padded variant is only worth having if its schedules compute the same model and apply through the
ordinary database path, so the test builds a model from a padded record and checks it against onnxruntime.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import tvmnet
from tvmnet.search_space import padded_pixels

from conftest import ATOL, RTOL, log_of_design_spaces, ort_run


@pytest.mark.parametrize("pixels, padded", [(49, 50), (9, 10), (7, None), (1, None), (196, None), (25, None),
                                            (36, None), (16, None), (121, 124)])
def test_padded_pixels_picks_the_nearest_count_a_register_tile_divides(pixels, padded):
    assert padded_pixels(pixels) == padded


def _model():
    from tvmnet import zoo

    return zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96)  # its last feature maps are 3x3: 9 pixels


@pytest.mark.timeout(300)
def test_a_padded_schedule_applies_from_a_log_and_matches_onnxruntime(tmp_path):
    from tvmnet import search_space

    model = _model()
    log_dir = tmp_path / "log"
    padded_tasks = log_of_design_spaces(model, log_dir, keep=lambda sch: search_space.is_padded(sch.trace))
    # the 1x1 convolutions on 3x3 pixels: the expansions and projections of the last blocks, and the head
    assert len(padded_tasks) >= 3, padded_tasks

    artifact = tvmnet.compile(model, output=tmp_path / "padded", tuning_logs=log_dir)
    compiled = tvmnet.load(artifact)
    assert set(padded_tasks) <= set(compiled.manifest["schedules"]["tuned"]), compiled.manifest["schedules"]
    spec = compiled.inputs[0]
    x = np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
    np.testing.assert_allclose(compiled.run(x), ort_run(model, {spec.name: x})[0], rtol=RTOL, atol=ATOL)


def test_only_cpu_targets_search_padded_variants():
    import tvm
    from tvm import te

    from tvmnet.search_space import padded_seeds, space_for
    from tvmnet.targets import get_target

    a = te.placeholder((4,), name="a")
    mod = tvm.IRModule({"main": te.create_prim_func([a, te.compute((4,), lambda i: a[i] + 1.0)])})
    kinds = [type(rule).__name__ for rule in space_for(mod, get_target("x86").tvm_target()).sch_rules]
    # PadPixels comes back from TVM as the wrapper of a Python rule, the only one among the defaults
    assert kinds.count("_PyScheduleRule") == 1 and kinds[kinds.index("AutoInline") + 1] == "_PyScheduleRule", kinds
    assert space_for(mod, get_target("cuda").tvm_target()) == "post-order-apply"
    assert padded_seeds(mod, get_target("cuda").tvm_target()) == []


@pytest.mark.timeout(420)
def test_padded_seeds_carry_the_register_tiles_the_padding_is_for(tmp_path):
    from tvmnet import pipeline, search_space, tune
    from tvmnet.frontend import load_onnx
    from tvmnet.targets import get_target

    target = get_target("x86").tvm_target()
    fused = pipeline.fuse(load_onnx(_model()).to_relax(), target)
    seeded = []
    for task in tune.extract_tasks(fused, target):
        seeds = search_space.padded_seeds(task.dispatched[0], target)
        if not seeds:
            continue
        seeded.append((task, len(seeds)))
        for trace in seeds:
            assert _replays_as_the_search_does(trace, task.dispatched[0], target), task.task_name
        for trace in seeds:
            assert search_space.is_padded(trace)
            tiles = [trace.decisions[inst] for inst in trace.insts if inst.kind.name == "SamplePerfectTile"]
            # 9 pixels padded to 10, 5 per register tile; the postprocessing (parallel, vectorize) included
            assert [int(d) for d in tiles[1]] == [1, 2, 1, 5], tiles
            assert {"Parallel", "Vectorize"} <= {inst.kind.name for inst in trace.insts}
    assert len(seeded) >= 3

    # `tune --remeasure 1 --trials 0` measures a task's seeds into its log, once: not again when the log
    # holds a padded record of this CPU
    task, count = seeded[0]
    log = tmp_path / "log"
    lines: list[str] = []
    tune.tune(_model(), trials=0, remeasure=1, tasks=[task.task_name], log_dir=log, progress=lines.append)
    assert any("measuring the padded seeds of 1 task(s)" in line for line in lines), lines
    database = tune.open_database(log)
    records = list(database.get_all_tuning_records())
    assert len(records) == count and all(search_space.is_padded(record.trace) for record in records), lines
    (task,) = tune._as_stored([task], database)
    ranked = tune._tuned_by_speed(database, [task], lambda cpu: cpu == tune.cpu_of(target))
    assert tune._padded_seeds([task], ranked, target) == [[]]


def _replays_as_the_search_does(trace, workload, target) -> bool:
    """The evolutionary search takes a task's fastest records from the database, replays each without
    its postprocessing and runs the postprocessors again (MetaSchedule's ThreadedTraceApply)."""
    from tvmnet.search_space import _postprocessed, space_for

    return _postprocessed(trace, workload, space_for(workload, target).postprocs) is not None


@pytest.mark.timeout(300)
def test_tune_marks_the_postprocessing_of_seeds_made_without_the_marker(tmp_path):
    """Seeds made before 2026-12-04 had no EnterPostproc: the search replayed their postprocessing and
    ran RewriteLayout again on top, and TVM aborted the whole tune on an internal check (V1 and
    V3-Small on a new CPU, whose fresh seeds were among each task's fastest records)."""
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    from tvmnet import pipeline, search_space, tune
    from tvmnet.frontend import load_onnx
    from tvmnet.targets import get_target

    target = get_target("x86").tvm_target()
    fused = pipeline.fuse(load_onnx(_model()).to_relax(), target)
    workload, seeds = next((task.dispatched[0], seeds[:2]) for task in tune.extract_tasks(fused, target)
                           if len(seeds := search_space.padded_seeds(task.dispatched[0], target)) >= 2)
    olds = {}  # run time -> trace, as padded_seeds made them: postprocessors run without entering postprocessing
    for time, seed in zip((1e-6, 2e-6), seeds):
        old = Schedule(workload)
        seed.apply_to_schedule(old, remove_postproc=True)
        assert all(postproc.apply(old) for postproc in search_space.space_for(workload, target).postprocs)
        assert not search_space.has_postproc_marker(old.trace)
        olds[time] = old.trace
    with pytest.raises(Exception, match="initial_indices_orig"):  # the abort, as TVM 0.27 has it
        _replays_as_the_search_does(olds[1e-6], workload, target)

    log = tmp_path / "log"
    log.mkdir()
    stale = ms.database.JSONDatabase(work_dir=str(log))
    for time, trace in olds.items():  # two seeds of one task share its marker
        stale.commit_tuning_record(ms.database.TuningRecord(
            trace, stale.commit_workload(workload), [time], target,
            ms.arg_info.ArgInfo.from_entry_func(workload, remove_preproc=True)))
    messages: list[str] = []
    records = tune.open_database(log, repair=True, warn=messages.append).get_all_tuning_records()
    assert "marked where postprocessing starts in 2 padded seed record" in messages[0], messages
    assert sorted(float(record.run_secs[0]) for record in records) == sorted(olds)
    for record in records:
        assert search_space.has_postproc_marker(record.trace)
        assert _replays_as_the_search_does(record.trace, workload, target)
        # the same schedule and time: only the marker was added
        assert str(record.trace).replace("  sch.enter_postproc()\n", "") == str(olds[float(record.run_secs[0])])
    # the file was rewritten: a second open finds nothing to mark
    messages.clear()
    tune.open_database(log, repair=True, warn=messages.append)
    assert messages == []


def _pointwise_nhwc(rows: int = 28, stride: int = 1):
    """A 1x1 NHWC convolution with a ReLU epilogue on a ``rows`` x ``rows`` map: the shape SplitRows is about
    (with ``stride`` 2, a map of half the rows, rounded up, as a stride-2 layer writes)."""
    import tvm
    from tvm import te

    out = -(-rows // stride)
    x = te.placeholder((1, rows, rows, 8), name="x")
    w = te.placeholder((8, 16), name="w")
    k = te.reduce_axis((0, 8), name="k")
    conv = te.compute((1, out, out, 16), lambda n, h, v, c: te.sum(x[n, h * stride, v * stride, k] * w[k, c], axis=k),
                      name="conv")
    relu = te.compute(conv.shape, lambda *i: te.max(conv(*i), 0.0), name="relu")
    return tvm.IRModule({"main": te.create_prim_func([x, w, relu])})


def _parallel_over(workload, axes: str):
    """``workload`` with its ReLU's loops reordered so ``axes`` (a prefix like "hw" or "c") come first,
    fused, and parallel; the convolution computed inside each ReLU iteration."""
    from tvm.s_tir import Schedule

    sch = Schedule(workload)
    relu = sch.get_sblock("relu")
    n, h, v, c = sch.get_loops(relu)
    c_outer, c_inner = sch.split(c, [2, 8])
    by_name = {"h": h, "w": v, "c": c_outer}
    first = [by_name[a] for a in axes]
    rest = [loop for loop in (n, h, v, c_outer) if loop not in first and loop != n]
    sch.reorder(n, *first, *rest, c_inner)
    sch.parallel(sch.fuse(n, *first))
    sch.compute_at(sch.get_sblock("conv"), sch.get_loops(relu)[-1])
    return sch


@pytest.mark.parametrize("axes, rows, follows", [
    ("h", [(0, 13), (14, 27)], True),    # each thread a contiguous half of the rows
    ("hw", [(0, 13), (14, 27)], True),   # rows and columns fused: 392 pixels each, still whole rows
    ("c", [(0, 27), (0, 27)], False),    # each thread half the channels of every row
    ("wh", [(0, 27), (0, 27)], False),   # columns outermost: every thread writes every row
    ("", None, True),                    # a parallel loop of one iteration: one thread writes it all
])
def test_split_rows_reads_which_rows_each_thread_writes(axes, rows, follows):
    from tvmnet import search_space

    sch = _parallel_over(_pointwise_nhwc(), axes)
    func = sch.mod["main"]
    assert search_space.thread_rows(func, 2) == rows
    assert search_space.splits_rows(func, 2) is follows
    assert search_space.SplitRows(2).apply(sch) is follows
    assert search_space.splits_rows(func, 1)  # one thread: nothing to split
    # small maps are left free: there the weights, not the activations, are what each core should share
    assert search_space.splits_rows(_parallel_over(_pointwise_nhwc(14), axes).mod["main"], 2)
    assert search_space.constrains(_pointwise_nhwc(), 2) and not search_space.constrains(_pointwise_nhwc(14), 2)


def test_a_stride_2_layer_after_a_split_map_splits_its_odd_rows_in_tvms_bands():
    """7 output rows from 14: thread 0 writes rows 0-3 and thread 1 rows 4-6, as TVM's runtime deals out a
    parallel loop of 7; such a layer, and only such a layer, is one where ``compile`` prefers rows split so."""
    from tvmnet import search_space

    assert search_space.row_bands(7, 2) == [(0, 3), (4, 6)]
    assert search_space.row_bands(28, 2) == [(0, 13), (14, 27)]
    assert search_space.row_bands(5, 4) == [(0, 1), (2, 3), (4, 4), None]  # the last thread left without rows
    halving = _pointwise_nhwc(14, stride=2)
    by_rows, by_channels = (_parallel_over(halving, axes).mod["main"] for axes in ("h", "c"))
    assert search_space.thread_rows(by_rows, 2) == [(0, 3), (4, 6)]
    assert search_space.splits_rows(by_rows, 2, min_rows=1, uneven=True)
    assert not search_space.splits_rows(by_channels, 2, min_rows=1, uneven=True)
    assert search_space.splits_rows(by_channels, 2, min_rows=1)  # odd rows: left free unless uneven
    assert search_space.halves_a_split_map(halving, 2) and not search_space.halves_a_split_map(halving, 1)
    assert not search_space.halves_a_split_map(_pointwise_nhwc(14), 2)  # its output is as large: a map of its own
    assert not search_space.halves_a_split_map(_pointwise_nhwc(12, stride=2), 2)  # read from a map left free
    assert not search_space.halves_a_split_map(_pointwise_nhwc(14, stride=2), 4)  # 14 rows do not split in 4


def test_cpu_search_spaces_split_rows_over_the_targets_cores():
    import tvm

    from tvmnet.search_space import space_for

    for cores, follows in ((1, True), (2, False), (4, False), (3, True)):  # 28 rows do not split in 3
        target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": cores})
        postprocs = space_for(_pointwise_nhwc(), target).postprocs
        # SplitRows comes back from TVM as the wrapper of a Python postprocessor, after MetaSchedule's own
        assert [type(p).__name__ for p in postprocs].index("_PyPostproc") == len(postprocs) - 1
        assert postprocs[-1].apply(_parallel_over(_pointwise_nhwc(), "wh")) is follows, cores
        assert postprocs[-1].apply(_parallel_over(_pointwise_nhwc(), "h"))


@pytest.mark.parametrize("rows, stride, rows_seconds, untuned_seconds, applied", [
    (28, 1, 2e-5, None, "h"), (28, 1, 3e-5, None, "c"), (28, 1, 2e-5, 1.5e-5, "h"), (28, 1, 2e-5, 0.9e-5, "untuned"),
    (14, 1, 1.1e-5, None, "h"), (14, 1, 1.2e-5, None, "c"), (12, 1, 1.01e-5, None, "c"),
    (14, 2, 1.4e-5, None, "h"), (14, 2, 1.6e-5, None, "c"), (12, 2, 1.01e-5, None, "c"),
])
def test_compile_prefers_a_record_that_splits_rows_unless_it_is_much_slower(
        tmp_path, rows, stride, rows_seconds, untuned_seconds, applied):
    """A log searched before SplitRows holds faster records that split channels; compile takes the fastest
    record that splits rows when it is at most SPLIT_ROWS_SLOWDOWN (2.5x) slower alone. An untuned kernel
    that measured fastest (the floor) stays: it runs on one thread (in CI, a 4-trial search's record that
    split rows replaced one); one that did not is never what the rule prefers. Maps of 14 to 27 rows, which
    the search leaves free, take one within SMALL_MAP_SLOWDOWN (1.15x); the stride-2 layers after them within
    HALVED_MAP_SLOWDOWN (1.5x), their 7 rows in bands of 4 and 3; smaller maps the fastest."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tvmnet import search_space, tune

    workload = _pointwise_nhwc(rows, stride)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 2})
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    entry = database.commit_workload(workload)
    schedules = [(_parallel_over(workload, "c").trace, 1e-5), (_parallel_over(workload, "h").trace, rows_seconds)]
    if untuned_seconds is not None:
        schedules.append((tvm.s_tir.schedule.Trace([], {}), untuned_seconds))
    for trace, seconds in schedules:
        database.commit_tuning_record(ms.database.TuningRecord(
            trace, entry, [seconds], target, ms.arg_info.ArgInfo.from_entry_func(workload, remove_preproc=True)))

    def chosen(build_target) -> str:
        (record,) = tune.compile_database(tmp_path, target=build_target).get_all_tuning_records()
        if tune.is_baseline(record):
            return "untuned"
        return "h" if search_space.trace_splits_rows(record.trace, workload, 2, min_rows=1, uneven=True) else "c"

    assert chosen(target) == applied
    one_thread = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 1})
    fastest = "untuned" if untuned_seconds is not None and untuned_seconds < 1e-5 else "c"
    assert chosen(one_thread) == fastest  # one thread: nothing to split, the fastest record applies


@pytest.mark.timeout(300)
def test_split_seeds_share_a_serial_squeeze_excitation_kernel_and_match_onnxruntime(tmp_path):
    """Every shipped record of MobileNetV3's squeeze-and-excitation kernels (a 1x1 convolution on one pixel
    that scales the feature map) ran on one thread; `split_seeds` splits such a schedule's outermost tile
    across the threads. The seed must run in parallel, keep the rest of the tiling, apply from a log and
    compute what onnxruntime does; a parallel schedule gets no seeds (bench/README.md item 35)."""
    from tvm.s_tir import meta_schedule as ms

    from tvmnet import pipeline, search_space, tune, zoo
    from tvmnet.frontend import load_onnx
    from tvmnet.targets import get_target

    target = get_target("x86").tvm_target()
    threads = search_space.threads_of(target)
    if threads < 2:
        pytest.skip("split seeds are for two or more threads")
    model = zoo.build_model("mobilenet_v3_large", alpha=0.25, resolution=96)
    fused = pipeline.fuse(load_onnx(model).to_relax(), target)
    def on_one_pixel(task) -> bool:
        image = ms.arg_info.ArgInfo.from_entry_func(task.dispatched[0], remove_preproc=True)[0]
        return [int(d) for d in image.shape][1:3] == [1, 1]

    task = next(task for task in tune.extract_tasks(fused, target)
                if task.task_name.startswith("fused_conv2d") and "multiply" in task.task_name and on_one_pixel(task))
    workload = task.dispatched[0]
    space = search_space.space_for(workload, target)
    def with_outer_tiles_of_one(trace):
        """``trace`` with every spatial loop whole in its second tile level, postprocessed."""
        for inst in search_space.spatial_tiles(trace):
            trace = trace.with_decision(inst, [1, math.prod(int(f) for f in trace.decisions[inst]), 1, 1], True)
        return search_space._postprocessed(trace, workload, space.postprocs)

    designs = ms.TuneContext(mod=workload, target=target, space_generator=space,
                             task_name=task.task_name).generate_design_space()
    # the design space that computes the scaling at the outermost tile, as every shipped record did, runs serially
    serial = next((sch for sch in map(with_outer_tiles_of_one, (design.trace for design in designs))
                   if sch is not None and search_space.runs_serially(sch.trace)), None)
    assert serial is not None, task.task_name

    seeds = search_space.split_seeds(serial.trace, workload, target)
    assert seeds, task.task_name
    for seed in seeds:
        assert not search_space.runs_serially(seed)
        split = [[int(f) for f in seed.decisions[inst]] for inst in search_space.spatial_tiles(seed)]
        assert sorted(factors[0] for factors in split) == [1] * (len(split) - 1) + [threads], split
        assert search_space.split_seeds(seed, workload, target) == []
    (tmp_path / "log").mkdir()
    database = ms.database.JSONDatabase(work_dir=str(tmp_path / "log"))
    record = ms.database.TuningRecord(seeds[0], database.commit_workload(workload), [1e-6], target,
                                      ms.arg_info.ArgInfo.from_entry_func(workload, remove_preproc=True))
    database.commit_tuning_record(record)
    # the fastest record is parallel: no seeds
    assert tune._seeds_from_fastest([task], [[record]], target, search_space.split_seeds) == [[]]

    artifact = tvmnet.compile(model, output=tmp_path / "split", tuning_logs=tmp_path / "log")
    compiled = tvmnet.load(artifact)
    assert task.task_name in compiled.manifest["schedules"]["tuned"], compiled.manifest["schedules"]
    spec = compiled.inputs[0]
    x = np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
    np.testing.assert_allclose(compiled.run(x), ort_run(model, {spec.name: x})[0], rtol=RTOL, atol=ATOL)


def test_row_seeds_widen_the_column_tile_to_a_whole_row_and_compute_the_same():
    """`row_seeds` folds the column loop's two outer tiles into the tile between the reductions (V1's
    512->512 convolution at 14x14 ran 0.97x its fastest record so, bench/README.md item 38) and changes nothing
    else; a schedule already so gets none, and the seed computes what the convolution does."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tvmnet import search_space

    target = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64", "num-cores": 2})
    workload = _pointwise_nhwc(14)
    space = search_space.space_for(workload, target)
    designs = ms.TuneContext(mod=workload, target=target, space_generator=space,
                             task_name="row seeds").generate_design_space()

    spatial_tiles = search_space.spatial_tiles
    trace = next(design.trace for design in designs if len(spatial_tiles(design.trace)) == 4)
    for inst, factors in zip(spatial_tiles(trace), ([1, 1, 1, 1], [2, 7, 1, 1], [2, 1, 7, 1], [1, 2, 1, 8])):
        trace = trace.with_decision(inst, factors, True)
    record = search_space._postprocessed(trace, workload, space.postprocs)
    assert record is not None

    seeds = search_space.row_seeds(record.trace, workload, target)
    assert len(seeds) == 1
    assert [[int(f) for f in seeds[0].decisions[inst]] for inst in spatial_tiles(seeds[0])] == [
        [1, 1, 1, 1], [2, 7, 1, 1], [1, 1, 14, 1], [1, 2, 1, 8]]
    assert search_space.row_seeds(seeds[0], workload, target) == []
    assert search_space.row_seeds(record.trace, workload, tvm.target.Target("cuda")) == []

    sch = tvm.s_tir.Schedule(workload)
    seeds[0].apply_to_schedule(sch, remove_postproc=False)
    kernel = tvm.compile(sch.mod, target=target)
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 14, 14, 8), dtype="float32"), rng.standard_normal((8, 16), dtype="float32")
    out = tvm.runtime.tensor(np.zeros((1, 14, 14, 16), "float32"))
    kernel(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_allclose(out.numpy(), np.maximum(x @ w, 0), rtol=1e-5, atol=1e-5)
