"""Check a compiled artifact against onnxruntime on the same input: the numerical reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError
from .manifest import MODEL_NAME
from .runtime import CompiledModel, load, random_input

RTOL = 1e-4
"""fp32 tolerance: |tvm - ort| <= ATOL + RTOL * |ort| element-wise (np.allclose)."""
ATOL = 1e-4


@dataclass(frozen=True)
class VerifyReport:
    output: str
    max_abs_error: float
    max_rel_error: float
    """Largest |tvm - ort| divided by the largest |ort|: relative to the output's scale."""
    rtol: float
    atol: float
    passed: bool

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def reference_outputs(model_path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the ONNX model in onnxruntime on the CPU with its default session options."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        return session.run(None, inputs)
    except Exception as exc:
        raise ArtifactError(f"onnxruntime could not run {model_path}: {str(exc).splitlines()[0]}") from None


def compare(name: str, got: np.ndarray, expected: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> VerifyReport:
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    scale = float(np.abs(expected).max()) or 1.0
    return VerifyReport(
        output=name,
        max_abs_error=float(diff.max()),
        max_rel_error=float(diff.max()) / scale,
        rtol=rtol,
        atol=atol,
        passed=bool(got.shape == expected.shape and np.allclose(got, expected, rtol=rtol, atol=atol)),
    )


def verify(
    artifact: str | Path | CompiledModel,
    *,
    model: str | Path | None = None,
    seed: int = 0,
    rtol: float = RTOL,
    atol: float = ATOL,
    remote: Any = None,
) -> list[VerifyReport]:
    """Feed one seeded random input to the artifact and to onnxruntime (on the artifact's copy of
    the ONNX model unless ``model`` is given); one report per output.

    A model loaded on a board (``tvmnet.load(path, remote=...)``, or ``remote`` given here) runs there;
    onnxruntime always runs here, on the host."""
    compiled = artifact if isinstance(artifact, CompiledModel) else load(artifact, remote=remote)
    model_path = Path(model) if model else compiled.path / MODEL_NAME
    if not model_path.is_file():
        raise ArtifactError(f"no ONNX model to compare with at {model_path}; pass --model")
    inputs = {spec.name: random_input(spec, seed) for spec in compiled.inputs}
    got = compiled.run(inputs)
    got_list = got if isinstance(got, list) else [got]
    expected = reference_outputs(model_path, inputs)
    return [compare(spec.name, g, e, rtol, atol) for spec, g, e in zip(compiled.outputs, got_list, expected)]
