"""Tests for the MobileNet zoo (tvmnet.zoo) and the exporter-style rewrite used by other tests.

Inference runs on small models (alpha 0.25, 96x96); the standard configs are only built for
parameter counts and one scale check, which keeps the file well under a minute on 2 cores.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from exporter_style import to_exporter_style

from tvmnet import zoo
from tvmnet.errors import ModelError, TvmnetError

FAMILIES = zoo.MODEL_NAMES
V3_FAMILIES = ("mobilenet_v3_large", "mobilenet_v3_small")
SMALL = {"alpha": 0.25, "resolution": 96}


@functools.cache
def _built(name: str, **kwargs: object) -> bytes:
    return zoo.build_model(name, **kwargs).SerializeToString()


def build(name: str, **kwargs: object) -> onnx.ModelProto:
    """A fresh copy of a (cached) small model, so tests may modify what they get."""
    return onnx.load_from_string(_built(name, **dict(sorted({**SMALL, **kwargs}.items()))))


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # reproducible summation order
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x})
    return logits


def image(batch: int = 1, resolution: int = 96, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, resolution, resolution)).astype(np.float32)


def assert_close(actual: np.ndarray, expected: np.ndarray, rtol: float) -> None:
    """Relative to the output's scale: logits near zero must not demand absurd precision."""
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * float(np.abs(expected).max()))


def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# -- catalogue ------------------------------------------------------------------------------


def test_list_models_describes_every_family() -> None:
    entries = zoo.list_models()
    assert tuple(e.name for e in entries) == FAMILIES
    for entry in entries:
        assert entry.description and "arXiv" in entry.paper
        assert entry.default_mean == (0.485, 0.456, 0.406)
        assert entry.default_std == (0.229, 0.224, 0.225)
        assert entry.num_classes == 1000
    with pytest.raises(AttributeError):
        entries[0].name = "other"  # type: ignore[misc]


# -- graph structure ------------------------------------------------------------------------


@pytest.mark.parametrize("opset", [11, 13, 17])
@pytest.mark.parametrize("name", FAMILIES)
def test_model_passes_full_check_with_named_io(name: str, opset: int) -> None:
    model = build(name, opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import] == [opset]
    assert model.producer_name == "tvmnet.zoo"
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, dims(inp), inp.type.tensor_type.elem_type) == ("input", [1, 3, 96, 96], onnx.TensorProto.FLOAT)
    assert (out.name, dims(out)) == ("logits", [1, 1000])
    props = {p.key: p.value for p in model.metadata_props}
    assert props["tvmnet.family"] == name
    assert props["tvmnet.alpha"] == "0.25"
    assert props["tvmnet.resolution"] == "96"
    assert props["tvmnet.seed"] == "0"
    assert "alpha=0.25" in model.doc_string

    node_names = [n.name for n in model.graph.node]
    assert all(node_names) and len(set(node_names)) == len(node_names)
    init_names = [t.name for t in model.graph.initializer]
    assert len(set(init_names)) == len(init_names)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GlobalAveragePool"] >= 1 and ops["Flatten"] == 1 and ops["Gemm"] >= 1
    assert "Softmax" not in ops and "BatchNormalization" not in ops


def test_layers_follow_the_reference_tables() -> None:
    """Spot checks of activations, SE placement and torchvision-style names."""
    v1 = Counter(n.op_type for n in build("mobilenet_v1").graph.node)
    assert v1["Relu"] == 27 and v1["Conv"] == 27 and "Clip" not in v1

    v2 = build("mobilenet_v2").graph
    assert "features.3.conv.1.dw" in {n.name for n in v2.node}
    clips = [n for n in v2.node if n.op_type == "Clip"]
    assert len(clips) == 35 and all(len(n.input) == 3 for n in clips)  # min/max as inputs (opset >= 11)
    # 10 residual connections, plus the first block's: at alpha 0.25 it maps 8 channels to 8.
    assert sum(n.op_type == "Add" for n in v2.node) == 11
    assert {"features.3.conv.1.0.weight", "features.18.0.weight", "classifier.1.weight"} <= {
        t.name for t in v2.initializer
    }

    for name, se_blocks in (("mobilenet_v3_large", 8), ("mobilenet_v3_small", 9)):
        ops13 = Counter(n.op_type for n in build(name, opset=13).graph.node)
        ops14 = Counter(n.op_type for n in build(name, opset=14).graph.node)
        assert ops14["HardSwish"] > 0 and ops13["HardSwish"] == 0
        assert ops13["HardSigmoid"] == se_blocks + ops14["HardSwish"]  # x * HardSigmoid(x) below 14
        assert ops14["HardSigmoid"] == se_blocks
        assert ops14["GlobalAveragePool"] == se_blocks + 1
    gates = [n for n in build("mobilenet_v3_small", opset=13).graph.node if n.op_type == "HardSigmoid"]
    assert all(math.isclose(a.f, 1 / 6, rel_tol=1e-6) for n in gates for a in n.attribute if a.name == "alpha")


# -- numerics in onnxruntime ----------------------------------------------------------------


@pytest.mark.parametrize(("alpha", "resolution"), [(0.25, 96), (1.0, 224)])
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_are_finite_and_well_scaled(name: str, alpha: float, resolution: int) -> None:
    """Calibrated BN keeps activations O(1), so compiler comparisons at 1e-4 mean something."""
    model = build(name, alpha=alpha, resolution=resolution)
    logits = run(model, image(resolution=resolution))
    assert logits.shape == (1, 1000) and np.isfinite(logits).all()
    assert 0.1 < logits.std() < 100
    other = run(model, image(resolution=resolution, seed=7))
    assert np.abs(other - logits).std() > 0.01 * logits.std()  # the output depends on the input


@pytest.mark.parametrize("name", FAMILIES)
def test_every_opset_computes_the_same_function(name: str) -> None:
    x = image()
    reference = run(build(name, opset=13), x)
    for opset in (11, 17):
        assert_close(run(build(name, opset=opset), x), reference, rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_dynamic_batch(name: str) -> None:
    model = build(name, batch=None)
    onnx.checker.check_model(model, full_check=True)
    assert dims(model.graph.input[0])[0] == "batch" and dims(model.graph.output[0]) == ["batch", 1000]
    x = image(batch=4)
    four = run(model, x)
    one = run(model, x[:1])
    assert four.shape == (4, 1000) and one.shape == (1, 1000)
    assert_close(four[:1], one, rtol=1e-5)
    assert_close(one, run(build(name), x[:1]), rtol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_kept_batchnorm_matches_folded(name: str) -> None:
    folded, kept = build(name, batch=None), build(name, batch=None, fold_bn=False)
    onnx.checker.check_model(kept, full_check=True)
    bn_nodes = [n for n in kept.graph.node if n.op_type == "BatchNormalization"]
    convs_without_bias = [n for n in kept.graph.node if n.op_type == "Conv" and len(n.input) == 2]
    assert bn_nodes and len(bn_nodes) == len(convs_without_bias)
    assert all(len(n.input) == 3 for n in folded.graph.node if n.op_type == "Conv")
    x = image(batch=2)
    assert_close(run(folded, x), run(kept, x), rtol=1e-4)


# -- determinism and weights ----------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_weights() -> None:
    first = zoo.build_model("mobilenet_v3_small", **SMALL)
    again = zoo.build_model("mobilenet_v3_small", **SMALL)
    assert first.SerializeToString() == again.SerializeToString()
    other = zoo.build_model("mobilenet_v3_small", seed=1, **SMALL)
    assert [n.op_type for n in other.graph.node] == [n.op_type for n in first.graph.node]
    for a, b in zip(first.graph.initializer, other.graph.initializer, strict=True):
        assert a.name == b.name and list(a.dims) == list(b.dims)
        if a.name.endswith(".weight"):
            assert not np.array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b)), a.name


@pytest.mark.parametrize("fold_bn", [True, False])
def test_weights_round_trip_through_npz(tmp_path: Path, fold_bn: bool) -> None:
    source = build("mobilenet_v3_small", fold_bn=fold_bn)
    path = zoo.save_weights(source, tmp_path / "weights.npz")
    assert path == tmp_path / "weights.npz"
    with np.load(path) as npz:
        assert "features.0.0.weight" in npz.files and "const.relu6.min" not in npz.files
        assert any(key.endswith(".running_var") for key in npz.files) == (not fold_bn)
    loaded = zoo.build_model("mobilenet_v3_small", seed=5, fold_bn=fold_bn, weights=path, **SMALL)
    onnx.checker.check_model(loaded, full_check=True)
    for a, b in zip(source.graph.initializer, loaded.graph.initializer, strict=True):
        assert a.SerializeToString() == b.SerializeToString()
    assert {p.key: p.value for p in loaded.metadata_props}["tvmnet.weights"] == "weights.npz"
    x = image()
    np.testing.assert_array_equal(run(loaded, x), run(source, x))


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def test_weights_file_problems_are_named(tmp_path: Path) -> None:
    model = build("mobilenet_v2")
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.dims}

    missing = dict(arrays)
    del missing["features.1.conv.0.0.weight"]
    expected = r"no array 'features\.1\.conv\.0\.0\.weight' \(expected shape \(8, 1, 3, 3\)\)"
    with pytest.raises(ModelError, match=expected):
        zoo.build_model("mobilenet_v2", weights=_write_npz(tmp_path / "missing.npz", missing), **SMALL)

    wrong = {**arrays, "classifier.1.weight": np.zeros((10, 1280), np.float32)}
    with pytest.raises(ModelError, match=r"'classifier\.1\.weight' has shape \(10, 1280\).*expected \(1000, 1280\)"):
        zoo.build_model("mobilenet_v2", weights=_write_npz(tmp_path / "wrong.npz", wrong), **SMALL)

    extra = {**arrays, "features.99.weight": np.zeros(3, np.float32)}
    with pytest.raises(ModelError, match=r"'features\.99\.weight' the model does not use"):
        zoo.build_model("mobilenet_v2", weights=_write_npz(tmp_path / "extra.npz", extra), **SMALL)

    # Folded weights do not fit a model with BatchNormalization nodes.
    folded = zoo.save_weights(model, tmp_path / "folded.npz")
    with pytest.raises(ModelError, match=r"no array 'features\.0\.1\.weight'.*fold_bn"):
        zoo.build_model("mobilenet_v2", fold_bn=False, weights=folded, **SMALL)

    with pytest.raises(ModelError, match="cannot read weights file"):
        zoo.build_model("mobilenet_v2", weights=tmp_path / "absent.npz", **SMALL)


def test_export_model_writes_atomically(tmp_path: Path) -> None:
    target = tmp_path / "models" / "v3s.onnx"
    written = zoo.export_model("mobilenet_v3_small", target, batch=None, **SMALL)
    assert written == target
    assert target.read_bytes() == zoo.build_model("mobilenet_v3_small", batch=None, **SMALL).SerializeToString()
    zoo.export_model("mobilenet_v3_small", target, seed=3, **SMALL)  # replaces the file
    assert {p.key: p.value for p in onnx.load(target).metadata_props}["tvmnet.seed"] == "3"
    assert sorted(p.name for p in target.parent.iterdir()) == ["v3s.onnx"]  # no temporary left
    with pytest.raises(ModelError):
        zoo.export_model("mobilenet_v3_small", tmp_path / "bad.onnx", resolution=100)
    assert not (tmp_path / "bad.onnx").exists()


# -- argument validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"name": "mobilenet_v4"}, ["'mobilenet_v4'", "mobilenet_v1", "mobilenet_v3_small"]),
        ({"alpha": 0.1}, ["alpha=0.1", "0.25..1.4"]),
        ({"alpha": 1.5}, ["alpha=1.5", "0.25..1.4"]),
        ({"alpha": float("nan")}, ["0.25..1.4"]),
        ({"resolution": 100}, ["resolution=100", "96, 128, 160, 192, 224"]),
        ({"resolution": 256}, ["resolution=256", "96, 128, 160, 192, 224"]),
        ({"opset": 10}, ["opset=10", "11, 12, 13, 14, 15, 16, 17"]),
        ({"opset": 18}, ["opset=18", "11, 12, 13, 14, 15, 16, 17"]),
        ({"batch": 0}, ["batch=0", ">= 1", "None"]),
        ({"num_classes": 0}, ["num_classes=0", "positive"]),
        ({"seed": -1}, ["seed=-1", "non-negative"]),
    ],
)
def test_bad_arguments_say_what_is_allowed(kwargs: dict[str, object], expected: list[str]) -> None:
    name = kwargs.pop("name", "mobilenet_v2")
    with pytest.raises(ModelError) as info:
        zoo.build_model(name, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message
    assert isinstance(info.value, TvmnetError)


# -- parameter counts -----------------------------------------------------------------------

# torchvision's sum(p.numel() for p in model.parameters()): conv/linear weights and biases plus BN
# weight and bias, no running statistics. V1 is not in torchvision; its count equals Keras'
# trainable count (4,253,864 total incl. 21,888 BN running stats) and the paper's 4.2M.
# V3-Small: the paper's Table 3 says 2.9M, but torchvision's implementation (the reference we
# match, as for every V2/V3 detail) has 2,542,856; V3-Large is 5.4M in the paper.
TORCHVISION_COUNTS = {
    "mobilenet_v1": 4_231_976,
    "mobilenet_v2": 3_504_872,
    "mobilenet_v3_large": 5_483_032,
    "mobilenet_v3_small": 2_542_856,
}


@pytest.mark.parametrize("name", FAMILIES)
def test_parameter_counts_match_published_numbers(name: str) -> None:
    standard = {"alpha": 1.0, "resolution": 224}  # and 1000 classes
    kept = build(name, fold_bn=False, **standard)
    assert zoo.count_parameters(kept) == TORCHVISION_COUNTS[name]
    # Folding trades each BN channel's weight + bias for a single conv bias.
    bn_channels = sum(
        math.prod(t.dims) for t in kept.graph.initializer if t.name.endswith(".running_mean")
    )
    assert zoo.count_parameters(build(name, **standard)) == TORCHVISION_COUNTS[name] - bn_channels


def test_parameter_counts_scale_with_width_and_classes() -> None:
    # V2-0.5: torchvision/Keras rules agree (Keras reports 1,987,224 incl. 18,544 BN running stats);
    # the paper lists 1.95M.
    assert zoo.count_parameters(build("mobilenet_v2", alpha=0.5, fold_bn=False)) == 1_968_680
    for name in FAMILIES:
        counts = [zoo.count_parameters(build(name, alpha=a, fold_bn=False)) for a in (0.25, 0.5)]
        counts.append(TORCHVISION_COUNTS[name])
        assert counts == sorted(counts) and len(set(counts)) == len(counts), (name, counts)
    # Parameters do not depend on the resolution; the classifier is (last_channel + 1) per class.
    v3s = zoo.count_parameters(build("mobilenet_v3_small", fold_bn=False))
    assert zoo.count_parameters(build("mobilenet_v3_small", resolution=160, fold_bn=False)) == v3s
    ten = zoo.count_parameters(build("mobilenet_v3_small", num_classes=10, fold_bn=False))
    assert v3s - ten == 990 * (256 + 1)  # alpha 0.25 scales the 1024-wide head to 256


# -- exporter-style graphs ------------------------------------------------------------------


@pytest.mark.parametrize("cast_shapes", [True, False])
@pytest.mark.parametrize("batch", [1, None])
@pytest.mark.parametrize(
    ("name", "opset"), [("mobilenet_v2", 11), ("mobilenet_v3_large", 13), ("mobilenet_v3_small", 17)]
)
def test_exporter_style_is_the_same_function(name: str, opset: int, batch: int | None, cast_shapes: bool) -> None:
    model = build(name, opset=opset, batch=batch)
    original = model.SerializeToString()
    styled = to_exporter_style(model, cast_shapes=cast_shapes)
    assert model.SerializeToString() == original  # the input is left alone
    onnx.checker.check_model(styled, full_check=True)

    ops = Counter(n.op_type for n in styled.graph.node)
    se_blocks = sum(n.op_type == "GlobalAveragePool" for n in model.graph.node) - 1
    assert ops["Flatten"] == 0
    assert ops["Reshape"] == 1 + 3 * se_blocks and ops["Shape"] == 1 + 3 * se_blocks
    assert ops["Unsqueeze"] == 1 and ops["Slice"] == 2 * se_blocks
    assert ops["Cast"] == (2 * (1 + 3 * se_blocks) if cast_shapes else 0)
    producers = {o: n.op_type for n in styled.graph.node for o in n.output}
    clips = [n for n in styled.graph.node if n.op_type == "Clip"]
    assert all(producers[i] == "Constant" for n in clips for i in n.input[1:])
    assert not any(t.name.startswith("const.relu6") for t in styled.graph.initializer)

    x = image(batch=2 if batch is None else 1)
    # Only reshapes and constants change; ORT may pick other kernels once shapes are dynamic.
    assert_close(run(styled, x), run(model, x), rtol=1e-5)
