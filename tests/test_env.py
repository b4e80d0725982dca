"""The environment tvmnet was verified with: apache-tvm-ffi 0.1.15.x makes MetaSchedule's TuneContext
segfault, so the pinned ffi version is checked, and a TuneContext is built in a subprocess (a segfault
there fails this test instead of killing pytest)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import version

import pytest

PINNED_TVM_FFI = "0.1.14.post1"

TUNE_CONTEXT_SCRIPT = textwrap.dedent("""
    import tvm
    from tvm import te
    from tvm.s_tir import meta_schedule as ms

    a = te.placeholder((16,), "float32", name="a")
    b = te.compute((16,), lambda i: a[i] + 1.0, name="b")
    add = te.create_prim_func([a, b])

    ctx = ms.TuneContext(mod=add, target=tvm.target.Target({"kind": "llvm", "num-cores": 1}), space_generator="post-order-apply",
                         search_strategy="evolutionary", task_name="add", rand_state=0)
    spaces = ctx.generate_design_space()
    ctx.clone()
    print("ok", len(spaces))
""")


def test_apache_tvm_ffi_is_the_pinned_version():
    installed = version("apache-tvm-ffi")
    assert installed == PINNED_TVM_FFI, (
        f"apache-tvm-ffi {installed} is installed, tvmnet is verified with {PINNED_TVM_FFI} "
        "(0.1.15.x segfaults in MetaSchedule's TuneContext): pip install apache-tvm-ffi==" + PINNED_TVM_FFI)


@pytest.mark.timeout(240)
def test_tune_context_constructs_in_a_subprocess():
    proc = subprocess.run([sys.executable, "-c", TUNE_CONTEXT_SCRIPT], capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, f"exit {proc.returncode} (negative: killed by signal)\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().splitlines()[-1].startswith("ok ")
