"""Shared helpers: compile a model with tvmnet and compare it with onnxruntime on the same input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import tvmnet

RTOL = 1e-4
ATOL = 1e-4
"""fp32: element-wise |tvm - ort| <= ATOL + RTOL * |ort| (np.testing.assert_allclose)."""


def ort_run(model: onnx.ModelProto | str | Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def compile_and_compare(model: onnx.ModelProto, out: Path, *, input_shapes=None, seed: int = 0) -> tvmnet.CompiledModel:
    """Compile for x86, load, and assert the output matches onnxruntime's on a seeded random input."""
    artifact = tvmnet.compile(model, output=out, target="x86", input_shapes=input_shapes)
    compiled = tvmnet.load(artifact)
    spec = compiled.inputs[0]
    x = np.random.default_rng(seed).standard_normal(spec.shape).astype(spec.dtype)
    got = compiled.run(x)
    expected = ort_run(model, {spec.name: x})[0]
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    assert np.abs(expected).max() > 1e-3, "degenerate reference output: the comparison would prove nothing"
    return compiled


def copy_artifact_with(artifact: Path, tmp_path: Path, garbage_library: bool = False, **changes: object) -> Path:
    """A copy of ``artifact`` whose manifest has ``changes`` (None deletes a key)."""
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    path = copy / "manifest.json"
    manifest = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    path.write_text(json.dumps(manifest))
    if garbage_library:  # were it dlopened, the error would be TVM's "could not load", not ours
        (copy / "model.so").write_bytes(b"\x7fELF garbage")
    return copy


def cpu_flags() -> set[str]:
    """This CPU's feature flags (/proc/cpuinfo; none where it is missing): whose x86 target code can run here,
    where code for a missing one would die of SIGILL."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def no_leftovers(directory: Path) -> list[str]:
    """Names of temporary or partial entries a failed compile could have left in ``directory``."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def log_of_design_spaces(model: onnx.ModelProto, log_dir: Path, keep=lambda schedule: True) -> list[str]:
    """A MetaSchedule log for ``model`` on the x86 target that holds, per task, its first design space that ``keep``
    accepts, postprocessed as the search does before it builds a candidate (so parallelized and vectorized) and
    stored as measured at 1 µs: a tuned build without a search. Returns the names of the tasks it covers."""
    from tvm.s_tir import meta_schedule as ms

    from tvmnet import pipeline, search_space, tune
    from tvmnet.frontend import load_onnx
    from tvmnet.targets import get_target

    target = get_target("x86").tvm_target()
    log_dir.mkdir(parents=True, exist_ok=True)
    database = ms.database.JSONDatabase(work_dir=str(log_dir))
    covered = []
    for task in tune.extract_tasks(pipeline.fuse(load_onnx(model).to_relax(), target), target):
        workload = task.dispatched[0]
        space = search_space.space_for(workload, target)
        context = ms.TuneContext(mod=workload, target=target, space_generator=space, task_name=task.task_name)
        schedule = next((sch for sch in context.generate_design_space() if keep(sch)), None)
        if schedule is None:
            continue
        for postproc in space.postprocs:
            assert postproc.apply(schedule), (task.task_name, postproc)
        database.commit_tuning_record(ms.database.TuningRecord(
            schedule.trace, database.commit_workload(workload), [1e-6], target,
            ms.arg_info.ArgInfo.from_entry_func(workload, remove_preproc=True)))
        covered.append(task.task_name)
    return covered


@pytest.fixture(scope="session")
def tiny_v2_artifact(tmp_path_factory) -> Path:
    """MobileNetV2 α=0.25 ρ=96 compiled once for the tests that only need some artifact."""
    from tvmnet import zoo

    out = tmp_path_factory.mktemp("artifacts") / "v2-tiny"
    return tvmnet.compile(zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96), output=out)
