"""Hardware targets, read from one TOML file per board in ``targets/``.

No target is hard-coded in Python: a file gives the TVM target (a dict, optionally based on a TVM
tag), the host target for GPUs, the cross compiler and the Debian package that provides it, the
runtime device, and how the target has been verified. ``--target path/to/board.toml`` works the same
way as a shipped name.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .errors import TargetError
from .manifest import host_arch

_PACKAGE_DIR = Path(__file__).resolve().parent
TARGETS_DIR = next(
    (d for d in (_PACKAGE_DIR / "targets_data", _PACKAGE_DIR.parent / "targets") if d.is_dir()),
    _PACKAGE_DIR / "targets_data",
)
"""Shipped target files: ``targets/`` in a checkout (editable install), packaged as ``targets_data`` in a wheel."""

DEVICES = ("cpu", "cuda", "opencl")
VERIFICATION_LEVELS = ("native", "emulated", "compiled")
ARCHES = ("x86_64", "aarch64", "arm")


@dataclass(frozen=True)
class CrossCompiler:
    """A C/C++ compiler that links the generated object code into a shared library for the board."""

    cc: str
    options: tuple[str, ...] = ()
    debian_package: str = ""

    def check(self) -> str:
        """Return the compiler's full path, or raise naming the package that provides it."""
        path = shutil.which(self.cc)
        if path is None:
            hint = f"install it: apt-get install {self.debian_package}" if self.debian_package else "install it"
            raise TargetError(f"cross compiler '{self.cc}' not found on PATH; {hint}")
        return path


@dataclass(frozen=True)
class TargetSpec:
    """One hardware target as read from its TOML file."""

    name: str
    description: str
    device: str
    arch: str
    verified: str
    tvm: dict[str, Any]
    source: Path
    aliases: tuple[str, ...] = ()
    host: dict[str, Any] | None = None
    cross_compiler: CrossCompiler | None = None
    rpc_key: str = ""
    notes: str = ""
    logs_from: str = ""
    """Another target whose tuning logs ``compile`` uses where this one has none of its own for a model: a
    portable x86 build takes the schedules tuned on x86 machines (``tune.compile_database`` prefers those of
    CPUs with the build's vector extension)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def tvm_target(self):
        """The resolved ``tvm.target.Target`` (host-dependent values such as ``native`` filled in)."""
        import tvm

        try:
            if self.host is not None:
                return tvm.target.Target(_resolve_auto(self.tvm), host=_resolve_auto(self.host))
            return tvm.target.Target(_resolve_auto(self.tvm))
        except Exception as exc:  # TVM raises its own error types for malformed dicts
            raise TargetError(f"target '{self.name}' ({self.source}): TVM rejects its [tvm] table: {exc}") from None

    def tvm_target_json(self) -> str:
        """The resolved target as JSON, as TVM prints it (for manifests and `targets show`)."""
        return json.dumps(json.loads(str(self.tvm_target())), sort_keys=True)

    @property
    def is_cross(self) -> bool:
        """True when the artifact is for another architecture than this machine."""
        return self.arch != host_arch()

    def check_device_compiler(self) -> str | None:
        """For CUDA targets, make sure TVM can compile the kernels; return the backend it will use.

        TVM 0.27 compiles CUDA with NVRTC (the ``cuda-bindings`` package) unless
        ``TVM_CUDA_COMPILE_MODE=nvcc``. Without cuda-bindings this selects nvcc, which must be on PATH and
        new enough, yet not too new, for the target's ``arch`` (CUDA 13 dropped everything before sm_75).
        Other devices need no compiler here (OpenCL source is compiled by the board's driver).
        """
        if self.device != "cuda":
            return None
        import importlib.util

        mode = os.environ.get("TVM_CUDA_COMPILE_MODE", "").strip().lower()
        if mode not in ("", "nvrtc", "nvcc"):
            raise TargetError(f"TVM_CUDA_COMPILE_MODE={mode!r}; expected 'nvcc' or 'nvrtc'")
        has_nvrtc = importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None
        if mode == "nvrtc" or (mode == "" and has_nvrtc):
            if not has_nvrtc:
                raise TargetError("TVM_CUDA_COMPILE_MODE=nvrtc but the cuda-bindings package (NVRTC) is not installed; "
                                  "pip install cuda-bindings, or unset it to compile with nvcc")
            return "nvrtc"
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            raise TargetError(f"target '{self.name}' needs a CUDA compiler: nvcc not found on PATH; install the CUDA "
                              "toolkit (Debian: nvidia-cuda-toolkit) or pip install cuda-bindings for NVRTC")
        arch = str(self.tvm_target().attrs.get("arch", ""))
        release = _nvcc_release(nvcc)
        if release is not None and arch.startswith("sm_"):
            sm = int("".join(ch for ch in arch[3:] if ch.isdigit()) or 0)
            if release[0] >= 13 and sm < 75:
                raise TargetError(f"target '{self.name}' is {arch}, which nvcc {release[0]}.{release[1]} ({nvcc}) cannot "
                                  "compile for (CUDA 13 dropped architectures before sm_75); put a CUDA 12 nvcc first "
                                  "on PATH")
        os.environ["TVM_CUDA_COMPILE_MODE"] = "nvcc"  # TVM reads it when it compiles the kernels
        return "nvcc"

    def fcompile(self):
        """The ``export_library`` compile function: the target's cross compiler, or TVM's default."""
        self.check_device_compiler()
        if self.cross_compiler is None:
            if self.is_cross:
                raise TargetError(f"target '{self.name}' is for {self.arch} but its file names no [cross_compiler]")
            return None
        from tvm.support import cc

        self.cross_compiler.check()
        return cc.cross_compiler(self.cross_compiler.cc, options=list(self.cross_compiler.options))

    def toolchain_version(self) -> str:
        """First line of ``CC --version`` for the compiler that links the library."""
        compiler = self.cross_compiler.check() if self.cross_compiler else (shutil.which("g++") or "g++")
        try:
            out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        return out.splitlines()[0] if out else "unknown"


def _nvcc_release(nvcc: str) -> tuple[int, int] | None:
    """(major, minor) from ``nvcc --version`` ("Cuda compilation tools, release 13.0, V13.0.88")."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _resolve_auto(table: dict[str, Any]) -> dict[str, Any]:
    """Replace the host-dependent placeholders ``mcpu = "native"`` and ``num-cores = "auto"``."""
    resolved = dict(table)
    if resolved.get("mcpu") == "native":
        import tvm

        resolved["mcpu"] = str(tvm.target.codegen.llvm_get_system_cpu())
    if resolved.get("num-cores") == "auto":
        from .runtime import physical_cores

        resolved["num-cores"] = physical_cores()
    return resolved


def _search_dirs() -> list[Path]:
    dirs = []
    if env := os.environ.get("TVMNET_TARGETS_PATH"):
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    dirs.append(TARGETS_DIR)
    return dirs


def read_target_file(path: Path) -> TargetSpec:
    """Parse and validate one target file."""
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise TargetError(f"cannot read target file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise TargetError(f"target file {path} is not valid TOML: {exc}") from None

    def need(key: str, allowed: tuple[str, ...] | None = None) -> Any:
        if key not in data:
            raise TargetError(f"target file {path} lacks the key '{key}'")
        value = data[key]
        if allowed is not None and value not in allowed:
            raise TargetError(f"target file {path}: {key} = {value!r}, expected one of {', '.join(allowed)}")
        return value

    if not isinstance(data.get("tvm"), dict):
        raise TargetError(f"target file {path} lacks a [tvm] table (TVM target dict or tag)")
    cross = data.get("cross_compiler")
    known = {"name", "aliases", "description", "device", "arch", "verified", "tvm", "host", "cross_compiler",
             "rpc_key", "notes", "logs_from"}
    return TargetSpec(
        name=need("name"),
        description=need("description"),
        device=need("device", DEVICES),
        arch=need("arch", ARCHES),
        verified=need("verified", VERIFICATION_LEVELS),
        tvm=data["tvm"],
        source=path,
        aliases=tuple(data.get("aliases", ())),
        host=data.get("host"),
        cross_compiler=CrossCompiler(
            cc=cross["cc"], options=tuple(cross.get("options", ())), debian_package=cross.get("debian_package", "")
        )
        if cross
        else None,
        rpc_key=data.get("rpc_key", data["name"]),
        notes=data.get("notes", ""),
        logs_from=data.get("logs_from", ""),
        extra={k: v for k, v in data.items() if k not in known},
    )


def list_targets() -> list[TargetSpec]:
    """Every target file on the search path (``$TVMNET_TARGETS_PATH`` first), by name."""
    found: dict[str, TargetSpec] = {}
    for directory in _search_dirs():
        for path in sorted(directory.glob("*.toml")):
            spec = read_target_file(path)
            found.setdefault(spec.name, spec)
    return sorted(found.values(), key=lambda spec: spec.name)


def get_target(name_or_path: str | os.PathLike) -> TargetSpec:
    """Find a target by name, alias, or the path of a TOML file."""
    text = os.fspath(name_or_path)
    if text.endswith(".toml") or os.sep in text:
        path = Path(text)
        if not path.is_file():
            raise TargetError(f"target file {path} does not exist")
        return read_target_file(path)
    targets = list_targets()
    for spec in targets:
        if text == spec.name or text in spec.aliases:
            return spec
    names = ", ".join(spec.name for spec in targets)
    raise TargetError(f"unknown target '{text}'; known targets: {names} (or give a path to a .toml file)")


VECTOR_EXTENSIONS = ("avx512f", "avx2")


def vector_isa(target) -> str | None:
    """The widest x86 vector extension of a ``tvm.target.Target``'s CPU (an entry of :data:`VECTOR_EXTENSIONS`),
    None for other targets: a tuned schedule's vector widths and register tiles were chosen for it (a build
    borrowing another CPU's records takes those of a CPU with its own extension first), and the expansion fusion
    was measured with AVX-512 only."""
    import tvm

    from .prefetch import applies_to as runs_on_x86

    if not runs_on_x86(target):
        return None
    return next((name for name in VECTOR_EXTENSIONS if tvm.target.codegen.target_has_features(name, target)), None)
