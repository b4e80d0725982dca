"""The runtime side loads and runs an artifact without importing tvmnet's compiler side or ONNX."""

from __future__ import annotations

import json
import subprocess
import sys

COMPILER_MODULES = {"tvmnet.frontend", "tvmnet.pipeline", "tvmnet.build", "tvmnet.zoo", "tvmnet.tune",
                    "tvmnet.summary", "onnx", "onnxslim"}

SCRIPT = """
import json, sys
import numpy as np
import tvmnet
model = tvmnet.load(sys.argv[1])
out = model.run(np.zeros(model.inputs[0].shape, model.inputs[0].dtype))
model.benchmark(number=1, repeat=2, warmup=0)
print(json.dumps({"shape": list(out.shape), "modules": sorted(sys.modules)}))
"""


def test_load_and_run_import_no_compiler_code(tiny_v2_artifact):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_v2_artifact)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 1000]
    assert COMPILER_MODULES.isdisjoint(result["modules"]), COMPILER_MODULES & set(result["modules"])


REMOTE_SCRIPT = """
import json, sys
import numpy as np
import tvmnet
from tvmnet import remote, rpc
with rpc.start_tracker(port=int(sys.argv[2])) as tracker, rpc.start_server(tracker.address, "iso") as server:
    with tvmnet.load(sys.argv[1], remote=remote.connect(tracker.address, "iso")) as model:
        out = model.run(np.zeros(model.inputs[0].shape, model.inputs[0].dtype))
        model.benchmark(number=1, repeat=2, warmup=0)
print(json.dumps({"shape": list(out.shape), "modules": sorted(sys.modules)}))
"""


def test_remote_load_and_run_import_no_compiler_code(tiny_v2_artifact):
    """tvmnet.remote (RPC to a board) is runtime side too: the tracker and server are child processes,
    so only the client's imports are counted."""
    import random
    import socket

    port = None
    for candidate in random.sample(range(9200, 10000), 800):  # below the ephemeral range (self-connect trap)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port = candidate
            break
    assert port is not None
    done = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(tiny_v2_artifact), str(port)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 1000]
    assert "tvmnet.remote" in result["modules"]
    assert COMPILER_MODULES.isdisjoint(result["modules"]), COMPILER_MODULES & set(result["modules"])
