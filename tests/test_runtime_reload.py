"""An artifact recompiled into the same directory loads as the new model in a process that had loaded
the old one (the dynamic loader would hand back the old library for the same path)."""

from __future__ import annotations

import shutil

import numpy as np

import tvmnet
from tvmnet import zoo

from conftest import ort_run


def test_recompiled_artifact_at_the_same_path_loads_the_new_library(tiny_v2_artifact, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_v2_artifact, path)
    old = tvmnet.load(path)
    x = np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype("float32")
    old_out = old.run(x)
    assert old_out.shape == (1, 1000)

    other = zoo.build_model("mobilenet_v1", alpha=0.25, resolution=96, num_classes=10)
    tvmnet.compile(other, output=path)  # replaces the directory, as a user recompiling would
    new = tvmnet.load(path)
    got = new.run(x)
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, ort_run(other, {"input": x})[0], rtol=1e-4, atol=1e-4)
    assert old.run(x).tobytes() == old_out.tobytes()  # the model loaded before keeps working


def test_library_swapped_after_the_hash_check_is_not_what_gets_loaded(tiny_v2_artifact, tmp_path, monkeypatch):
    """The private copy is hashed again: a swap between check and dlopen is caught."""
    from tvmnet import runtime

    path = tmp_path / "model"
    shutil.copytree(tiny_v2_artifact, path)
    real_copy = shutil.copyfile

    def copy_then_tamper(src, dst, *args, **kwargs):
        result = real_copy(src, dst, *args, **kwargs)
        with open(dst, "ab") as handle:
            handle.write(b"\0")
        return result

    monkeypatch.setattr(shutil, "copyfile", copy_then_tamper)
    try:
        runtime.load(path)
    except tvmnet.ArtifactError as exc:
        assert "changed while it was being loaded" in str(exc)
    else:
        raise AssertionError("a library that differs from its manifest was loaded")
