"""Import any MobileNet-style ONNX file: check it, bind its shapes, canonicalize it, hand it to Relax.

Relax is TVM's successor to Relay (the PyPI apache-tvm has no Relay). TVM 0.27's ONNX frontend rejects
what real exporters write (Shape -> Gather -> Concat -> Reshape chains, Constant nodes), so every model
is first canonicalized with onnxslim on static shapes: shapes inferred, constants folded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from .errors import InputError, ModelError
from .manifest import TensorSpec

MIN_OPSET = 11
"""Older models are converted to ``CONVERT_TO_OPSET`` first (the frontend's coverage is best there)."""
CONVERT_TO_OPSET = 13

InputShapes = Mapping[str, Sequence[int]]


@dataclass
class ImportedModel:
    """A checked, shape-bound, canonicalized ONNX model and its I/O signature."""

    onnx_model: onnx.ModelProto
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    source_bytes: bytes
    """The model as the user gave it, for the artifact's reference copy and its sha256."""

    def to_relax(self):
        """The Relax IRModule, weights embedded as constants."""
        from tvm.relax.frontend.onnx import from_onnx

        try:
            return from_onnx(
                self.onnx_model,
                shape_dict={spec.name: list(spec.shape) for spec in self.inputs},
                dtype_dict={spec.name: spec.dtype for spec in self.inputs},
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"TVM's ONNX frontend could not import the model: {first}") from None


def parse_input_shapes(items: Sequence[str]) -> dict[str, list[int]]:
    """Parse ``name:1,3,224,224`` strings (the CLI's ``--input-shape``)."""
    shapes: dict[str, list[int]] = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = [int(d) for d in dims.split(",")]
            if any(d < 1 for d in shape):
                raise ValueError
        except ValueError:
            raise InputError(f"bad --input-shape '{item}'; write NAME:D1,D2,... e.g. input:1,3,224,224") from None
        shapes[name] = shape
    return shapes


def read_model(source: str | os.PathLike | onnx.ModelProto) -> tuple[onnx.ModelProto, bytes]:
    """Parse an ONNX file (or take a ModelProto) and return it with its serialized bytes."""
    if isinstance(source, onnx.ModelProto):
        return source, source.SerializeToString()
    path = Path(source)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"model file {path} does not exist") from None
    except IsADirectoryError:
        raise ModelError(f"{path} is a directory, expected an .onnx file") from None
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from None
    try:
        model = onnx.load_model_from_string(data)
    except Exception:
        raise ModelError(f"{path} is not a valid ONNX model (truncated, or not an ONNX file)") from None
    if not model.graph.node or not model.opset_import:
        raise ModelError(f"{path} is not a valid ONNX model (no graph nodes or no opset; truncated or not ONNX)")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        try:
            onnx.load_external_data_for_model(model, str(path.resolve().parent))
        except Exception as exc:
            raise ModelError(f"{path}: cannot load its external weight files: {exc}") from None
        data = model.SerializeToString()
    return model, data


def _default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _supported_ops() -> set[str]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    return set(_get_convert_map())


def check_supported_ops(model: onnx.ModelProto) -> None:
    """Fail once, listing every op type TVM cannot import and the first node that uses it."""
    supported = _supported_ops()
    first_use: dict[str, str] = {}
    for index, node in enumerate(model.graph.node):
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        if (node.domain not in ("", "ai.onnx") or node.op_type not in supported) and op not in first_use:
            first_use[op] = node.name or f"#{index}"
    if first_use:
        listing = "; ".join(f"{op} (first at node '{name}')" for op, name in first_use.items())
        raise ModelError(f"unsupported ONNX op(s) for TVM's Relax frontend: {listing}")


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {init.name for init in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or "?")
        for d in value.type.tensor_type.shape.dim
    ]


def _dtype(value: onnx.ValueInfoProto) -> str:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)).name


def _bind_input_shapes(model: onnx.ModelProto, shapes: InputShapes) -> list[TensorSpec]:
    """Give every graph input a static shape, from the model or from ``shapes``."""
    inputs = _graph_inputs(model)
    names = [value.name for value in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise InputError(f"--input-shape names unknown input(s) {', '.join(unknown)}; the model's inputs are: "
                         f"{', '.join(names)}")
    specs = []
    for value in inputs:
        dims = _dims(value)
        if value.name in shapes:
            given = list(shapes[value.name])
            clash = len(given) != len(dims) or any(isinstance(d, int) and d != g for d, g in zip(dims, given))
            if clash:
                raise InputError(f"--input-shape {value.name}:{','.join(map(str, given))} does not fit the model's "
                                 f"shape {dims} for input '{value.name}'")
            dims = given
        elif any(not isinstance(d, int) for d in dims) or not dims and not value.type.tensor_type.HasField("shape"):
            example = ",".join(str(d) if isinstance(d, int) else "1" for d in dims) or "1,3,224,224"
            raise InputError(f"input '{value.name}' has dynamic shape {dims}; bind it with "
                             f"--input-shape {value.name}:{example}")
        tensor_shape = value.type.tensor_type.shape
        for dim, size in zip(tensor_shape.dim, dims):
            dim.Clear()
            dim.dim_value = int(size)
        specs.append(TensorSpec(value.name, tuple(int(d) for d in dims), _dtype(value)))
    return specs


def _canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Infer shapes and fold constant subgraphs with onnxslim, on the now static shapes."""
    import onnxslim

    del model.graph.value_info[:]  # stale symbolic shapes would survive the binding otherwise
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    try:
        slimmed = onnxslim.slim(model)
    except Exception as exc:
        raise ModelError(f"could not canonicalize the model (shape inference / constant folding): {exc}") from None
    if slimmed is None:
        raise ModelError("could not canonicalize the model: onnxslim returned nothing")
    return onnx.shape_inference.infer_shapes(slimmed, strict_mode=False)


def load_onnx(source: str | os.PathLike | onnx.ModelProto, input_shapes: InputShapes | None = None) -> ImportedModel:
    """Read, check, shape-bind and canonicalize an ONNX model for TVM."""
    model, source_bytes = read_model(source)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"the ONNX checker rejects the model: {str(exc).strip().splitlines()[0]}") from None
    opset = _default_opset(model)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, CONVERT_TO_OPSET)
        except Exception as exc:
            raise ModelError(f"the model uses opset {opset}; converting it to opset {CONVERT_TO_OPSET} failed: "
                             f"{str(exc).splitlines()[0]}") from None
    check_supported_ops(model)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # work on a copy: binding edits in place
    inputs = _bind_input_shapes(model, input_shapes or {})
    model = _canonicalize(model)
    outputs = []
    for value in model.graph.output:
        dims = _dims(value)
        if any(not isinstance(d, int) for d in dims):
            raise ModelError(f"output '{value.name}' still has a dynamic shape {dims} after binding the inputs; "
                             "tvmnet compiles static shapes only")
        outputs.append(TensorSpec(value.name, tuple(dims), _dtype(value)))
    return ImportedModel(onnx_model=model, inputs=inputs, outputs=outputs, source_bytes=source_bytes)
