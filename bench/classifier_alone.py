#!/usr/bin/env python3
"""MobileNetV2's classifier alone: tvmnet (compiled with the shipped V2 log) against onnxruntime, with warm
caches and with a 64 MB write between calls (inside the model its 5 MB of weights are cold). Each runtime in
its own process (onnxruntime as compare.py runs it, on every physical core), three alternations; median of
180 calls each (bench/README.md, item 11).

    python bench/classifier_alone.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare import ort_session, physical_cores  # noqa: E402 - the bench scripts share compare.py's helpers

V2_LOG = REPO / "tuning_logs" / "x86" / "5d6c81a15e4595c0"
CALLS, SKIPPED = 200, 20


def build(work: Path) -> None:
    """A Gemm-only ONNX with V2's classifier weights, and its tvmnet artifact."""
    import onnx
    from onnx import TensorProto, helper

    import tvmnet
    from tvmnet import zoo

    model = zoo.build_model("mobilenet_v2")
    weight = next(i for i in model.graph.initializer if len(i.dims) == 2)
    bias = [i for i in model.graph.initializer if list(i.dims) == [weight.dims[0]]][-1]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", weight.name, bias.name], ["y"], transB=1)], "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.dims[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.dims[0]])], [weight, bias])
    gemm = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    gemm.ir_version = 8
    onnx.save(gemm, work / "classifier.onnx")
    tvmnet.compile(work / "classifier.onnx", output=work / "artifact", tuning_logs=V2_LOG, progress=print)


def time_one(runtime: str, work: Path) -> str:
    x = np.random.default_rng(0).random((1, 1280), dtype=np.float32)
    if runtime == "onnxruntime":
        session = ort_session(str(work / "classifier.onnx"), physical_cores())
        call = lambda: session.run(None, {"x": x})  # noqa: E731
    else:
        import tvmnet

        compiled = tvmnet.load(work / "artifact")
        call = lambda: compiled.run(x)  # noqa: E731
    junk = np.ones(16 << 20, np.float32)  # 64 MB, more than the L3

    def median_us(flush: bool) -> float:
        seconds = []
        for _ in range(CALLS):
            if flush:
                np.add(junk, 1.0, out=junk)
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds[SKIPPED:]) * 1e6

    for _ in range(50):
        call()
    return f"{runtime}: warm {median_us(False):.1f} µs, cold {median_us(True):.1f} µs"


def main() -> None:
    if len(sys.argv) == 3:
        print(time_one(sys.argv[1], Path(sys.argv[2])))
        return
    work = Path(tempfile.mkdtemp(prefix="classifier-"))
    build(work)
    for _ in range(3):
        for runtime in ("onnxruntime", "tvmnet"):
            done = subprocess.run([sys.executable, __file__, runtime, str(work)], capture_output=True, text=True)
            print(done.stdout.strip() or done.stderr[-2000:])


if __name__ == "__main__":
    main()
