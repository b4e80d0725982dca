"""MobileNet model zoo: V1, V2, V3-Large and V3-Small as ONNX graphs, built without a framework.

The weights are random but deterministic (``seed``) and calibrated so activations stay O(1)
through the whole net, which makes the models fit for checking a compiler's numbers; real weights
can be loaded from an ``.npz`` keyed by initializer name (torchvision ``state_dict`` names).

    >>> from tvmnet import zoo
    >>> model = zoo.build_model("mobilenet_v2", alpha=0.5, resolution=160)
    >>> zoo.export_model("mobilenet_v3_small", "v3s.onnx", batch=None)
"""

from __future__ import annotations

import io
import math
import numbers
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tvmnet.errors import ModelError

from ._families import FAMILIES, ZooEntry
from ._graph import GraphBuilder

__all__ = [
    "MODEL_NAMES",
    "SUPPORTED_OPSETS",
    "SUPPORTED_RESOLUTIONS",
    "ZooEntry",
    "build_model",
    "count_parameters",
    "export_model",
    "list_models",
    "save_weights",
]

MODEL_NAMES: tuple[str, ...] = ("mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small")
ALPHA_RANGE: tuple[float, float] = (0.25, 1.4)
SUPPORTED_RESOLUTIONS: tuple[int, ...] = (96, 128, 160, 192, 224)
SUPPORTED_OPSETS: tuple[int, ...] = (11, 12, 13, 14, 15, 16, 17)

# BN statistics come from a random batch; the last feature map is only (resolution/32)^2 pixels,
# so small resolutions need more images for per-channel statistics that hold for other inputs.
_CALIBRATION_PIXELS = 96


def list_models() -> list[ZooEntry]:
    """The zoo's families, in ``MODEL_NAMES`` order."""
    return [FAMILIES[name].entry for name in MODEL_NAMES]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate(
    name: str, alpha: float, resolution: int, num_classes: int, opset: int, batch: int | None, seed: int
) -> None:
    """Reject bad arguments with one-line messages that say what is allowed."""
    if name not in FAMILIES:
        raise ModelError(f"unknown zoo model {name!r}: choose one of {', '.join(MODEL_NAMES)}")
    lo, hi = ALPHA_RANGE
    if (
        not isinstance(alpha, numbers.Real)
        or isinstance(alpha, bool)
        or not math.isfinite(alpha)
        or not lo <= alpha <= hi
    ):
        raise ModelError(
            f"alpha={alpha!r} is outside the supported range {lo}..{hi}; "
            "pick a width multiplier in it (e.g. 0.25, 0.5, 0.75, 1.0)"
        )
    if not _is_int(resolution) or resolution not in SUPPORTED_RESOLUTIONS:
        choices = ", ".join(map(str, SUPPORTED_RESOLUTIONS))
        raise ModelError(
            f"resolution={resolution!r} is not supported; use one of {choices} (multiples of 32 from 96 to 224)"
        )
    if not _is_int(num_classes) or num_classes < 1:
        raise ModelError(f"num_classes={num_classes!r} must be a positive integer (1000 for ImageNet)")
    if not _is_int(opset) or opset not in SUPPORTED_OPSETS:
        choices = ", ".join(map(str, SUPPORTED_OPSETS))
        raise ModelError(f"opset={opset!r} is not supported; use one of {choices}")
    if batch is not None and (not _is_int(batch) or batch < 1):
        raise ModelError(f"batch={batch!r} must be an integer >= 1, or None for a dynamic batch dimension")
    if not _is_int(seed) or seed < 0:
        raise ModelError(f"seed={seed!r} must be a non-negative integer")


def build_model(
    name: str,
    *,
    alpha: float = 1.0,
    resolution: int = 224,
    num_classes: int = 1000,
    opset: int = 13,
    batch: int | None = 1,
    fold_bn: bool = True,
    seed: int = 0,
    weights: str | os.PathLike[str] | None = None,
) -> onnx.ModelProto:
    """Build a MobileNet as an ONNX model: ``input`` [batch,3,R,R] float32 -> ``logits`` [batch,classes].

    ``alpha`` is the width multiplier, ``batch=None`` makes the first dimension dynamic
    (``"batch"``), ``fold_bn=False`` keeps BatchNormalization nodes (same function as folded).
    Weights are drawn with ``numpy.random.default_rng`` from ``seed`` (He-normal convs, BN
    statistics measured on a seeded random batch), or read from ``weights`` (an ``.npz`` as
    written by :func:`save_weights`).
    """
    _validate(name, alpha, resolution, num_classes, opset, batch, seed)
    family = FAMILIES[name]
    weight_seq, calib_seq = np.random.SeedSequence(seed).spawn(2)
    calib_batch = max(2, math.ceil(_CALIBRATION_PIXELS / (resolution // 32) ** 2))
    calib = np.random.default_rng(calib_seq).standard_normal((calib_batch, 3, resolution, resolution))
    builder = GraphBuilder(
        opset=opset, fold_bn=fold_bn, bn_eps=family.bn_eps, rng=np.random.default_rng(weight_seq), calib=calib
    )
    logits = family.build(builder, float(alpha), num_classes)
    graph = builder.graph(logits, name=f"{name}_{alpha:g}_{resolution}", resolution=resolution, batch=batch)
    opset_ids = [helper.make_opsetid("", opset)]
    # The lowest IR version that can carry this opset, so older runtimes and TVM accept the file.
    model = helper.make_model(
        graph, opset_imports=opset_ids, ir_version=helper.find_min_ir_version_for(opset_ids), producer_name="tvmnet.zoo"
    )
    source = f"random (seed {seed})"
    if weights is not None:
        _load_weights(model, Path(weights))
        source = Path(weights).name
    entry = family.entry
    model.doc_string = (
        f"{entry.description}; alpha={alpha:g}, resolution={resolution}, {num_classes} classes, "
        f"BN {'folded' if fold_bn else 'kept'}, weights {source}. {entry.paper}"
    )
    helper.set_model_props(
        model,
        {
            "tvmnet.family": name,
            "tvmnet.alpha": f"{alpha:g}",
            "tvmnet.resolution": str(resolution),
            "tvmnet.num_classes": str(num_classes),
            "tvmnet.seed": str(seed),
            "tvmnet.weights": source,
            "tvmnet.fold_bn": str(fold_bn).lower(),
            "tvmnet.mean": ",".join(map(str, entry.default_mean)),
            "tvmnet.std": ",".join(map(str, entry.default_std)),
        },
    )
    return model


def _atomic_write(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write via a temporary file in the same directory + ``os.replace``: readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def export_model(name: str, path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Build with ``build_model(name, **kwargs)`` and write it to ``path`` atomically; return the path."""
    model = build_model(name, **kwargs)
    return _atomic_write(path, model.SerializeToString())


# -- weights --------------------------------------------------------------------------------


def _running_stat_names(model: onnx.ModelProto) -> set[str]:
    """BatchNormalization's inputs 3 and 4 (running mean / variance): buffers, not parameters."""
    return {name for node in model.graph.node if node.op_type == "BatchNormalization" for name in node.input[3:5]}


def _weight_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Initializers that hold weights: floating point with at least one dimension.

    That leaves out scalar operator constants (the shared Clip bounds) and integer shape
    tensors, which no weight file should have to carry.
    """
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    return [t for t in model.graph.initializer if t.data_type in floating and len(t.dims) > 0]


def count_parameters(model: onnx.ModelProto) -> int:
    """Number of trainable parameters, torchvision's definition.

    Sums the element counts of the weight initializers (see ``_weight_tensors``) except BN
    running mean/variance (found by their role as BatchNormalization inputs 3/4, not by name).
    For a ``fold_bn=False`` model this is exactly torchvision's ``sum(p.numel() for p in
    model.parameters())``. A folded model has one conv bias per channel where BN had a weight and
    a bias, so it counts one fewer parameter per BN channel.
    """
    stats = _running_stat_names(model)
    return sum(math.prod(t.dims) for t in _weight_tensors(model) if t.name not in stats)


def save_weights(model: onnx.ModelProto, path: str | os.PathLike[str]) -> Path:
    """Write the model's weight initializers (incl. BN running stats) to an ``.npz``, for ``weights=``."""
    buffer = io.BytesIO()
    np.savez(buffer, **{t.name: numpy_helper.to_array(t) for t in _weight_tensors(model)})
    return _atomic_write(path, buffer.getvalue())


def _load_weights(model: onnx.ModelProto, path: Path) -> None:
    """Replace every weight initializer by the array of the same name; all must be there, no extras."""
    hint = (
        "save it with tvmnet.zoo.save_weights() from a model built with the same name, alpha, num_classes "
        "and fold_bn"
    )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read weights file {path}: {exc}; {hint}") from exc
    tensors = _weight_tensors(model)
    for tensor in tensors:
        expected = tuple(tensor.dims)
        if tensor.name not in arrays:
            raise ModelError(f"weights file {path} has no array {tensor.name!r} (expected shape {expected}); {hint}")
        array = arrays[tensor.name]
        if array.shape != expected or not np.issubdtype(array.dtype, np.floating):
            raise ModelError(
                f"weights file {path}: {tensor.name!r} has shape {array.shape} ({array.dtype}), "
                f"expected {expected} (float32); {hint}"
            )
    unexpected = sorted(set(arrays) - {t.name for t in tensors})
    if unexpected:
        raise ModelError(f"weights file {path} has an array {unexpected[0]!r} the model does not use; {hint}")
    for tensor in tensors:
        tensor.CopyFrom(numpy_helper.from_array(arrays[tensor.name].astype(np.float32), tensor.name))
