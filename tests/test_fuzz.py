"""Hostile and broken models: every mutation of a valid zoo model ends cleanly.

Each case is a tiny zoo model (α=0.25, ρ=96, 10 classes) mutated by hypothesis: truncated or
bit-flipped bytes, flipped proto fields, dropped initializers, wrong and huge dims, graph cycles,
unknown ops, wrong or absent opsets, external-data locations outside the model's folder, empty graphs,
missing inputs/outputs. "Cleanly" means one of:

* a ``TvmnetError`` with a one-line message (in-process), or exit code 2..5 with one ``tvmnet: error:``
  line on stderr and no traceback (the CLI, in a subprocess, so a native abort shows as a signal);
* a successful import into Relax (in-process: ``load_onnx`` + ``to_relax``; with ``TVMNET_FUZZ_COMPILE=1``
  also compiled and compared as below), or a successful ``tvmnet compile`` whose artifact matches
  onnxruntime on a seeded random input;

never a crash, never a hang (every case has a time bound), never a partial artifact (no output
directory after a failure, no hidden staging directories).

The default run is bounded (``TVMNET_FUZZ_EXAMPLES`` in-process examples, 40 by default, and
``TVMNET_FUZZ_CLI_EXAMPLES`` CLI subprocess cases, 4 by default, plus 3 named CLI cases: weights in
an external file next to the model (compiles and matches onnxruntime), a symlinked weight file that
points outside the folder, a 2**40 batch; the same cases every run unless ``TVMNET_FUZZ_SEED`` is set). A longer run (an hour or more on 2 cores)::

    TVMNET_FUZZ_EXAMPLES=2000 TVMNET_FUZZ_CLI_EXAMPLES=100 TVMNET_FUZZ_COMPILE=1 TVMNET_FUZZ_SEED=1 \
        python3 -m pytest -q -s tests/test_fuzz.py

Each run prints how many cases ended how (``-s`` shows it).
"""

from __future__ import annotations

import collections
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import tvmnet
from tvmnet import zoo
from tvmnet.errors import TvmnetError
from tvmnet.frontend import load_onnx

from conftest import ort_run

EXAMPLES = int(os.environ.get("TVMNET_FUZZ_EXAMPLES", "40"))
CLI_EXAMPLES = int(os.environ.get("TVMNET_FUZZ_CLI_EXAMPLES", "4"))
COMPILE_IN_PROCESS = os.environ.get("TVMNET_FUZZ_COMPILE", "") not in ("", "0")
"""Also compile (and compare) in-process cases whose import succeeds; 10-30 s each on a busy CPU."""
SEED = os.environ.get("TVMNET_FUZZ_SEED")
"""Unset: hypothesis derandomizes (the same cases every run); set: that seed's cases."""
CASE_SECONDS = 120
"""Bound on one case (import, and compile + onnxruntime comparison when the import succeeds)."""

BASES = ("mobilenet_v1", "mobilenet_v3_small")
KINDS = (
    "truncate", "flip_bytes", "flip_field", "drop_initializer", "wrong_dims", "huge_dims", "cycle", "unknown_op",
    "opset", "external_data", "empty_graph", "missing_io",
)
HUGE = (2**20, 2**31 - 1, 2**31, 2**32 + 3, 2**40, 2**62, 2**63 - 1)
ELEM_TYPES = (0, TensorProto.INT64, TensorProto.STRING, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BOOL,
              TensorProto.UINT8, TensorProto.COMPLEX64, 99)

OUTCOMES: collections.Counter = collections.Counter()


@functools.lru_cache(maxsize=None)
def base_bytes(name: str) -> bytes:
    return zoo.build_model(name, alpha=0.25, resolution=96, num_classes=10, seed=0).SerializeToString()


# -- mutations ------------------------------------------------------------------------------------
# Each takes hypothesis' ``data``, a fresh ModelProto and the case's folder, edits the model (or writes
# bytes itself) and returns a short description. ``Case`` collects what the runners need.


class Case:
    def __init__(self, folder: Path, model: onnx.ModelProto | None = None) -> None:
        self.folder = folder
        self.model = model
        self.raw: bytes | None = None  # set by byte-level mutations instead of model
        self.input_shapes: dict[str, list[int]] | None = None
        self.what = ""

    @property
    def path(self) -> Path:
        return self.folder / "model.onnx"

    def write(self) -> Path:
        self.path.write_bytes(self.raw if self.raw is not None else self.model.SerializeToString())
        return self.path


def _pick(data, seq, label):
    return data.draw(st.sampled_from(list(seq)), label=label)


def _index(data, seq, label):
    return data.draw(st.integers(0, len(seq) - 1), label=label)


def m_truncate(data, case):
    raw = case.model.SerializeToString()
    cut = data.draw(st.one_of(st.integers(0, 64), st.integers(0, len(raw) - 1)), label="cut")
    case.raw = raw[:cut]
    return f"truncate to {cut} of {len(raw)} bytes"


def m_flip_bytes(data, case):
    raw = bytearray(case.model.SerializeToString())
    # Nodes sit at the start of the graph, inputs/outputs/opsets at the end; the middle is weights.
    region = _pick(data, ("head", "tail", "anywhere"), "region")
    lo, hi = {"head": (0, min(len(raw), 4096)), "tail": (max(0, len(raw) - 2048), len(raw)),
              "anywhere": (0, len(raw))}[region]
    flips = data.draw(st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(1, 255)), min_size=1, max_size=8),
                      label="flips")
    for pos, xor in flips:
        raw[pos] ^= xor
    case.raw = bytes(raw)
    return f"flip {len(flips)} byte(s) in {region}: {flips[:3]}"


def m_flip_field(data, case):
    g = case.model.graph
    what = _pick(data, ("attr", "node_input", "elem_type", "ir_version", "dup_output", "drop_attr", "op_swap",
                        "initializer_type", "metadata", "not_utf8"), "field")
    if what == "attr":
        node = g.node[_index(data, g.node, "node")]
        if not node.attribute:
            return "attr: node has none"
        attr = node.attribute[_index(data, node.attribute, "attr")]
        value = data.draw(st.sampled_from([-7, -1, 0, 1, 2, 3, 5, 1000, 2**31 - 1, 2**40]), label="value")
        if attr.type == onnx.AttributeProto.INTS and attr.ints:
            attr.ints[_index(data, attr.ints, "pos")] = value
        elif attr.type == onnx.AttributeProto.INT:
            attr.i = value
        elif attr.type == onnx.AttributeProto.FLOAT:
            attr.f = _pick(data, (float("nan"), float("inf"), -1e30, 0.0), "float")
        return f"attr {node.name}.{attr.name} = {value}"
    if what == "node_input":
        node = g.node[_index(data, g.node, "node")]
        name = _pick(data, ("no_such_tensor", ""), "name")
        node.input[_index(data, node.input, "pos")] = name
        return f"node {node.name} input -> {name!r}"
    if what == "elem_type":
        values = _pick(data, ("input", "output"), "which")
        value = getattr(g, values)[0]
        value.type.tensor_type.elem_type = _pick(data, ELEM_TYPES, "elem_type")
        return f"{values} elem_type -> {value.type.tensor_type.elem_type}"
    if what == "initializer_type":
        init = g.initializer[_index(data, g.initializer, "init")]
        init.data_type = _pick(data, ELEM_TYPES, "elem_type")
        return f"initializer {init.name} data_type -> {init.data_type}"
    if what == "metadata":
        key = _pick(data, ("tvmnet.mean", "tvmnet.std"), "key")
        prop = next(p for p in case.model.metadata_props if p.key == key)
        prop.value = _pick(data, ("", "1,2", "nan,0,1", "a,b,c", "0,0,0", "1,1,1"), "value")
        return f"metadata {prop.key}={prop.value!r}"
    if what == "not_utf8":
        target = _pick(data, ("node_name", "op_type", "input_name", "metadata"), "where")
        marker = "\x01MARK\x01"
        if target == "node_name":
            g.node[_index(data, g.node, "node")].name = marker
        elif target == "op_type":
            g.node[_index(data, g.node, "node")].op_type = marker
        elif target == "input_name":
            g.input[0].name = marker
        else:
            case.model.metadata_props[0].value = marker
        case.raw = case.model.SerializeToString().replace(marker.encode(), b"\xff\xfeMARK\xc3")
        return f"{target} not UTF-8"
    if what == "ir_version":
        case.model.ir_version = _pick(data, (0, 1, 2, 3, 4, 12, 99, 2**31), "ir")
        return f"ir_version {case.model.ir_version}"
    if what == "dup_output":
        i, j = _index(data, g.node, "i"), _index(data, g.node, "j")
        g.node[i].output[0] = g.node[j].output[0]
        return f"node {i} output = node {j} output"
    if what == "drop_attr":
        node = g.node[_index(data, g.node, "node")]
        if not node.attribute:
            return "drop_attr: node has none"
        attr = node.attribute[_index(data, node.attribute, "attr")]
        node.attribute.remove(attr)
        return f"drop {node.name}.{attr.name}"
    node = g.node[_index(data, g.node, "node")]
    old, node.op_type = node.op_type, _pick(data, ("Relu", "Conv", "MatMul", "Reshape", "Gemm", "Add",
                                                   "GlobalAveragePool", "Flatten", "Concat", "Softmax"), "op")
    return f"op {old} -> {node.op_type} at {node.name}"


def m_drop_initializer(data, case):
    g = case.model.graph
    init = g.initializer[_index(data, g.initializer, "init")]
    g.initializer.remove(init)
    if data.draw(st.booleans(), label="as_input"):  # the weight becomes a (static) graph input instead
        g.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        return f"initializer {init.name} -> graph input"
    return f"drop initializer {init.name}"


def _input_dims(case):
    return case.model.graph.input[0].type.tensor_type.shape.dim


def m_wrong_dims(data, case):
    g = case.model.graph
    what = _pick(data, ("init_dim", "init_permute", "init_rank", "input_dim", "input_rank"), "what")
    if what.startswith("init"):
        init = g.initializer[_index(data, g.initializer, "init")]
        if what == "init_dim":
            pos = _index(data, init.dims, "pos")
            init.dims[pos] = max(0, init.dims[pos] + data.draw(st.integers(-3, 3).filter(bool), label="delta"))
        elif what == "init_permute" and len(init.dims) > 1:
            init.dims[0], init.dims[1] = init.dims[1], init.dims[0]
        else:
            init.dims.append(1) if data.draw(st.booleans(), label="grow") else init.dims.pop()
        return f"{what} {init.name} -> {list(init.dims)}"
    dims = _input_dims(case)
    if what == "input_dim":
        pos = _index(data, dims, "pos")
        dims[pos].dim_value = data.draw(st.sampled_from([0, 1, 2, 4, 7, 33, 95, 97]), label="size")
        return f"input dim {pos} -> {dims[pos].dim_value}"
    if data.draw(st.booleans(), label="grow"):
        dims.add().dim_value = 1
    else:
        del dims[_index(data, dims, "pos")]
    return f"input rank -> {len(dims)}"


def m_huge_dims(data, case):
    g = case.model.graph
    size = _pick(data, HUGE, "size")
    what = _pick(data, ("input", "initializer", "input_shape"), "what")
    if what == "initializer":
        init = g.initializer[_index(data, g.initializer, "init")]
        init.dims[_index(data, init.dims, "pos")] = size
        return f"initializer {init.name} dims -> {list(init.dims)}"
    dims = _input_dims(case)
    pos = _index(data, dims, "pos")
    if what == "input":
        dims[pos].dim_value = size
        return f"input dim {pos} -> {size}"
    dims[pos].dim_param = "d"  # dynamic, then bound to a huge size with --input-shape
    shape = [96] * len(dims)
    shape[:2] = [1, 3]
    shape[pos] = size
    case.input_shapes = {"input": shape}
    return f"--input-shape input:{shape}"


def m_cycle(data, case):
    g = case.model.graph
    i = _index(data, g.node, "i")
    j = data.draw(st.integers(i, len(g.node) - 1), label="j")
    g.node[i].input[0] = g.node[j].output[0]
    return f"node {i} reads node {j}'s output"


def m_unknown_op(data, case):
    node = case.model.graph.node[_index(data, case.model.graph.node, "node")]
    if data.draw(st.booleans(), label="domain"):
        node.domain = _pick(data, ("com.evil", "ai.onnx.ml", "com.microsoft"), "domain")
        return f"{node.name} domain {node.domain}"
    node.op_type = data.draw(st.one_of(st.sampled_from(["NoSuchOp", "StringNormalizer", "Loop", "If", "Scan",
                                                        "TfIdfVectorizer", "conv"]),
                                       st.text("abcXYZ_", min_size=1, max_size=8)), label="op")
    return f"{node.name} op_type {node.op_type!r}"


def m_opset(data, case):
    what = _pick(data, ("version", "absent", "domain", "extra"), "what")
    opsets = case.model.opset_import
    if what == "version":
        opsets[0].version = _pick(data, (0, 1, 6, 7, 9, 10, 12, 14, 17, 18, 21, 22, 99, 2**31, 2**62), "version")
        return f"opset {opsets[0].version}"
    if what == "absent":
        del opsets[:]
        return "no opset_import"
    if what == "domain":
        opsets[0].domain = "com.evil"
        return "default opset moved to domain com.evil"
    opsets.add(domain="", version=9)
    return "two default-domain opsets"


EXTERNAL = ("inside", "dotdot_passwd", "absolute_passwd", "outside_real", "absolute_real", "symlink_out",
            "missing", "offset_past_end", "length_huge", "directory", "dotdot_inside")


def m_external_data(data, case):
    g = case.model.graph
    biggest = sorted(range(len(g.initializer)), key=lambda k: -len(g.initializer[k].raw_data))[:8]
    init = g.initializer[_pick(data, biggest, "init")]
    variant = _pick(data, EXTERNAL, "variant")
    payload = init.raw_data
    outside = case.folder.parent / f"outside-{case.folder.name}.bin"  # a file with valid weights, outside
    location, offset, length = "weights.bin", 0, len(payload)
    if variant in ("inside", "offset_past_end", "length_huge"):
        (case.folder / "weights.bin").write_bytes(payload)
        offset = 1 << 40 if variant == "offset_past_end" else 0
        length = 1 << 40 if variant == "length_huge" else len(payload)
    elif variant == "dotdot_passwd":
        location = "../../../../../../etc/passwd"
    elif variant == "absolute_passwd":
        location = "/etc/passwd"
    elif variant in ("outside_real", "absolute_real", "symlink_out"):
        outside.write_bytes(payload)
        location = {"outside_real": f"../{outside.name}", "absolute_real": str(outside)}.get(variant, "link.bin")
        if variant == "symlink_out":
            (case.folder / "link.bin").symlink_to(outside)
    elif variant == "missing":
        location = "nope.bin"
    elif variant == "directory":
        (case.folder / "sub").mkdir()
        location = "sub"
    else:  # dotdot_inside: leaves the folder and comes back; still refused, and harmless to refuse
        (case.folder / "weights.bin").write_bytes(payload)
        location = f"../{case.folder.name}/weights.bin"
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    del init.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        init.external_data.add(key=key, value=value)
    return f"external data {variant} ({location}) for {init.name}"


def m_empty_graph(data, case):
    g = case.model.graph
    what = _pick(data, ("nodes", "everything", "keep_one"), "what")
    if what == "keep_one":
        del g.node[1:]
    else:
        del g.node[:]
    if what == "everything":
        del g.initializer[:]
        del g.input[:]
        del g.output[:]
    return f"empty graph ({what})"


def m_missing_io(data, case):
    g = case.model.graph
    what = _pick(data, ("no_inputs", "no_outputs", "unknown_output", "extra_input", "output_is_input"), "what")
    if what == "no_inputs":
        del g.input[:]
    elif what == "no_outputs":
        del g.output[:]
    elif what == "unknown_output":
        g.output[0].name = "nobody_writes_this"
    elif what == "extra_input":
        g.input.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1, 4]))
    else:
        g.output[0].name = g.input[0].name
    return f"missing io ({what})"


MUTATIONS = {name: globals()[f"m_{name}"] for name in KINDS}


def draw_case(data, folder: Path) -> Case:
    base = _pick(data, BASES, "base")
    case = Case(folder, onnx.ModelProto.FromString(base_bytes(base)))
    kind = _pick(data, KINDS, "kind")
    case.what = f"{base}: {kind}: {MUTATIONS[kind](data, case)}"
    case.write()
    return case


# -- oracles --------------------------------------------------------------------------------------


def compare_with_onnxruntime(artifact: Path, reference: Path) -> None:
    """The artifact's output equals onnxruntime's on the model file the artifact was compiled from."""
    compiled = tvmnet.load(artifact)
    feeds = {spec.name: np.random.default_rng(0).standard_normal(spec.shape).astype(spec.dtype)
             for spec in compiled.inputs}
    got = compiled.run(feeds)
    got = got if isinstance(got, list) else [got]
    expected = ort_run(str(reference), feeds)
    assert len(got) == len(expected)
    for tvm_out, ort_out in zip(got, expected):
        assert tvm_out.shape == ort_out.shape
        # Corrupted weights can overflow; where onnxruntime is finite TVM must agree within a tolerance
        # scaled to the output (different summation order), and non-finite entries must coincide.
        finite = np.isfinite(ort_out)
        assert np.array_equal(finite, np.isfinite(tvm_out))
        if finite.any():
            scale = float(np.abs(ort_out[finite]).max())
            np.testing.assert_allclose(tvm_out[finite], ort_out[finite], rtol=1e-3, atol=1e-4 * max(1.0, scale))


def assert_no_partial_artifact(parent: Path, output: Path) -> None:
    assert not output.exists(), f"failed compile left {output}"
    hidden = [p.name for p in parent.iterdir() if p.name.startswith(f".{output.name}.")] if parent.is_dir() else []
    assert hidden == [], f"failed compile left {hidden}"


def _settings(examples: int):
    return settings(max_examples=examples, deadline=None, database=None, derandomize=SEED is None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def _seed(test):
    return test if SEED is None else __import__("hypothesis").seed(int(SEED))(test)


# -- in-process: tvmnet.frontend.load_onnx, then tvmnet.compile when the import succeeds ---------------


def import_or_fail_cleanly(case: Case) -> str:
    """Import in-process (and compile with TVMNET_FUZZ_COMPILE=1); the outcome, or an AssertionError."""
    try:
        imported = load_onnx(case.path, case.input_shapes)
        imported.to_relax()
    except TvmnetError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)
        return "in-process: tvmnet error at import"
    if not COMPILE_IN_PROCESS:
        return "in-process: imported into Relax"
    out = case.folder / "artifact"
    try:
        tvmnet.compile(case.path, output=out, input_shapes=case.input_shapes)
    except TvmnetError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)
        assert_no_partial_artifact(case.folder, out)
        return "in-process: tvmnet error at compile"
    compare_with_onnxruntime(out, case.path)
    return "in-process: compiled, matches onnxruntime"


def run_case(data, tmp_path_factory, check: Callable[[Case], str]) -> None:
    """Draw one mutated model, let ``check`` take it through tvmnet within CASE_SECONDS, count its outcome."""
    folder = tmp_path_factory.mktemp("case")
    case = draw_case(data, folder)
    note(case.what)
    started = time.monotonic()
    OUTCOMES[check(case)] += 1
    elapsed = time.monotonic() - started
    assert elapsed < CASE_SECONDS, f"{case.what} took {elapsed:.0f} s"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(max(900, EXAMPLES * CASE_SECONDS // 4))
@_seed
@_settings(EXAMPLES)
@given(data=st.data())
def test_mutated_models_import_or_fail_cleanly(data, tmp_path_factory):
    run_case(data, tmp_path_factory, import_or_fail_cleanly)


# -- the CLI in a subprocess: a native abort would show as a signal -----------------------------------


def run_cli_compile(case: Case) -> tuple[subprocess.CompletedProcess, Path]:
    out = case.folder / "build" / "artifact"
    args = [sys.executable, "-m", "tvmnet.cli", "compile", str(case.path), "-o", str(out)]
    for name, shape in (case.input_shapes or {}).items():
        args += ["--input-shape", f"{name}:{','.join(map(str, shape))}"]
    try:
        done = subprocess.run(args, cwd=case.folder, capture_output=True, text=True, timeout=CASE_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"tvmnet compile hung (> {CASE_SECONDS} s) on {case.what}")
    return done, out


def check_cli_outcome(case: Case) -> str:
    done, out = run_cli_compile(case)
    assert done.returncode >= 0, f"tvmnet compile died of signal {-done.returncode} on {case.what}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    if done.returncode == 0:
        compare_with_onnxruntime(out, case.path)
        return "CLI: compiled, matches onnxruntime"
    errors = [line for line in done.stderr.splitlines() if not line.startswith("[tvmnet] ")]
    assert len(errors) == 1 and errors[0].startswith("tvmnet: error: "), done.stderr
    assert done.returncode in (2, 3, 4, 5), (done.returncode, done.stderr)
    assert_no_partial_artifact(out.parent, out)
    return f"CLI: exit {done.returncode}"


@pytest.mark.timeout(max(900, CLI_EXAMPLES * CASE_SECONDS))
@_seed
@_settings(CLI_EXAMPLES)
@given(data=st.data())
def test_mutated_models_through_the_cli(data, tmp_path_factory):
    run_case(data, tmp_path_factory, check_cli_outcome)


class FixedDraws:
    """Stands in for hypothesis' ``data`` to build one named case: each draw returns its label's value."""

    def __init__(self, **values) -> None:
        self.values = values

    def draw(self, strategy, label: str):
        return self.values[label]


NAMED_CLI_CASES = {
    # compiles: weights in a file next to the model
    "external_inside": ("mobilenet_v1", "external_data", dict(init=None, variant="inside")),
    # refused: a symlink next to the model that points outside its folder
    "external_symlink_out": ("mobilenet_v1", "external_data", dict(init=None, variant="symlink_out")),
    # refused before any work: a dynamic batch bound to 2**40
    "huge_input_shape": ("mobilenet_v3_small", "huge_dims", dict(size=2**40, what="input_shape", pos=0)),
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(NAMED_CLI_CASES))
def test_named_cases_through_the_cli(name, tmp_path):
    base, kind, draws = NAMED_CLI_CASES[name]
    case = Case(tmp_path / "case", onnx.ModelProto.FromString(base_bytes(base)))
    case.folder.mkdir()
    if draws.get("init", 0) is None:  # the biggest initializer
        draws["init"] = max(range(len(case.model.graph.initializer)),
                            key=lambda k: len(case.model.graph.initializer[k].raw_data))
    case.what = f"{name}: {MUTATIONS[kind](FixedDraws(**draws), case)}"
    case.write()
    outcome = check_cli_outcome(case)
    OUTCOMES[outcome] += 1
    assert outcome == ("CLI: compiled, matches onnxruntime" if name == "external_inside" else
                       "CLI: exit 3" if name == "huge_input_shape" else "CLI: exit 2"), outcome


@pytest.fixture(scope="module", autouse=True)
def _report_outcomes():
    yield
    total = sum(OUTCOMES.values())
    print(f"\nfuzz: {total} cases: " + ", ".join(f"{n} {k}" for k, n in sorted(OUTCOMES.items())))
