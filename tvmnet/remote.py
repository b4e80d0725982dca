"""Run a compiled artifact on a remote board through a TVM RPC tracker, and bring outputs and timings back.

Runtime side, like ``tvmnet.runtime``: imports TVM's runtime and RPC client, nothing of tvmnet's
compiler side and no ONNX. The artifact was cross-compiled on the host; only its ``model.so`` goes to
the board, after the same checks as a local ``tvmnet.load`` (manifest, sha256, architecture).

    board = remote.connect("127.0.0.1:9190", "rasp4b")      # bounded wait, one-line errors
    model = tvmnet.load("build/mbv2-rasp4b", remote=board)   # a CompiledModel that runs on the board
    model.run(x); model.benchmark()                           # timed on the board by TVM's evaluator

A server may register a global function ``tvmnet.server_info`` (no arguments, returns a JSON object as a
string, e.g. ``{"emulated": true, "arch": "aarch64", "emulator": "qemu-aarch64"}``); ``tvmnet emulate``
servers do. Real boards do not need it.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError, InputError, TvmnetError
from .manifest import read_manifest
from .runtime import CompiledModel, check_library, output_tensors

SERVER_INFO_FUNCTION = "tvmnet.server_info"
DEFAULT_TIMEOUT_S = 60.0
"""How long ``connect`` waits for a free board before giving up."""

EMULATION_WARNING = (
    "the board is emulated ({emulator}): outputs are real, timings under emulation say nothing about the "
    "hardware's speed"
)


def parse_tracker(tracker: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), or a one-line ``InputError``."""
    host, _, port = str(tracker).strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"bad RPC tracker {tracker!r}; write HOST:PORT, e.g. 127.0.0.1:9190")
    return host.strip("[]"), int(port)


def _last_line(exc: BaseException) -> str:
    """The informative line of a TVM/RPC error (TVM puts the cause last, after its own headers)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def normalize_arch(name: str | None) -> str | None:
    """An architecture or target triple in the names manifests use (x86_64, aarch64, arm)."""
    if not name:
        return None
    first = str(name).strip().lower().split("-")[0]
    if first in ("aarch64", "arm64", "aarch64_be"):
        return "aarch64"
    if first.startswith(("arm", "thumb")):
        return "arm"
    if first in ("x86_64", "amd64", "x64"):
        return "x86_64"
    return first or None


@dataclass
class RemoteSession:
    """An RPC session to one board, obtained from a tracker (or wrapping a ``tvm.rpc`` session).

    The session lasts as long as this object and the models loaded through it are alive.
    """

    rpc: Any
    """The ``tvm.rpc.RPCSession``."""
    tracker: str | None = None
    key: str | None = None
    server_info: dict[str, Any] = field(default_factory=dict)
    """What the server says about itself through ``tvmnet.server_info``; empty for servers without it."""
    arch: str | None = None
    """The board's architecture if it could be learnt (server_info, or the board's LLVM triple), else None."""

    @classmethod
    def wrap(cls, session: Any, *, tracker: str | None = None, key: str | None = None) -> RemoteSession:
        info = _server_info(session)
        arch = normalize_arch(info.get("arch")) or normalize_arch(_remote_triple(session))
        return cls(rpc=session, tracker=tracker, key=key, server_info=info, arch=arch)

    @property
    def emulated(self) -> bool:
        return bool(self.server_info.get("emulated"))

    @property
    def emulator(self) -> str:
        return str(self.server_info.get("emulator") or "emulator")

    def describe(self) -> str:
        where = f"key '{self.key}' at tracker {self.tracker}" if self.tracker else "an RPC session"
        return where + (f", emulated by {self.emulator}" if self.emulated else "")

    def close(self) -> None:
        """Let go of the board. The connection ends, and the tracker hands the board to others, once no
        model or tensor from this session is left either (``RemoteModel.close`` drops a model's)."""
        import gc

        self.rpc = None
        gc.collect()  # TVM's remote devices point back at their session: collect the cycles now

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _server_info(session: Any) -> dict[str, Any]:
    try:
        function = session.get_function(SERVER_INFO_FUNCTION)
    except Exception:  # a real board has no such function: TVM raises AttributeError
        return {}
    try:
        info = json.loads(str(function()))
    except Exception:
        return {}
    return info if isinstance(info, dict) else {}


def _remote_triple(session: Any) -> str | None:
    """The board's LLVM system triple, when the board's TVM has LLVM (pip's apache-tvm does)."""
    try:
        return str(session.get_function("target.llvm_get_system_triple")())
    except Exception:
        return None


def connect(tracker: str, key: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
            session_timeout_s: float = 0) -> RemoteSession:
    """Ask the tracker at ``tracker`` (HOST:PORT) for a board registered under ``key``.

    Fails with a one-line ``TvmnetError`` if the tracker cannot be reached, no server has that key, or
    no server with it becomes free within ``timeout_s`` seconds; it never waits longer than that.
    ``session_timeout_s`` (0: none) lets the server end the session after that many seconds.
    """
    host, port = parse_tracker(tracker)
    if not key:
        raise InputError("an RPC key is needed: pass --rpc-key (the board's key at the tracker)")
    from tvm import rpc

    from .rpc import query_tracker

    address = f"{host}:{port}"
    state: dict[str, Any] = {}

    def work() -> None:
        try:
            keys = query_tracker(host, port)  # probes the socket first: a tracker that is down fails at once
            state["keys"] = keys
            if key not in keys:
                raise TvmnetError(f"no RPC server with key '{key}' is registered at tracker {address} "
                                  f"(registered: {', '.join(sorted(keys)) or 'none'})")
            client = rpc.connect_tracker(host, port)
            state["client"] = client
            state["session"] = client.request(key, priority=1, session_timeout=session_timeout_s, max_retry=1)
        except BaseException as exc:  # handed to the caller's thread
            state["error"] = exc

    thread = threading.Thread(target=work, name="tvmnet-rpc-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        client = state.get("client")
        if client is not None:  # end the pending request: its socket closes and the thread returns
            try:
                client.close()
            except Exception:
                pass
        keys = state.get("keys")
        why = (f"its {key!r} server(s) stayed busy" if keys and key in keys
               else "the tracker did not answer")
        raise TvmnetError(f"no board with key '{key}' from tracker {address} within {timeout_s:g} s ({why}); "
                          "try again later or raise --rpc-timeout")
    error = state.get("error")
    if isinstance(error, TvmnetError):
        raise error
    if error is not None:
        raise TvmnetError(f"cannot get a session for key '{key}' from tracker {address}: {_last_line(error)}") \
            from None
    return RemoteSession.wrap(state["session"], tracker=address, key=key)


def default_key(manifest: dict[str, Any]) -> str | None:
    """The RPC key for an artifact when none is given: the manifest's, else its shipped target's rpc_key."""
    target = manifest.get("target", {})
    if target.get("rpc_key"):
        return str(target["rpc_key"])
    name = target.get("name")
    if not name:
        return None
    try:  # target files only: reading them imports no compiler code
        from .targets import get_target

        return get_target(str(name)).rpc_key or None
    except Exception:
        return None


class RemoteModel(CompiledModel):
    """A compiled artifact loaded on a board: ``run`` and ``benchmark`` execute there.

    Inputs are checked here against the manifest (the same checks as a local model) before they go over
    the wire; outputs come back as numpy arrays; ``benchmark`` timings are measured on the board.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], vm: Any, device: Any, remote: RemoteSession) -> None:
        super().__init__(path, manifest, vm, device)
        self.remote = remote

    @property
    def server_info(self) -> dict[str, Any]:
        return self.remote.server_info

    @property
    def emulated(self) -> bool:
        return self.remote.emulated

    def __repr__(self) -> str:
        return f"RemoteModel({str(self.path)!r}, target={self.manifest['target']['name']!r}, on {self.remote.describe()})"

    def close(self) -> None:
        """Drop this model's hold on the board and close its session (see ``RemoteSession.close``)."""
        self._vm = None
        self._device = None
        self.remote.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _remote_args(self, arrays: list[np.ndarray]) -> list[Any]:
        import tvm

        if self._vm is None:
            raise TvmnetError("this remote model was closed; load it again")
        try:
            return [tvm.runtime.tensor(np.ascontiguousarray(array), self._device) for array in arrays]
        except Exception as exc:
            raise TvmnetError(f"sending the input to the board failed: {_last_line(exc)}") from None

    def _call(self, arrays: list[np.ndarray]) -> Any:
        # the stateful API is the one that works over RPC for any output arity
        args = self._remote_args(arrays)
        try:
            self._vm.set_input("main", *args)
            self._vm.invoke_stateful("main")
            return self._vm.get_outputs("main")
        except Exception as exc:
            raise TvmnetError(f"running on the board failed: {_last_line(exc)}") from None

    def _host_outputs(self, result: Any) -> list[np.ndarray]:
        try:  # a remote tensor has no local memory to view: TVM copies it over the wire
            return [tensor.numpy() for tensor in output_tensors(result)]
        except Exception as exc:
            raise TvmnetError(f"fetching the output from the board failed: {_last_line(exc)}") from None

    def _time_main(self, arrays: list[np.ndarray], *, number: int, repeat: int, warmup: int) -> list[float]:
        args = self._remote_args(arrays)
        try:
            self._vm.set_input("main", *args)
            for _ in range(warmup):
                self._vm.invoke_stateful("main")
            timer = self._vm.time_evaluator("invoke_stateful", self._device, number=number, repeat=repeat)
            return [float(s) for s in timer("main").results]
        except Exception as exc:
            raise TvmnetError(f"timing on the board failed: {_last_line(exc)}") from None

    def _profile_main(self, arrays: list[np.ndarray], *, runs: int, warmup: int) -> list[dict[str, tuple[int, float]]]:
        raise InputError("a per-kernel profile times each call in the process that runs the VM, so it cannot "
                         "run over RPC; run `tvmnet bench ARTIFACT --per-kernel` on the board itself")


def load(path: str | Path, remote: RemoteSession | Any, *, device: str | None = None,
         trust: bool = False) -> RemoteModel:
    """Upload an artifact's library to the board behind ``remote`` and load it there.

    ``remote`` is a ``RemoteSession`` from ``connect`` or a plain ``tvm.rpc`` session. The same checks
    as a local load come first (manifest, library sha256 unless ``trust``); then the artifact's
    architecture is compared with the board's when the board's can be learnt.
    """
    from tvm.runtime.vm import VirtualMachine

    board = remote if isinstance(remote, RemoteSession) else RemoteSession.wrap(remote)
    if board.rpc is None:
        raise TvmnetError("this RPC session was closed; connect again")
    artifact = Path(path)
    manifest = read_manifest(artifact)
    library = check_library(artifact, manifest, trust=trust)
    target = manifest["target"]
    arch = target.get("arch")
    if board.arch and arch and board.arch != arch:
        raise ArtifactError(
            f"{artifact} was compiled for {arch} (target '{target.get('name')}'), the board ({board.describe()}) "
            f"is {board.arch}; compile for that board's target"
        )
    device_type = device or target.get("device", "cpu")
    try:
        dev = board.rpc.device(device_type, 0)
        present = dev.exist
    except Exception as exc:
        raise ArtifactError(f"the board cannot provide device '{device_type}': {_last_line(exc)}") from None
    if not present:
        raise ArtifactError(f"{artifact} needs a {device_type} device and the board ({board.describe()}) has none")
    remote_name = f"tvmnet-{manifest['library'].get('sha256', 'untrusted')[:16]}.so"
    try:
        board.rpc.upload(str(library), remote_name)
    except Exception as exc:
        raise TvmnetError(f"uploading {library.name} to the board failed: {_last_line(exc)}") from None
    try:
        rexec = board.rpc.load_module(remote_name)
        vm = VirtualMachine(rexec, dev)
    except Exception as exc:
        known = f"the board is {board.arch}" if board.arch else "the board did not say its architecture"
        raise ArtifactError(
            f"the board could not load {library.name} (built for {arch}, target '{target.get('name')}'; {known}): "
            f"{_last_line(exc)}"
        ) from None
    return RemoteModel(artifact, manifest, vm, dev, board)


def connect_and_load(path: str | Path, tracker: str, key: str | None = None, *,
                     timeout_s: float = DEFAULT_TIMEOUT_S, trust: bool = False,
                     device: str | None = None) -> RemoteModel:
    """Check the artifact, get a board from ``tracker`` (key: ``key``, else the artifact's target's
    rpc_key), and load the artifact there. The local checks come first, so a bad artifact costs no board."""
    parse_tracker(tracker)
    artifact = Path(path)
    manifest = read_manifest(artifact)
    check_library(artifact, manifest, trust=trust)
    key = key or default_key(manifest)
    if not key:
        raise InputError(f"{artifact}'s target '{manifest['target'].get('name')}' names no RPC key; pass --rpc-key")
    return load(artifact, connect(tracker, key, timeout_s=timeout_s), device=device, trust=trust)


__all__ = ["RemoteModel", "RemoteSession", "connect", "connect_and_load", "default_key", "load", "parse_tracker"]
