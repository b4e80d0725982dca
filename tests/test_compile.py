"""Every zoo family compiles for x86 and matches onnxruntime; so do exporter-style graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tvmnet
from tvmnet import zoo
from tvmnet.manifest import sha256_file

from conftest import ATOL, RTOL, compile_and_compare, ort_run
from exporter_style import to_exporter_style

POINTS = [(0.25, 96), (0.5, 128)]


@pytest.mark.parametrize("family", zoo.MODEL_NAMES)
@pytest.mark.parametrize("alpha,resolution", POINTS)
def test_zoo_family_matches_onnxruntime(family, alpha, resolution, tmp_path):
    model = zoo.build_model(family, alpha=alpha, resolution=resolution, seed=1)
    compiled = compile_and_compare(model, tmp_path / "a")
    assert compiled.inputs[0].shape == (1, 3, resolution, resolution)
    assert compiled.outputs[0].shape == (1, 1000)


def test_dynamic_batch_export_at_batch_1_and_4(tmp_path):
    model = zoo.build_model("mobilenet_v2", alpha=0.25, resolution=96, batch=None)
    for batch in (1, 4):
        compiled = compile_and_compare(model, tmp_path / f"b{batch}", input_shapes={"input": [batch, 3, 96, 96]})
        assert compiled.outputs[0].shape == (batch, 1000)


def test_batchnorm_kept_model(tmp_path):
    model = zoo.build_model("mobilenet_v3_small", alpha=0.25, resolution=96, fold_bn=False)
    assert any(node.op_type == "BatchNormalization" for node in model.graph.node)
    compile_and_compare(model, tmp_path / "bn")


@pytest.mark.parametrize("family", ["mobilenet_v2", "mobilenet_v3_small"])
def test_exporter_style_graph_is_canonicalized(family, tmp_path):
    """Shape->Gather->Concat->Reshape chains and Constant nodes, as real exporters write them."""
    model = to_exporter_style(zoo.build_model(family, alpha=0.25, resolution=96))
    assert {"Shape", "Reshape"} <= {node.op_type for node in model.graph.node}
    compile_and_compare(model, tmp_path / "exp")


@pytest.mark.parametrize("opset", [11, 17])
def test_opsets(opset, tmp_path):
    compile_and_compare(zoo.build_model("mobilenet_v3_small", alpha=0.25, resolution=96, opset=opset), tmp_path / "o")


def test_manifest_describes_artifact(tiny_v2_artifact):
    manifest = json.loads((tiny_v2_artifact / "manifest.json").read_text())
    assert manifest["library"]["sha256"] == sha256_file(tiny_v2_artifact / "model.so")
    assert manifest["model"]["sha256"] == sha256_file(tiny_v2_artifact / "model.onnx")
    assert manifest["target"]["name"] == "x86" and manifest["target"]["arch"] == "x86_64"
    assert json.loads(manifest["target"]["tvm"])["num-cores"] >= 1
    assert manifest["tvm_version"].startswith("0.27")
    assert manifest["preprocessing"]["resolution"] == 96 and manifest["preprocessing"]["layout"] == "NCHW"
    assert manifest["graph"]["ops"]["Conv"] > 30 and manifest["graph"]["flops"] > 0
    assert manifest["inputs"] == [{"name": "input", "shape": [1, 3, 96, 96], "dtype": "float32"}]


def test_benchmark_and_run_agree_with_reference(tiny_v2_artifact):
    compiled = tvmnet.load(tiny_v2_artifact)
    stats = compiled.benchmark(number=2, repeat=5, warmup=1)
    assert stats.repeat == 5 and 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms <= stats.max_ms
    x = np.random.default_rng(3).standard_normal((1, 3, 96, 96)).astype("float32")
    expected = ort_run(tiny_v2_artifact / "model.onnx", {"input": x})[0]
    np.testing.assert_allclose(compiled.run({"input": x}), expected, rtol=RTOL, atol=ATOL)


def test_recompile_replaces_artifact_atomically(tmp_path):
    model = zoo.build_model("mobilenet_v1", alpha=0.25, resolution=96)
    out = tmp_path / "art"
    tvmnet.compile(model, output=out)
    first = sha256_file(out / "model.onnx")
    tvmnet.compile(zoo.build_model("mobilenet_v1", alpha=0.25, resolution=96, seed=5), output=out)
    assert sha256_file(out / "model.onnx") != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
