"""The ``tvmnet`` command: a thin click layer over the Python API.

User errors (``TvmnetError``, and click's usage errors) print one line on stderr and exit with the error's
code; anything else is a bug, still one line unless ``--verbose`` asks for the traceback.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import click

from .errors import TvmnetError


def _stderr(message: str) -> None:
    click.echo(message, err=True)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


# click >= 8.2 raises this usage error for a group given no command; it stays click's help page
_NO_COMMAND = getattr(click.exceptions, "NoArgsIsHelpError", ())


def _exit_on_usage_error(exc: click.UsageError) -> None:
    """A bad option or argument: one line like every other user error, pointing at the command's help."""
    if isinstance(exc, _NO_COMMAND):
        raise exc
    where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
    _stderr(f"tvmnet: error: {exc.format_message()}{where}")
    sys.exit(exc.exit_code)


class _Group(click.Group):
    """Turns exceptions into one-line errors with meaningful exit codes."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:  # the group's own options (`tvmnet --bogus`); a command's are parsed inside invoke
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            _exit_on_usage_error(exc)
            raise  # not reached unless click shows its help page instead

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TvmnetError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            _stderr(f"tvmnet: error: {exc}")
            sys.exit(exc.exit_code)
        except click.UsageError as exc:  # a command's options and arguments, an unknown command
            _exit_on_usage_error(exc)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            _stderr("tvmnet: interrupted")
            sys.exit(130)
        except Exception as exc:  # a bug, but the user still gets one line
            if ctx.obj and ctx.obj.get("verbose"):
                traceback.print_exc()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _stderr(f"tvmnet: internal error: {type(exc).__name__}: {first} (rerun with --verbose for details)")
            sys.exit(70)


@click.group(cls=_Group)
@click.option("--verbose", "-v", is_flag=True, help="Show tracebacks and TVM's own messages.")
@click.version_option(package_name="tvmnet")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """Compile, run and check MobileNet classifiers with Apache TVM (Relax)."""
    ctx.obj = {"verbose": verbose}


_input_shape = click.option(
    "--input-shape", "input_shapes", multiple=True, metavar="NAME:D1,D2,..",
    help="Bind an input's shape, e.g. input:1,3,224,224 (needed for dynamic dimensions).",
)


@main.command("compile")
@click.argument("model", required=False)
@click.option("--target", "-t", default="x86", show_default=True, help="Target name, alias, or path to a .toml file.")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True, help="Artifact directory to write.")
@_input_shape
@click.option("--tuning-logs", type=click.Path(path_type=Path), help="MetaSchedule database directory to apply.")
@click.option("--labels", type=click.Path(path_type=Path), help="Text file with one class name per line.")
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Width multiplier for zoo models.")
@click.option("--resolution", type=int, default=224, show_default=True, help="Input resolution for zoo models.")
def compile_cmd(model: str | None, target: str, output: Path, input_shapes: tuple[str, ...],
                tuning_logs: Path | None, labels: Path | None, alpha: float, resolution: int) -> None:
    """Compile MODEL (an .onnx file or a zoo name; default mobilenet_v2) into an artifact directory."""
    from .build import compile as compile_model
    from .frontend import parse_input_shapes

    compile_model(model, output=output, target=target, input_shapes=parse_input_shapes(input_shapes),
                  tuning_logs=tuning_logs, labels=labels, alpha=alpha, resolution=resolution,
                  progress=lambda msg: _stderr(f"[tvmnet] {msg}"))


@main.command("tune")
@click.argument("model", required=False)
@click.option("--target", "-t", default="x86", show_default=True, help="Target name, alias, or .toml path.")
@click.option("--trials", type=int,
              help="Total measured trials over the selected tasks (records already in the log count).")
@click.option("--trials-per-task", type=int, help="Cap on trials for each task.")
@click.option("--tasks", "task_names", multiple=True, help="Tune only tasks whose name contains this (repeatable).")
@click.option("--undertuned", type=click.IntRange(min=1), metavar="N",
              help="Tune only tasks with fewer than N trials on this CPU: after --remeasure on a new CPU, those "
                   "whose records all came from other CPUs.")
@click.option("--log-dir", type=click.Path(path_type=Path),
              help="Database directory (default tuning_logs/<target>/<fingerprint>).")
@click.option("--timeout", "timeout_s", type=float, default=60.0, show_default=True,
              help="Seconds for one measurement.")
@click.option("--number", type=int, default=3, show_default=True)
@click.option("--repeat", type=int, default=1, show_default=True)
@click.option("--min-repeat-ms", type=int, default=100, show_default=True)
@click.option("--early-stopping", type=int, help="Stop a task after this many trials without improvement.")
@click.option("--trials-per-iter", type=int, default=64, show_default=True,
              help="Candidates measured per task per round (a small budget over many tasks wants fewer).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--remeasure", type=int, default=0, metavar="N",
              help="First time each task's 2nd to Nth fastest records of this CPU, its fastest from another "
                   "CPU, its padded seeds (if it has no padded record) and its split seeds (if its fastest runs "
                   "on one thread) and its row seed (its fastest's pixel tile widened to a whole row) side by side "
                   "with its fastest, and store them on the log's scale: re-ranks a log measured under other "
                   "conditions; --trials 0 stops after that.")
@click.option("--recheck", type=int, default=0, metavar="N",
              help="After the search, time each task's N fastest new candidates side by side with its fastest "
                   "earlier record and store them on the log's scale (a host busier now than when the log was "
                   "measured).")
@click.option("--alpha", type=float, default=1.0, show_default=True, help="Width multiplier for zoo models.")
@click.option("--resolution", type=int, default=224, show_default=True, help="Input resolution for zoo models.")
@_input_shape
@click.option("--rpc-tracker", metavar="HOST:PORT", help="Measure on boards registered with this RPC tracker.")
@click.option("--rpc-key", help="Board key on the tracker (default: the target's rpc_key).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tune_cmd(model: str | None, target: str, trials: int | None, trials_per_task: int | None,
             task_names: tuple[str, ...], undertuned: int | None, log_dir: Path | None, timeout_s: float,
             number: int, repeat: int, min_repeat_ms: int, early_stopping: int | None, trials_per_iter: int,
             seed: int, remeasure: int, recheck: int, alpha: float, resolution: int, input_shapes: tuple[str, ...],
             rpc_tracker: str | None, rpc_key: str | None, as_json: bool) -> None:
    """Tune MODEL's kernels for TARGET with MetaSchedule; Ctrl-C keeps every measured record, rerun resumes."""
    from .frontend import parse_input_shapes
    from .tune import tune

    result = tune(model, target=target, trials=trials, trials_per_task=trials_per_task,
                  tasks=list(task_names) or None, undertuned=undertuned, log_dir=log_dir, timeout_s=timeout_s,
                  number=number, repeat=repeat, min_repeat_ms=min_repeat_ms, early_stopping=early_stopping,
                  num_trials_per_iter=trials_per_iter, seed=seed, remeasure=remeasure, recheck=recheck,
                  alpha=alpha, resolution=resolution, input_shapes=parse_input_shapes(input_shapes),
                  rpc_tracker=rpc_tracker, rpc_key=rpc_key, progress=lambda msg: _stderr(f"[tvmnet] {msg}"))
    if as_json:
        _print_json(result.to_json())
    else:
        click.echo(result.table())


_trust = click.option("--trust", is_flag=True, help="Load even if the library's sha256 differs from the manifest.")


def _rpc_options(command: Any) -> Any:
    """--rpc-tracker/--rpc-key/--rpc-timeout: run the artifact on a board behind a TVM RPC tracker."""
    command = click.option("--rpc-timeout", type=float, default=60.0, show_default=True, metavar="SECONDS",
                           help="How long to wait for a free board.")(command)
    command = click.option("--rpc-key", help="Board key on the tracker (default: the artifact's target's rpc_key).")(
        command)
    return click.option("--rpc-tracker", metavar="HOST:PORT",
                        help="Run on a board registered with this RPC tracker instead of here.")(command)


def _load_model(artifact: Path, trust: bool, rpc_tracker: str | None, rpc_key: str | None,
                rpc_timeout: float) -> Any:
    """The artifact loaded here, or on a board when --rpc-tracker is given (one line on stderr says which)."""
    from .errors import InputError

    if not rpc_tracker:
        if rpc_key:
            raise InputError("--rpc-key needs --rpc-tracker HOST:PORT")
        from .runtime import load

        return load(artifact, trust=trust)
    from .remote import EMULATION_WARNING, connect_and_load

    model = connect_and_load(artifact, rpc_tracker, rpc_key, timeout_s=rpc_timeout, trust=trust)
    _stderr(f"[tvmnet] running on {model.remote.describe()}")
    if model.emulated:
        _stderr("[tvmnet] warning: " + EMULATION_WARNING.format(emulator=model.remote.emulator))
    return model


@main.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--image", type=click.Path(path_type=Path), help="Image file to classify.")
@click.option("--input", "input_file", type=click.Path(path_type=Path), help=".npy array to feed as the input.")
@click.option("--top", default=5, show_default=True, help="How many classes to print.")
@click.option("--output", "-o", "output_file", type=click.Path(path_type=Path), help="Save the raw output as .npy.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_trust
@_rpc_options
def run_cmd(artifact: Path, image: Path | None, input_file: Path | None, top: int, output_file: Path | None,
            as_json: bool, trust: bool, rpc_tracker: str | None, rpc_key: str | None, rpc_timeout: float) -> None:
    """Run ARTIFACT on an image (or .npy, or a random input) and print the top classes."""
    import numpy as np

    from .errors import InputError
    from .preprocess import load_image, top_k
    from .runtime import random_input

    if image and input_file:
        raise InputError("give --image or --input, not both")
    model = _load_model(artifact, trust, rpc_tracker, rpc_key, rpc_timeout)
    if image:
        if model.preprocessing is None:
            raise InputError("this model's input is not an image tensor; use --input file.npy")
        data = load_image(image, model.preprocessing, model.inputs[0].dtype)
    elif input_file:
        try:
            data = np.load(input_file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {input_file} as a .npy array: {exc}") from None
    else:
        _stderr("[tvmnet] no --image or --input: using a seeded random input")
        data = random_input(model.inputs[0])
    result = model.run(data)
    first = result[0] if isinstance(result, list) else result
    if output_file:
        np.save(output_file, first)
    best = top_k(first, top)
    labels = model.labels
    rows = [{"class": cls, "label": labels[cls] if labels else None, "probability": p} for cls, p in best]
    if as_json:
        _print_json(rows)
        return
    for row in rows:
        label = f"  {row['label']}" if row["label"] else ""
        click.echo(f"{row['class']:>6}  {row['probability']:.4f}{label}")


@main.command("verify")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path),
              help="ONNX model to compare with (default: the artifact's copy).")
@click.option("--seed", default=0, show_default=True)
@click.option("--rtol", default=1e-4, show_default=True)
@click.option("--atol", default=1e-4, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_trust
@_rpc_options
def verify_cmd(artifact: Path, model: Path | None, seed: int, rtol: float, atol: float, as_json: bool,
               trust: bool, rpc_tracker: str | None, rpc_key: str | None, rpc_timeout: float) -> None:
    """Compare ARTIFACT's output with onnxruntime's (run here) on the same random input."""
    from .verify import verify

    reports = verify(_load_model(artifact, trust, rpc_tracker, rpc_key, rpc_timeout), model=model, seed=seed,
                     rtol=rtol, atol=atol)
    if as_json:
        _print_json([r.to_json() for r in reports])
    else:
        for r in reports:
            verdict = "PASS" if r.passed else "FAIL"
            click.echo(f"{r.output}: max abs error {r.max_abs_error:.3g}, max rel error {r.max_rel_error:.3g} "
                       f"(rtol {r.rtol:g}, atol {r.atol:g}) {verdict}")
    if not all(r.passed for r in reports):
        sys.exit(1)


PROFILE_RUNS = 20  # instrumented runs behind `bench --per-kernel`'s medians


@main.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--number", default=10, show_default=True, help="Calls per timed sample.")
@click.option("--repeat", default=30, show_default=True, help="Timed samples.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--per-kernel", "per_kernel", is_flag=True,
              help="Also time every call the VM makes (fused kernels, allocations): where the time goes.")
@click.option("--top", default=15, show_default=True, help="Rows of the --per-kernel table (0: all).")
@_trust
@_rpc_options
def bench_cmd(artifact: Path, number: int, repeat: int, as_json: bool, per_kernel: bool, top: int, trust: bool,
              rpc_tracker: str | None, rpc_key: str | None, rpc_timeout: float) -> None:
    """Time ARTIFACT (median, p90 of per-call latency), here or on a board (timed there).
    For comparisons with onnxruntime use bench/."""
    model = _load_model(artifact, trust, rpc_tracker, rpc_key, rpc_timeout)
    if per_kernel and getattr(model, "remote", None) is not None:
        model.profile()  # refused with the reason before any timing is spent
    stats = model.benchmark(number=number, repeat=repeat)
    kernels = model.profile(runs=PROFILE_RUNS) if per_kernel else None
    remote = getattr(model, "remote", None)
    if as_json:
        data = stats.to_json()
        if remote is not None:
            data["remote"] = {"tracker": remote.tracker, "key": remote.key, "arch": remote.arch,
                              "emulated": remote.emulated}
        if kernels is not None:
            data["kernels"] = [k.to_json() for k in kernels]
        _print_json(data)
        return
    where = ""
    if remote is not None:
        where = f" on board '{remote.key}'" + (f" (EMULATED by {remote.emulator}: not the board's speed)"
                                              if remote.emulated else "")
    click.echo(f"median {stats.median_ms:.3f} ms  p90 {stats.p90_ms:.3f} ms  min {stats.min_ms:.3f} ms  "
               f"({stats.repeat} samples x {stats.number} calls){where}")
    if kernels is not None:
        total_us = sum(k.us for k in kernels)
        click.echo(f"per kernel (median of {PROFILE_RUNS} instrumented runs, {total_us / 1e3:.3f} ms in calls):")
        click.echo(f"{'µs':>9} {'share':>6} {'calls':>5}  function")
        for k in kernels[:top or None]:
            click.echo(f"{k.us:9.1f} {k.share:6.1%} {k.calls:5d}  {k.name}")


@main.command("inspect")
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect_cmd(path: Path, as_json: bool) -> None:
    """Show an artifact's manifest and graph summary (ops, FLOPs, parameters), or an .onnx file's summary."""
    from .manifest import read_manifest

    if path.is_dir():
        info = read_manifest(path)
    else:
        from .frontend import read_model
        from .summary import summarize

        import onnx

        info = {"graph": summarize(onnx.shape_inference.infer_shapes(read_model(path)[0]))}
    if as_json:
        _print_json(info)
        return
    if "target" in info:
        target = info["target"]
        click.echo(f"name:      {info.get('name')}")
        click.echo(f"target:    {target['name']} ({target['arch']}, {target['device']}, "
                   f"verified: {target['verified']})")
        click.echo(f"tvm:       {info.get('tvm_version')}  target {target['tvm']}")
        for spec in info["inputs"]:
            click.echo(f"input:     {spec['name']} {spec['dtype']}{spec['shape']}")
        for spec in info["outputs"]:
            click.echo(f"output:    {spec['name']} {spec['dtype']}{spec['shape']}")
        sched = info.get("schedules") or {}
        click.echo(f"schedules: {len(sched.get('tuned', []))} tuned of {sched.get('total', '?')}")
    graph = info["graph"]
    click.echo(f"graph:     {graph['nodes']} nodes, {graph['parameters']:,} parameters, "
               f"{graph['flops'] / 1e6:.1f} MFLOPs, opset {graph['opset']}")
    click.echo("ops:       " + ", ".join(f"{op} x{n}" for op, n in graph["ops"].items()))


@main.group("zoo")
def zoo_group() -> None:
    """Built-in MobileNet V1/V2/V3 ONNX graphs (deterministic weights from a seed, or your .npz)."""


@zoo_group.command("list")
def zoo_list() -> None:
    """List the model families."""
    from . import zoo

    for entry in zoo.list_models():
        click.echo(f"{entry.name:<20} {entry.description}")


@zoo_group.command("export")
@click.argument("name")
@click.option("--output", "-o", type=click.Path(path_type=Path), required=True)
@click.option("--alpha", type=float, default=1.0, show_default=True)
@click.option("--resolution", type=int, default=224, show_default=True)
@click.option("--opset", type=int, default=13, show_default=True)
@click.option("--batch", default="1", show_default=True, help="Batch size, or 'dynamic'.")
@click.option("--keep-bn", is_flag=True, help="Keep BatchNormalization nodes instead of folding them.")
@click.option("--seed", default=0, show_default=True)
@click.option("--weights", type=click.Path(path_type=Path), help=".npz of initializer name -> array.")
def zoo_export(name: str, output: Path, alpha: float, resolution: int, opset: int, batch: str, keep_bn: bool,
               seed: int, weights: Path | None) -> None:
    """Export model NAME as an ONNX file."""
    from . import zoo
    from .errors import InputError

    if batch == "dynamic":
        batch_size = None
    elif batch.isdigit():
        batch_size = int(batch)
    else:
        raise InputError(f"--batch {batch!r}: give a positive integer or 'dynamic'")
    path = zoo.export_model(name, output, alpha=alpha, resolution=resolution, opset=opset, batch=batch_size,
                            fold_bn=not keep_bn, seed=seed, weights=weights)
    _stderr(f"[tvmnet] wrote {path}")


@main.group("targets", invoke_without_command=True)
@click.pass_context
def targets_group(ctx: click.Context) -> None:
    """List hardware targets (one TOML file each)."""
    if ctx.invoked_subcommand is None:
        from .targets import list_targets

        click.echo(f"{'name':<18} {'device':<7} {'arch':<8} {'verified':<9} description")
        for spec in list_targets():
            click.echo(f"{spec.name:<18} {spec.device:<7} {spec.arch:<8} {spec.verified:<9} {spec.description}")


@targets_group.command("show")
@click.argument("name")
def targets_show(name: str) -> None:
    """Print the resolved TVM target of NAME as JSON."""
    from .targets import get_target

    click.echo(json.dumps(json.loads(get_target(name).tvm_target_json()), indent=2))


@main.group("rpc")
def rpc_group() -> None:
    """Run a TVM RPC tracker or board server, or ask a tracker which boards it has.

    TVM RPC has no authentication: everything binds to 127.0.0.1 unless --host says otherwise.
    """


def _stop_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so the TVM child process is stopped with us, not orphaned."""
    import signal

    def _terminate(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)


def _serve(process: Any, what: str) -> None:
    """Keep a started tracker/server in the foreground until it exits or Ctrl-C / SIGTERM stops it."""
    _stderr(f"[tvmnet] {what} listening on {process.address} (Ctrl-C stops it)")
    try:
        code = process.proc.wait()
    except KeyboardInterrupt:
        process.stop()
        return
    if code:
        sys.exit(code)


def _warn_if_public(host: str) -> None:
    import ipaddress

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        _stderr(f"[tvmnet] warning: binding to {host}: TVM RPC has no authentication, anyone who reaches this "
                "port can run code here")


@rpc_group.command("tracker")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=9190, show_default=True)
def rpc_tracker_cmd(host: str, port: int) -> None:
    """Start a tracker that boards register with and tuners ask for boards."""
    from .rpc import start_tracker

    _warn_if_public(host)
    _stop_on_sigterm()
    _serve(start_tracker(host, port), "RPC tracker")


@rpc_group.command("server")
@click.option("--tracker", required=True, metavar="HOST:PORT")
@click.option("--key", required=True, help="Board key, e.g. rasp4b.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, help="Port to serve on (default: a free one).")
def rpc_server_cmd(tracker: str, key: str, host: str, port: int | None) -> None:
    """Start a board server registered with TRACKER under KEY (run this on the board)."""
    from .rpc import start_server

    _warn_if_public(host)
    _stop_on_sigterm()
    _serve(start_server(tracker, key, host=host, port=port), f"RPC server '{key}'")


@rpc_group.command("status")
@click.option("--tracker", required=True, metavar="HOST:PORT")
@click.option("--json", "as_json", is_flag=True)
def rpc_status_cmd(tracker: str, as_json: bool) -> None:
    """List the board keys registered at TRACKER and how many servers of each are free."""
    from .errors import InputError
    from .rpc import query_tracker

    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"--tracker {tracker!r}: write HOST:PORT, e.g. 127.0.0.1:9190")
    keys = query_tracker(host, int(port))
    if as_json:
        _print_json(keys)
        return
    if not keys:
        click.echo("no boards registered")
    for key, free in sorted(keys.items()):
        click.echo(f"{key:<20} {free} free")


@main.command("emulate")
@click.argument("target", default="rasp4b")
@click.option("--tracker", metavar="HOST:PORT", help="Tracker to register with [default: 127.0.0.1:9190].")
@click.option("--key", help="Board key (default: the target's rpc_key).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the emulated board serves on.")
@click.option("--port", type=int, help="Port it serves on (default: a free one).")
@click.option("--timeout", "timeout_s", type=float, default=300.0, show_default=True,
              help="Seconds to wait for it to register (importing TVM under qemu is slow).")
@click.option("--setup-only", is_flag=True, help="Prepare the cached aarch64 sysroot and exit.")
@click.option("--rebuild", is_flag=True, help="Prepare the sysroot afresh even if the cached one looks fine.")
@click.option("--status", "show_status", is_flag=True, help="Show the cached sysroot and the running emulated boards.")
@click.option("--stop", "stop_it", is_flag=True, help="Stop the emulated board(s) with this key (and --tracker).")
@click.option("--json", "as_json", is_flag=True, help="Print --status / the started board as JSON.")
def emulate_cmd(target: str, tracker: str | None, key: str | None, host: str, port: int | None, timeout_s: float,
                setup_only: bool, rebuild: bool, show_status: bool, stop_it: bool, as_json: bool) -> None:
    """Run an emulated TARGET board (qemu-user, aarch64 only) on an RPC tracker, to check ARM builds without one.

    Prepares once a cached Debian arm64 sysroot with the aarch64 wheels of TVM ($TVMNET_EMULATOR_CACHE moves
    it; needs debootstrap and qemu-user-static), then starts TVM's RPC server in it under qemu and returns once
    the tracker lists it. Results are the board's; timings are not.
    """
    from . import emulate
    from .errors import InputError
    from .targets import get_target

    if sum((setup_only, show_status, stop_it)) > 1:
        raise InputError("give at most one of --setup-only, --status, --stop")
    spec = get_target(target)
    say = lambda msg: _stderr(f"[tvmnet] {msg}")  # noqa: E731
    if show_status:
        info = emulate.status(spec.arch)
        if as_json:
            _print_json(info)
            return
        if info["ready"]:
            m = info["marker"]
            click.echo(f"{info['arch']} sysroot: ready at {info['path']} (Debian {m['debian']}, Python {m['python']}, "
                       + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ")")
        else:
            click.echo(f"{info['arch']} sysroot: {info['problem']} ({info['path']}); "
                       f"tvmnet emulate {spec.name} --setup-only prepares it")
        click.echo(f"qemu: {info['qemu'] or 'missing (apt-get install qemu-user-static)'}; "
                   f"debootstrap: {info['debootstrap'] or 'missing (apt-get install debootstrap)'}; binfmt_misc: "
                   f"{'registered' if info['binfmt_misc'] else 'not registered'} (not needed)")
        for server in info["servers"]:
            click.echo(f"running: '{server['key']}' at tracker {server['tracker']}, serving {server['host']}:"
                       f"{server['port']}, pid {server['pid']}, log {server['log']}")
        if not info["servers"]:
            click.echo("running: none")
        return
    if stop_it:
        key = key or spec.rpc_key
        stopped = emulate.stop(key, tracker)
        if not stopped:
            raise TvmnetError(f"no emulated board with key '{key}'" + (f" at {tracker}" if tracker else "")
                              + " is running")
        for server in stopped:
            say(f"stopped the emulated board '{server.key}' at {server.tracker} (pid {server.pid})")
        return
    if setup_only:
        root = emulate.prepare(spec.arch, progress=say, rebuild=rebuild)
        say(f"emulator sysroot ready: {root.path}")
        return
    if rebuild:
        emulate.prepare(spec.arch, progress=say, rebuild=True)
    tracker = tracker or "127.0.0.1:9190"
    _warn_if_public(host)
    server = emulate.start(target, tracker, key=key, host=host, port=port, timeout=timeout_s, progress=say)
    if as_json:
        _print_json(server.to_json())
    say(f"emulated {spec.name} ({server.arch}, qemu) registered at tracker {tracker} as '{server.key}' "
        f"(pid {server.pid}, log {server.log})")
    say("results are the board's, timings are not (qemu is 10-100x slower); stop it with: "
        f"tvmnet emulate {spec.name} --stop --key {server.key}")


if __name__ == "__main__":
    main()
