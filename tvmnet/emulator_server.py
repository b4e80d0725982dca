"""TVM RPC server for an emulated board: run BY PATH by the sysroot's aarch64 Python under qemu-user.

``tvmnet emulate`` starts it as ``qemu-aarch64-static -L SYSROOT SYSROOT/usr/bin/python3 THIS_FILE ...``
with ``PYTHONPATH`` at the sysroot's aarch64 wheels (apache-tvm, apache-tvm-ffi, numpy). tvmnet itself
is not installed in the sysroot, so this file imports nothing from tvmnet and only the standard
library, numpy and TVM's runtime.

Why not ``python -m tvm.exec.rpc_server``: ``tvm.rpc.Server`` starts the server in a ``PopenWorker``,
which execs ``sys.executable``; under user-mode qemu without binfmt_misc that exec is an "Exec format
error" (the kernel cannot run an aarch64 ELF). Here the listen loop runs in this process (a thread, as
in ``PopenWorker``) and every RPC session is forked from it, which qemu-user handles. ``sys.executable``
is also pointed at a host shell wrapper that re-enters qemu, so code that does exec it works too.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import platform
import signal
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracker", required=True, help="HOST:PORT of the RPC tracker")
    parser.add_argument("--key", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port-end", type=int)
    parser.add_argument("--custom-addr")
    parser.add_argument("--wrapper", help="host script that runs this sysroot's python under qemu")
    parser.add_argument("--emulator", default="qemu-aarch64")
    args = parser.parse_args(argv)

    if args.wrapper:
        sys.executable = args.wrapper  # anything that execs a fresh Python goes back through qemu
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # runtime only: the 240 MB compiler library is not needed
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    log = logging.getLogger("tvmnet.emulator")
    log.info("importing tvm under %s (%s)", args.emulator, platform.machine())

    import tvm
    import tvm_ffi
    from tvm.base import _LOADED_LIBS
    from tvm.rpc import server
    from tvm_ffi.libinfo import load_lib_ctypes

    # Runtime-only TVM skips libtvm_runtime_extra, which holds functions MetaSchedule's RPC runner calls
    # on the board (tvm.contrib.random.random_fill_for_measure); load it as `import tvm` would.
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent
    if "tvm_runtime_extra" not in _LOADED_LIBS:
        try:
            _LOADED_LIBS["tvm_runtime_extra"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_extra",
                                                                extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")
        except (OSError, RuntimeError, TypeError) as exc:
            log.warning("libtvm_runtime_extra not loaded (%s): MetaSchedule measurements will fail", exc)

    info = json.dumps({"emulated": True, "arch": platform.machine(), "emulator": args.emulator,
                       "tvm": tvm.__version__, "python": platform.python_version()})

    @tvm_ffi.register_global_func("tvmnet.server_info", override=True)
    def _server_info() -> str:  # no args; the client side reads it to warn that timings mean nothing
        return info

    multiprocessing.set_start_method("fork", force=True)  # sessions are forks of this emulated process
    host, _, port = args.tracker.rpartition(":")
    state = server.PopenRPCServerState(args.host, args.port, args.port_end or args.port + 1,
                                       tracker_addr=(host, int(port)), key=args.key,
                                       custom_addr=args.custom_addr)
    log.info("tvmnet emulator: serving on %s:%d as '%s' at tracker %s (%s)", args.host, state.port, args.key,
             args.tracker, info)

    def _stop(_signum, _frame):
        log.info("stopping")
        os._exit(0)  # the listen thread blocks in select/accept; nothing to flush

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    state.thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
