"""Hardware targets (issue 3): every shipped target file resolves, and cross builds produce the right ELF.

Each build compiles a real model through ``tvmnet.compile`` once per module (module-scoped fixtures):
MobileNetV2 alpha=0.5 at 160x160 for the CPU architectures, a smaller MobileNetV2 (alpha=0.25, 96x96)
for the GPU source checks. Builds for the remaining targets of an architecture already covered are
marked ``slow``.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import tvmnet
from tvmnet import pipeline
from tvmnet.errors import ArtifactError, TargetError
from tvmnet.manifest import host_arch
from tvmnet.targets import get_target, list_targets

from conftest import cpu_flags

SHIPPED = {
    "x86", "x86-avx2", "x86-avx512", "rasp4b", "rasp4b32", "rasp3b", "rk3399", "rk3399-mali",
    "jetson-nano", "jetson-orin-nano", "cuda", "cuda-sm80", "cuda-sm90",
}
EM_ARM, EM_X86_64, EM_AARCH64 = 40, 62, 183
E_MACHINE = {"x86_64": EM_X86_64, "aarch64": EM_AARCH64, "arm": EM_ARM}
ELF_CLASS = {"x86_64": 64, "aarch64": 64, "arm": 32}
EF_ARM_ABI_FLOAT_HARD = 0x400
# What TVM 0.27's export_library puts in every library: the serialized module tree (device code,
# VM bytecode, weights) that tvm.runtime.load_module reads back.
LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"

CPU_MODEL = {"alpha": 0.5, "resolution": 160}
GPU_MODEL = {"alpha": 0.25, "resolution": 96}
FAST_BUILDS = ("rasp4b", "rasp4b32", "x86-avx2")  # one per architecture and float ABI
SLOW_BUILDS = ("rasp3b", "rk3399", "x86-avx512")


# --- ELF reading, just enough for the checks (no binutils needed) ---------------------------------


class Elf:
    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        assert data[:4] == b"\x7fELF", f"{path} is not an ELF file"
        self.bits = {1: 32, 2: 64}[data[4]]
        assert data[5] == 1, "little-endian expected"
        self.e_type, self.e_machine = struct.unpack_from("<HH", data, 16)
        if self.bits == 64:
            (self.e_flags,) = struct.unpack_from("<I", data, 48)
            (shoff,) = struct.unpack_from("<Q", data, 0x28)
            shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
            sh_fmt, sym_fmt, sym_size = "<IIQQQQIIQQ", "<IBBHQQ", 24
        else:
            (self.e_flags,) = struct.unpack_from("<I", data, 36)
            (shoff,) = struct.unpack_from("<I", data, 0x20)
            shentsize, shnum = struct.unpack_from("<HH", data, 0x2E)
            sh_fmt, sym_fmt, sym_size = "<IIIIIIIIII", "<IIIBBH", 16
        sections = [struct.unpack_from(sh_fmt, data, shoff + i * shentsize) for i in range(shnum)]
        self.dynamic_symbols: set[str] = set()
        for sh in sections:
            if sh[1] != 11:  # SHT_DYNSYM
                continue
            offset, size, link = sh[4], sh[5], sh[6]
            strtab = sections[link][4]
            for pos in range(offset + sym_size, offset + size, sym_size):  # entry 0 is the null symbol
                fields = struct.unpack_from(sym_fmt, data, pos)
                name_off = fields[0]
                shndx = fields[3] if self.bits == 64 else fields[5]
                if shndx == 0:  # undefined: imported, not exported
                    continue
                end = data.index(b"\0", strtab + name_off)
                self.dynamic_symbols.add(data[strtab + name_off:end].decode())


def check_library(artifact: Path, target: str) -> Elf:
    spec = get_target(target)
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["target"]["name"] == target
    assert manifest["target"]["arch"] == spec.arch
    elf = Elf(artifact / "model.so")
    assert elf.e_type == 3, "model.so is not a shared object (ET_DYN)"
    assert elf.bits == ELF_CLASS[spec.arch]
    assert elf.e_machine == E_MACHINE[spec.arch]
    if spec.arch == "arm":
        assert elf.e_flags & EF_ARM_ABI_FLOAT_HARD, "armhf boards need the hard-float ABI"
    assert LIBRARY_BIN_SYMBOL in elf.dynamic_symbols
    kernels = {s for s in elf.dynamic_symbols if s.startswith("__tvm_ffi_fused_")}
    if spec.device == "cpu":
        assert kernels, "no host kernels exported"
    return elf


# --- building, once per target per module -------------------------------------------------------

_built: dict[str, tuple[Path, object]] = {}


def build(target: str, tmp_root: Path, model: dict) -> tuple[Path, object]:
    """Compile MobileNetV2 for ``target`` through tvmnet.compile; keep the VM executable it linked."""
    if target not in _built:
        captured = {}
        real_build = pipeline.build

        def capturing_build(*args, **kwargs):
            built = real_build(*args, **kwargs)
            captured["executable"] = built.executable
            return built

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pipeline, "build", capturing_build)
            out = tvmnet.compile("mobilenet_v2", output=tmp_root / target, target=target, **model)
        _built[target] = (out, captured["executable"])
    return _built[target]


@pytest.fixture(scope="module")
def build_root(tmp_path_factory) -> Path:
    yield tmp_path_factory.mktemp("targets")
    _built.clear()


# --- target files -------------------------------------------------------------------------------


def test_all_shipped_targets_are_listed():
    assert SHIPPED <= {spec.name for spec in list_targets()}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_target_file_resolves(name):
    spec = get_target(name)
    target = spec.tvm_target()
    assert target.kind.name == {"cpu": "llvm", "cuda": "cuda", "opencl": "opencl"}[spec.device]
    cpu = target if spec.device == "cpu" else target.host
    assert cpu is not None and cpu.kind.name == "llvm", "GPU targets need a [host] table"
    assert int(cpu.attrs["num-cores"]) >= 1, "MetaSchedule needs num-cores"
    triple = str(cpu.attrs.get("mtriple", ""))
    if spec.arch == "aarch64":
        assert triple.startswith("aarch64")
    elif spec.arch == "arm":
        assert triple.startswith(("armv7", "armv8")) and triple.endswith("gnueabihf")
        assert str(cpu.attrs.get("mfloat-abi")) == "hard"
    if spec.is_cross:
        assert spec.cross_compiler is not None and spec.cross_compiler.debian_package
    assert spec.verified in ("native", "emulated", "compiled")
    if spec.verified == "native":
        assert spec.arch == "x86_64" and spec.device == "cpu", "only x86 CPU targets can have run here"
    for alias in spec.aliases:
        assert get_target(alias).name == name


@pytest.mark.parametrize("name", sorted(s for s in SHIPPED if get_target(s).cross_compiler))
def test_cross_compiler_is_installed(name):
    compiler = get_target(name).cross_compiler
    assert compiler.check()
    assert get_target(name).toolchain_version() != "unknown"


def test_missing_cross_compiler_names_the_package(tmp_path):
    path = tmp_path / "board.toml"
    text = get_target("rasp4b").source.read_text().replace('"aarch64-linux-gnu-g++"', '"no-such-g++"')
    path.write_text(text.replace('name = "rasp4b"', 'name = "board"'))
    with pytest.raises(TargetError, match="no-such-g\\+\\+.*apt-get install g\\+\\+-aarch64-linux-gnu"):
        tvmnet.compile("mobilenet_v2", output=tmp_path / "out", target=path, **GPU_MODEL)
    assert not (tmp_path / "out").exists()


# --- CPU builds ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", [*FAST_BUILDS, *(pytest.param(n, marks=pytest.mark.slow) for n in SLOW_BUILDS)]
)
def test_cpu_build_is_an_elf_for_the_board(name, build_root):
    artifact, _ = build(name, build_root, CPU_MODEL)
    check_library(artifact, name)


# CPU flags (conftest.cpu_flags) each x86 target's library executes
ISA_FLAGS = {
    "x86-avx2": ("avx2", "fma"),
    "x86-avx512": ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"),  # LLVM's skylake-avx512
}


@pytest.mark.parametrize("name", sorted(ISA_FLAGS))
def test_x86_build_runs_here_and_matches_onnxruntime(name, build_root):
    """Each x86 target runs natively wherever this CPU has its instruction set (x86-avx512: a Zen 4/5 or
    a Xeon since Skylake-SP), and matches onnxruntime."""
    flags = cpu_flags()
    missing = [flag for flag in ISA_FLAGS[name] if flag not in flags]
    if host_arch() != "x86_64" or missing:
        pytest.skip(f"this CPU lacks {', '.join(missing) or 'x86-64'}")
    import onnxruntime as ort

    artifact, _ = build(name, build_root, CPU_MODEL)
    model = tvmnet.load(artifact)
    x = np.random.default_rng(0).standard_normal(model.inputs[0].shape).astype(np.float32)
    got = model.run(x)
    session = ort.InferenceSession(str(artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got.reshape(want.shape), want, rtol=1e-3, atol=1e-3)


def test_loading_an_aarch64_artifact_here_names_the_architecture(build_root):
    if host_arch() == "aarch64":
        pytest.skip("this machine is aarch64")
    artifact, _ = build("rasp4b", build_root, CPU_MODEL)
    with pytest.raises(ArtifactError, match=f"aarch64.*{host_arch()}"):
        tvmnet.load(artifact)


# --- GPU targets --------------------------------------------------------------------------------


def _opencl_sources(executable) -> list[str]:
    sources = []
    stack = list(executable.mod.imports)
    while stack:
        module = stack.pop()
        if module.kind == "opencl":
            sources.append(module.inspect_source("cl"))
        stack.extend(module.imports)
    return sources


def test_mali_build_holds_opencl_kernels_that_compile(build_root):
    artifact, executable = build("rk3399-mali", build_root, GPU_MODEL)
    check_library(artifact, "rk3399-mali")
    sources = _opencl_sources(executable)
    assert sources, "no OpenCL module in the executable"
    assert all("__kernel" in src for src in sources)
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang not installed (Debian: clang); the OpenCL kernels were not compiled")
    for index, src in enumerate(sources):
        path = build_root / f"mali_kernels_{index}.cl"
        path.write_text(src)
        result = subprocess.run(
            [clang, "-cl-std=CL1.2", "-fsyntax-only", "-x", "cl", str(path)],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stderr[-4000:]


def test_cuda_without_nvcc_is_a_clear_target_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc (nor anything else) on PATH
    with pytest.raises(TargetError, match="nvcc not found on PATH; install the CUDA toolkit \\(Debian: nvidia-cuda-toolkit\\)"):
        tvmnet.compile("mobilenet_v2", output=tmp_path / "out", target="cuda-sm90", **GPU_MODEL)
    assert not (tmp_path / "out").exists()


def test_cuda13_refuses_jetson_nano_sm53(tmp_path, monkeypatch):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.88'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TVM_CUDA_COMPILE_MODE", "nvcc")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(TargetError, match="sm_53.*CUDA 12"):
        get_target("jetson-nano").fcompile()


@pytest.mark.parametrize("name", ["cuda-sm90", pytest.param("jetson-orin-nano", marks=pytest.mark.slow)])
def test_cuda_build_embeds_kernels(name, build_root):
    spec = get_target(name)
    try:
        backend = spec.check_device_compiler()
    except TargetError as exc:
        pytest.skip(f"no CUDA compiler here: {exc}")
    artifact, executable = build(name, build_root, GPU_MODEL)
    check_library(artifact, name)
    kinds = set()
    stack = list(executable.mod.imports)
    while stack:
        module = stack.pop()
        kinds.add(module.kind)
        stack.extend(module.imports)
    assert "cuda" in kinds, f"no CUDA module in the executable ({backend}); found {sorted(kinds)}"
