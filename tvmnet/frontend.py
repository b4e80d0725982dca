"""Import any MobileNet-style ONNX file: check it, bind its shapes, canonicalize it, hand it to Relax.

Relax is TVM's successor to Relay (the PyPI apache-tvm has no Relay). TVM 0.27's ONNX frontend rejects
what real exporters write (Shape -> Gather -> Concat -> Reshape chains, Constant nodes), so every model
is first canonicalized with onnxslim on static shapes: shapes inferred, constants folded.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import sys
import tempfile
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
MAX_INPUT_ELEMENTS = 2**28
"""Largest input tensor accepted (1 GiB of float32); larger ones are a corrupted or hostile shape."""
MAX_TENSOR_ELEMENTS = 2**31 - 1
"""Largest tensor anywhere in the graph: past it, 32-bit indexing and memory both give out."""

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
        """The Relax IRModule, weights embedded as constants.

        TVM's importer prints to stdout and its C++ side logs to stderr when it fails (the failed
        BlockBuilder complains as it is destroyed, possibly at exit); both are captured here so a
        failure is the one-line ``ModelError`` alone. The captured text rides on the error as a note.
        """
        from tvm.relax.frontend.onnx import from_onnx

        message = None
        with _captured_native_output() as captured, _clip_as_relax_op():
            try:
                return from_onnx(
                    self.onnx_model,
                    shape_dict={spec.name: list(spec.shape) for spec in self.inputs},
                    dtype_dict={spec.name: spec.dtype for spec in self.inputs},
                )
            except Exception as exc:
                message = one_line(exc)
            gc.collect()  # outside the except block: the importer's frames (and its BlockBuilder) die here
        error = ModelError(f"TVM's ONNX frontend could not import the model: {message}")
        if captured.text.strip() and hasattr(error, "add_note"):
            error.add_note("TVM's output:\n" + captured.text.strip())
        raise error


@contextlib.contextmanager
def _clip_as_relax_op():
    """While importing, convert a Clip with constant bounds to Relax's ``clip`` op.

    TVM 0.27's converter lowers Clip straight to TIR (``call_tir`` of topi's maximum and minimum), which
    Relax's ``ConvertLayout`` cannot see through: under the NHWC convolutions of :mod:`tvmnet.pipeline`
    every ReLU6 would sit between two transposes. As a Relax op it meets :func:`tvmnet.pipeline.fuse`,
    which rewrites every float clip (these and HardSwish's) the one way. A missing bound is infinite.
    Integer clips and clips with computed or NaN bounds keep TVM's conversion (it maps NaN bounds to
    ±inf). The frontend has no hook for custom converters, so the classmethod is swapped for the import
    and restored after.
    """
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend

    converter = getattr(onnx_frontend, "Clip", None)
    original = vars(converter).get("_impl_v13") if converter is not None else None
    if original is None:  # another TVM: keep its conversion
        yield
        return
    constant = type(relax.const(0.0))

    def impl_v13(cls, bb, inputs, attr, params):
        if not str(inputs[0].ty.dtype).startswith("float"):  # no infinite bound for integers
            return original.__func__(cls, bb, inputs, attr, params)
        bounds = []
        for bound, unbounded in zip(inputs[1:3], (-np.inf, np.inf)):
            value = bound.value.numpy() if isinstance(bound, constant) else None
            if bound is not None and (value is None or value.size != 1 or np.isnan(value).any()):
                return original.__func__(cls, bb, inputs, attr, params)
            bounds.append(unbounded if bound is None else float(value.item()))
        return bb.emit(relax.op.clip(inputs[0], *bounds))

    converter._impl_v13 = classmethod(impl_v13)
    try:
        yield
    finally:
        converter._impl_v13 = original


class _Captured:
    text = ""


@contextlib.contextmanager
def _captured_native_output():
    """Send file descriptors 1 and 2 (Python's and native code's output) to a temporary file.

    Process-wide while it lasts: output from other threads in that window is captured too.
    """
    captured = _Captured()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no usable descriptors (a daemon with them closed): nothing to protect
        yield captured
        return
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield captured
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.text = sink.read(64 * 1024).decode(errors="replace")


def one_line(exc: BaseException | str, limit: int = 400) -> str:
    """An exception's message as one line: whitespace collapsed, checker context dropped, shortened."""
    text = str(exc).split("==> Context:")[0]
    text = " ".join(text.split()) or (type(exc).__name__ if isinstance(exc, BaseException) else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    """Parse an ONNX file (or take a ModelProto) and return it with its serialized bytes.

    External weight files must be plain files inside the model's folder: a location that is absolute,
    climbs out with ``..`` or resolves (through symlinks) outside the folder is refused before anything
    is opened.
    """
    if isinstance(source, onnx.ModelProto):
        _check_structure(source, "the model")
        if _external_tensors(source):
            raise ModelError("the model keeps weights in external files; pass the .onnx file's path (not a "
                             "ModelProto) so they are read from its folder")
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
    _check_structure(model, str(path))
    external = _external_tensors(model)
    if external:
        folder = path.resolve().parent
        for tensor in external:
            _check_external_location(tensor, folder, path)
        try:
            onnx.load_external_data_for_model(model, str(folder))
        except Exception as exc:
            raise ModelError(f"{path}: cannot load its external weight files: {one_line(exc)}") from None
        data = model.SerializeToString()
    return model, data


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]


def _check_external_location(tensor: onnx.TensorProto, folder: Path, path: Path) -> None:
    """Refuse external data that is not a regular file inside ``folder`` (the model's own folder)."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    where = f"{path}: weight '{tensor.name}' is stored in external file {location!r}"
    relative = Path(location)
    if not location or relative.is_absolute() or location.startswith(("/", "\\")) or ".." in relative.parts \
            or "\\" in location or "\0" in location:
        raise ModelError(f"{where}; external data must be a relative path inside the model's folder, refusing it")
    resolved = (folder / relative).resolve()
    if not resolved.is_relative_to(folder):
        raise ModelError(f"{where}, which resolves outside the model's folder ({resolved}); refusing it")
    if not resolved.is_file():
        raise ModelError(f"{where}, which is missing or not a regular file; keep it next to the model")
    size = resolved.stat().st_size
    numbers = {}
    for key in ("offset", "length"):
        text = info.get(key, "0" if key == "offset" else str(size))
        if not re.fullmatch(r"[0-9]{1,20}", text):
            raise ModelError(f"{where} with {key} {text!r}, which is not a byte count")
        numbers[key] = int(text)
    if numbers["offset"] + numbers["length"] > size:
        raise ModelError(f"{where} at offset {numbers['offset']} length {numbers['length']}, beyond the file's "
                         f"{size} bytes")


def _check_text_fields(message, what: str, path: str = "model") -> None:
    """protobuf hands back ``bytes`` for a string field that is not UTF-8; nothing downstream expects it."""
    from google.protobuf.descriptor import FieldDescriptor

    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if _is_repeated(field) else [value]
            if any(not isinstance(v, str) for v in values):
                raise ModelError(f"{what} is corrupted: its field {path}.{field.name} is not UTF-8 text")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for index, item in enumerate(value if _is_repeated(field) else [value]):
                _check_text_fields(item, what, f"{path}.{field.name}[{index}]" if _is_repeated(field) else
                                   f"{path}.{field.name}")


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5.29; ``label`` is deprecated there
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _check_metadata(model: onnx.ModelProto, what: str) -> None:
    """tvmnet's own preprocessing metadata (``tvmnet.mean`` / ``tvmnet.std``) must be three finite numbers."""
    for prop in model.metadata_props:
        if prop.key in ("tvmnet.mean", "tvmnet.std"):
            try:
                values = [float(v) for v in prop.value.split(",")]
            except ValueError:
                values = []
            if len(values) != 3 or not all(np.isfinite(values)) or prop.key == "tvmnet.std" and 0 in values:
                raise ModelError(f"{what} has malformed metadata {prop.key}={prop.value!r}; expected three "
                                 "comma-separated numbers (std non-zero)")


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _check_structure(model: onnx.ModelProto, what: str) -> None:
    """Checks the ONNX checker leaves to later, where the failure would be far less clear."""
    _check_text_fields(model, what)
    _check_metadata(model, what)
    graph = model.graph
    if not graph.node:
        raise ModelError(f"{what} has an empty graph (no nodes)")
    if not graph.output:
        raise ModelError(f"{what} declares no graph outputs; a classifier needs one")
    initializers = {init.name for init in graph.initializer}
    inputs = [value.name for value in graph.input if value.name not in initializers]
    if not inputs:
        raise ModelError(f"{what} declares no graph inputs (besides weights); a classifier needs one")
    consumed = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    unused = [name for name in inputs if name not in consumed]
    if unused:  # TVM's importer drops them, and the compiled function would not take what the manifest lists
        raise ModelError(f"{what} declares graph input(s) {', '.join(unused)} that no node uses; remove them "
                         "from graph.input")
    for init in graph.initializer:
        if any(d < 0 for d in init.dims):
            raise ModelError(f"weight '{init.name}' has a negative dimension {list(init.dims)}")
        count = int(np.prod([int(d) for d in init.dims], dtype=object)) if init.dims else 1
        if count > MAX_TENSOR_ELEMENTS:
            raise ModelError(f"weight '{init.name}' declares shape {list(init.dims)} ({count} values), "
                             f"over the {MAX_TENSOR_ELEMENTS} tvmnet accepts; the model is corrupted")
        if init.data_location == onnx.TensorProto.EXTERNAL or init.data_type in (0, onnx.TensorProto.STRING):
            continue
        try:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        except Exception:
            raise ModelError(f"weight '{init.name}' has unknown data type {init.data_type}") from None
        if init.HasField("raw_data"):
            have, want = len(init.raw_data), count * itemsize
            unit = "bytes"
        else:
            have = max(len(getattr(init, name)) for name in _TYPED_FIELDS)
            want = count * (2 if init.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128) else 1)
            unit = "values"
            if init.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.BOOL,
                                  onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                                  onnx.TensorProto.UINT16):
                continue  # packed into int32_data in ways that vary with the type; the checker handles these
        if have != want:
            raise ModelError(f"weight '{init.name}' declares shape {list(init.dims)} ({want} {unit}) but holds "
                             f"{have} {unit}; the model is corrupted")


def _check_weight_shapes(model: onnx.ModelProto) -> None:
    """Shapes the ONNX checker does not look at and TVM would broadcast its way through (it compiles a
    Conv whose bias is [24, 1]; onnxruntime refuses to run that model): weights of Conv, Gemm and
    BatchNormalization must have the ranks and sizes the ONNX operator specs require."""
    dims = {init.name: list(init.dims) for init in model.graph.initializer}

    def shape(node: onnx.NodeProto, index: int) -> list[int] | None:
        return dims.get(node.input[index]) if len(node.input) > index and node.input[index] else None

    for index, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx"):
            continue
        where = f"{node.op_type} node '{node.name or f'#{index}'}'"
        weight, bias = shape(node, 1), shape(node, 2)
        if node.op_type in ("Conv", "ConvTranspose") and weight is not None:
            if len(weight) < 3:
                raise ModelError(f"{where}: weight {node.input[1]} has shape {weight}; a convolution weight has "
                                 "rank 3 or more")
            channels = weight[0] if node.op_type == "Conv" else None
            if bias is not None and (len(bias) != 1 or channels is not None and bias[0] != channels):
                raise ModelError(f"{where}: bias {node.input[2]} has shape {bias}; ONNX requires a 1-D bias of "
                                 f"{channels if channels is not None else 'output-channel'} values")
        elif node.op_type == "Gemm" and weight is not None and len(weight) != 2:
            raise ModelError(f"{where}: B {node.input[1]} has shape {weight}; Gemm takes 2-D matrices")
        elif node.op_type == "BatchNormalization":
            params = [shape(node, k) for k in range(1, 5)]
            known = [p for p in params if p is not None]
            if any(len(p) != 1 for p in known) or len({p[0] for p in known}) > 1:
                raise ModelError(f"{where}: scale/bias/mean/var have shapes {params}; ONNX requires four 1-D "
                                 "tensors of the channel count")


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
    elem_type = value.type.tensor_type.elem_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:
        dtype = None
    if dtype is None or dtype.kind not in "fiub":
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else elem_type
        raise ModelError(f"tensor '{value.name}' has element type {name}; tvmnet compiles numeric tensors only")
    return dtype.name


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
            _check_size(f"--input-shape {value.name}", dims, MAX_INPUT_ELEMENTS, InputError)
        elif any(not isinstance(d, int) for d in dims) or not dims and not value.type.tensor_type.HasField("shape"):
            example = ",".join(str(d) if isinstance(d, int) else "1" for d in dims) or "1,3,224,224"
            raise InputError(f"input '{value.name}' has dynamic shape {dims}; bind it with "
                             f"--input-shape {value.name}:{example}")
        _check_size(f"input '{value.name}'", dims, MAX_INPUT_ELEMENTS)
        tensor_shape = value.type.tensor_type.shape
        for dim, size in zip(tensor_shape.dim, dims):
            dim.Clear()
            dim.dim_value = int(size)
        specs.append(TensorSpec(value.name, tuple(int(d) for d in dims), _dtype(value)))
    return specs


def _check_size(what: str, dims: Sequence[int], limit: int, error: type[Exception] = ModelError) -> None:
    """Refuse zero-sized dimensions and tensors with more than ``limit`` elements."""
    if any(int(d) < 1 for d in dims):
        raise error(f"{what} has shape {list(dims)}; every dimension must be at least 1")
    count = 1
    for d in dims:
        count *= int(d)
    if count > limit:
        raise error(f"{what} has shape {list(dims)} ({count} elements), over the {limit} tvmnet accepts; "
                    "a corrupted model or a mistyped --input-shape")


def _check_types_and_shapes(model: onnx.ModelProto) -> None:
    """ONNX's strict shape and type inference on the shape-bound model: what the checker leaves out (an
    output declared double that a Gemm computes as float, a Conv fed a 3-D tensor). TVM compiles some
    of these anyway, into artifacts whose manifest would not describe them."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]  # exporters' stale intermediate shapes must not clash with the bound input
    for output in probe.graph.output:
        output.type.tensor_type.ClearField("shape")  # declared types still count, declared shapes do not
    try:
        onnx.shape_inference.infer_shapes(probe, strict_mode=True, check_type=True)
    except Exception as exc:
        raise ModelError(f"ONNX shape/type inference rejects the model: {one_line(exc)}") from None


def _canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Infer shapes and fold constant subgraphs with onnxslim, on the now static shapes."""
    import onnxslim

    del model.graph.value_info[:]  # stale symbolic shapes would survive the binding otherwise
    for output in model.graph.output:
        output.type.tensor_type.ClearField("shape")
    try:
        slimmed = onnxslim.slim(model)
    except Exception as exc:
        raise ModelError(f"could not canonicalize the model (shape inference / constant folding): {one_line(exc)}") \
            from None
    if slimmed is None:
        raise ModelError("could not canonicalize the model: onnxslim returned nothing")
    return onnx.shape_inference.infer_shapes(slimmed, strict_mode=False)


def load_onnx(source: str | os.PathLike | onnx.ModelProto, input_shapes: InputShapes | None = None) -> ImportedModel:
    """Read, check, shape-bind and canonicalize an ONNX model for TVM."""
    model, source_bytes = read_model(source)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelError(f"the ONNX checker rejects the model: {one_line(exc)}") from None
    opset = _default_opset(model)
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:  # the checker lets it through; onnxruntime refuses it, TVM would guess
        raise ModelError(f"the model claims opset {opset}, newer than any this onnx {onnx.__version__} knows "
                         f"(up to {newest}); export it with opset {newest} or lower")
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, CONVERT_TO_OPSET)
        except Exception as exc:
            raise ModelError(f"the model uses opset {opset}; converting it to opset {CONVERT_TO_OPSET} failed: "
                             f"{one_line(exc)}") from None
    check_supported_ops(model)
    _check_weight_shapes(model)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # work on a copy: binding edits in place
    inputs = _bind_input_shapes(model, input_shapes or {})
    _check_types_and_shapes(model)
    model = _canonicalize(model)
    outputs = []
    for value in model.graph.output:
        if not value.type.tensor_type.HasField("shape"):
            raise ModelError(f"the shape of output '{value.name}' cannot be inferred from the inputs' shapes")
        dims = _dims(value)
        if any(not isinstance(d, int) for d in dims):
            raise ModelError(f"output '{value.name}' still has a dynamic shape {dims} after binding the inputs; "
                             "tvmnet compiles static shapes only")
        outputs.append(TensorSpec(value.name, tuple(dims), _dtype(value)))
    for value in [*model.graph.value_info, *model.graph.output]:
        dims = _dims(value)
        if all(isinstance(d, int) for d in dims):
            _check_size(f"tensor '{value.name}'", dims, MAX_TENSOR_ELEMENTS)
    return ImportedModel(onnx_model=model, inputs=inputs, outputs=outputs, source_bytes=source_bytes)
