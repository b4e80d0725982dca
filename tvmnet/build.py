"""Compile an ONNX MobileNet into a standalone artifact: ``model.so`` (weights inside) + ``manifest.json``.

The artifact directory is assembled in a temporary sibling and renamed into place, so a failed or
interrupted compile leaves nothing half-written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import onnx

from . import __version__, pipeline, tune, zoo
from .errors import ArtifactError, ModelError
from .frontend import ImportedModel, InputShapes, load_onnx
from .manifest import (
    FORMAT_VERSION,
    LIBRARY_NAME,
    MANIFEST_NAME,
    MODEL_NAME,
    Preprocessing,
    preprocessing_to_json,
    read_manifest,
    sha256_file,
    write_json_atomic,
)
from .summary import summarize
from .targets import TargetSpec, get_target

DEFAULT_MODEL = "mobilenet_v2"
Progress = Callable[[str], None]


def resolve_model(
    model: str | os.PathLike | onnx.ModelProto | None, *, alpha: float = 1.0, resolution: int = 224
) -> tuple[str | os.PathLike | onnx.ModelProto, str]:
    """A model argument (file, zoo name, ModelProto, or None for the default) and a display name."""
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "model"
    text = os.fspath(model)
    if text in zoo.MODEL_NAMES and not Path(text).exists():
        return zoo.build_model(text, alpha=alpha, resolution=resolution), f"{text}-{alpha:g}-{resolution}"
    return model, Path(text).stem


def _preprocessing(imported: ImportedModel) -> Preprocessing | None:
    """Image preprocessing defaults for 4-D image inputs (zoo metadata wins over ImageNet defaults)."""
    shape = imported.inputs[0].shape
    if len(shape) != 4:
        return None
    layout = "NHWC" if shape[3] == 3 and shape[1] != 3 else "NCHW"
    resolution = shape[1] if layout == "NHWC" else shape[2]
    meta = {p.key: p.value for p in imported.onnx_model.metadata_props}
    kwargs = {}
    for key in ("mean", "std"):
        if f"tvmnet.{key}" in meta:
            kwargs[key] = tuple(float(v) for v in meta[f"tvmnet.{key}"].split(","))
    return Preprocessing(resolution=resolution, layout=layout, **kwargs)


def _read_labels(labels: Sequence[str] | str | os.PathLike | None, num_classes: int) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        try:
            labels = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise ModelError(f"cannot read labels file {path}: {exc.strerror}") from None
    labels = list(labels)
    if len(labels) != num_classes:
        raise ModelError(f"{len(labels)} labels given, the model has {num_classes} classes")
    return labels


def _load_database(tuning_logs: str | os.PathLike | None, fused=None, spec: TargetSpec | None = None,
                   warn: Progress | None = None):
    """The MetaSchedule database in ``tuning_logs``; without one, ``tune``'s default log dir for this
    model's workloads and target when it exists (``tuning_logs/<target>/<fingerprint>/``), else the one of
    the target it names in ``logs_from``, else None. Each workload's fastest record is applied, damaged
    lines skipped with a warning (see :func:`tune.compile_database`). Returns ``(database, path)``."""
    if tuning_logs is None:
        if fused is None or spec is None:
            return None, None
        # extract the model's tasks only where this target, or the one it borrows from, has logs at all
        roots = [tune.log_root() / name for name in (spec.name, spec.logs_from) if name]
        roots = [root for root in roots if root.is_dir()]
        if not roots:
            return None, None
        fingerprint = tune.workload_fingerprint(fused, spec)
        tuning_logs = next((root / fingerprint for root in roots if tune.has_database(root / fingerprint)), None)
        if tuning_logs is None:
            return None, None
        if tuning_logs.parent.name != spec.name and warn is not None:
            warn(f"no tuning log of {spec.name} for this model: using {tuning_logs.parent.name}'s ({tuning_logs})")
    path = Path(tuning_logs)
    if not tune.has_database(path):
        raise ModelError(f"{path} holds no MetaSchedule database ({tune.WORKLOAD_FILE}); run `tvmnet tune` first")
    return tune.compile_database(path, warn=warn, target=spec.tvm_target() if spec is not None else None), path


def _prepare_output(output: Path) -> Path:
    """Check the destination early; return the temporary directory to assemble the artifact in."""
    if output.exists() and not output.is_dir():
        raise ArtifactError(f"output {output} exists and is not a directory; choose another -o")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST_NAME).is_file():
        raise ArtifactError(f"output {output} is a non-empty directory that is not a tvmnet artifact; "
                            "refusing to overwrite it")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the artifact from other users
        return staging
    except OSError as exc:
        raise ArtifactError(f"cannot write to {output.parent}: {exc.strerror}; choose a writable -o") from None


def _move_into_place(staging: Path, output: Path) -> None:
    old = None
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, old)
    os.replace(staging, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def compile(  # noqa: A001 - the public name users expect: tvmnet.compile
    model: str | os.PathLike | onnx.ModelProto | None = None,
    *,
    output: str | os.PathLike,
    target: str | os.PathLike | TargetSpec = "x86",
    input_shapes: InputShapes | None = None,
    tuning_logs: str | os.PathLike | None = None,
    labels: Sequence[str] | str | os.PathLike | None = None,
    alpha: float = 1.0,
    resolution: int = 224,
    progress: Progress | None = None,
) -> Path:
    """Compile ``model`` (an .onnx path, a zoo name, a ModelProto, or None for MobileNetV2-1.0-224)
    for ``target`` into the artifact directory ``output``; return its path."""
    say = progress or (lambda _msg: None)
    spec = target if isinstance(target, TargetSpec) else get_target(target)
    fcompile = spec.fcompile()  # a missing cross toolchain fails now, before minutes of work
    tvm_target = spec.tvm_target()
    output = Path(output)
    source, name = resolve_model(model, alpha=alpha, resolution=resolution)

    started = time.monotonic()
    say(f"importing {name}")
    imported = load_onnx(source, input_shapes)
    label_list = _read_labels(labels, imported.outputs[0].shape[-1])
    mod = imported.to_relax()
    say(f"optimizing for {spec.name} ({tvm_target.kind.name})")
    fused = pipeline.fuse(mod, tvm_target)
    database, tuning_logs = _load_database(tuning_logs, fused, spec, warn=say)
    say("building")
    built = pipeline.build(fused, tvm_target, database)
    report = built.schedules
    if database is not None:
        say(f"tuned schedules: {len(report.tuned)} of {report.total} functions ({len(report.fallback)} fallback)")
    if report.fused:
        say(f"fused {len(report.fused)} expansion(s) with the depthwise convolution each feeds "
            f"({', '.join(report.fused)}): their tuned records no longer apply")

    staging = _prepare_output(output)
    try:
        library = staging / LIBRARY_NAME
        say(f"linking {LIBRARY_NAME}" + (f" with {spec.cross_compiler.cc}" if spec.cross_compiler else ""))
        try:
            built.executable.export_library(str(library), fcompile=fcompile)
        except Exception as exc:
            raise ArtifactError(f"linking {LIBRARY_NAME} failed: {str(exc).strip().splitlines()[-1]}") from None
        (staging / MODEL_NAME).write_bytes(imported.source_bytes)
        pre = _preprocessing(imported)
        manifest = {
            "format_version": FORMAT_VERSION,
            "tvmnet_version": __version__,
            "tvm_version": _tvm_version(),
            "name": name,
            "inputs": [spec_.to_json() for spec_ in imported.inputs],
            "outputs": [spec_.to_json() for spec_ in imported.outputs],
            "target": {
                "name": spec.name,
                "tvm": spec.tvm_target_json(),
                "device": spec.device,
                "arch": spec.arch,
                "triple": str(tvm_target.host.attrs.get("mtriple", "") if tvm_target.host else
                              tvm_target.attrs.get("mtriple", "")) or None,
                "toolchain": spec.toolchain_version(),
                "verified": spec.verified,
                "rpc_key": spec.rpc_key or None,
            },
            "library": {"file": LIBRARY_NAME, "sha256": sha256_file(library),
                        "input_alignment": built.input_alignment},
            "model": {"file": MODEL_NAME, "sha256": sha256_file(staging / MODEL_NAME)},
            "preprocessing": preprocessing_to_json(pre) if pre else None,
            "labels": label_list,
            "graph": summarize(imported.onnx_model),
            "schedules": {**report.to_json(), "database": str(tuning_logs) if tuning_logs else None},
            "compile_seconds": round(time.monotonic() - started, 2),
        }
        write_json_atomic(staging / MANIFEST_NAME, manifest)
        read_manifest(staging)  # what we promise must be what the runtime accepts
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"wrote {output}")
    return output


def _tvm_version() -> str:
    import tvm

    return tvm.__version__
