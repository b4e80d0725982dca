"""tvmnet: compile MobileNet classifiers from ONNX with Apache TVM and run them anywhere.

``tvmnet.load`` is the runtime side and imports no compiler code, so a board with only TVM's
runtime can load an artifact; ``tvmnet.compile`` (and the rest of the compiler side) is imported
on first use. ``tvmnet.remote.connect`` gets a board from a TVM RPC tracker and
``tvmnet.load(path, remote=board)`` runs an artifact there.
"""

from __future__ import annotations

from typing import Any

from .errors import ArtifactError, InputError, ModelError, TargetError, TvmnetError
from .remote import RemoteModel
from .runtime import CompiledModel, load

__version__ = "0.1.0"

__all__ = [
    "ArtifactError",
    "CompiledModel",
    "InputError",
    "ModelError",
    "RemoteModel",
    "TargetError",
    "TvmnetError",
    "compile",
    "load",
]

_LAZY = {"compile": ("tvmnet.build", "compile")}


def __getattr__(name: str) -> Any:
    """Import compiler-side entry points only when asked for."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'tvmnet' has no attribute {name!r}")
