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


def _tiny(**kwargs) -> onnx.ModelProto:
    return zoo.build_model("mobilenet_v1", alpha=0.25, resolution=96, num_classes=10, **kwargs)


def _externalize(model: onnx.ModelProto, location: str) -> onnx.TensorProto:
    """Point the biggest weight at external file ``location`` (and drop its inline bytes)."""
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    size = len(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(size))):
        init.external_data.add(key=key, value=value)
    return init


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, how):
    model = _tiny()
    payload = max(model.graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    folder = tmp_path / "m"
    folder.mkdir()
    outside = tmp_path / "secret.bin"
    outside.write_bytes(payload)  # valid weights: refused for where they are, not for what they are
    location = {"dotdot": "../secret.bin", "absolute": str(outside), "symlink": "w.bin"}[how]
    if how == "symlink":
        (folder / "w.bin").symlink_to(outside)
    _externalize(model, location)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    _compile_fails(folder / "model.onnx", tmp_path, ModelError, "outside the model's folder|relative path inside")


def test_external_data_inside_the_folder_compiles(tmp_path):
    from conftest import ort_run

    model = _tiny()
    payload = max(model.graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    (tmp_path / "w.bin").write_bytes(payload)
    external = onnx.ModelProto()
    external.CopyFrom(model)
    _externalize(external, "w.bin")
    (tmp_path / "model.onnx").write_bytes(external.SerializeToString())
    artifact = tvmnet.compile(tmp_path / "model.onnx", output=tmp_path / "out")
    compiled = tvmnet.load(artifact)
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype("float32")
    np.testing.assert_allclose(compiled.run(x), ort_run(model, {"input": x})[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ModelError, match="pass the .onnx file's path"):  # in memory: no folder to read from
        tvmnet.compile(external, output=tmp_path / "out2")


def test_huge_dims_are_refused_before_any_work(tmp_path):
    model = _tiny()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**40
    _compile_fails(model, tmp_path, ModelError, r"over the 268435456 tvmnet accepts")
    _compile_fails(_tiny(batch=None), tmp_path, InputError, "over the", input_shapes={"input": [2**20, 3, 96, 96]})


def test_weight_whose_bytes_do_not_fit_its_shape(tmp_path):
    model = _tiny()
    model.graph.initializer[0].dims[0] -= 1
    _compile_fails(model, tmp_path, ModelError, "declares shape .* but holds")


def test_graph_without_outputs_or_with_unused_input(tmp_path):
    model = _tiny()
    del model.graph.output[:]
    _compile_fails(model, tmp_path, ModelError, "declares no graph outputs")
    model = _tiny()
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1, 4]))
    _compile_fails(model, tmp_path, ModelError, "graph input.* extra that no node uses")


def test_corrupted_text_and_metadata(tmp_path):
    model = _tiny()
    model.graph.node[0].name = "NAME0"
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString().replace(b"NAME0", b"N\xffM\xfe0"))
    _compile_fails(path, tmp_path, ModelError, r"node\[0\].name is not UTF-8")
    model = _tiny()
    next(p for p in model.metadata_props if p.key == "tvmnet.std").value = "0,0,0"
    _compile_fails(model, tmp_path, ModelError, "malformed metadata tvmnet.std")


def test_tvm_importer_failure_is_one_clean_line(tmp_path):
    """TVM prints to stdout and logs from C++ as it fails; the CLI shows only tvmnet's line."""
    import subprocess
    import sys

    model = _tiny()
    next(a for a in model.graph.node[2].attribute if a.name == "group").i = -7
    (tmp_path / "m.onnx").write_bytes(model.SerializeToString())
    done = subprocess.run([sys.executable, "-m", "tvmnet.cli", "compile", "m.onnx", "-o", "out"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if not line.startswith("[tvmnet] ")]
    assert lines == ["tvmnet: error: TVM's ONNX frontend could not import the model: Check failed: groups > 0 "
                     "(-7 vs. 0) : The number of groups in convolution is expected to be positive. However, the "
                     "given number of groups is -7"], done.stderr


def test_conv_bias_of_the_wrong_rank(tmp_path):
    """Found by the fuzz: TVM compiled a [C, 1] Conv bias that onnxruntime refuses to run."""
    model = _tiny()
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and len(n.input) == 3)
    bias = next(i for i in model.graph.initializer if i.name == conv.input[2])
    bias.dims.append(1)
    _compile_fails(model, tmp_path, ModelError, r"has shape \[\d+, 1\]; ONNX requires a 1-D bias")


def test_opset_newer_than_onnx_knows(tmp_path):
    """Found by the long fuzz run: the checker accepts opset 99, TVM compiled it, onnxruntime refuses it."""
    model = _tiny()
    model.opset_import[0].version = 99
    _compile_fails(model, tmp_path, ModelError, "claims opset 99, newer than any this onnx")
