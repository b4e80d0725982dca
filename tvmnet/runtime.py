"""Load a compiled artifact and run it: the only part of tvmnet a board needs.

Imports TVM's runtime (``tvm.runtime``) and nothing of tvmnet's compiler side, so an artifact loads
where only TVM's runtime is installed. Every input is checked against the manifest before TVM sees it.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from .errors import ArtifactError, InputError
from .manifest import (
    Preprocessing,
    TensorSpec,
    check_tvm_version,
    host_arch,
    input_alignment,
    preprocessing_from_json,
    read_manifest,
    sha256_file,
    tensor_specs,
)


THREADS_ENV = "TVM_NUM_THREADS"
CPU_DEVICE_TYPE = 1
"""DLPack's device type of the host CPU (``kDLCPU``)."""


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings count once): the thread count TVM should use.

    Reads the kernel's CPU topology for the CPUs in this process's affinity mask, so ``taskset`` and
    container CPU sets count; without Linux's sysfs, the logical CPU count.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def use_physical_cores() -> None:
    """Give TVM's thread pool one thread per physical core, unless ``TVM_NUM_THREADS`` is set.

    TVM's default on x86 is half the logical CPUs, because it assumes two-way SMT. On a CPU or VM without
    SMT that is half the cores: on this project's 2-core machine every inference and every tuning
    measurement ran on one thread. TVM reads the variable when a thread first runs parallel code, so
    this must run before that (``load`` and the tuning workers call it first).
    """
    os.environ.setdefault(THREADS_ENV, str(physical_cores()))


@dataclass(frozen=True)
class BenchmarkStats:
    """Latency of one inference, in milliseconds, over ``repeat`` samples of ``number`` calls each."""

    median_ms: float
    mean_ms: float
    p90_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    number: int
    repeat: int

    @classmethod
    def from_samples(cls, seconds: list[float], number: int) -> BenchmarkStats:
        ms = sorted(s * 1e3 for s in seconds)
        p90_index = min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))
        return cls(
            median_ms=statistics.median(ms),
            mean_ms=statistics.fmean(ms),
            p90_ms=ms[p90_index],
            min_ms=ms[0],
            max_ms=ms[-1],
            std_ms=statistics.pstdev(ms),
            number=number,
            repeat=len(ms),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KernelTime:
    """One function the VM calls (a fused kernel, or a VM builtin such as an allocation), per inference."""

    name: str
    calls: int
    """How often one inference calls it."""
    us: float
    """Microseconds per inference, summed over its calls (median over the profiled runs)."""
    share: float
    """Fraction of the profiled calls' total time."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class CompiledModel:
    """A compiled MobileNet: ``run`` inputs through it, ``benchmark`` it, read its manifest.

    Thread-safe, with calls serialised: TVM's VirtualMachine keeps per-call state (registers, frames), so
    ``run`` and ``benchmark`` hold a per-model lock while TVM runs and its outputs are copied out; input
    checks happen before it. One inference already uses every core through TVM's thread pool; for
    concurrent inferences, ``tvmnet.load`` the artifact once per thread (each model has its own VM).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], vm: Any, device: Any) -> None:
        self.path = path
        self.manifest = manifest
        self.inputs: list[TensorSpec] = tensor_specs(manifest["inputs"])
        self.outputs: list[TensorSpec] = tensor_specs(manifest["outputs"])
        self.preprocessing: Preprocessing | None = (
            preprocessing_from_json(manifest["preprocessing"]) if manifest.get("preprocessing") else None
        )
        self.labels: list[str] | None = manifest.get("labels")
        self._vm = vm
        self._device = device
        self._lock = threading.Lock()
        self._kept_inputs: dict[int, tuple[Any, np.ndarray | None]] = {}  # input index -> (tensor, host view)
        self._on_cpu = device.dlpack_device_type() == CPU_DEVICE_TYPE
        self._input_alignment = input_alignment(manifest)
        self._main: Any = None

    def __repr__(self) -> str:
        ins = ", ".join(spec.describe() for spec in self.inputs)
        return f"CompiledModel({str(self.path)!r}, target={self.manifest['target']['name']!r}, inputs=[{ins}])"

    def _check_inputs(self, data: np.ndarray | Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Arrays in the model's input order, each verified against the manifest."""
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - {spec.name for spec in self.inputs})
            if unknown:
                names = ", ".join(spec.name for spec in self.inputs)
                raise InputError(f"unknown input name(s) {', '.join(unknown)}; the model's inputs are: {names}")
            missing = [spec.name for spec in self.inputs if spec.name not in data]
            if missing:
                raise InputError(f"missing input(s) {', '.join(missing)}")
            arrays = [data[spec.name] for spec in self.inputs]
        else:
            if len(self.inputs) != 1:
                names = ", ".join(spec.name for spec in self.inputs)
                raise InputError(f"the model has {len(self.inputs)} inputs ({names}); pass a dict name -> array")
            arrays = [data]
        return [_check_array(spec, array) for spec, array in zip(self.inputs, arrays)]

    def reads_in_place(self, array: np.ndarray) -> bool:
        """Whether ``run`` hands this array to TVM's kernels as it is, without copying it first.

        That takes a CPU model and a writeable, C-contiguous array whose data is aligned as the artifact's
        kernels assume (``library.input_alignment`` in the manifest): tvmnet builds them to assume only the
        element size, so any ordinary array qualifies; artifacts from before that assume TVM's 64 bytes,
        which numpy gives only by chance (a misaligned tensor handed to such kernels crashed the process).
        DLPack cannot export a read-only array.
        """
        return self._in_place(array) is not None

    def _in_place(self, array: np.ndarray) -> Any | None:
        """``array`` as a TVM tensor over its own memory, or None where ``reads_in_place`` says no.

        TVM checks the alignment as it wraps the array. Reading the address first (``array.ctypes.data``)
        takes under 1 µs warm, but an inference pushes Python's own code and data out of the caches and
        ctypes is a lot of both to bring back: without it, ``run`` took 14-18 µs less per MobileNet call
        here (bench/README.md item 44).
        """
        if not (self._on_cpu and array.flags.c_contiguous and array.flags.writeable):
            return None
        import tvm_ffi

        try:
            return tvm_ffi.from_dlpack(array, require_alignment=self._input_alignment, require_contiguous=True)
        except RuntimeError:  # "FromDLPack: Data is not aligned to N bytes"
            return None

    def _device_inputs(self, arrays: list[np.ndarray]) -> list[Any]:
        """The inputs as TVM tensors (call with the lock held): an array ``reads_in_place`` accepts is
        passed without a copy; any other is copied into a tensor this model keeps.

        A fresh tensor per call cost about 0.13 ms more per MobileNetV2 inference than a copy into one
        kept tensor (2-core x86 VM): a new allocation and its first touch on every call. The copy goes
        through a numpy view of each kept tensor (DLPack), which is one C call instead of TVM's Python
        ``copyfrom``; numpy cannot view GPU memory, so a GPU model copies with ``copyfrom``. A kept tensor
        is made on the first copy: most calls on a CPU now read in place and need none.
        """
        tensors = []
        for i, array in enumerate(arrays):
            tensor = self._in_place(array)
            if tensor is not None:
                tensors.append(tensor)
                continue
            if i not in self._kept_inputs:
                import tvm

                kept = tvm.runtime.empty(self.inputs[i].shape, self.inputs[i].dtype, self._device)
                self._kept_inputs[i] = (kept, np.from_dlpack(kept) if self._on_cpu else None)
            kept, view = self._kept_inputs[i]
            if view is None:
                kept.copyfrom(array)
            else:
                np.copyto(view, array)
            tensors.append(kept)
        return tensors

    def _call(self, arrays: list[np.ndarray]) -> Any:
        if self._main is None:
            self._main = self._vm["main"]
        return self._main(*self._device_inputs(arrays))

    def _host_outputs(self, result: Any) -> list[np.ndarray]:
        """The VM's output tensor(s) as numpy arrays the caller owns (the VM reuses its memory next call).

        Copied through a DLPack view: after an inference has streamed the weights through the caches,
        TVM's Python ``Tensor.numpy()`` took about 0.15 ms per MobileNetV2 call here, this about 0.01 ms.
        numpy cannot view GPU memory, so a GPU model's outputs come back through ``Tensor.numpy()``.
        """
        if not self._on_cpu:
            return [tensor.numpy() for tensor in output_tensors(result)]
        return [np.from_dlpack(tensor).copy() for tensor in output_tensors(result)]

    def run(self, data: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray | list[np.ndarray]:
        """Run one inference; one output comes back as an array, several as a list in manifest order."""
        arrays = self._check_inputs(data)
        with self._lock:  # the VM is not reentrant; see the class docstring
            outputs = self._host_outputs(self._call(arrays))
        return outputs[0] if len(outputs) == 1 else outputs

    def benchmark(
        self, data: np.ndarray | Mapping[str, np.ndarray] | None = None, *, number: int = 10, repeat: int = 30,
        warmup: int = 5,
    ) -> BenchmarkStats:
        """Time ``main`` with TVM's own evaluator (no Python in the timed loop); random input by default."""
        if data is None:
            data = {spec.name: random_input(spec) for spec in self.inputs}
        arrays = self._check_inputs(data)
        with self._lock:
            seconds = self._time_main(arrays, number=number, repeat=repeat, warmup=warmup)
        return BenchmarkStats.from_samples(seconds, number)

    def profile(self, data: np.ndarray | Mapping[str, np.ndarray] | None = None, *, runs: int = 20,
                warmup: int = 5) -> list[KernelTime]:
        """Where one inference spends its time: every call the VM makes, slowest first.

        Each call is timed on the host around the VM's call instruction (``set_instrument``), so a few
        microseconds of instrumentation per call are included: use it to find the kernels worth tuning,
        and ``benchmark`` for latency.
        """
        if data is None:
            data = {spec.name: random_input(spec) for spec in self.inputs}
        arrays = self._check_inputs(data)
        with self._lock:
            per_run = self._profile_main(arrays, runs=max(1, runs), warmup=warmup)
        names = list(per_run[0])
        medians = {name: statistics.median(run.get(name, (0, 0.0))[1] for run in per_run) for name in names}
        total = sum(medians.values()) or 1.0
        kernels = [KernelTime(name=name, calls=per_run[0][name][0], us=medians[name] * 1e6,
                              share=medians[name] / total) for name in names]
        return sorted(kernels, key=lambda k: -k.us)

    def _profile_main(self, arrays: list[np.ndarray], *, runs: int, warmup: int) -> list[dict[str, tuple[int, float]]]:
        """Per run: VM callee -> (calls, seconds)."""
        args = self._device_inputs(arrays)
        for _ in range(warmup):
            self._vm["main"](*args)
        per_run: list[dict[str, tuple[int, float]]] = []
        started: dict[str, float] = {}
        current: dict[str, tuple[int, float]] = {}

        def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
            now = time.perf_counter()
            if before:
                started[symbol] = now
            else:
                calls, seconds = current.get(symbol, (0, 0.0))
                current[symbol] = (calls + 1, seconds + now - started[symbol])
            return 0  # VMInstrumentReturnKind.NO_OP: run the call as usual

        with self.instrumented(instrument):
            for _ in range(runs):
                current = {}
                self._vm["main"](*args)
                per_run.append(current)
        return per_run

    @contextlib.contextmanager
    def instrumented(self, hook: Callable[..., int]) -> Iterator[None]:
        """Inside the block, every call the VM makes runs ``hook(func, symbol, before, ret, *args)`` before
        and after it (TVM's VM instrument; return 0 to run the call as usual): what ``profile`` and the
        bench/ diagnostics build on. The hook is cleared on leaving, however the block ends."""
        self._vm.set_instrument(hook)
        try:
            yield
        finally:
            self._vm._set_instrument(None)  # the public setter refuses None; this clears it

    def _time_main(self, arrays: list[np.ndarray], *, number: int, repeat: int, warmup: int) -> list[float]:
        """Seconds per call of ``main``, one sample per repeat, timed where the model runs."""
        args = self._device_inputs(arrays)
        for _ in range(warmup):
            self._vm["main"](*args)
        timer = self._vm.time_evaluator("main", self._device, number=number, repeat=repeat)
        return list(timer(*args).results)


def output_tensors(result: Any) -> list[Any]:
    """A VM result as a list of tensors: one tensor, or the tuple a model with several outputs returns."""
    import tvm

    return [result] if isinstance(result, tvm.runtime.Tensor) else list(result)


def random_input(spec: TensorSpec, seed: int = 0) -> np.ndarray:
    """A deterministic N(0, 1) input of the right shape and dtype (for bench and verify)."""
    return np.random.default_rng(seed).standard_normal(spec.shape).astype(spec.dtype)


def _check_array(spec: TensorSpec, array: Any) -> np.ndarray:
    if not isinstance(array, np.ndarray):
        raise InputError(f"input '{spec.name}' must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.dtype(spec.dtype):
        raise InputError(
            f"input '{spec.name}' has dtype {array.dtype}, expected {spec.dtype} (convert with .astype('{spec.dtype}'))"
        )
    if tuple(array.shape) != spec.shape:
        hint = ""
        if len(spec.shape) == 4 and tuple(array.shape) == (spec.shape[0], spec.shape[2], spec.shape[3], spec.shape[1]):
            hint = " (looks like NHWC; the model takes NCHW: use array.transpose(0, 3, 1, 2))"
        elif len(spec.shape) == len(array.shape) and tuple(array.shape[1:]) == spec.shape[1:]:
            hint = f" (batch size {array.shape[0]} given, the artifact was compiled for batch {spec.shape[0]})"
        raise InputError(
            f"input '{spec.name}' has shape {list(array.shape)}, expected {list(spec.shape)}{hint}"
        )
    _warn_if_not_finite(spec, array)
    return array


def _warn_if_not_finite(spec: TensorSpec, array: np.ndarray) -> None:
    """Warn, at the line that called ``run``/``benchmark``/``profile``, if a float input holds NaN or Inf.

    Only the input can tell: a NaN or Inf pixel never reaches a MobileNet's output, because the first
    ReLU6 (``maximum``/``minimum``) drops it (checked on V1, V2 and V3-Small, NaN and ±Inf at three
    places). ``min`` and ``max`` carry any NaN or Inf and, unlike ``isfinite(array).all()``, allocate
    nothing. Reading the fresh device copy instead was no faster (paired blocks, tuned MobileNetV2), so
    the check stays with the other input checks, which local and remote models share.
    """
    if array.dtype.kind == "f" and not (math.isfinite(array.min()) and math.isfinite(array.max())):
        warnings.warn(f"input '{spec.name}' contains NaN or Inf; the outputs will not be meaningful",
                      stacklevel=_stacklevel_outside_package())


def _stacklevel_outside_package() -> int:
    """The ``stacklevel`` that attributes a warning raised in tvmnet to the first caller outside it.

    A fixed number breaks whenever the call chain changes, and Python 3.12 inlines comprehensions, which
    3.10 and 3.11 count as frames.
    """
    package = str(Path(__file__).resolve().parent) + os.sep
    frame, level = sys._getframe(2), 2  # level 1 is the function that calls warnings.warn
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def check_library(artifact: Path, manifest: dict[str, Any], *, trust: bool = False) -> Path:
    """The artifact's library, refused if missing or if its sha256 differs from the manifest's
    (loading a shared library runs its code); ``trust=True`` skips the hash check."""
    library = artifact / manifest["library"]["file"]
    if not library.is_file():
        raise ArtifactError(f"{artifact} lacks its library {library.name}; recompile the artifact")
    if not trust and sha256_file(library) != manifest["library"]["sha256"]:
        raise ArtifactError(
            f"{library} does not match the sha256 in its manifest (modified or swapped); recompile it, "
            "or pass trust=True / --trust if you know where it came from"
        )
    return library


def load(path: str | Path, *, device: str | None = None, trust: bool = False, remote: Any = None) -> CompiledModel:
    """Load an artifact directory written by ``tvmnet compile``.

    Refuses, before any ``dlopen``, a library built for another architecture or whose sha256 differs
    from the manifest's (loading a shared library runs its code); ``trust=True`` skips the hash check.
    ``remote`` (a session from ``tvmnet.remote.connect``) runs it on that board instead of here.
    """
    if remote is not None:
        from .remote import load as load_remote

        return load_remote(path, remote, device=device, trust=trust)

    use_physical_cores()
    import tvm
    from tvm.runtime.vm import VirtualMachine

    artifact = Path(path)
    manifest = read_manifest(artifact)
    target = manifest["target"]
    arch = target.get("arch")
    if arch != host_arch():
        raise ArtifactError(
            f"{artifact} was compiled for {arch} (target '{target.get('name')}'), this machine is {host_arch()}; "
            "run it on such a board, or over RPC with --rpc-tracker/--rpc-key"
        )
    check_tvm_version(artifact, manifest, tvm.__version__)
    library = check_library(artifact, manifest, trust=trust)
    device_type = device or target.get("device", "cpu")
    try:
        dev = tvm.device(device_type, 0)
    except Exception as exc:
        raise ArtifactError(f"unknown device '{device_type}': {exc}") from None
    if not dev.exist:
        raise ArtifactError(
            f"{artifact} needs a {device_type} device and this machine has none (target '{target.get('name')}')"
        )
    try:
        lib = _load_private_copy(library, None if trust else manifest["library"]["sha256"])
        vm = VirtualMachine(lib, dev)
    except ArtifactError:
        raise
    except Exception as exc:
        raise ArtifactError(f"TVM could not load {library}: {str(exc).splitlines()[0]}") from None
    return CompiledModel(artifact, manifest, vm, dev)


def _load_private_copy(library: Path, sha256: str | None) -> Any:
    """``dlopen`` a private copy of ``library`` under a fresh name, its hash checked again.

    The dynamic loader hands back the library already loaded under the same path, so a model
    recompiled into the same directory would otherwise run the old code in a process that had loaded
    it before (found by the fuzz: a manifest for one model, the VM of another). The copy is also what
    gets hashed, so the file cannot be swapped between the check and the load. Where the copy cannot
    be loaded (a noexec temporary directory) the artifact's own file is loaded instead.
    """
    import shutil
    import tempfile

    import tvm

    folder = tempfile.mkdtemp(prefix="tvmnet-")
    try:
        private = Path(folder) / library.name
        try:
            shutil.copyfile(library, private)
        except OSError:
            return tvm.runtime.load_module(str(library))
        if sha256 is not None and sha256_file(private) != sha256:
            raise ArtifactError(f"{library} changed while it was being loaded; load it again")
        try:
            return tvm.runtime.load_module(str(private))
        except Exception:
            return tvm.runtime.load_module(str(library))
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the mapping outlives the file


__all__ = ["BenchmarkStats", "CompiledModel", "check_library", "load", "random_input"]
