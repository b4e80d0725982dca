"""Runtime input validation beyond tests/test_errors.py: NaN/Inf warnings, non-contiguous and
read-only arrays, non-array inputs, byte order, missing inputs. All before TVM sees the data."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import tvmnet
from tvmnet.errors import ArtifactError, InputError

from conftest import copy_artifact_with

SHAPE = (1, 3, 96, 96)


@pytest.fixture(scope="module")
def model(tiny_v2_artifact):
    return tvmnet.load(tiny_v2_artifact)


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).standard_normal(SHAPE).astype("float32")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_warns_and_still_runs(model, x, bad):
    y = x.copy()
    y[0, 1, 2, 3] = bad
    with pytest.warns(UserWarning, match="input 'input' contains NaN or Inf") as caught:
        out = model.run(y)
    assert out.shape == (1, 1000)
    assert [w.filename for w in caught] == [__file__]  # attributed to the line that called run


def test_nan_warns_from_benchmark_too(model, x):
    y = x.copy()
    y[0, 0, 0, 0] = np.nan
    with pytest.warns(UserWarning, match="contains NaN or Inf") as caught:
        model.benchmark(y, number=1, repeat=1, warmup=0)
    assert [w.filename for w in caught] == [__file__]


def test_finite_input_does_not_warn(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.run(x)


@pytest.mark.parametrize("view", ["strided", "fortran", "reversed", "transposed"])
def test_non_contiguous_arrays_are_copied_and_give_the_same_result(model, x, view):
    if view == "strided":
        big = np.zeros((1, 3, 192, 192), "float32")
        big[:, :, ::2, ::2] = x
        arg = big[:, :, ::2, ::2]
    elif view == "fortran":
        arg = np.asfortranarray(x)
    elif view == "reversed":
        arg = np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    else:
        arg = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    assert not arg.flags.c_contiguous and np.array_equal(arg, x)
    before = arg.copy()
    assert model.run(arg).tobytes() == model.run(x).tobytes()
    assert np.array_equal(arg, before)  # the caller's array is untouched


def _at_offset(x: np.ndarray, offset_bytes: int) -> np.ndarray:
    """A C-contiguous copy of ``x`` whose data starts ``offset_bytes`` past a 64-byte boundary."""
    raw = np.empty(x.nbytes + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset_bytes
    y = raw[start:start + x.nbytes].view(x.dtype).reshape(x.shape)
    y[...] = x
    assert y.flags.c_contiguous and y.ctypes.data % 64 == offset_bytes
    return y


def test_an_artifact_that_does_not_state_its_input_alignment_reads_only_64_byte_aligned_arrays_in_place(
        tiny_v2_artifact, model, x, tmp_path):
    """Artifacts compiled before tvmnet recorded ``input_alignment`` have kernels that assume 64 bytes."""
    library = {k: v for k, v in model.manifest["library"].items() if k != "input_alignment"}
    older = tvmnet.load(copy_artifact_with(tiny_v2_artifact, tmp_path, library=library))
    assert [older.reads_in_place(_at_offset(x, offset)) for offset in (0, 4, 16)] == [True, False, False]
    assert older.run(_at_offset(x, 16)).tobytes() == older.run(x).tobytes()


@pytest.mark.parametrize("value", [0, 3, 128, "4", True])
def test_a_bad_input_alignment_in_the_manifest_is_refused(tiny_v2_artifact, model, tmp_path, value):
    library = {**model.manifest["library"], "input_alignment": value}
    edited = copy_artifact_with(tiny_v2_artifact, tmp_path, library=library)
    with pytest.raises(ArtifactError, match="library.input_alignment .* is not a power of two from 1 to 64; "
                                            "recompile the artifact"):
        tvmnet.load(edited)


@pytest.mark.parametrize("offset", [0, 4, 16, 32, 60, 2])
def test_arrays_at_any_alignment_give_the_same_result(model, x, offset):
    """Any float32-aligned array runs in place (no copy): tvmnet builds the kernels that read the input to
    assume only the element size (TVM's 64-byte assumption crashed this model's first kernel on numpy's
    16-byte aligned arrays before). An array not even aligned to its element size is copied. All give the
    same output, and a run in place still sees a change the caller made to its array between runs."""
    assert model.manifest["library"]["input_alignment"] == 4
    y = _at_offset(x, offset)
    assert model.reads_in_place(y) == (offset % 4 == 0)
    reference = model.run(x)
    assert model.run(y).tobytes() == reference.tobytes()
    y *= 2.0
    changed = model.run(y)
    assert changed.tobytes() == model.run(x * 2.0).tobytes() != reference.tobytes()
    np.testing.assert_array_equal(y, x * 2.0)  # the caller's array is untouched by the run


@pytest.mark.parametrize("aligned", [True, False])
def test_read_only_array_is_accepted(model, x, aligned):
    y = _at_offset(x, 0 if aligned else 16)
    y.flags.writeable = False
    assert not model.reads_in_place(y)  # DLPack cannot export a read-only array
    assert model.run(y).tobytes() == model.run(x).tobytes()


def test_the_copies_a_gpu_model_makes_give_the_same_result(tiny_v2_artifact, x, monkeypatch):
    """numpy cannot view GPU memory (``np.from_dlpack`` raises BufferError), so a model on a GPU copies
    inputs in with ``copyfrom`` and outputs out with ``Tensor.numpy()``. No GPU here: this runs that code
    on the CPU model, with numpy refusing DLPack as it does for GPU memory, so a GPU model that still
    reached for numpy views fails here rather than on a user's GPU."""
    cpu_model = tvmnet.load(tiny_v2_artifact)
    y = _at_offset(x, 16)
    reference, doubled = cpu_model.run(y), cpu_model.run(x * 2.0)

    def no_device_views(*_args, **_kwargs):
        raise BufferError("numpy cannot view this device's memory")

    monkeypatch.setattr(np, "from_dlpack", no_device_views)
    as_if_gpu = tvmnet.load(tiny_v2_artifact)
    as_if_gpu._on_cpu = False
    assert not as_if_gpu.reads_in_place(y)  # a GPU model copies every input
    first = as_if_gpu.run(y)
    assert first.tobytes() == reference.tobytes()
    second = as_if_gpu.run(y * 2.0)  # the kept input tensor is reused; the first output stays the caller's
    assert second.tobytes() == doubled.tobytes() != first.tobytes()
    assert first.tobytes() == reference.tobytes()


@pytest.mark.parametrize("arg", [[[0.0]], (0.0,), 0.0, None, "image.jpg", memoryview(b"abcd")],
                         ids=["list", "tuple", "float", "None", "str", "memoryview"])
def test_non_arrays_are_refused(model, arg):
    with pytest.raises(InputError, match="input 'input' must be a numpy array, got"):
        model.run(arg)


def test_lists_are_refused_even_with_the_right_shape(model, x):
    with pytest.raises(InputError, match="must be a numpy array, got list"):
        model.run(x.tolist())


@pytest.mark.parametrize("dtype", [">f4", "int32", "float16", "uint8"])
def test_other_dtypes_and_byte_orders_are_refused(model, x, dtype):
    with pytest.raises(InputError, match=r"has dtype .*, expected float32 \(convert with .astype\('float32'\)\)"):
        model.run(x.astype(dtype))


def test_wrong_rank_and_scalar_array(model):
    with pytest.raises(InputError, match=r"shape \[3, 96, 96\], expected \[1, 3, 96, 96\]"):
        model.run(np.zeros((3, 96, 96), "float32"))
    with pytest.raises(InputError, match=r"shape \[\], expected"):
        model.run(np.zeros((), "float32"))


def test_dict_inputs(model, x):
    assert model.run({"input": x}).tobytes() == model.run(x).tobytes()
    with pytest.raises(InputError, match="missing input"):
        model.run({})
    with pytest.raises(InputError, match="unknown input name"):
        model.run({"input": x, "extra": x})


def test_each_run_sees_its_own_input_and_keeps_its_output(model, x):
    """An input is copied into tensors the model keeps, or read in place: a run must never see the
    previous input, and an output already returned must not change when the next run writes into the same
    memory."""
    first = model.run(x)
    kept = first.copy()
    other = model.run(np.flip(x, axis=3) * 2.0 + 1.0)
    again = model.run(x)
    assert not np.allclose(other, first, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(first, kept)
    np.testing.assert_array_equal(again, first)


def test_a_model_with_two_outputs_returns_both_in_order(tmp_path):
    """Outputs are copied out of the VM's tensors through DLPack views: every output, in the ONNX order."""
    from onnx import TensorProto, helper

    from conftest import ort_run

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["positive"]), helper.make_node("Neg", ["x"], ["negated"])], "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("positive", TensorProto.FLOAT, [1, 8]),
         helper.make_tensor_value_info("negated", TensorProto.FLOAT, [1, 8])])
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx_model.ir_version = 8
    compiled = tvmnet.load(tvmnet.compile(onnx_model, output=tmp_path / "two", target="x86"))
    x = np.random.default_rng(0).standard_normal((1, 8)).astype("float32")
    got = compiled.run(x)
    assert isinstance(got, list) and len(got) == 2
    for mine, reference in zip(got, ort_run(onnx_model, {"x": x})):
        np.testing.assert_array_equal(mine, reference)
    again = compiled.run(-x)
    np.testing.assert_array_equal(got[1], -x)  # an output already returned is the caller's own copy
    np.testing.assert_array_equal(again[0], np.maximum(-x, 0))
    # the input goes to two kernels; both were built to read it at any float32 alignment
    assert compiled.manifest["library"]["input_alignment"] == 4
    moved = _at_offset(x, 4)
    assert compiled.reads_in_place(moved)
    for mine, reference in zip(compiled.run(moved), got):
        np.testing.assert_array_equal(mine, reference)


def test_an_input_used_other_than_by_kernels_keeps_the_64_byte_alignment(tmp_path):
    """Where the VM hands an input on as it is (here ONNX Identity returns it), kernels TVM built to assume
    64 bytes may read it later, so the artifact says 64 and misaligned arrays are copied."""
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx_model.ir_version = 8
    compiled = tvmnet.load(tvmnet.compile(onnx_model, output=tmp_path / "identity", target="x86"))
    assert compiled.manifest["library"]["input_alignment"] == 64
    x = np.arange(8, dtype="float32").reshape(1, 8)
    assert not compiled.reads_in_place(_at_offset(x, 4))
    np.testing.assert_array_equal(compiled.run(_at_offset(x, 4)), x)
