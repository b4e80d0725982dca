"""tvmnet.expand_fusion: an expansion on a large map and the stride-2 depthwise convolution it feeds become one
kernel, on x86 with AVX-512 only, and only where that kernel computes what the two did.

The models are one such pair each, built with onnx.helper at the smallest size the pass takes (112x112)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from tvmnet import expand_fusion, pipeline
from tvmnet.frontend import load_onnx
from tvmnet.targets import get_target

ACTIVATIONS = {"relu6": ("Clip", [0.0, 6.0]), "relu": ("Relu", []), "hardswish": ("HardSwish", [])}


def pair_model(path, rows: int = 112, inputs: int = 16, channels: int = 96, activation: str = "relu6"):
    """NCHW image -> 1x1 conv to ``channels`` + bias -> activation -> 3x3 depthwise conv, stride 2 + bias ->
    activation, as an ONNX file (opset 14) at ``path``."""
    rng = np.random.default_rng(0)
    op, bounds = ACTIVATIONS[activation]
    initializers = [
        numpy_helper.from_array((rng.standard_normal((channels, inputs, 1, 1)) * 0.3).astype("float32"), "w1"),
        numpy_helper.from_array(rng.standard_normal(channels).astype("float32"), "b1"),
        numpy_helper.from_array((rng.standard_normal((channels, 1, 3, 3)) * 0.3).astype("float32"), "w2"),
        numpy_helper.from_array(rng.standard_normal(channels).astype("float32"), "b2"),
        *(numpy_helper.from_array(np.array(b, "float32"), name) for b, name in zip(bounds, ["low", "high"])),
    ]
    bound_names = ["low", "high"][:len(bounds)]
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["expanded"], kernel_shape=[1, 1], name="expand"),
        helper.make_node(op, ["expanded", *bound_names], ["expanded_act"], name="expand_act"),
        helper.make_node("Conv", ["expanded_act", "w2", "b2"], ["depthwise"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         strides=[2, 2], group=channels, name="depthwise"),
        helper.make_node(op, ["depthwise", *bound_names], ["output"], name="depthwise_act"),
    ]
    graph = helper.make_graph(
        nodes, "expand_pair", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, inputs, rows, rows])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, channels, rows // 2, rows // 2])],
        initializers)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    return path


def fused_kernels(path) -> list[str]:
    target = get_target("x86").tvm_target()
    return expand_fusion.fuse_expand_pairs(pipeline.fuse(load_onnx(str(path)).to_relax(), target), target)[1]


X86_HAS_AVX512 = expand_fusion.applies_to(get_target("x86").tvm_target())
needs_avx512 = pytest.mark.skipif(not X86_HAS_AVX512, reason="the pass fuses only on x86 CPUs with AVX-512")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("activation", ["relu6", "relu"])
def test_pair_compiles_to_one_kernel_that_matches_onnxruntime(activation, tmp_path):
    """The whole compile path: the manifest names the fused kernel (where this CPU has AVX-512) and the artifact
    matches onnxruntime on a seeded input (verify's tolerance, 1e-4 + 1e-4·|ort|)."""
    import tvmnet
    from tvmnet.verify import verify

    model = pair_model(tmp_path / "pair.onnx", activation=activation)
    artifact = tmp_path / "artifact"
    tvmnet.compile(str(model), output=artifact, target="x86")
    schedules = json.loads((artifact / "manifest.json").read_text())["schedules"]
    assert schedules["fused"] == (["fused_expand_depthwise0"] if X86_HAS_AVX512 else []), schedules
    (report,) = verify(artifact)
    assert report.passed, report


@needs_avx512
@pytest.mark.parametrize("change", [{"activation": "hardswish"}, {"rows": 56}, {"inputs": 32}])
def test_other_pairs_stay_two_kernels(change, tmp_path):
    """HardSwish fails the numerical check; a 56-row map and a 32-channel input are outside MIN_ROWS and
    MAX_INPUTS, where fusing lost or did not gain."""
    assert fused_kernels(pair_model(tmp_path / "pair.onnx", **change)) == []


@needs_avx512
def test_a_kernel_that_computes_something_else_is_not_used(tmp_path, monkeypatch):
    """The numerical check can fail: with the depthwise weights laid out wrong, the pair stays as it was."""
    right = expand_fusion._fused_weights

    def wrong(first, second):
        pw_weight, pw_bias, dw_weight, dw_bias = right(first, second)
        return [pw_weight, pw_bias, np.ascontiguousarray(dw_weight[::-1]), dw_bias]

    model = pair_model(tmp_path / "pair.onnx")
    assert fused_kernels(model) == ["fused_expand_depthwise0"]
    monkeypatch.setattr(expand_fusion, "_fused_weights", wrong)
    assert fused_kernels(model) == []
