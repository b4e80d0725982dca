"""Bad input: each case gets a clear one-line message, its exit code, and leaves nothing behind."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tvmnet
from tvmnet import zoo
from tvmnet.errors import ArtifactError, InputError, ModelError, TargetError

from conftest import no_leftovers


def _compile_fails(model, tmp_path, error, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises(error, match=match) as info:
        tvmnet.compile(model, output=out, **kwargs)
    assert "\n" not in str(info.value)
    assert not out.exists() and no_leftovers(tmp_path) == []
    return info.value


def test_truncated_onnx(tmp_path):
    data = zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) // 3])
    _compile_fails(path, tmp_path, ModelError, "not a valid ONNX model")


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "photo.onnx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(256))
    _compile_fails(path, tmp_path, ModelError, "not a valid ONNX model")


def test_missing_file(tmp_path):
    _compile_fails(tmp_path / "nope.onnx", tmp_path, ModelError, "does not exist")


def _model_with_unsupported_ops() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok"),
        helper.make_node("StringNormalizer", ["a"], ["b"], name="weird_1"),
        helper.make_node("StringNormalizer", ["b"], ["c"], name="weird_2"),
        helper.make_node("MyCustomOp", ["c"], ["y"], name="custom_1", domain="com.example"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])


def test_unsupported_ops_are_listed_with_first_node(tmp_path):
    err = _compile_fails(_model_with_unsupported_ops(), tmp_path, ModelError, "unsupported ONNX op")
    assert "StringNormalizer (first at node 'weird_1')" in str(err)
    assert "com.example.MyCustomOp (first at node 'custom_1')" in str(err)
    assert "weird_2" not in str(err)


def test_dynamic_input_without_shape_names_the_input(tmp_path):
    model = zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96, batch=None)
    err = _compile_fails(model, tmp_path, InputError, "input 'input' has dynamic shape")
    assert "--input-shape input:1,3,96,96" in str(err)


def test_input_shape_for_unknown_input(tmp_path):
    model = zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96, batch=None)
    _compile_fails(model, tmp_path, InputError, "unknown input", input_shapes={"image": [1, 3, 96, 96]})


def test_input_shape_that_contradicts_model(tmp_path):
    model = zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96, batch=None)
    _compile_fails(model, tmp_path, InputError, "does not fit", input_shapes={"input": [1, 3, 128, 128]})


def test_unknown_target(tmp_path):
    _compile_fails(zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96), tmp_path, TargetError,
                   "unknown target 'pdp11'", target="pdp11")


def test_output_is_a_file(tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    with pytest.raises(ArtifactError, match="not a directory"):
        tvmnet.compile(zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96), output=target)
    assert target.read_text() == "precious"


def test_output_under_a_file_is_unwritable(tmp_path):
    """Works as root too: a path below a regular file can never be created."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ArtifactError, match="cannot write"):
        tvmnet.compile(zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96), output=blocker / "out")


def test_wrong_shape_and_dtype_to_run(tiny_v2_artifact):
    compiled = tvmnet.load(tiny_v2_artifact)
    with pytest.raises(InputError, match=r"shape \[1, 3, 64, 64\], expected \[1, 3, 96, 96\]"):
        compiled.run(np.zeros((1, 3, 64, 64), "float32"))
    with pytest.raises(InputError, match="looks like NHWC"):
        compiled.run(np.zeros((1, 96, 96, 3), "float32"))
    with pytest.raises(InputError, match="batch size 2 given"):
        compiled.run(np.zeros((2, 3, 96, 96), "float32"))
    with pytest.raises(InputError, match="dtype float64, expected float32"):
        compiled.run(np.zeros((1, 3, 96, 96), "float64"))
    with pytest.raises(InputError, match="unknown input name"):
        compiled.run({"image": np.zeros((1, 3, 96, 96), "float32")})
    with pytest.raises(InputError, match="must be a numpy array"):
        compiled.run([[0.0]])


def test_non_contiguous_input_is_accepted(tiny_v2_artifact):
    compiled = tvmnet.load(tiny_v2_artifact)
    x = np.random.default_rng(0).standard_normal((1, 96, 96, 3)).astype("float32")
    np.testing.assert_array_equal(compiled.run(x.transpose(0, 3, 1, 2)), compiled.run(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))


def test_tampered_library_is_refused(tiny_v2_artifact, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_v2_artifact, copy)
    with open(copy / "model.so", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match the sha256"):
        tvmnet.load(copy)
    assert tvmnet.load(copy, trust=True).run(np.zeros((1, 3, 96, 96), "float32")).shape == (1, 1000)


def test_load_incomplete_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        tvmnet.load(tmp_path)
    with pytest.raises(ArtifactError, match="not a tvmnet artifact"):
        tvmnet.load(tmp_path / "missing")
