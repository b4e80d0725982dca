"""Errors tvmnet raises for user mistakes.

Every user-facing failure is a ``TvmnetError``: the CLI prints its message as one line and exits
non-zero; anything else that escapes is a bug and gets a traceback.
"""

from __future__ import annotations


class TvmnetError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""

    exit_code = 1


class ModelError(TvmnetError):
    """The ONNX model cannot be read, checked or imported."""

    exit_code = 2


class InputError(TvmnetError):
    """An input array or shape does not match what the model expects."""

    exit_code = 3


class TargetError(TvmnetError):
    """A target is unknown, malformed, or its toolchain is missing."""

    exit_code = 4


class ArtifactError(TvmnetError):
    """A compiled artifact is missing, incomplete, tampered with, or built for another machine."""

    exit_code = 5
