"""Rewrite a zoo model the way framework exporters (PyTorch, tf2onnx, Paddle2ONNX) write it.

Exporters trace ``x.view(x.size(0), -1)`` and friends into shape-computation subgraphs and
inline constants as ``Constant`` nodes; TVM's ONNX frontend handles the clean zoo graphs but not
always these. Tests use this helper to check that tvmnet canonicalizes such graphs before import.
Every rewrite is exact (reshapes, casts of shape values, constants), so the function is unchanged.

Observed with TVM 0.27's ``relax.frontend.onnx.from_onnx``: ``Shape -> Gather(scalar) /
Slice -> Concat -> Reshape`` chains import fine (they fold to shape expressions). The import fails
with "Reshape requires the input new shape to be Shape. However, the given one is
relax.TensorType" when the shape is indexed by a ``Gather`` with a 1-D index tensor (the SE gate
view below, so V3 models fail at any batch), or when a symbolic dimension goes through a ``Cast``
(``cast_shapes``; dynamic batch only, static dimensions fold to constants). V1 and V2 have no SE
blocks, so with a static batch they still import.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["to_exporter_style"]

_UNSQUEEZE_AXES_AS_INPUT = 13  # before opset 13, Unsqueeze takes ``axes`` as an attribute


class _Emitter:
    """Appends nodes whose output tensor is named like the node."""

    def __init__(self, opset: int, cast_shapes: bool) -> None:
        self.opset = opset
        self.cast_shapes = cast_shapes
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, inputs: list[str], name: str, **attrs: object) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        return self.op("Constant", [], name, value=numpy_helper.from_array(value, name))

    def ints(self, name: str, *values: int) -> str:
        return self.const(name, np.array(values, dtype=np.int64))

    def unsqueeze0(self, x: str, name: str) -> str:
        if self.opset >= _UNSQUEEZE_AXES_AS_INPUT:
            return self.op("Unsqueeze", [x, self.ints(f"{name}.axes", 0)], name)
        return self.op("Unsqueeze", [x], name, axes=[0])

    def shape_values(self, dims: str, name: str) -> str:
        """With ``cast_shapes``, the int64 -> int32 -> int64 round trip of tf2onnx / Paddle2ONNX."""
        if not self.cast_shapes:
            return dims
        narrow = self.op("Cast", [dims], f"{name}.to_int32", to=onnx.TensorProto.INT32)
        return self.op("Cast", [narrow], f"{name}.to_int64", to=onnx.TensorProto.INT64)

    def leading_dims(self, x: str, count: int, name: str) -> str:
        """``Shape(x)[:count]`` via Slice, as ``x.shape[:2]`` exports."""
        shape = self.op("Shape", [x], f"{name}.shape")
        bounds = [self.ints(f"{name}.starts", 0), self.ints(f"{name}.ends", count)]
        dims = self.op("Slice", [shape, *bounds], f"{name}.slice")
        return self.shape_values(dims, name)

    def gathered_dims(self, x: str, indices: tuple[int, ...], name: str) -> str:
        """``Shape(x)`` indexed with a 1-D ``Gather``, as tf2onnx writes ``tf.shape(x)[:2]``."""
        shape = self.op("Shape", [x], f"{name}.shape")
        dims = self.op("Gather", [shape, self.ints(f"{name}.indices", *indices)], f"{name}.gather", axis=0)
        return self.shape_values(dims, name)

    def reshape(self, x: str, dims: str, tail: tuple[int, ...], name: str) -> str:
        """``Reshape(x, Concat(dims, tail))``: a shape computed at run time."""
        shape = self.op("Concat", [dims, self.ints(f"{name}.tail", *tail)], f"{name}.concat", axis=0)
        return self.op("Reshape", [x, shape], name)


def to_exporter_style(model: onnx.ModelProto, *, cast_shapes: bool = True) -> onnx.ModelProto:
    """Return a copy of a zoo model with exporter-style patterns; the input is not modified.

    (a) The classifier's ``Flatten`` becomes ``Shape -> Gather(0) -> Unsqueeze -> Concat([-1])
    -> Reshape`` (PyTorch's ``x.view(x.size(0), -1)``). (b) In every squeeze-excite block the
    pooled tensor is flattened to ``[N, C]`` and back to ``[N, C, 1, 1]`` before the first 1x1
    conv (``Shape -> Slice -> Concat -> Reshape``), and the gate is reshaped to ``x.shape[:2] +
    (1, 1)`` before the multiply (``Shape -> Gather([0, 1]) -> Concat -> Reshape``).
    (c) Initializers feeding ``Clip`` min/max become ``Constant`` nodes. (d) With
    ``cast_shapes``, the shape values computed in (a) and (b) go through ``Cast`` to int32 and
    back, as tf2onnx and Paddle2ONNX write them.
    """
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    opset = next(o.version for o in result.opset_import if o.domain in ("", "ai.onnx"))
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def se_gate_target(node: onnx.NodeProto) -> str | None:
        """For an SE gate (HardSigmoid scaling another tensor), the tensor it scales."""
        users = consumers.get(node.output[0], [])
        if node.op_type != "HardSigmoid" or len(users) != 1 or users[0].op_type != "Mul":
            return None
        (other,) = [name for name in users[0].input if name != node.output[0]]
        return None if other == node.input[0] else other  # x * HardSigmoid(x) is a hard-swish

    out = _Emitter(opset, cast_shapes)
    renamed: dict[str, str] = {}
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)
        node.input[:] = [renamed.get(name, name) for name in node.input]
        base = node.name

        if node.op_type == "Flatten":
            shape = out.op("Shape", [node.input[0]], f"{base}.shape")
            index = out.const(f"{base}.index", np.array(0, dtype=np.int64))
            batch = out.op("Gather", [shape, index], f"{base}.gather", axis=0)
            batch = out.shape_values(out.unsqueeze0(batch, f"{base}.unsqueeze"), base)
            shape = out.op("Concat", [batch, out.ints(f"{base}.minus_one", -1)], f"{base}.concat", axis=0)
            out.nodes.append(helper.make_node("Reshape", [node.input[0], shape], list(node.output), name=base))
            continue

        if node.op_type == "Clip":
            for slot, role in ((1, "min"), (2, "max")):
                if len(node.input) > slot and node.input[slot] in initializers:
                    value = numpy_helper.to_array(initializers[node.input[slot]])
                    node.input[slot] = out.const(f"{base}.{role}", value)
        out.nodes.append(node)

        pooled = node.output[0]
        if node.op_type == "GlobalAveragePool" and all(user.op_type == "Conv" for user in consumers.get(pooled, [])):
            flat = out.reshape(pooled, out.leading_dims(pooled, 1, f"{base}.n"), (-1,), f"{base}.flatten")
            renamed[pooled] = out.reshape(flat, out.leading_dims(pooled, 2, f"{base}.nc"), (1, 1), f"{base}.unflatten")
        target = se_gate_target(node)
        if target is not None:
            dims = out.gathered_dims(target, (0, 1), f"{base}.target_nc")
            renamed[node.output[0]] = out.reshape(node.output[0], dims, (1, 1), f"{base}.view")

    graph.ClearField("node")
    graph.node.extend(out.nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    return result
