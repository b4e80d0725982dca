"""Tune a model's fused TIR functions with MetaSchedule into a JSON database that ``compile`` applies.

Tasks are extracted from :func:`tvmnet.pipeline.fuse`'s output, the very module ``compile``
schedules, so every record lands on a workload ``compile`` will look up.

The log directory defaults to ``tuning_logs/<target>/<fingerprint>/`` (root overridable with
``$TVMNET_TUNING_LOGS``), where the fingerprint hashes the task *workloads* (the structural hashes of
the fused PrimFuncs, which hold no weights): another MobileNetV2 of the same shape with other weights
finds the same log, and ``compile`` finds it without being told.

Durability: MetaSchedule's ``JSONDatabase.commit_record`` appends one line to
``database_tuning_record.json`` and closes the file, and the default ``AddToDatabase`` measure
callback commits every batch as soon as the task scheduler joins it, so a killed tune keeps every
joined batch. At most the batches in flight (built and sent to the runner, not yet joined) are lost.
A rerun into the same directory loads the database, counts the records already there against the
trial budget, and warm-starts the evolutionary search from them.

CPUs: every record keeps the target it was measured on, and times from two CPUs do not compare (the
shipped x86 logs were first tuned on a znver3 machine, then again on a znver5 one). So a tune counts
trials and floors of its own CPU only, and one that starts on a CPU new to the log first measures here
the record ``compile`` borrowed for each task (:func:`borrowed_elsewhere`); ``compile`` applies each
workload's fastest record of the build's CPU and falls back to another CPU's, with a warning, only where its
own CPU has none.

Concurrency: a tune holds an exclusive ``fcntl.flock`` on ``<log_dir>/.tune.lock``; a second tune
into the same directory fails at once with a :class:`TvmnetError` naming the holder's pid (it does
not wait: a tune takes hours, and silently queueing behind one is worse than being told).
"""

from __future__ import annotations

import errno
import hashlib
import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .errors import TvmnetError

Progress = Callable[[str], None]

LOG_ROOT_ENV = "TVMNET_TUNING_LOGS"
DEFAULT_LOG_ROOT = "tuning_logs"
LOCK_NAME = ".tune.lock"
WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
MODULE_EQUALITY = "structural"  # what build._load_database's JSONDatabase uses too
FAILED_SECONDS = 1e9  # MetaSchedule records failed runs with run_secs of 1e10
DUPLICATE_SIGNAL_S = 0.25  # a signal repeated sooner is one signal delivered twice (see _stop_on_interrupt)


@dataclass
class TaskResult:
    """One tuned task: its fused function's name, how often the model calls it, trials, best latency."""

    name: str
    weight: int
    trials: int
    """Records measured on this CPU in the database for this workload (earlier runs included)."""
    new_trials: int
    """Trials measured by this run."""
    best_us: float | None
    """Best measured latency in microseconds (the untuned kernel's included), None without any."""
    untuned_us: float | None = None
    """The untuned kernel's measured latency in microseconds (the floor), None if not measured."""

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "weight": self.weight, "trials": self.trials, "new_trials": self.new_trials,
                "best_us": self.best_us, "untuned_us": self.untuned_us}


@dataclass
class TuneResult:
    log_dir: Path
    target: str
    fingerprint: str
    runner: str
    tasks: list[TaskResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def trials(self) -> int:
        return sum(t.trials for t in self.tasks)

    @property
    def new_trials(self) -> int:
        return sum(t.new_trials for t in self.tasks)

    @property
    def estimated_us(self) -> float | None:
        """Sum over tasks of weight x best latency (None unless every task has a measurement)."""
        if not self.tasks or any(t.best_us is None for t in self.tasks):
            return None
        return sum(t.weight * t.best_us for t in self.tasks)

    def table(self) -> str:
        width = max([len("task")] + [len(t.name) for t in self.tasks])
        lines = [f"{'task':<{width}}  weight  trials      best µs   untuned µs"]
        for t in self.tasks:
            best = f"{t.best_us:12.1f}" if t.best_us is not None else f"{'-':>12}"
            untuned = f"{t.untuned_us:12.1f}" if t.untuned_us is not None else f"{'-':>12}"
            lines.append(f"{t.name:<{width}}  {t.weight:6d}  {t.trials:6d}  {best} {untuned}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, object]:
        return {"log_dir": str(self.log_dir), "target": self.target, "fingerprint": self.fingerprint,
                "runner": self.runner, "trials": self.trials, "new_trials": self.new_trials,
                "seconds": round(self.seconds, 2), "tasks": [t.to_json() for t in self.tasks]}


# ----------------------------------------------------------------------------------------------
# Tasks, fingerprint, default log dir


def _ms():
    from tvm.s_tir import meta_schedule as ms

    return ms


def _shash(mod) -> int:
    from tvm_ffi import structural_hash

    return int(structural_hash(mod))


def extract_tasks(fused, tvm_target) -> list:
    """MetaSchedule tasks of a fused module (one per distinct PrimFunc workload)."""
    return list(_ms().relax_integration.extract_tasks(fused, tvm_target, module_equality=MODULE_EQUALITY))


def fingerprint_tasks(tasks: Sequence) -> str:
    """A short hash of the set of task workloads: weights and function names do not enter it."""
    hashes = sorted({_shash(task.dispatched[0]) for task in tasks})
    digest = hashlib.sha256(",".join(f"{h:x}" for h in hashes).encode()).hexdigest()
    return digest[:16]


def log_root() -> Path:
    """Where default log directories live: ``$TVMNET_TUNING_LOGS``, else ``tuning_logs`` in the cwd."""
    return Path(os.environ.get(LOG_ROOT_ENV) or DEFAULT_LOG_ROOT)


def _target_spec(target):
    from .targets import TargetSpec, get_target

    return target if isinstance(target, TargetSpec) else get_target(target)


def _fused_of(model, tvm_target):
    """An ImportedModel or an already fused IRModule -> the fused IRModule."""
    from . import pipeline
    from .frontend import ImportedModel

    if isinstance(model, ImportedModel):
        return pipeline.fuse(model.to_relax(), tvm_target)
    return model


def default_log_dir(model, target) -> Path:
    """``<root>/<target name>/<workload fingerprint>`` for an ImportedModel or a fused IRModule.

    ``model`` must be fused with ``pipeline.fuse`` for the same target when it is an IRModule.
    """
    spec = _target_spec(target)
    return log_root() / spec.name / workload_fingerprint(model, spec)


def workload_fingerprint(model, target) -> str:
    """The fingerprint of ``model``'s tuning tasks for ``target``: the name of its log directory."""
    tvm_target = _target_spec(target).tvm_target()
    return fingerprint_tasks(extract_tasks(_fused_of(model, tvm_target), tvm_target))


def has_database(path: str | os.PathLike) -> bool:
    return (Path(path) / WORKLOAD_FILE).is_file()


# ----------------------------------------------------------------------------------------------
# Loading a database that may hold damaged lines


def open_database(log_dir: str | os.PathLike, *, repair: bool = False, warn: Progress | None = None):
    """``log_dir``'s JSONDatabase, with damaged lines reported (file and line number) and skipped.

    MetaSchedule aborts the whole load on the first bad line (a line cut short by a full disk, a stray
    blank line or a hand edit), without saying which. Fast path: TVM's own loader. If it fails, every
    line is checked on its own and only the good ones are loaded. ``repair=False`` (compile) loads a
    cleaned copy and leaves the files alone; ``repair=True`` (tune, holding the lock) moves the bad
    lines to ``<file>.corrupt`` and rewrites the file, so that new records append to a loadable database,
    and marks the postprocessing of older padded seeds, so that the search can replay them.
    """
    path = Path(log_dir)
    database = _open_checked_database(path, repair=repair, warn=warn)
    if repair and _mark_seed_postprocessing(path, warn=warn):
        database = _ms().database.JSONDatabase(work_dir=str(path), module_equality=MODULE_EQUALITY)
    return database


def _open_checked_database(path: Path, *, repair: bool, warn: Progress | None):
    ms = _ms()
    try:
        return ms.database.JSONDatabase(work_dir=str(path), module_equality=MODULE_EQUALITY)
    except Exception:  # noqa: BLE001 - TVM raises InternalError/RuntimeError/ValueError here alike
        pass
    workloads, records, bad = _check_database_lines(path)
    if not bad:  # TVM failed although every line checks out on its own: nothing we can skip
        raise TvmnetError(f"tuning database {path} cannot be loaded; move it aside and tune again")
    for name, numbers in bad.items():
        more = f" and {len(numbers) - 10} more" if len(numbers) > 10 else ""
        shown = ", ".join(str(n) for n in numbers[:10]) + more
        (warn or _warn)(f"warning: {path / name}: skipped {len(numbers)} damaged line(s): line {shown}")
    if repair:
        for name, lines in ((WORKLOAD_FILE, workloads), (RECORD_FILE, records)):
            if name in bad:
                original = (path / name).read_bytes()
                (path / f"{name}.corrupt").write_bytes(original)
                _write_lines_atomically(path / name, lines)
        target_dir = path
    else:
        import tempfile

        target_dir = Path(tempfile.mkdtemp(prefix="tvmnet-db-"))
        _write_lines_atomically(target_dir / WORKLOAD_FILE, workloads)
        _write_lines_atomically(target_dir / RECORD_FILE, records)
    try:
        return ms.database.JSONDatabase(work_dir=str(target_dir), module_equality=MODULE_EQUALITY)
    finally:
        if not repair:
            import shutil

            shutil.rmtree(target_dir, ignore_errors=True)  # the database is in memory now


def _mark_seed_postprocessing(path: Path, *, warn: Progress | None) -> int:
    """Put the ``EnterPostproc`` marker into the padded seed records of ``path`` made before seeds had
    it (:func:`search_space.has_postproc_marker`: without it the search aborts on them), rewriting the
    record file in place; a record that cannot be marked moves to ``<file>.corrupt``. Returns how many
    records changed. Called by ``tune`` only, holding the lock; ``compile`` applies such records as they are."""
    import json
    import tempfile

    from . import search_space

    records_file = path / RECORD_FILE
    lines = [line for _number, line in _numbered_lines(records_file)]
    stale = {i for i, line in enumerate(lines) if '"PadEinsum"' in line and '"EnterPostproc"' not in line}
    if not stale:
        return 0
    ms = _ms()
    workloads = [ms.database.Workload.from_json(json.loads(line))
                 for _number, line in _numbered_lines(path / WORKLOAD_FILE) if line.strip()]
    marked: list[tuple[int, int]] = []  # (line, workload index) of each record the serializer wrote, in order
    with tempfile.TemporaryDirectory(prefix="tvmnet-db-") as scratch:  # TVM writes the lines, as tune does
        serializer = ms.database.JSONDatabase(work_dir=scratch, module_equality=MODULE_EQUALITY)
        markers: dict[tuple[int, str], Callable] = {}  # one per task and CPU: their seeds share design spaces
        for i in sorted(stale):
            index, stored = json.loads(lines[i])
            record = ms.database.TuningRecord.from_json(stored, workloads[int(index)])
            key = (int(index), json.dumps(stored[2], sort_keys=True))
            if key not in markers:
                markers[key] = search_space.postproc_marker(record.workload.mod, record.target)
            trace = markers[key](record.trace)
            if trace is None:
                continue
            serializer.commit_tuning_record(ms.database.TuningRecord(
                trace, serializer.commit_workload(record.workload.mod), record.run_secs, record.target,
                record.args_info))
            marked.append((i, int(index)))
        written = [json.loads(line)[1] for _number, line in _numbered_lines(Path(scratch) / RECORD_FILE)]
    replaced = {i: json.dumps([index, stored], separators=(",", ":")) for (i, index), stored in zip(marked, written)}
    kept = [replaced.get(i, line) for i, line in enumerate(lines) if i not in stale or i in replaced]
    unmarked = [lines[i] for i in sorted(stale) if i not in replaced]
    if unmarked:
        with open(path / f"{RECORD_FILE}.corrupt", "a", encoding="utf-8") as stream:
            stream.write("".join(line + "\n" for line in unmarked))
    _write_lines_atomically(records_file, kept)
    (warn or _warn)(f"{path}: marked where postprocessing starts in {len(stale) - len(unmarked)} padded seed "
                    f"record(s) of an older tvmnet, which the search could not replay"
                    + (f"; moved {len(unmarked)} it could not mark to {RECORD_FILE}.corrupt" if unmarked else ""))
    return len(stale)


def compile_database(log_dir: str | os.PathLike, *, warn: Progress | None = None, target=None):
    """An in-memory database holding each workload's fastest measured record from ``log_dir`` (see
    below for the exception): what ``compile`` applies.

    TVM 0.27's JSONDatabase answers a query with a member of a Pareto front chosen by crowding
    distance, not with the fastest record (measured here: it skipped a 0.13 µs untuned floor for an
    8.3 µs candidate). MemoryDatabase sorts by mean run time, so the fastest record, the untuned floor
    included, is the one applied.

    Each record keeps the CPU it was measured on, and one log may hold records of several CPUs (a log
    tuned on one machine, then tuned again on another). Times from two CPUs do not compare, so when
    ``target`` (the build's ``tvm.target.Target``) is given, each workload takes its fastest record
    measured on the build's CPU and only a workload with none takes another CPU's fastest, of a CPU with
    the build's vector extension (:func:`targets.vector_isa`) where there is one; ``warn`` then says how many did:
    they apply and compute the same results, but were fastest elsewhere.

    Where the search space makes a workload split rows across threads (:class:`search_space.SplitRows`),
    the fastest record that does is applied instead when it is close enough (:func:`_preferred`).
    """
    here = cpu_of(target) if target is not None else None
    distance = _distance_from(target) if target is not None else lambda _record: 0
    ranked: dict[int, list[tuple[tuple[int, float], object]]] = {}
    for record in open_database(log_dir, warn=warn).get_all_tuning_records():
        secs = _record_seconds(record)
        if secs is not None:  # this CPU's records first
            ranked.setdefault(_shash(record.workload.mod), []).append(((distance(record), secs), record))
    best = [_preferred(sorted(records, key=lambda pair: pair[0]), target) for records in ranked.values()]
    borrowed = [record for (elsewhere, _secs), record in best if elsewhere]
    if borrowed and warn is not None:
        cpus = ", ".join(sorted({cpu_of(record.target) for record in borrowed}))
        warn(f"warning: {log_dir}: {len(borrowed)} of {len(best)} workloads were tuned on {cpus} and this build is "
             f"for {here}: their schedules apply and compute the same results but may be slower here; "
             "run `tvmnet tune` on this CPU for schedules made for it")
    return memory_database(record for _rank, record in best)


def _distance_from(target) -> Callable[[object], int]:
    """How far a record's CPU is from ``target``'s: 0 the same CPU, 1 another with its vector extension
    (:func:`targets.vector_isa`), 2 any other. A schedule made for 16-float vectors ran V2 about twice as slow
    in AVX2 code as one made on an AVX2 CPU (bench/README.md item 49)."""
    from .targets import vector_isa

    here = cpu_of(target)
    isa_of = {here: vector_isa(target)}  # CPU -> its vector extension

    def distance(record) -> int:
        cpu = cpu_of(record.target)
        if cpu == here:
            return 0
        if cpu not in isa_of:
            isa_of[cpu] = vector_isa(record.target)
        return 1 if isa_of[cpu] == isa_of[here] else 2

    return distance


SPLIT_ROWS_SLOWDOWN = 2.5
"""How much slower alone a record that splits rows (:class:`search_space.SplitRows`) may be than the
fastest for ``compile`` to prefer it: in V2, a 2.3x slower one ran 20-30% faster inside the model than the
fastest, which split columns (bench/README.md item 28). Searches with the rule find ones about as fast alone."""

SMALL_MAP_SLOWDOWN = 1.15
"""The same for maps of :data:`search_space.MIN_PREFERRED_ROWS` up to :data:`search_space.MIN_SPLIT_ROWS` rows,
which the search leaves free: V1 took records up to 1.10x slower alone and ran 2% faster; V3-Large, taking
ones up to 2.5x slower, ran 2-3% slower (bench/README.md item 43)."""

HALVED_MAP_SLOWDOWN = 1.5
"""The same for the stride-2 layers that read such a map (:func:`search_space.halves_a_split_map`), their
output rows in TVM's uneven bands: V2's 14x14 -> 7x7 depthwise convolution took a record 1.31x slower alone and
V1's one 1.46x slower, and each model ran 0.6-0.8% faster; V3-Large's fastest such record is 6.3x slower
(bench/README.md item 45)."""


def _preferred(ranked: list, target) -> tuple:
    """The (rank, record) to apply from a workload's records, best rank first: the first, unless the search
    space now constrains the workload to split rows across threads and the first does not. Then the fastest
    record of the same CPU that does, if one is within :data:`SPLIT_ROWS_SLOWDOWN` of the first: logs
    searched before the rule keep their records, and those searched after it prefer records that follow it.
    On maps of :data:`search_space.MIN_PREFERRED_ROWS` rows or more, which the search leaves free, the same
    within :data:`SMALL_MAP_SLOWDOWN`, and on the stride-2 layers after them within :data:`HALVED_MAP_SLOWDOWN`."""
    from . import search_space

    (first_elsewhere, first_secs), first = ranked[0]
    workload = first.workload.mod
    threads = search_space.threads_of(target) if target is not None else 1
    if is_baseline(first):
        return ranked[0]  # the untuned kernel measured fastest (the floor) runs on one thread: nothing to split
    tiers = [(search_space.MIN_SPLIT_ROWS, False, SPLIT_ROWS_SLOWDOWN),
             (search_space.MIN_PREFERRED_ROWS, False, SMALL_MAP_SLOWDOWN)]
    if search_space.halves_a_split_map(workload, threads):
        tiers.append((1, True, HALVED_MAP_SLOWDOWN))
    for min_rows, uneven, slowdown in tiers:
        if search_space.constrains(workload, threads, min_rows, uneven):
            break
    else:
        return ranked[0]
    for (elsewhere, secs), record in ranked:
        if elsewhere != first_elsewhere or secs > first_secs * slowdown:
            break
        if not is_baseline(record) and search_space.trace_splits_rows(record.trace, workload, threads,
                                                                      min_rows, uneven):
            return (elsewhere, secs), record
    return ranked[0]


def memory_database(records: Iterable):
    """A MemoryDatabase holding ``records``; a query answers with the fastest one of the workload."""
    ms = _ms()
    database = ms.database.MemoryDatabase(module_equality=MODULE_EQUALITY)
    for record in records:
        workload = database.commit_workload(record.workload.mod)
        database.commit_tuning_record(ms.database.TuningRecord(
            record.trace, workload, record.run_secs, record.target, record.args_info))
    return database


def _as_stored(tasks: Sequence, database) -> list:
    """``tasks`` with each module replaced by the database's copy of its workload, where it has one.

    Workloads match by structure, which ignores block names, but a record's trace names the blocks it
    schedules and is replayed on the stored module when the log is loaded. Block names follow Relax
    variable numbering, which changes with the pipeline (V2's global mean was ``lv235_red`` when its log
    began and ``lv200_red`` later): a search on the freshly extracted module wrote 16 records the log
    could not load again. Searching the stored module keeps every new trace loadable.
    """
    ms = _ms()
    stored = []
    for task in tasks:
        mod = task.dispatched[0]
        if database.has_workload(mod):
            mod = database.commit_workload(mod).mod
            task = ms.ExtractedTask(task.task_name, mod, task.target, [mod], task.weight)
        stored.append(task)
    return stored


def cpu_of(target) -> str:
    """The CPU a target is for, which tuning records are kept apart by: its ``mcpu``, else its ``arch``
    (cuda's sm_XX), else its kind. ``target`` is a ``tvm.target.Target`` or the JSON dict a record stores."""
    if isinstance(target, Mapping):
        attrs, kind = target, target.get("kind")
    else:
        attrs, kind = target.attrs, target.kind.name
    for key in ("mcpu", "arch"):
        if key in attrs and str(attrs[key]):
            return str(attrs[key])
    return str(kind)


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


def _check_database_lines(path: Path) -> tuple[list[str], list[str], dict[str, list[int]]]:
    """Good workload lines, good record lines (workload indices renumbered), bad line numbers per file."""
    import json

    ms = _ms()
    bad: dict[str, list[int]] = {}
    kept_workloads: list[str] = []
    workloads = []
    new_index: dict[int, int] = {}
    index = 0
    for number, line in _numbered_lines(path / WORKLOAD_FILE):
        ok = False
        if line.strip():
            try:
                workloads.append(ms.database.Workload.from_json(json.loads(line)))
                ok = True
            except Exception:  # noqa: BLE001 - any parse or structure error marks the line bad
                pass
        if ok:
            new_index[index] = len(kept_workloads)
            kept_workloads.append(line)
        else:
            bad.setdefault(WORKLOAD_FILE, []).append(number)
        index += 1 if line.strip() else 0  # MetaSchedule numbers workloads by line; blank lines are damage
    kept_records: list[str] = []
    for number, line in _numbered_lines(path / RECORD_FILE):
        try:
            entry = json.loads(line)
            workload_index = new_index[int(entry[0])]
            ms.database.TuningRecord.from_json(entry[1], workloads[workload_index])
            kept_records.append(json.dumps([workload_index, entry[1]], separators=(",", ":")))
        except Exception:  # noqa: BLE001
            bad.setdefault(RECORD_FILE, []).append(number)
    return kept_workloads, kept_records, bad


def _numbered_lines(file: Path):
    if not file.is_file():
        return
    with open(file, encoding="utf-8", errors="replace") as stream:
        for number, line in enumerate(stream, 1):
            yield number, line.rstrip("\n")


def _write_lines_atomically(file: Path, lines: Sequence[str]) -> None:
    temp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    temp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(temp, file)


SEED_RECORDS_PER_CPU = 16
"""How many of each workload's fastest records of each CPU a log started from another target's log keeps,
beside that CPU's untuned floor: enough for :func:`_preferred` to find one that splits rows, and a sliver of a
shipped x86 log (V2's holds over 16,000 records, 230 MB)."""


def _start_from(log_dir: Path, source: Path, name: str, say: Progress) -> None:
    """Start the empty ``log_dir`` from ``source``, the log of the target ``name`` that this one's ``logs_from``
    names: its workloads and, per workload and CPU, the untuned floor and :data:`SEED_RECORDS_PER_CPU` fastest
    records. Its first tune then measures here the record ``compile`` borrowed for each task
    (:func:`borrowed_elsewhere`), as a tune on a new CPU does, and ``compile`` borrows the records of the tasks
    not tuned yet, as it did from ``source``.

    Lines are read as JSON only (checking each record with TVM took 2 minutes for V2's log): a record line
    that is not one is left out, and the tune's :func:`open_database` checks what is kept."""
    import json

    if not has_database(source):
        say(f"{name} has no log of this model ({source}): {log_dir} starts empty")
        return
    ranked: dict[tuple[int, str, bool], list[tuple[float, int]]] = {}
    total = 0
    for number, line in _numbered_lines(source / RECORD_FILE):
        total += 1
        try:
            workload, (trace, run_secs, target, _args) = json.loads(line)
            secs, key = _mean_seconds(run_secs), (int(workload), cpu_of(target), not trace[0])  # no insts: floor
        except (ValueError, TypeError, AttributeError, IndexError):
            continue
        if secs is not None:
            ranked.setdefault(key, []).append((secs, number))
    kept = {number for (_workload, _cpu, floor), fastest in ranked.items()
            for _secs, number in sorted(fastest)[:1 if floor else SEED_RECORDS_PER_CPU]}
    _write_lines_atomically(log_dir / RECORD_FILE,
                            [line for number, line in _numbered_lines(source / RECORD_FILE) if number in kept])
    # last: a log without its workload file is started again. MetaSchedule numbers workloads by line, blank
    # lines apart
    _write_lines_atomically(log_dir / WORKLOAD_FILE,
                            [line for _number, line in _numbered_lines(source / WORKLOAD_FILE) if line.strip()])
    cpus = ", ".join(sorted({cpu for _workload, cpu, _floor in ranked}))
    say(f"started {log_dir} from {name}'s log ({source}): {len(kept)} of its {total} records, each workload's "
        f"fastest of {cpus}; the record each task borrows is measured here before its first search")


# ----------------------------------------------------------------------------------------------
# Lock


class _DirLock:
    """An exclusive, non-blocking flock on ``<log_dir>/.tune.lock`` (released when the process dies)."""

    def __init__(self, log_dir: Path):
        self.path = log_dir / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> "_DirLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise TvmnetError(
                    f"{self.path.parent} is being tuned by another process{f' (pid {holder})' if holder else ''}; "
                    "wait for it to finish or tune into another --log-dir") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


# ----------------------------------------------------------------------------------------------
# Builder / runner pieces (module level so cloudpickle sends them to workers by reference)


def _worker_init() -> None:
    """Popen worker initializer: import TVM before the (timed) first job.

    It does *not* import ``tvm.s_tir.tensor_intrin`` (~20-40 s on a busy 2-core machine, and LocalBuilder
    restarts its worker pool on every batch): :func:`_build` below does not need it, because tensorized
    blocks are already rewritten to the intrinsic's implementation when the schedule is applied in the
    tuning process.

    It does set the thread count: a runner worker measures with as many threads as ``load`` runs the
    model with (one per physical core), or the search optimises for a thread count no user runs.
    """
    from .runtime import use_physical_cores

    use_physical_cores()
    import tvm  # noqa: F401
    from tvm.s_tir.meta_schedule.builder import local_builder  # noqa: F401


def _build(mod, target, _params):
    """MetaSchedule's default_build without its ``import tvm.s_tir.tensor_intrin``."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


class _Export:
    """Export a built candidate as a shared library linked by the target's compiler (picklable)."""

    def __init__(self, cc: str | None = None, options: Sequence[str] = ()):
        self.cc = cc
        self.options = list(options)

    def __call__(self, rt_mod) -> str:
        import tempfile

        from tvm.support import cc as tvm_cc

        path = os.path.join(tempfile.mkdtemp(prefix="tvmnet-ms-"), "candidate.so")
        fcompile = tvm_cc.cross_compiler(self.cc, options=self.options) if self.cc else None
        rt_mod.export_library(path, fcompile=fcompile)
        return path


def make_builder(spec, timeout_s: float, max_workers: int):
    """MetaSchedule's LocalBuilder as every tvmnet tune uses it: workers warmed by ``_worker_init`` (so the
    first build does not time out importing the tensor intrinsics) and the target's cross linker."""
    ms = _ms()
    export = _Export(spec.cross_compiler.cc, spec.cross_compiler.options) if spec.cross_compiler else _Export()
    if spec.cross_compiler:
        spec.cross_compiler.check()
    return ms.builder.LocalBuilder(max_workers=max_workers, timeout_sec=timeout_s, f_build=_build,
                                   f_export=export, initializer=_worker_init)


def _parse_tracker(tracker: str) -> tuple[str, int]:
    host, sep, port = str(tracker).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TvmnetError(f"bad rpc tracker '{tracker}'; write HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def make_runner(spec, *, rpc_tracker, rpc_key, timeout_s, number, repeat, min_repeat_ms):
    """The runner every tvmnet tune measures with, here (LocalRunner) or on boards behind an RPC tracker;
    returns ``(runner, its name for progress lines)``."""
    ms = _ms()
    evaluator = ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                          enable_cpu_cache_flush=False)
    if rpc_tracker is None:
        if spec.is_cross:
            raise TvmnetError(f"target '{spec.name}' is for {spec.arch}: tuning it needs a board, pass "
                              "rpc_tracker=HOST:PORT and rpc_key")
        return ms.runner.LocalRunner(timeout_sec=timeout_s, evaluator_config=evaluator,
                                     initializer=_worker_init), "local"
    host, port = _parse_tracker(rpc_tracker)
    key = rpc_key or spec.rpc_key
    if not key:
        raise TvmnetError(f"rpc tuning needs a device key: pass rpc_key (target '{spec.name}' names none)")
    from . import rpc

    keys = rpc.query_tracker(host, port)  # fails clearly when the tracker is down
    if key not in keys:
        raise TvmnetError(f"no RPC server with key '{key}' is registered at tracker {host}:{port} "
                          f"(registered: {', '.join(sorted(keys)) or 'none'})")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_timeout_sec=max(60, int(timeout_s)))
    # One worker per free board: each worker asks the tracker for a board per candidate, so a board that
    # dies costs the candidate it was running (recorded as failed) and the rest go to the boards still up.
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator, max_workers=max(1, keys[key]),
                               initializer=_worker_init), f"rpc:{host}:{port}:{key}"


# ----------------------------------------------------------------------------------------------
# Database accounting


def _mean_seconds(run_secs) -> float | None:
    """The mean of one measurement's run times; None without any, or where MetaSchedule marked the run failed."""
    if run_secs is None or len(run_secs) == 0:
        return None
    mean = sum(float(s) for s in run_secs) / len(run_secs)
    return None if mean >= FAILED_SECONDS else mean


def _record_seconds(record) -> float | None:
    return _mean_seconds(record.run_secs)


def is_baseline(record) -> bool:
    """A record with an empty trace: the untuned kernel, measured by :func:`measure_schedules`."""
    return len(record.trace.insts) == 0


def database_stats(database, tasks: Sequence, cpu: str | None = None
                   ) -> dict[int, tuple[int, float | None, float | None]]:
    """workload hash -> (trials, best seconds, untuned seconds) for the given tasks' workloads, counting
    only records measured on ``cpu`` when it is given (times from two CPUs do not compare).

    Trials do not count the untuned baseline record; the best includes it.
    """
    wanted = {_shash(task.dispatched[0]) for task in tasks}
    stats: dict[int, list] = {h: [0, None, None] for h in wanted}
    for record in database.get_all_tuning_records():
        h = _shash(record.workload.mod)
        if h not in stats or (cpu is not None and cpu_of(record.target) != cpu):
            continue
        secs = _record_seconds(record)
        if is_baseline(record):
            stats[h][2] = secs
        else:
            stats[h][0] += 1
        if secs is not None and (stats[h][1] is None or secs < stats[h][1]):
            stats[h][1] = secs
    return {h: (n, best, base) for h, (n, best, base) in stats.items()}


def task_stats(database, task, cpu: str | None = None) -> tuple[int, float | None, float | None]:
    """(trials, best seconds, untuned seconds) of one task's workload in ``database`` (on ``cpu``)."""
    return database_stats(database, [task], cpu)[_shash(task.dispatched[0])]


def _tuned_by_speed(database, tasks: Sequence, measured_on: Callable[[str], bool]) -> list[list]:
    """For each task, its tuned records (not the untuned floor, not failed) whose CPU passes
    ``measured_on``, fastest first."""
    ranked: dict[int, list] = {_shash(task.dispatched[0]): [] for task in tasks}
    for record in database.get_all_tuning_records():
        records = ranked.get(_shash(record.workload.mod))
        secs = _record_seconds(record)
        if records is not None and secs is not None and not is_baseline(record) and measured_on(cpu_of(record.target)):
            records.append((secs, record))
    return [[record for _secs, record in sorted(ranked[_shash(task.dispatched[0])], key=lambda pair: pair[0])]
            for task in tasks]


def borrowed_elsewhere(database, tasks: Sequence, target) -> list:
    """For each task, the tuned record of another CPU than ``target``'s that ``compile`` would apply if this CPU
    had none (a CPU with its vector extension first; :func:`_preferred` among that CPU's), or None: what a first
    tune here measures, so that the task's first record here is the schedule its build ran until then."""
    here, distance = cpu_of(target), _distance_from(target)
    borrowed = []
    for records in _tuned_by_speed(database, tasks, lambda c: c != here):
        ranked = sorted((((distance(record), _record_seconds(record)), record) for record in records),
                        key=lambda pair: pair[0])
        borrowed.append(_preferred(ranked, target)[1] if ranked else None)
    return borrowed


def fastest_here(database, tasks: Sequence, cpu: str, top: int) -> list[list]:
    """For each rank ``r < top``: ``(task, its r-th fastest tuned record measured on cpu)`` for every task
    that has that many."""
    ranked = list(zip(tasks, _tuned_by_speed(database, tasks, lambda c: c == cpu)))
    return [[(task, records[rank]) for task, records in ranked if len(records) > rank] for rank in range(top)]


def _to_measure(task, traces: Iterable) -> list:
    """Records of ``task``'s workload holding ``traces``, with no run time yet: what
    :func:`measure_schedules` takes to time seeds and candidates."""
    ms = _ms()
    return [ms.database.TuningRecord(trace, ms.database.Workload(task.dispatched[0])) for trace in traces]


def _padded_seeds(tasks: Sequence, ranked: Sequence[list], tvm_target) -> list[list]:
    """For each task, records to measure holding its padded seeds (:func:`search_space.padded_seeds`);
    none for a task with a padded record among its ``ranked`` ones (this CPU's) already, so a resumed tune
    does not measure them again."""
    from . import search_space

    return [[] if any(search_space.is_padded(record.trace) for record in records) else
            _to_measure(task, search_space.padded_seeds(task.dispatched[0], tvm_target))
            for task, records in zip(tasks, ranked)]


def _seeds_from_fastest(tasks: Sequence, ranked: Sequence[list], tvm_target, make: Callable) -> list[list]:
    """For each task, records to measure holding ``make(trace, workload, target)``'s variants of its fastest
    tuned record on this CPU (first of its ``ranked`` list): :func:`search_space.split_seeds` and
    :func:`search_space.row_seeds`. Once a variant is fastest, it makes none of itself; variants that lost are
    timed again by the next run (a few seconds per task), as the host may have been busy."""
    return [_to_measure(task, make(records[0].trace, task.dispatched[0], tvm_target)) if records else []
            for task, records in zip(tasks, ranked)]


SIDE_BY_SIDE_ROUNDS = 5  # rounds of schedules timed against a task's fastest record (see measure_schedules)
BUSY_HOST_SLOWDOWN = 4.0
"""A task's fastest record running this many times slower than the log says shows a host too busy for side by
side times: threads that other processes deschedule stall a parallel kernel at its barriers far more than a
serial one, so the ratio no longer holds. While MobileNetV2 ran in another process, a serial schedule of a
V3-Large squeeze-and-excitation scaling timed 0.003x its parallel fastest record side by side, and about as
fast alone (bench/README.md item 38)."""


def measure_schedules(tasks: Sequence, builder, runner, database, tvm_target, say: Progress,
                      records: Sequence | None = None, what: str = "schedule from another CPU",
                      against=None, rounds: int = 1) -> None:
    """Measure each task's workload, unscheduled or with the schedule of its record in ``records``, with
    the tuning builder and runner, and store it as a record measured on ``tvm_target``.

    Without ``records`` this measures the untuned kernels (empty traces), the floor a tuned record must
    beat: the database applies a workload's fastest record, so a partial or short tune cannot make a
    model slower than no log at all (few random candidates of a small elementwise kernel often lose to
    LLVM's own loop). With another CPU's records it measures that CPU's best schedules here, so that a
    tune on a new CPU starts from them with times that compare; ``what`` names such records in messages.

    ``against`` (a record of this CPU for the workload of every task given) times the schedules side by
    side with that record: ``rounds`` rounds, each running all of them in turn, and each schedule is
    stored with the record's time in the log times the ratio of their medians. A log gathers times from
    runs under different load (onnxruntime's V3-Large read 3.8 ms one hour and 7.4 ms the next on this
    project's shared host), so a schedule measured under load, stored as measured, would lose to a slower
    one measured on a quiet host; the ratio to a schedule run alongside it holds. The record itself is
    timed but not stored again. Schedules that beat it are timed beside it for ``rounds`` more rounds and
    stored with that second ratio: picked as winners by the first, they would be stored with its luck too
    (remeasures found 5-20% "wins" that did not show in the model, bench/README.md item 39). Without
    ``against`` each time is stored as measured (median of rounds).
    """
    if not tasks:
        return
    import shutil
    import statistics

    from tvm.s_tir import Schedule

    ms = _ms()
    what = "untuned kernel" if records is None else what
    if against is None:
        say(f"measuring the {what} of {len({task.task_name for task in tasks})} task(s)"
            + (": the floor a tuned record must beat" if records is None else " on this CPU"))
    else:
        say(f"{tasks[0].task_name}: timing {len(tasks)} schedule(s) ({what}) side by side with its fastest record, "
            f"{rounds} rounds")
    entries = list(zip(tasks, records if records is not None else [None] * len(tasks)))
    if against is not None:
        entries.append((tasks[0], against))
    scheduled = []  # (task, schedule) for each schedule that applies
    reference = None  # against's index in scheduled
    for task, record in entries:
        if record is None:
            scheduled.append((task, Schedule(task.dispatched[0])))
            continue
        sch = Schedule(record.workload.mod)  # a trace names the blocks of the module it was tuned on
        try:
            record.trace.apply_to_schedule(sch, remove_postproc=False)
        except Exception as exc:  # noqa: BLE001 - TVM's ScheduleError and friends: skip this one schedule
            say(f"{task.task_name}: a schedule ({what}) does not apply, not recorded: "
                f"{str(exc).strip().splitlines()[-1][:200]}")
            continue
        reference = len(scheduled) if record is against else reference
        scheduled.append((task, sch))
    args = [ms.arg_info.ArgInfo.from_entry_func(sch.mod, remove_preproc=True) for _, sch in scheduled]
    built = builder.build([ms.builder.BuilderInput(sch.mod, tvm_target) for _, sch in scheduled])
    ready = [i for i, b in enumerate(built) if b.error_msg is None]
    for i, b in enumerate(built):
        if b.error_msg is not None:
            say(f"{scheduled[i][0].task_name}: a schedule ({what}) did not build, not recorded: "
                f"{b.error_msg.strip().splitlines()[-1][:200]}")
    import tvm

    device = tvm.runtime.Device._DEVICE_TYPE_TO_NAME[tvm_target.get_target_device_type()]  # "cpu", "cuda", ...

    def median_times(indices: list[int]) -> dict[int, float]:
        """Each schedule's median over ``rounds`` rounds that run them all in turn; one that fails to run is
        reported and dropped from ``ready``."""
        times: dict[int, list[float]] = {i: [] for i in indices}
        for round_index in range(max(1, rounds)):
            if not indices:
                break
            turn = round_index % len(indices)
            order = indices[turn:] + indices[:turn]  # rotated, so that no schedule always runs first
            futures = runner.run([ms.runner.RunnerInput(built[i].artifact_path, device, args[i]) for i in order])
            for i, future in zip(order, futures):
                result = future.result()
                if result.error_msg is not None or not result.run_secs:
                    say(f"{scheduled[i][0].task_name}: a schedule ({what}) failed to run, not recorded: "
                        f"{(result.error_msg or 'no timing').strip().splitlines()[-1][:200]}")
                    indices.remove(i)
                    ready.remove(i)
                    continue
                times[i].append(sum(float(s) for s in result.run_secs) / len(result.run_secs))
        return {i: statistics.median(times[i]) for i in indices}

    def side_by_side(medians: dict[int, float]) -> dict[int, float]:
        """Seconds to store for each schedule timed beside ``against``: the record's time in the log times the
        ratio of their medians; none on a host too busy for ratios."""
        if _too_busy(tasks[0], against, medians[reference], what, say):
            return {}
        ratios = {i: medians[i] / medians[reference] for i in medians if i != reference}
        winners = [i for i, ratio in ratios.items() if ratio < 1]
        if winners and rounds > 1:
            # the fastest of several schedules over a few rounds is partly luck (a 20-100 us kernel on a shared
            # host); timed again beside the record, a winner is stored with the second ratio, which chose nothing
            say(f"{tasks[0].task_name}: {len(winners)} of them beat its fastest record (the best at "
                f"{min(ratios.values()):.2f}x its time); timing those again, {rounds} rounds")
            again = median_times(winners + [reference])
            if reference in again:
                if _too_busy(tasks[0], against, again[reference], what, say):
                    return {}
                ratios.update({i: again[i] / again[reference] for i in winners if i in again})
            ratios = {i: ratio for i, ratio in ratios.items() if i in ready}
        if ratios:
            say(f"{tasks[0].task_name}: the fastest of them took {min(ratios.values()):.2f}x the time of its fastest "
                "record")
        return {i: ratio * _record_seconds(against) for i, ratio in ratios.items()}

    medians = median_times(list(ready))
    if against is not None and reference not in medians:
        say(f"{tasks[0].task_name}: its fastest record did not run here; the schedules ({what}) are stored as measured")
    stored = side_by_side(medians) if against is not None and reference in medians else medians
    for b in built:
        if b.error_msg is None:
            shutil.rmtree(os.path.dirname(b.artifact_path), ignore_errors=True)
    for i, seconds in stored.items():
        if i == reference:
            continue
        task, sch = scheduled[i]
        database.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, database.commit_workload(task.dispatched[0]), [seconds], tvm_target, args[i]))


def _too_busy(task, against, measured: float, what: str, say: Progress) -> bool:
    """Whether ``against`` (a task's fastest record) ran :data:`BUSY_HOST_SLOWDOWN` times slower than the log
    says, which makes side-by-side ratios meaningless; says so."""
    slowdown = measured / _record_seconds(against)
    if slowdown < BUSY_HOST_SLOWDOWN:
        return False
    say(f"{task.task_name}: its fastest record ran {slowdown:.0f}x slower than the log says: the host is too busy to "
        f"compare schedules side by side; the schedules ({what}) are not stored, run again when it is quieter")
    return True


def _select(tasks: list, names: Sequence[str] | None) -> list:
    if names is None:
        return tasks
    by_name = {t.task_name: t for t in tasks}
    chosen, missing = [], []
    for name in names:
        exact = by_name.get(name)
        matches = [exact] if exact is not None else [t for t in tasks if name in t.task_name]
        if not matches:
            missing.append(name)
        chosen.extend(m for m in matches if m not in chosen)
    if missing:
        raise TvmnetError(f"no task matches {', '.join(missing)}; the model's tasks are: "
                          f"{', '.join(t.task_name for t in tasks)}")
    return chosen


# ----------------------------------------------------------------------------------------------
# Progress measure callback


def _run_seconds(runner_results) -> list[float | None]:
    """Each result's mean run time in seconds, None where it failed."""
    return [None if result.error_msg is not None else _mean_seconds(result.run_secs) for result in runner_results]


def _make_progress_callback(names, weights, state, say):
    ms = _ms()
    from tvm.ir.utils import derived_object

    @derived_object
    class _Progress(ms.measure_callback.PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            n = len(runner_results)
            state["new"][task_id] += n
            state["done"] += n
            improved = False
            times = _run_seconds(runner_results)
            for secs in times:
                if secs is None:
                    continue
                best = state["best"][task_id]
                if best is None or secs < best:
                    state["best"][task_id] = secs
                    improved = True
            state["stale"][task_id] = 0 if improved else state["stale"][task_id] + n
            if state["recheck"]:  # this run's fastest candidates of the task, to time side by side afterwards
                found = state["found"][task_id]
                found += [(secs, candidate.sch.trace) for candidate, secs in zip(measure_candidates, times)
                          if secs is not None]
                found.sort(key=lambda pair: pair[0])
                del found[state["recheck"]:]
            errors = sum(1 for r in runner_results if r.error_msg is not None)
            elapsed = time.monotonic() - state["started"]
            total = state["budget"]
            done = state["done"]
            eta = elapsed / done * max(0, total - done) if done else math.nan
            best = state["best"][task_id]
            started = sum(1 for x in state["new"] if x)
            say(f"[{done}/{total} trials, {started}/{len(names)} tasks started] {names[task_id]} "
                f"(x{weights[task_id]}): +{n} trials"
                + (f", {errors} failed" if errors else "")
                + (f", best {best * 1e6:.1f} µs" if best is not None else ", no valid measurement yet")
                + f", elapsed {elapsed:.0f} s, ETA {eta:.0f} s")

    return _Progress()


def _quiet_console() -> None:
    """MetaSchedule logs every batch's statistics table to stdout; keep that in ``<log_dir>/logs/`` only
    (the progress callback reports to the user)."""
    import logging

    for handler in logging.getLogger("tvm.s_tir.meta_schedule").handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)


PLATEAU_TRIALS = 64
"""Trials without a better candidate after which a task's claim on the next batch halves (then a third...)."""


def next_task(alive: Sequence[int], weights: Sequence[float], best: Sequence[float | None], picks: Sequence[int],
              had: Sequence[int], stale: Sequence[int]) -> int:
    """The task the next batch goes to: one never tried first (the costliest, those with no measurement
    at all before any), else the largest weight x best latency, damped by how often this run picked it
    and by how many trials it has gone without improving.

    Without the last damping a costly task that had stopped improving kept the batches: on the 2-core Zen
    5, 42 of 46 batches of MobileNetV1 (20 min) went to its 512x512 pointwise convolution (5 calls x
    210 µs), whose best did not move once in them.
    """
    def cost(i: int) -> float:
        return math.inf if best[i] is None else weights[i] * best[i]

    fresh = [i for i in alive if picks[i] == 0 and had[i] == 0]
    if fresh:
        return max(fresh, key=cost)
    return max(alive, key=lambda i: cost(i) / math.sqrt(1 + picks[i]) / (1 + stale[i] / PLATEAU_TRIALS))


STORED_BATCHES_BEFORE_SENDING = 2  # evolutions in a row that found only stored schedules, then one is sent as is


def _skipping_stored(population_size: int, stored: dict[str, set[str]], budget_left: Callable[[], int],
                     skipped: list[int]):
    """MetaSchedule's evolutionary search, minus the schedules the log already holds for the task on this CPU.

    The search seeds each run with the log's fastest records but remembers only what it measured in the
    current run (TVM leaves a TODO in ``evolutionary_search.cc`` to add the database's records), so a resumed
    search measured stored schedules again: 67 of the 1,040 trials of a V3-Large search on the Intel Xeon
    (a67e5bf) repeated a (workload, trace) that CPU's records already held. Another CPU's records are not
    left out: measuring one here is new. ``stored`` maps a task's name to its records' traces (``str(trace)``,
    decisions included); ``skipped[0]`` counts the candidates left out.

    A batch with stored schedules left out is sent short rather than refilled (refilling would take another
    evolution of the population for one or two candidates), so the search needs more batches for the same
    trials, and MetaSchedule checks the run's budget only before a batch: each batch is cut to
    ``budget_left()``, and none is sent once it is spent. After :data:`STORED_BATCHES_BEFORE_SENDING`
    evolutions in a row found only stored schedules, the next batch is sent as it is: the search has converged
    on the log, and measuring is then better use of the time than evolving again.
    """
    ms = _ms()
    from tvm.ir.utils import derived_object

    @derived_object
    class _SkipStored(ms.search_strategy.PySearchStrategy):
        def __init__(self, inner=None):
            super().__init__()
            self.inner = inner or ms.search_strategy.EvolutionarySearch(population_size=population_size)
            self.known: set[str] = set()

        def _initialize_with_tune_context(self, context) -> None:
            self.inner._initialize_with_tune_context(context)
            self.known = stored.get(context.task_name, set())

        def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None):
            self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

        def post_tuning(self) -> None:
            self.inner.post_tuning()

        def generate_measure_candidates(self):
            left = budget_left()
            if left <= 0:
                return None
            for _ in range(STORED_BATCHES_BEFORE_SENDING):
                candidates = self.inner.generate_measure_candidates()
                if candidates is None:
                    return None
                new = [c for c in candidates if str(c.sch.trace) not in self.known]
                skipped[0] += len(candidates) - len(new)
                if new:
                    return new[:left]
            candidates = self.inner.generate_measure_candidates()  # converged on the log: send what it finds
            return None if candidates is None else candidates[:left]

        def notify_runner_results(self, measure_candidates, results) -> None:
            self.inner.notify_runner_results(measure_candidates, results)

        def clone(self):
            return _SkipStored(self.inner.clone())

    return _SkipStored()


def _make_scheduler(state, say, names):
    """A task scheduler that joins every batch before choosing the next task, so that measured records
    reach the database (and the disk) one batch after they are measured.

    MetaSchedule's "gradient" scheduler (tune_relax's default) sends one batch per task round-robin in
    its first round and joins none of them until the round is over: for MobileNetV2 (33 tasks x 64)
    that is the whole default budget, and a kill loses every measurement. This one picks tasks without
    any trial first, then where the time is (:func:`next_task`), so a resumed run spends its batches
    on the costly tasks that still improve rather than one on every task; it also applies
    ``early_stopping``.
    """
    ms = _ms()
    from tvm.ir.utils import derived_object

    @derived_object
    class _JoiningScheduler(ms.task_scheduler.PyTaskScheduler):
        def __init__(self):
            super().__init__()
            self.pending: list[int] = []
            self.picks: list[int] = [0] * len(names)

        def next_task_id(self) -> int:
            tasks = self._outer().tasks_
            for i in self.pending:
                if not tasks[i].is_terminated:
                    self.join_running_task(i)
            self.pending = []
            if state["interrupted"].is_set():  # every batch sent so far is joined, so on disk
                return -1
            limit = state["early_stopping"]
            for i, task in enumerate(tasks):
                if limit and not task.is_terminated and state["stale"][i] >= limit and i not in state["stopped"]:
                    state["stopped"].add(i)
                    say(f"{names[i]}: no improvement in {state['stale'][i]} trials, stopping it early")
                    self._outer().terminate_task(i)
            alive = [i for i, task in enumerate(tasks) if not task.is_terminated]
            if not alive:
                return -1
            choice = next_task(alive, state["weights"], state["best"], self.picks, state["had"], state["stale"])
            self.picks[choice] += 1
            self.pending.append(choice)
            return choice

    return _JoiningScheduler()


@contextlib.contextmanager
def _stop_on_interrupt(interrupted: threading.Event, say: Progress):
    """Ctrl-C / SIGTERM while tuning: finish the batch being measured, then stop (a KeyboardInterrupt
    raised inside MetaSchedule's C++ loop left the tuner hung on a lock). A second signal exits at once;
    records of earlier batches are on disk either way. Only the main thread can take signals.

    One signal can arrive twice at once: coreutils ``timeout`` sends it to the command and then to its
    process group. A repeat within ``DUPLICATE_SIGNAL_S`` is that, not a second Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    first: list[float] = []

    def handle(signum: int, _frame) -> None:
        if first and time.monotonic() - first[0] < DUPLICATE_SIGNAL_S:
            return
        if first:
            say("interrupted again: exiting now; the batch being measured is lost, earlier ones are on disk")
            os._exit(128 + signum)
        first.append(time.monotonic())
        interrupted.set()
        say("interrupted: finishing the batch being measured, then stopping (Ctrl-C again to quit at once)")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------
# tune()


def tune(
    model=None,
    *,
    target="x86",
    trials: int | None = None,
    trials_per_task: int | None = None,
    tasks: Sequence[str] | None = None,
    undertuned: int | None = None,
    log_dir: str | os.PathLike | None = None,
    timeout_s: float = 60.0,
    number: int = 3,
    repeat: int = 1,
    min_repeat_ms: int = 100,
    early_stopping: int | None = None,
    seed: int = 0,
    alpha: float = 1.0,
    resolution: int = 224,
    input_shapes=None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    progress: Progress | None = None,
    num_trials_per_iter: int = 64,
    population_size: int = 512,
    builder_workers: int | None = None,
    builder_timeout_s: float = 120.0,
    remeasure: int = 0,
    recheck: int = 0,
) -> TuneResult:
    """Tune ``model`` (path, zoo name, ModelProto, None for MobileNetV2) for ``target`` with MetaSchedule.

    ``trials`` is the total budget over the selected tasks, counting records already in ``log_dir``
    (default: 64 per task); ``trials_per_task`` caps each task. ``tasks`` selects tasks by exact name or
    substring; ``undertuned=N`` keeps of those the tasks with fewer than N trials measured on this CPU (after
    ``remeasure`` on a new CPU, the tasks whose records all came from other CPUs: where a search paid most on
    the Intel Xeons, bench/README.md items 40-41). ``timeout_s`` bounds one measurement,
    ``builder_timeout_s`` one candidate build.
    ``early_stopping=N`` stops a task after N trials without improvement.

    ``remeasure=K`` first times each selected task's 2nd to Kth fastest records of this CPU again, side by
    side with its fastest (:func:`measure_schedules`), with this run's builder and runner, and stores the
    new times, on the log's scale, beside the old. For a log measured under other conditions: MetaSchedule's
    search never measures a schedule that is already in the database again. (Until tvmnet 2026-12-02 a CPU
    without SMT was tuned on one thread, so a log's fastest records were the best single-thread schedules,
    often ones that do not parallelise.) It also times here the record each task would borrow from another
    CPU (:func:`borrowed_elsewhere`), as a first tune on this CPU would: a log whose other CPU was tuned
    later, with better settings, can hold better schedules for this one too. ``trials=0`` stops after that.

    A task with a pixel-padded variant in the search space (``tvmnet/search_space.py``: a 1x1 convolution on
    7x7 pixels) that has no padded record on this CPU yet first gets its padded seeds timed (9 schedules at
    7x7, on top of ``trials``), side by side with its fastest record, when it is tuned or ``remeasure`` is
    given; the search then starts from them. So do its split seeds (:func:`search_space.split_seeds`, when its
    fastest record runs on one thread), and with ``remeasure`` its row seed (:func:`search_space.row_seeds`).

    A target whose file names ``logs_from`` (the portable ``x86-avx2``, ``x86-avx512``) and has no log of its own
    yet starts one from that target's log of the model (:func:`_start_from`), so that its first tune begins from
    the schedules other CPUs found, as a tune on a new CPU does.

    ``recheck=K`` times, after the search, each task's K fastest candidates of this run side by side with
    the task's fastest record from before it, and stores them again on the log's scale. The search stores
    its candidates as measured, so on a host busier now than when the log was measured a better schedule
    found now can lose to the old record in ``compile``; a task with no earlier record here is not rechecked.
    """
    from . import pipeline, search_space
    from .build import resolve_model
    from .frontend import load_onnx

    say = progress or (lambda _msg: None)
    started = time.monotonic()
    spec = _target_spec(target)
    tvm_target = spec.tvm_target()
    source, name = resolve_model(model, alpha=alpha, resolution=resolution)
    say(f"importing {name}")
    imported = load_onnx(source, input_shapes)
    fused = pipeline.fuse(imported.to_relax(), tvm_target)
    all_tasks = extract_tasks(fused, tvm_target)
    fingerprint = fingerprint_tasks(all_tasks)
    selected = _select(all_tasks, tasks)
    log_dir = Path(log_dir) if log_dir is not None else log_root() / spec.name / fingerprint
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TvmnetError(f"cannot create tuning log dir {log_dir}: {exc.strerror}") from None

    ms = _ms()
    interrupted = threading.Event()
    with _DirLock(log_dir), _stop_on_interrupt(interrupted, say):
        if spec.logs_from and not has_database(log_dir):
            _start_from(log_dir, log_root() / spec.logs_from / fingerprint, spec.logs_from, say)
        database = open_database(log_dir, repair=True, warn=say)
        selected = _as_stored(selected, database)
        cpu = cpu_of(tvm_target)  # records of other CPUs neither count as trials nor set the floor here
        before = database_stats(database, selected, cpu)
        if undertuned is not None:
            selected = [t for t in selected if before[_shash(t.dispatched[0])][0] < undertuned]
        hashes = [_shash(t.dispatched[0]) for t in selected]
        existing = [before[h][0] for h in hashes]
        budget_total = trials if trials is not None else 64 * len(selected)
        remaining = max(0, budget_total - sum(existing))
        per_task_left = [
            (max(0, trials_per_task - n) if trials_per_task is not None else remaining) for n in existing
        ]
        to_tune = [i for i, left in enumerate(per_task_left) if left > 0]
        remaining = min(remaining, sum(per_task_left[i] for i in to_tune))
        runner_name = "local" if rpc_tracker is None else f"rpc:{rpc_tracker}"
        fewer = f" (fewer than {undertuned} trials on {cpu})" if undertuned is not None else ""
        say(f"{len(all_tasks)} tasks in {name}, {len(selected)} selected{fewer}; {sum(existing)} trials on {cpu} "
            f"already in {log_dir}; {remaining} to run")

        new = [0] * len(selected)
        tuning = remaining > 0 and bool(to_tune)
        no_floor = [task for task, h in zip(selected, hashes) if before[h][2] is None and (tuning or before[h][0])]
        # a task about to be tuned on this CPU for the first time starts from the best schedule another CPU
        # found for it, measured here first (a log moved to a new machine, or a board of another family)
        port_to = range(len(selected)) if remeasure else to_tune if tuning else []
        elsewhere = dict(zip(port_to, borrowed_elsewhere(database, [selected[i] for i in port_to], tvm_target)))
        seeded = range(len(selected)) if remeasure else to_tune if tuning else []
        if selected and (tuning or no_floor or remeasure):
            builder = make_builder(spec, builder_timeout_s,
                                    builder_workers or max(1, min(2, (os.cpu_count() or 1))))
            runner, runner_name = make_runner(spec, rpc_tracker=rpc_tracker, rpc_key=rpc_key, timeout_s=timeout_s,
                                               number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
            # this CPU's fastest records as the log holds them now, before anything is measured here
            ranked = _tuned_by_speed(database, selected, lambda c: c == cpu)
            seeded_tasks, seeded_ranked = [selected[i] for i in seeded], [ranked[i] for i in seeded]
            seeds = dict(zip(seeded, _padded_seeds(seeded_tasks, seeded_ranked, tvm_target)))
            splits = dict(zip(seeded, _seeds_from_fastest(seeded_tasks, seeded_ranked, tvm_target,
                                                          search_space.split_seeds)))
            # row seeds only when asked to re-rank: most lose, and one timed before every search would add a
            # record per task to each run beyond its trials
            rows = dict(zip(seeded, _seeds_from_fastest(seeded_tasks, seeded_ranked, tvm_target,
                                                        search_space.row_seeds))) if remeasure else {}
            measure_schedules(no_floor, builder, runner, database, tvm_target, say)
            # a task with a fastest record here is timed side by side with it; the others in one batch
            unranked: list[tuple] = []
            for i, task in enumerate(selected):
                if interrupted.is_set():
                    break
                theirs = elsewhere.get(i)
                theirs = [theirs] if theirs is not None and (existing[i] == 0 or remeasure) else []
                batches = [(ranked[i][1:remeasure], "next fastest records"), (theirs, "schedules from another CPU"),
                           (seeds.get(i, []), "padded seeds"), (splits.get(i, []), "split seeds"),
                           (rows.get(i, []), "row seeds")]  # names for messages
                candidates = [record for records, _ in batches for record in records]
                if not ranked[i]:
                    unranked += [(task, record, name) for records, name in batches for record in records]
                elif candidates:
                    what = ", ".join(f"{name}: {len(records)}" for records, name in batches if records)
                    measure_schedules([task] * len(candidates), builder, runner, database, tvm_target, say,
                                      records=candidates, what=what, against=ranked[i][0], rounds=SIDE_BY_SIDE_ROUNDS)
            if unranked and not interrupted.is_set():
                names = dict.fromkeys(name for _, _, name in unranked)  # in order, once each
                measure_schedules([task for task, _, _ in unranked], builder, runner, database, tvm_target, say,
                                  records=[record for _, record, _ in unranked], what=" and ".join(names))
            before = database_stats(database, selected, cpu)
        if tuning and not interrupted.is_set():
            chosen = [selected[i] for i in to_tune]
            say(f"preparing {len(chosen)} tuning contexts (imports MetaSchedule's tensor intrinsics once)")
            # this CPU's records of each task before the search: what it need not measure again, and what its
            # rechecked candidates are timed against (the fastest)
            here = _tuned_by_speed(database, chosen, lambda c: c == cpu)
            skipped = [0]
            stored = {task.task_name: {str(r.trace) for r in records} for task, records in zip(chosen, here)}
            # trials left in this run: ``state`` (made below) counts the measured ones as each batch is joined
            strategy = _skipping_stored(population_size, stored, lambda: state["budget"] - state["done"], skipped)
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                extracted_tasks=chosen, work_dir=str(log_dir), strategy=strategy, seed=seed,
                space=search_space.space_for(chosen[0].dispatched[0], tvm_target))
            _quiet_console()
            earlier = [records[0] if records else None for records in here] if recheck else []
            per_iter = max(1, min(num_trials_per_iter, max(per_task_left[i] for i in to_tune)))
            state = {"new": [0] * len(chosen), "best": [before[hashes[i]][1] for i in to_tune],
                     "stale": [0] * len(chosen), "stopped": set(), "done": 0, "budget": remaining,
                     "started": time.monotonic(), "weights": [float(w) for w in weights],
                     "early_stopping": early_stopping, "interrupted": interrupted,
                     "had": [existing[i] for i in to_tune],
                     "recheck": max(0, recheck), "found": [[] for _ in chosen]}
            scheduler = _make_scheduler(state, say, [t.task_name for t in chosen])
            callbacks = ms.measure_callback.MeasureCallback.create("default") + [
                _make_progress_callback([t.task_name for t in chosen], [int(w) for w in weights], state, say)]
            cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=max(1, os.cpu_count() or 1),
                                                        tree_method="auto")
            say(f"tuning {len(chosen)} tasks, {remaining} trials, runner {runner_name}")
            from tvm.s_tir.meta_schedule import _ffi_api as ms_ffi

            ms_ffi.TaskSchedulerTune(  # type: ignore[attr-defined]
                scheduler, contexts, [float(w) for w in weights], remaining,
                max(per_task_left[i] for i in to_tune), per_iter, builder, runner, callbacks, database, cost_model)
            if skipped[0]:
                say(f"left out {skipped[0]} candidates the log already held for {cpu} (not measured again)")
            for j, i in enumerate(to_tune):
                new[i] = state["new"][j]
            for task, against, found in zip(chosen, earlier, state["found"]):
                if interrupted.is_set():
                    break
                if against is not None and found:
                    records = _to_measure(task, (trace for _secs, trace in found))
                    measure_schedules([task] * len(records), builder, runner, database, tvm_target, say,
                                      records=records, what="this search's fastest", against=against,
                                      rounds=SIDE_BY_SIDE_ROUNDS)
        after = database_stats(database, selected, cpu)

    result = TuneResult(log_dir=log_dir, target=spec.name, fingerprint=fingerprint, runner=runner_name)
    for i, task in enumerate(selected):
        n, best, untuned = after[hashes[i]]
        result.tasks.append(TaskResult(name=task.task_name, weight=int(task.weight), trials=n, new_trials=new[i],
                                       best_us=best * 1e6 if best is not None else None,
                                       untuned_us=untuned * 1e6 if untuned is not None else None))
    result.seconds = time.monotonic() - started
    say(result.table())
    say(f"tuned {len(selected)} tasks: {result.new_trials} new trials, {result.trials} in {log_dir} "
        f"({result.seconds:.0f} s)")
    if interrupted.is_set():
        say("stopped early by the interrupt; run the same command again to resume")
        raise KeyboardInterrupt
    return result
