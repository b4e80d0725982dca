"""An emulated aarch64 board on the TVM RPC tracker: qemu-user running TVM's RPC server in a Debian sysroot.

``prepare()`` builds, once, a cached aarch64 user space (default ``~/.cache/tvmnet/emulators/aarch64``,
root overridable with ``$TVMNET_EMULATOR_CACHE``):

1. ``debootstrap --foreign --arch=arm64 --variant=minbase --include=python3 bookworm`` (the first stage only
   downloads and unpacks the base system; it runs nothing, so no binfmt_misc or chroot is needed),
2. ``dpkg -x`` of every .deb in its apt cache (the first stage leaves python3 and its libraries packed),
3. host ``pip install --target site --platform manylinux_2_28_aarch64 --only-binary=:all:`` of numpy and the
   aarch64 wheels of apache-tvm and apache-tvm-ffi, pinned to the versions tvmnet requires,
4. a smoke test under qemu (``import tvm`` in the sysroot's Python) and a marker file with the versions,
   written last: a directory without a valid marker is rebuilt.

``start()`` runs :mod:`tvmnet.emulator_server` (a launcher file, run by path by the sysroot's Python under
``qemu-aarch64-static -L SYSROOT``) in its own session, registered at a tracker under a key, and returns
once the tracker lists it. ``running()`` and ``stop()`` find and stop such servers through small state
files in ``<cache>/servers/``.

What it is for: correctness of aarch64 artifacts (and the RPC tuning path) without a board. Timings under
emulation mean nothing; the server says so through the global function ``tvmnet.server_info``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import TargetError, TvmnetError

Progress = Callable[[str], None]

FORMAT_VERSION = 1
"""Bump when the sysroot layout changes: caches with another version are rebuilt."""
CACHE_ENV = "TVMNET_EMULATOR_CACHE"
MIRROR_ENV = "TVMNET_DEBIAN_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
MARKER = "tvmnet-emulator.json"
LAUNCHER = Path(__file__).resolve().with_name("emulator_server.py")
START_TIMEOUT = 300.0
"""``import tvm`` alone takes 10-30 s under qemu on a busy 2-core machine."""


@dataclass(frozen=True)
class EmulatedArch:
    name: str
    debian_arch: str
    qemu: tuple[str, ...]  # binaries to look for, first found wins
    wheel_platforms: tuple[str, ...]
    loader: str  # the dynamic loader, relative to the sysroot


ARCHES = {
    "aarch64": EmulatedArch("aarch64", "arm64", ("qemu-aarch64-static", "qemu-aarch64"),
                            ("manylinux_2_28_aarch64", "manylinux2014_aarch64"), "lib/ld-linux-aarch64.so.1"),
}

DEBIAN_PACKAGES = {"debootstrap": "debootstrap", "qemu": "qemu-user-static"}


def _say(progress: Progress | None, message: str) -> None:
    if progress:
        progress(message)


# ----------------------------------------------------------------------------------------------
# Where things are


def cache_root() -> Path:
    """``$TVMNET_EMULATOR_CACHE``, else ``$XDG_CACHE_HOME/tvmnet/emulators`` (``~/.cache/...``)."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tvmnet" / "emulators"


@dataclass(frozen=True)
class Sysroot:
    """A prepared emulator directory: ``root/`` (Debian user space), ``site/`` (wheels), ``bin/python3``."""

    path: Path

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def site(self) -> Path:
        return self.path / "site"

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / "python3"

    @property
    def wrapper(self) -> Path:
        """Host shell script that runs the sysroot's Python under qemu (what ``sys.executable`` becomes)."""
        return self.path / "bin" / "python3"

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def read_marker(self) -> dict | None:
        try:
            return json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return None


def _arch(arch: str) -> EmulatedArch:
    if arch not in ARCHES:
        raise TargetError(f"tvmnet can emulate {', '.join(ARCHES)} boards only, not {arch}")
    return ARCHES[arch]


def sysroot(arch: str = "aarch64") -> Sysroot:
    return Sysroot(cache_root() / _arch(arch).name)


# ----------------------------------------------------------------------------------------------
# What the host has


def find_qemu(arch: str = "aarch64") -> str | None:
    for name in _arch(arch).qemu:
        if path := shutil.which(name):
            return path
    return None


def find_debootstrap() -> str | None:
    # /usr/sbin is not on a normal user's PATH
    return shutil.which("debootstrap") or next(
        (p for p in ("/usr/sbin/debootstrap", "/sbin/debootstrap") if os.access(p, os.X_OK)), None)


def missing_packages(arch: str = "aarch64", *, for_setup: bool = True) -> list[str]:
    """Debian packages this machine lacks: qemu-user-static always, debootstrap to prepare a sysroot."""
    missing = []
    if for_setup and find_debootstrap() is None:
        missing.append(DEBIAN_PACKAGES["debootstrap"])
    if find_qemu(arch) is None:
        missing.append(DEBIAN_PACKAGES["qemu"])
    return missing


def _require_packages(arch: str, *, for_setup: bool) -> None:
    missing = missing_packages(arch, for_setup=for_setup)
    if missing:
        need = " and ".join(missing)
        raise TvmnetError(f"emulating {arch} needs the Debian package{'s' if len(missing) > 1 else ''} {need}; "
                          f"install {'them' if len(missing) > 1 else 'it'}: sudo apt-get install {' '.join(missing)}")


def binfmt_registered(arch: str = "aarch64") -> bool:
    """Whether the kernel runs ``arch`` ELF files through qemu by itself (binfmt_misc). Not needed here."""
    entry = Path("/proc/sys/fs/binfmt_misc") / f"qemu-{_arch(arch).name}"
    try:
        return entry.read_text().startswith("enabled")
    except OSError:
        return False


def expected_versions() -> dict[str, str]:
    """apache-tvm and apache-tvm-ffi as tvmnet pins them (the board's runtime must match the compiler)."""
    from importlib import metadata

    pins: dict[str, str] = {}
    try:
        for req in metadata.requires("tvmnet") or []:
            name, sep, version = req.partition("==")
            if sep and name.strip() in ("apache-tvm", "apache-tvm-ffi"):
                pins[name.strip()] = version.split(";")[0].strip()
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        pass
    for name in ("apache-tvm", "apache-tvm-ffi"):
        if name not in pins:
            pins[name] = metadata.version(name)
    return pins


# ----------------------------------------------------------------------------------------------
# The sysroot


def check(arch: str = "aarch64") -> str | None:
    """Why the cached sysroot cannot be used (None when it is ready)."""
    root = sysroot(arch)
    marker = root.read_marker()
    if not root.path.exists():
        return "not prepared yet"
    if marker is None:
        return "no valid marker (setup did not finish)"
    if marker.get("format") != FORMAT_VERSION:
        return f"made by another tvmnet (format {marker.get('format')}, expected {FORMAT_VERSION})"
    for name, version in expected_versions().items():
        if marker.get("versions", {}).get(name) != version:
            return f"has {name} {marker.get('versions', {}).get(name)}, tvmnet needs {version}"
    loader = root.root / _arch(arch).loader
    for path in (root.python, loader, root.site / "tvm" / "lib" / "libtvm_runtime.so", root.site / "numpy",
                 root.wrapper):
        if not path.exists():
            return f"{path} is missing"
    return None


def _run(cmd: list[str], log: Path, what: str, *, env: dict | None = None, timeout: float = 1800) -> str:
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(map(str, cmd))}\n")
        out.flush()
        try:
            done = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TvmnetError(f"{what} did not finish within {timeout:.0f} s (log: {log})") from None
        out.write(done.stdout)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-8:])
        raise TvmnetError(f"{what} failed (exit {done.returncode}); log: {log}\n{tail}")
    return done.stdout


def _guest_env(root: Sysroot, base: dict | None = None) -> dict[str, str]:
    env = {k: v for k, v in (base if base is not None else os.environ).items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(QEMU_LD_PREFIX=str(root.root), PYTHONPATH=str(root.site), PYTHONNOUSERSITE="1",
               PYTHONUNBUFFERED="1", TVM_USE_RUNTIME_LIB="1")
    return env


def _write_wrapper(root: Sysroot, qemu: str) -> None:
    root.wrapper.parent.mkdir(parents=True, exist_ok=True)
    root.wrapper.write_text(
        "#!/bin/sh\n"
        "# The emulated board's Python: TVM's RPC code execs sys.executable, which must stay under qemu.\n"
        f'QEMU_LD_PREFIX="{root.root}"; export QEMU_LD_PREFIX\n'
        f'exec "{qemu}" -L "{root.root}" "{root.python}" "$@"\n')
    root.wrapper.chmod(0o755)


class _Lock:
    """flock on ``<cache>/.ARCH.lock``: one setup at a time (a second waits, saying so)."""

    def __init__(self, path: Path, progress: Progress | None):
        self.path, self.progress, self.fd = path, progress, None

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            _say(self.progress, f"waiting for another tvmnet preparing the emulator ({self.path})")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def prepare(arch: str = "aarch64", *, progress: Progress | None = None, rebuild: bool = False) -> Sysroot:
    """The cached sysroot for ``arch``, built first when missing, broken or stale (a few minutes, once)."""
    spec = _arch(arch)
    root = sysroot(arch)
    with _Lock(root.path.parent / f".{spec.name}.lock", progress):
        problem = "rebuild requested" if rebuild else check(arch)
        if problem is None:
            return root
        _require_packages(arch, for_setup=True)
        if os.geteuid() != 0 and shutil.which("fakeroot") is None:
            raise TvmnetError("preparing the emulator runs debootstrap, which needs root: run this as root "
                              "(e.g. sudo -E tvmnet emulate --setup-only), or install fakeroot")
        _say(progress, f"preparing the {spec.name} emulator in {root.path} ({problem}); this happens once")
        _build(spec, root, progress)
        return root


def _build(spec: EmulatedArch, final: Sysroot, progress: Progress | None) -> None:
    started = time.monotonic()
    qemu = find_qemu(spec.name)
    tmp = Sysroot(final.path.with_name(f".{final.path.name}.tmp-{os.getpid()}"))
    shutil.rmtree(tmp.path, ignore_errors=True)
    tmp.path.mkdir(parents=True)
    log = tmp.path / "setup.log"
    try:
        mirror = os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
        _say(progress, f"[1/4] debootstrap {SUITE} {spec.debian_arch} (minbase + python3) from {mirror}")
        cmd = [find_debootstrap(), "--foreign", f"--arch={spec.debian_arch}", "--variant=minbase",
               "--include=python3", SUITE, tmp.root, mirror]
        if os.geteuid() != 0:
            cmd.insert(0, shutil.which("fakeroot"))
        _run(cmd, log, "debootstrap")

        archives = sorted((tmp.root / "var" / "cache" / "apt" / "archives").glob("*.deb"))
        _say(progress, f"[2/4] unpacking {len(archives)} Debian packages (the first stage leaves python3 packed)")
        if not archives:
            raise TvmnetError(f"debootstrap left no packages in {tmp.root}/var/cache/apt/archives (log: {log})")
        for deb in archives:
            _run(["dpkg-deb", "-x", deb, tmp.root], log, f"dpkg-deb -x {deb.name}", timeout=600)
            deb.unlink()
        pythons = sorted((tmp.root / "usr" / "bin").glob("python3.[0-9]*"))
        pythons = [p for p in pythons if p.name.replace("python3.", "").isdigit()]
        if not tmp.python.exists() or not pythons:
            raise TvmnetError(f"no python3 in the {spec.name} sysroot after unpacking (log: {log})")
        py_version = pythons[-1].name.replace("python", "")

        versions = expected_versions()
        wheels = ["numpy"] + [f"{name}=={version}" for name, version in versions.items()]
        _say(progress, f"[3/4] aarch64 wheels for Python {py_version}: {', '.join(wheels)}")
        cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--target",
               tmp.site, "--only-binary=:all:", "--implementation", "cp", "--python-version", py_version]
        for platform_tag in spec.wheel_platforms:
            cmd += ["--platform", platform_tag]
        _run(cmd + wheels, log, "pip install of the aarch64 wheels")
        # The board needs TVM's runtime only; the 240 MB compiler library is never loaded.
        for lib in (tmp.site / "tvm" / "lib").glob("libtvm_compiler*.so"):
            lib.unlink()

        _say(progress, "[4/4] smoke test under qemu: import numpy and tvm (10-30 s emulated)")
        out = _run([qemu, "-L", tmp.root, tmp.python, "-c",
                    "import platform, numpy, tvm; print('SMOKE', platform.machine(), platform.python_version(), "
                    "numpy.__version__, tvm.__version__)"],
                   log, "the smoke test (the sysroot's python importing tvm under qemu)", env=_guest_env(tmp),
                   timeout=600)
        smoke = next((line.split() for line in out.splitlines() if line.startswith("SMOKE ")), None)
        if smoke is None or smoke[1] != spec.name:
            raise TvmnetError(f"the smoke test under qemu printed no '{spec.name}' line (log: {log})")
        _, _, python, numpy_version, tvm_version = smoke

        old = final.path.with_name(f".{final.path.name}.old-{os.getpid()}")
        if final.path.exists():
            final.path.rename(old)
        tmp.path.rename(final.path)
        shutil.rmtree(old, ignore_errors=True)
        _write_wrapper(final, qemu)
        # can the guest exec a fresh Python (what TVM's PopenWorker does)? Only through the wrapper.
        probe = subprocess.run([qemu, "-L", final.root, final.python, "-c",
                                "import subprocess, sys; print(subprocess.run([sys.argv[1], '-c', "
                                "'import platform; print(platform.machine())'], capture_output=True, text=True)"
                                ".stdout.strip())", final.wrapper],
                               capture_output=True, text=True, env=_guest_env(final), timeout=300)
        marker = {
            "format": FORMAT_VERSION, "arch": spec.name, "debian": f"{SUITE} {spec.debian_arch}", "python": python,
            "versions": {**versions, "numpy": numpy_version}, "tvm_imported": tvm_version, "qemu": qemu,
            "guest_exec_through_wrapper": probe.stdout.strip() == spec.name,
            "seconds": round(time.monotonic() - started, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        final.marker.write_text(json.dumps(marker, indent=2) + "\n")  # last: the commit point
        size = sum(f.stat().st_size for f in final.path.rglob("*") if f.is_file() and not f.is_symlink())
        _say(progress, f"emulator ready in {marker['seconds']:.0f} s: {final.path} ({size / 2**20:.0f} MiB; "
                       f"Python {python}, apache-tvm {tvm_version}, numpy {numpy_version})")
    except BaseException:
        if tmp.path.exists():
            kept = tmp.path.with_name(f".{final.path.name}.failed")
            shutil.rmtree(kept, ignore_errors=True)
            try:
                tmp.path.rename(kept)  # keep the log for the user; the next run starts afresh
            except OSError:
                shutil.rmtree(tmp.path, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Servers


@dataclass
class EmulatorServer:
    """A started emulated board (a detached qemu process serving TVM RPC)."""

    key: str
    tracker: str
    arch: str
    pid: int
    host: str
    port: int
    log: str
    started: float

    @property
    def state_file(self) -> Path:
        return _servers_dir() / _state_name(self.key, self.tracker)

    def alive(self) -> bool:
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        if LAUNCHER.name.encode() not in cmdline:
            return False  # pid reused by something else
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            return stat.rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False

    def output(self) -> str:
        try:
            return Path(self.log).read_text(errors="replace")
        except OSError:
            return ""

    def to_json(self) -> dict:
        return asdict(self)


def _servers_dir() -> Path:
    return cache_root() / "servers"


def _state_name(key: str, tracker: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{key}@{tracker}")
    return f"{safe}.json"


def parse_tracker(tracker: str) -> tuple[str, int]:
    host, sep, port = str(tracker).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise TvmnetError(f"bad tracker address '{tracker}'; write HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def _registered(host: str, port: int, key: str, server_port: int) -> bool:
    from tvm import rpc

    summary = rpc.connect_tracker(host, port).summary()
    return any(item.get("key") == f"server:{key}" and int(item.get("addr", [None, -1])[1]) == server_port
               for item in summary.get("server_info", []))


def running(key: str | None = None, tracker: str | None = None) -> list[EmulatorServer]:
    """Emulated boards started by ``start`` that are still alive (state files of dead ones are removed)."""
    found = []
    directory = _servers_dir()
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            server = EmulatorServer(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        if not server.alive():
            path.unlink(missing_ok=True)
            continue
        if (key is None or server.key == key) and (tracker is None or server.tracker == tracker):
            found.append(server)
    return found


def start(target: str = "rasp4b", tracker: str = "127.0.0.1:9190", *, key: str | None = None,
          host: str = "127.0.0.1", port: int | None = None, timeout: float = START_TIMEOUT,
          progress: Progress | None = None) -> EmulatorServer:
    """Start an emulated ``target`` board registered at ``tracker`` under ``key`` (the target's rpc_key)."""
    from . import rpc
    from .targets import get_target

    spec = get_target(target)
    arch = _arch(spec.arch)
    key = key or spec.rpc_key
    tracker_host, tracker_port = parse_tracker(tracker)
    _require_packages(arch.name, for_setup=check(arch.name) is not None)
    rpc.query_tracker(tracker_host, tracker_port)  # a clear error now if the tracker is down
    if others := running(key, tracker):
        other = others[0]
        raise TvmnetError(f"an emulated board with key '{key}' is already registered at {tracker} (pid {other.pid}); "
                          f"stop it first: tvmnet emulate {spec.name} --stop --key {key}")
    root = prepare(arch.name, progress=progress)
    qemu = find_qemu(arch.name)
    port = port or rpc.free_port(host)
    directory = _servers_dir()
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / _state_name(key, tracker).replace(".json", ".log")
    cmd = [qemu, "-L", str(root.root), str(root.python), str(LAUNCHER), "--tracker", tracker, "--key", key,
           "--host", host, "--port", str(port), "--port-end", str(port + 1), "--wrapper", str(root.wrapper),
           "--emulator", f"qemu-{arch.name}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_guest_env(root), cwd=str(directory), start_new_session=True)
    server = EmulatorServer(key=key, tracker=tracker, arch=arch.name, pid=proc.pid, host=host, port=port,
                            log=str(log), started=time.time())
    server.state_file.write_text(json.dumps(server.to_json(), indent=2) + "\n")
    _say(progress, f"starting TVM's RPC server under qemu-{arch.name} (pid {proc.pid}; importing TVM emulated "
                   f"takes 10-30 s)")
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                tail = "\n".join(server.output().strip().splitlines()[-10:])
                raise TvmnetError(f"the emulated {spec.name} exited with status {proc.returncode} before it "
                                  f"registered (log: {log})" + (f":\n{tail}" if tail else ""))
            try:
                if _registered(tracker_host, tracker_port, key, port):
                    return server
            except (OSError, RuntimeError, TvmnetError):
                pass  # tracker busy; its absence is caught above or by the deadline
            if time.monotonic() > deadline:
                raise TvmnetError(f"the emulated {spec.name} did not register at {tracker} within {timeout:.0f} s "
                                  f"(log: {log})")
            time.sleep(0.5)
    except BaseException:
        _kill(server.pid, 5.0)
        server.state_file.unlink(missing_ok=True)
        raise


def _kill(pid: int, timeout: float) -> None:
    """SIGTERM the server's process group (server and session forks), SIGKILL what is left after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)  # our own child (started in this process)
                if done:
                    return
            except ChildProcessError:
                if not Path(f"/proc/{pid}").exists():
                    return
                stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}/stat").exists() else ""
                if not stat or stat.rsplit(")", 1)[1].split()[0] == "Z":
                    return
            time.sleep(0.1)


def stop(key: str | None = None, tracker: str | None = None, timeout: float = 10.0) -> list[EmulatorServer]:
    """Stop the emulated boards matching ``key`` / ``tracker`` (all when both are None); returns them."""
    servers = running(key, tracker)
    for server in servers:
        _kill(server.pid, timeout)
        server.state_file.unlink(missing_ok=True)
        Path(server.log).unlink(missing_ok=True)  # a board that died by itself keeps its log for diagnosis
    return servers


def status(arch: str = "aarch64") -> dict:
    """The sysroot's state, what the host has, and the running emulated boards (for ``--status``)."""
    root = sysroot(arch)
    problem = check(arch)
    return {
        "arch": arch, "path": str(root.path), "ready": problem is None, "problem": problem,
        "marker": root.read_marker() if problem is None else None,
        "qemu": find_qemu(arch), "debootstrap": find_debootstrap(), "missing_packages": missing_packages(arch),
        "binfmt_misc": binfmt_registered(arch),
        "servers": [s.to_json() for s in running() if s.arch == arch],
    }


def server_info(session) -> dict | None:
    """What an RPC server says about itself (``tvmnet.server_info``), None when it registers no such function."""
    try:
        func = session.get_function("tvmnet.server_info")
    except (AttributeError, RuntimeError):
        return None
    try:
        return json.loads(str(func()))
    except (ValueError, TypeError):
        return None


__all__ = ["EmulatorServer", "cache_root", "check", "prepare", "running", "server_info", "start", "status", "stop",
           "sysroot"]
