"""Every zoo family compiles for x86 and matches onnxruntime; so do exporter-style graphs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import tvmnet
from tvmnet import zoo
from tvmnet.manifest import sha256_file

from conftest import ATOL, RTOL, compile_and_compare, ort_run
from exporter_style import to_exporter_style

# Every family at one (alpha, resolution); a second point for V1, the cheapest, in the default run and
# for the others in the slow run (20-40 s each on 2 cores, through the same import/compile/compare path).
SECOND_POINT_DEFAULT = "mobilenet_v1"
CASES = [(family, 0.25, 96) for family in zoo.MODEL_NAMES] + [
    pytest.param(family, 0.5, 128, marks=() if family == SECOND_POINT_DEFAULT else pytest.mark.slow)
    for family in zoo.MODEL_NAMES
]


@pytest.mark.parametrize("family,alpha,resolution", CASES)
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


def _conv_clip_model(lo: float | None, hi: float | None, computed_hi: bool = False) -> onnx.ModelProto:
    """x -> Conv 3x3 -> Clip(lo, hi) -> Conv 1x1: a Clip between two convolutions, as in every MobileNet."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")]
    bounds = []
    for name, value in (("lo", lo), ("hi", hi)):
        if value is not None:
            inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        bounds.append(name if value is not None else "")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1")]
    if computed_hi:  # a bound computed in the graph from the input: TVM's own conversion must still apply
        nodes += [helper.make_node("ReduceMax", ["x"], ["hi_c"], keepdims=0, name="max_of_x")]
        bounds[1] = "hi_c"
    nodes += [helper.make_node("Clip", ["c1", *bounds], ["c2"], name="clip"),
              helper.make_node("Conv", ["c2", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "conv_clip", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("lo,hi,computed_hi", [(0.0, 6.0, False), (None, 0.5, False), (-0.5, None, False),
                                               (None, None, False), (1.0, -1.0, False), (0.0, None, True)])
def test_clip_bounds_match_onnxruntime(lo, hi, computed_hi, tmp_path):
    """Clip with constant bounds is imported as Relax maximum/minimum (so the NHWC layout passes through
    it); missing, crossed (lo > hi) and computed bounds must give onnxruntime's values all the same."""
    compile_and_compare(_conv_clip_model(lo, hi, computed_hi), tmp_path / "a")


@pytest.mark.parametrize("family", zoo.MODEL_NAMES)
def test_cpu_convolutions_are_nhwc_with_no_transposes_inside(family):
    """The CPU pipeline converts convolutions to NHWC; a ReLU6, HardSigmoid or HardSwish must not bring a
    transpose pair with it (only the model's input and the classifier's feature map are transposed), and
    V3's HardSwish fuses into the convolution before it."""
    import tvm

    from tvmnet import pipeline
    from tvmnet.frontend import load_onnx
    from tvmnet.targets import get_target

    target = get_target("x86").tvm_target()
    fused = pipeline.fuse(load_onnx(zoo.build_model(family, alpha=0.25, resolution=96)).to_relax(), target)
    names = [gv.name_hint for gv, f in fused.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert sum("transpose" in n for n in names) == 2, names
    if family.startswith("mobilenet_v3"):  # HardSwish: x * clip(x / 6 + 0.5, 0, 1)
        assert any(n.startswith("fused_conv2d") and all(op in n for op in ("maximum", "minimum", "multiply"))
                   for n in names), names
    convs = [f for gv, f in fused.functions.items() if "conv2d" in gv.name_hint]
    assert convs and all("NHWC" in f.script() or "nhwc" in f.script() for f in convs)
    assert all("layout_free_buffers" in f.attrs for f in convs)


@pytest.mark.parametrize("family", ["mobilenet_v1", "mobilenet_v2"])
def test_cpu_tensors_of_28_rows_or_more_sit_in_the_middle_of_their_storage(family):
    """Two threads each write half the rows of such a tensor, so half its bytes; centred in the storage the
    planner reuses, every tensor keeps the boundary between the threads' bytes at one place
    (pipeline.centre_row_bands). Smaller maps stay at the start. The kernels that receive a centred tensor
    take it at that offset: test_zoo_family_matches_onnxruntime runs them against onnxruntime."""
    import tvm
    from tvm import relax

    from tvmnet import pipeline
    from tvmnet.frontend import load_onnx
    from tvmnet.targets import get_target

    target = get_target("x86").tvm_target()
    fused = pipeline.fuse(load_onnx(zoo.build_model(family, alpha=0.25, resolution=96)).to_relax(), target)
    lowered = pipeline.lower(pipeline.schedule(fused, target)[0], target)
    storages, centred, at_start = [], 0, 0
    for block in lowered["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.vm.alloc_storage"):
                storages.append((binding.var, int(value.args[0].values[0])))
            elif isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.vm.alloc_tensor"):
                storage_bytes = next(size for var, size in storages if var.same_as(value.args[0]))
                offset, dims = int(value.args[1].value), [int(d) for d in value.args[2].values]
                nbytes = int(np.prod(dims)) * np.dtype(str(value.args[3].value)).itemsize
                if len(dims) == 4 and dims[1] >= 28:
                    assert offset % 64 == 0 and abs(offset + nbytes / 2 - storage_bytes / 2) < 64, (dims, offset)
                    centred += offset > 0
                else:
                    assert offset == 0, (dims, offset)
                    at_start += 1
    assert centred and at_start


def test_graph_convert_layout_cannot_handle_still_compiles(tmp_path):
    """ONNX Max of two tensors imports as stack + max over a 5-D tensor, which Relax's ConvertLayout
    rejects; the pipeline then keeps the model's NCHW layout, and the result still matches onnxruntime."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w3")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
             helper.make_node("Conv", ["x", "w2"], ["b"], pads=[1, 1, 1, 1], name="conv_b"),
             helper.make_node("Max", ["a", "b"], ["m"], name="max_ab"),
             helper.make_node("Conv", ["m", "w3"], ["y"], name="conv_y")]
    graph = helper.make_graph(nodes, "max_of_convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    compile_and_compare(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "a")


def _planned_module(return_the_centred_tensor: bool):
    """A memory-planned module whose storage holds a 56-row tensor and then a 28-row one (NHWC), the second
    handed to a kernel, then returned as it is or not."""
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    @I.ir_module
    class Planned:
        @T.prim_func
        def fill56(x: T.Buffer((1, 56, 4, 8), "float32"), y: T.Buffer((1, 56, 4, 8), "float32")):
            for n, h, w, c in T.grid(1, 56, 4, 8):
                y[n, h, w, c] = x[n, h, w, c]

        @T.prim_func
        def fill28(x: T.Buffer((1, 28, 4, 8), "float32"), y: T.Buffer((1, 28, 4, 8), "float32")):
            for n, h, w, c in T.grid(1, 28, 4, 8):
                y[n, h, w, c] = x[n, h, w, c]

        @R.function(pure=False)
        def main(x56: R.Tensor((1, 56, 4, 8), "float32"), x28: R.Tensor((1, 28, 4, 8), "float32")):
            cls = Planned
            storage = R.memory.alloc_storage(R.shape([7168]), 0, "global", "float32")
            t56 = R.memory.alloc_tensor(storage, 0, R.shape([1, 56, 4, 8]), "float32", 0)
            cls.fill56(x56, t56)
            t28 = R.memory.alloc_tensor(storage, 0, R.shape([1, 28, 4, 8]), "float32", 0)
            cls.fill28(x28, t28)
            return t28 if return_the_centred_tensor else t56

    return Planned


def test_centring_moves_a_smaller_tensor_of_28_rows_and_lets_its_kernel_take_the_offset():
    from tvmnet import pipeline

    centred = pipeline.centre_row_bands(_planned_module(return_the_centred_tensor=False))
    script = centred["main"].script()
    assert "R.memory.alloc_tensor(storage, 1792, R.shape([1, 28, 4, 8])" in script, script
    assert "R.memory.alloc_tensor(storage, 0, R.shape([1, 56, 4, 8])" in script, script
    assert "offset_factor=16" in centred["fill28"].script() and "offset_factor" not in centred["fill56"].script()


def test_a_centred_tensor_used_other_than_by_a_kernel_leaves_the_plan_as_it_was():
    """A VM builtin (a reshape's view, or the caller) would see the offset: then nothing moves."""
    from tvmnet import pipeline

    planned = _planned_module(return_the_centred_tensor=True)
    assert pipeline.centre_row_bands(planned).same_as(planned)
