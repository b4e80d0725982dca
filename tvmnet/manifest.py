"""The artifact's ``manifest.json``: what the compiler promises and what the runtime checks.

Shared by the compiler side (which writes it) and the runtime side (which reads it), so it imports
neither TVM nor ONNX.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import ArtifactError

MANIFEST_NAME = "manifest.json"
LIBRARY_NAME = "model.so"
MODEL_NAME = "model.onnx"
FORMAT_VERSION = 1
"""Bumped when the manifest's meaning changes; the runtime refuses other versions."""
TVM_ALIGNMENT = 64
"""Bytes TVM's generated kernels assume a tensor's data is aligned to, unless built to assume less."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and numpy dtype name of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[{','.join(map(str, self.shape))}]"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(name=str(data["name"]), shape=tuple(int(d) for d in data["shape"]), dtype=str(data["dtype"]))


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor (defaults for ``--image``)."""

    resolution: int
    layout: str = "NCHW"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_fraction: float = 0.875
    """Resize the shorter side to ``resolution / crop_fraction``, then centre-crop (the ImageNet habit)."""


def host_arch() -> str:
    """This machine's architecture, in the names manifests and target files use."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, "arm" if machine.startswith("arm") else machine)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON next to its final place and rename, so readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(artifact: Path) -> dict[str, Any]:
    """Read and sanity-check an artifact directory's manifest."""
    path = artifact / MANIFEST_NAME
    if not artifact.is_dir():
        raise ArtifactError(f"{artifact} is not a tvmnet artifact directory (compile one with `tvmnet compile`)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{artifact} has no {MANIFEST_NAME}; it is not a complete tvmnet artifact") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is unreadable or not JSON ({exc}); recompile the artifact") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a tvmnet manifest (a JSON {type(data).__name__}, not an object)")
    _check_format(path, data)
    for key in ("inputs", "outputs", "target", "library"):
        if key not in data:
            raise ArtifactError(f"{path} lacks '{key}'; recompile the artifact")
    return data


def _check_format(path: Path, data: dict[str, Any]) -> None:
    """Refuse manifests of another format, saying which tvmnet wrote it and what to do."""
    from . import __version__  # here, not at import time: tvmnet/__init__ imports this module

    version = data.get("format_version")
    writer = data.get("tvmnet_version")
    written_by = f"tvmnet {writer}" if isinstance(writer, str) else "an unknown tvmnet"
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(
            f"{path} has no valid format_version ({version!r}); it was not written by a tvmnet release this "
            f"tvmnet {__version__} knows: recompile the model with this tvmnet"
        )
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} was written by {written_by} in manifest format {version}, newer than this tvmnet "
            f"{__version__} reads (format {FORMAT_VERSION}): upgrade tvmnet here, or recompile the model with "
            f"tvmnet {__version__}"
        )
    if version < FORMAT_VERSION:
        raise ArtifactError(
            f"{path} was written by {written_by} in manifest format {version}, older than this tvmnet "
            f"{__version__} reads (format {FORMAT_VERSION}): recompile the model with tvmnet {__version__}"
        )


def _release(version: str) -> tuple[int, int] | None:
    """TVM's major.minor from a version string like ``0.27.0.post1`` or ``0.28.dev0``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_tvm_version(artifact: Path, manifest: dict[str, Any], installed: str) -> None:
    """A model library only loads with the TVM release that built it (its ABI changes between releases).

    Another major.minor than the installed TVM's: ``ArtifactError`` before any ``dlopen``. Same release,
    another patch or post version: a warning, and the load goes ahead.
    """
    built = manifest.get("tvm_version")
    if not isinstance(built, str) or _release(built) is None:
        raise ArtifactError(
            f"{artifact / MANIFEST_NAME} does not say which TVM built it (tvm_version {built!r}); recompile the "
            f"model with this tvmnet (TVM {installed})"
        )
    if _release(built) != _release(installed):
        raise ArtifactError(
            f"{artifact} was compiled with TVM {built}, this machine has TVM {installed}; a model library "
            f"loads only with the TVM release that built it: recompile it here, or install apache-tvm=={built}"
        )
    if built != installed:
        warnings.warn(
            f"{artifact} was compiled with TVM {built}, this machine has TVM {installed} (same release, "
            "loading it anyway)",
            stacklevel=3,
        )


def input_alignment(manifest: dict[str, Any]) -> int:
    """Bytes the artifact's kernels need an input array's data aligned to for reading it in place
    (``library.input_alignment``; artifacts that do not say need TVM's 64)."""
    value = manifest["library"].get("input_alignment", TVM_ALIGNMENT)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value > TVM_ALIGNMENT \
            or value & (value - 1):
        raise ArtifactError(f"the manifest's library.input_alignment {value!r} is not a power of two from 1 to "
                            f"{TVM_ALIGNMENT}; recompile the artifact")
    return value


def tensor_specs(entries: list[dict[str, Any]]) -> list[TensorSpec]:
    return [TensorSpec.from_json(entry) for entry in entries]


def preprocessing_from_json(data: dict[str, Any]) -> Preprocessing:
    return Preprocessing(
        resolution=int(data["resolution"]),
        layout=str(data.get("layout", "NCHW")),
        mean=tuple(data.get("mean", Preprocessing.mean)),
        std=tuple(data.get("std", Preprocessing.std)),
        crop_fraction=float(data.get("crop_fraction", Preprocessing.crop_fraction)),
    )


def preprocessing_to_json(pre: Preprocessing) -> dict[str, Any]:
    return asdict(pre)
