"""The CLI end to end, through real subprocesses as a user types it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image


def tvmnet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tvmnet.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_zoo_export_compile_run_verify_bench_inspect(tmp_path):
    done = tvmnet("zoo", "list", cwd=tmp_path)
    assert done.returncode == 0 and "mobilenet_v3_small" in done.stdout

    done = tvmnet("zoo", "export", "mobilenet_v3_small", "--alpha", "0.75", "--resolution", "96",
                  "--batch", "dynamic", "-o", "m.onnx", cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    done = tvmnet("compile", "m.onnx", "--target", "x86", "-o", "build/m", cwd=tmp_path)
    assert done.returncode == 3 and "--input-shape input:1,3,96,96" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "build" / "m").exists()

    (tmp_path / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(1000)))
    done = tvmnet("compile", "m.onnx", "--input-shape", "input:1,3,96,96", "--labels", "labels.txt",
                  "-o", "build/m", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wrote build/m" in done.stderr

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(tmp_path / "cat.jpg")
    done = tvmnet("run", "build/m", "--image", "cat.jpg", "--top", "3", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 3 and rows[0]["label"] == f"class_{rows[0]['class']}"
    assert rows[0]["probability"] >= rows[1]["probability"] >= rows[2]["probability"] > 0

    done = tvmnet("run", "build/m", "--image", "cat.jpg", cwd=tmp_path)
    assert done.returncode == 0 and len(done.stdout.strip().splitlines()) == 5

    done = tvmnet("verify", "build/m", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "PASS" in done.stdout and "max abs error" in done.stdout

    done = tvmnet("bench", "build/m", "--number", "2", "--repeat", "5", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)
    assert stats["repeat"] == 5 and stats["median_ms"] > 0

    done = tvmnet("bench", "build/m", "--number", "2", "--repeat", "3", "--per-kernel", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    kernels = json.loads(done.stdout)["kernels"]
    assert kernels == sorted(kernels, key=lambda k: -k["us"]) and abs(sum(k["share"] for k in kernels) - 1) < 1e-6
    convs = [k for k in kernels if k["name"].startswith("fused_conv2d")]
    assert convs and all(k["calls"] >= 1 and k["us"] > 0 for k in convs)
    conv_nodes = sum(node.op_type == "Conv" for node in onnx.load(tmp_path / "m.onnx").graph.node)
    assert sum(k["calls"] for k in convs) == conv_nodes  # each Conv is one fused kernel, called once
    done = tvmnet("bench", "build/m", "--per-kernel", "--top", "3", "--repeat", "2", cwd=tmp_path)
    assert done.returncode == 0 and len(done.stdout.strip().splitlines()) == 2 + 1 + 3, done.stdout

    done = tvmnet("inspect", "build/m", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "HardSigmoid" in done.stdout or "HardSwish" in done.stdout
    assert "parameters" in done.stdout and "MFLOPs" in done.stdout

    done = tvmnet("inspect", "m.onnx", "--json", cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["graph"]["parameters"] > 0


def test_default_model_is_mobilenet_v2(tmp_path):
    """`tvmnet compile -o DIR` with no model builds MobileNetV2-1.0-224 (checked on the manifest)."""
    done = tvmnet("compile", "-o", "mbv2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "mbv2" / "manifest.json").read_text())
    assert manifest["name"] == "mobilenet_v2-1-224"
    assert manifest["inputs"][0]["shape"] == [1, 3, 224, 224]
    assert 3_400_000 < manifest["graph"]["parameters"] < 3_600_000


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["compile", "missing.onnx", "-o", "x"], 2, "does not exist"),
        (["compile", "mobilenet_v2", "--target", "nonesuch", "-o", "x"], 4, "unknown target"),
        (["run", "nowhere"], 5, "not a tvmnet artifact"),
        (["compile", "mobilenet_v2", "--input-shape", "input=1,3", "-o", "x"], 3, "bad --input-shape"),
        (["zoo", "export", "mobilenet_v9", "-o", "m.onnx"], 2, "mobilenet_v9"),
        (["tune", "mobilenet_v2", "--undertuned", "0"], 2, "--undertuned"),
        (["nonesuch"], 2, "No such command 'nonesuch'"),
        (["--bogus", "run", "x"], 2, "No such option '--bogus'"),
    ],
)
def test_errors_are_one_line_with_exit_code(tmp_path, args, code, message):
    done = tvmnet(*args, cwd=tmp_path)
    assert done.returncode == code, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("tvmnet: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args", [[], ["zoo"]])
def test_a_group_given_no_command_shows_its_help_not_an_error(tmp_path, args):
    """click asks for the help page with a usage error (click >= 8.2); the one-line usage errors must leave it be."""
    done = tvmnet(*args, cwd=tmp_path)
    assert "Commands:" in done.stdout + done.stderr
    assert "tvmnet: error" not in done.stderr
