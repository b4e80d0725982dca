"""Graph summary for `tvmnet inspect`: op counts, parameters and FLOPs of a shape-inferred ONNX model.

Computed once at compile time and stored in the manifest, so inspecting an artifact needs no ONNX.
"""

from __future__ import annotations

from collections import Counter
from math import prod
from typing import Any

import onnx


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _node_flops(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Floating-point operations of the compute-heavy ops (a multiply-add counts as two)."""
    out = shapes.get(node.output[0]) if node.output else None
    if out is None:
        return 0
    if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in shapes:
        weight = shapes[node.input[1]]  # [C_out, C_in / groups, kH, kW]
        return 2 * prod(out) * prod(weight[1:])
    if node.op_type in ("Gemm", "MatMul") and node.input[0] in shapes:
        reduce_dim = shapes[node.input[0]][-1]
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            reduce_dim = shapes[node.input[0]][0]
        return 2 * prod(out) * reduce_dim
    return 0


def summarize(model: onnx.ModelProto) -> dict[str, Any]:
    """Op counts, parameter count and FLOPs of a model whose shapes are static and inferred."""
    shapes = _shapes(model)
    return {
        "nodes": len(model.graph.node),
        "ops": dict(sorted(Counter(node.op_type for node in model.graph.node).items())),
        "parameters": sum(prod(init.dims) for init in model.graph.initializer),
        "flops": sum(_node_flops(node, shapes) for node in model.graph.node),
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    }
