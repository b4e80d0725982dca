"""Manifests from another tvmnet or another TVM get a clear compatibility message, before any dlopen."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tvm

import tvmnet
from tvmnet.errors import ArtifactError
from tvmnet.manifest import FORMAT_VERSION

from conftest import copy_artifact_with


def test_manifest_from_a_newer_tvmnet(tiny_v2_artifact, tmp_path):
    copy = copy_artifact_with(tiny_v2_artifact, tmp_path, format_version=FORMAT_VERSION + 1, tvmnet_version="9.1.0")
    with pytest.raises(ArtifactError, match=rf"written by tvmnet 9.1.0 in manifest format {FORMAT_VERSION + 1}, "
                                            rf"newer than this tvmnet {tvmnet.__version__} reads .*upgrade tvmnet"):
        tvmnet.load(copy)


def test_manifest_from_an_older_tvmnet(tiny_v2_artifact, tmp_path):
    copy = copy_artifact_with(tiny_v2_artifact, tmp_path, format_version=FORMAT_VERSION - 1, tvmnet_version="0.0.1")
    with pytest.raises(ArtifactError, match=rf"written by tvmnet 0.0.1 in manifest format {FORMAT_VERSION - 1}, "
                                            r"older than .*recompile the model with tvmnet"):
        tvmnet.load(copy)


@pytest.mark.parametrize("value", [None, "1", 1.5, True])
def test_manifest_without_a_valid_format_version(tiny_v2_artifact, tmp_path, value):
    copy = copy_artifact_with(tiny_v2_artifact, tmp_path, format_version=value)
    if value is None:
        assert "format_version" not in json.loads((copy / "manifest.json").read_text())
    with pytest.raises(ArtifactError, match="no valid format_version"):
        tvmnet.load(copy)


def test_manifest_that_is_not_an_object(tiny_v2_artifact, tmp_path):
    copy = copy_artifact_with(tiny_v2_artifact, tmp_path)
    (copy / "manifest.json").write_text("[1, 2, 3]")
    with pytest.raises(ArtifactError, match="not a tvmnet manifest"):
        tvmnet.load(copy)


def test_library_from_another_tvm_release_is_refused_before_dlopen(tiny_v2_artifact, tmp_path):
    copy = copy_artifact_with(tiny_v2_artifact, tmp_path, garbage_library=True, tvm_version="0.19.0")
    with pytest.raises(ArtifactError, match=rf"compiled with TVM 0.19.0, this machine has TVM {tvm.__version__}.*"
                                            r"install apache-tvm==0.19.0"):
        tvmnet.load(copy, trust=True)
    copy = copy_artifact_with(tiny_v2_artifact, tmp_path / "b", garbage_library=True, tvm_version=None)
    with pytest.raises(ArtifactError, match="does not say which TVM built it"):
        tvmnet.load(copy, trust=True)


def test_same_tvm_release_another_patch_warns_and_loads(tiny_v2_artifact, tmp_path):
    major, minor = tvm.__version__.split(".")[:2]
    other = f"{major}.{minor}.99"
    copy = copy_artifact_with(tiny_v2_artifact, tmp_path, tvm_version=other)
    with pytest.warns(UserWarning, match=rf"compiled with TVM {other}.*same release"):
        model = tvmnet.load(copy)
    assert model.run(np.zeros((1, 3, 96, 96), "float32")).shape == (1, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tvmnet.load(tiny_v2_artifact)  # the artifact as built: no warning


def test_cli_prints_the_compatibility_message_as_one_line(tiny_v2_artifact, tmp_path):
    copy = copy_artifact_with(tiny_v2_artifact, tmp_path, tvm_version="0.19.0")
    done = subprocess.run([sys.executable, "-m", "tvmnet.cli", "run", str(copy)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 5
    lines = [line for line in done.stderr.splitlines() if not line.startswith("[tvmnet] ")]
    assert len(lines) == 1 and lines[0].startswith("tvmnet: error: ") and "TVM 0.19.0" in lines[0], done.stderr
