#!/usr/bin/env bash
# One-command set-up on a fresh Debian/Ubuntu machine: cross toolchains, the tvmnet package with its
# test extra, then the main job on the built-in model (compile MobileNetV2 for this CPU and verify it
# against onnxruntime). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  g++-aarch64-linux-gnu     # rasp4b, rk3399, jetson host code
  g++-arm-linux-gnueabihf   # rasp4b32, rasp3b
  clang                     # compiles the generated OpenCL C kernel by kernel in the Mali tests
  debootstrap               # tvmnet emulate: the Debian arm64 user space of the emulated rasp4b
  qemu-user-static          # tvmnet emulate: runs that aarch64 user space (TVM's RPC server) here
)
[ "$(id -u)" -eq 0 ] || DEBIAN_PACKAGES+=(fakeroot)  # debootstrap as a normal user (tvmnet emulate --setup-only)
missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "[setup] installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

echo "[setup] installing tvmnet and its Python dependencies"
python3 -m pip install -q --disable-pip-version-check -e ".[test]"

echo "[setup] emulated rasp4b: preparing the cached aarch64 sysroot (once, ~1.5 min; tests/test_emulate.py uses it)"
tvmnet emulate rasp4b --setup-only

echo "[setup] main job: compile the built-in MobileNetV2-1.0-224 for this CPU and verify it"
tvmnet compile --target x86 -o build/mbv2
tvmnet verify build/mbv2
