#!/usr/bin/env bash
# make setup: a .venv/ with PyPI torch==2.11.0 (the libtorch tch 0.24 is built for), and the
# stable links the build uses (.venv/libtorch -> site-packages/torch, .venv/nccl/libnccl.so).
# Idempotent: when the right torch is already there it only checks, in about a second.
# `setup.sh --peers` (make bench-peers; every bench target runs it) also installs the Python peers
# the benchmarks compare against and the golden scripts in tests/fixtures run: PEERS below, the
# versions the recorded figures and fixtures were made with.
set -euo pipefail
TORCH_VERSION=2.11.0
PEERS=(transformers==5.24.0 peft==0.21.2 pillow==13.0.0)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup: '$PY' not found. Install Python 3.10+ with venv and pip (Debian: apt-get install python3 python3-venv python3-pip), or set PYTHON=/path/to/python3." >&2
  exit 1
fi

installed_version() {
  # Reads the version from the dist-info metadata: importing torch takes seconds.
  "$VENV/bin/python" - <<'PY' 2>/dev/null || true
import importlib.metadata as m
try:
    print(m.version("torch"))
except m.PackageNotFoundError:
    pass
PY
}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  if ! "$PY" -m venv "$VENV"; then
    echo "setup: '$PY -m venv' failed. Install the venv module (Debian: apt-get install python3-venv)." >&2
    exit 1
  fi
fi
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
  echo "setup: pip is missing in $VENV. Install pip (Debian: apt-get install python3-pip) or run '$PY -m ensurepip'." >&2
  exit 1
fi

have="$(installed_version)"
if [ "$have" != "$TORCH_VERSION" ]; then
  echo "setup: installing torch==$TORCH_VERSION into $VENV (about a minute, 4.6 GB; found: ${have:-none})"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ln -sfn "$SITE/torch" "$VENV/libtorch"
# cudarc looks for libnccl.so; the NCCL wheel ships only libnccl.so.2.
if [ -e "$SITE/nvidia/nccl/lib/libnccl.so.2" ]; then
  mkdir -p "$VENV/nccl"
  ln -sfn "$SITE/nvidia/nccl/lib/libnccl.so.2" "$VENV/nccl/libnccl.so"
fi
# Library folders of the wheel's CUDA runtime (NVRTC, NCCL): read by the kernels crate and the trainer
# at run time, so nothing has to be exported by hand.
{
  for d in "$SITE"/nvidia/*/lib "$SITE"/nvidia/cu13/lib; do [ -d "$d" ] && echo "$d"; done
  [ -d "$VENV/nccl" ] && echo "$VENV/nccl"
} | sort -u > "$VENV/cuda-lib-dirs.txt"
echo "setup: ok (torch $TORCH_VERSION in $VENV)"

if [ "${1:-}" = "--peers" ]; then
  # pip would check in seconds what the metadata answers at once
  if ! "$VENV/bin/python" - "${PEERS[@]}" <<'PY'
import importlib.metadata as m, sys
def has(pin):
    name, version = pin.split("==")
    try:
        return m.version(name) == version
    except m.PackageNotFoundError:
        return False
sys.exit(0 if all(has(p) for p in sys.argv[1:]) else 1)
PY
  then
    echo "setup: installing the benchmarks' peers into $VENV: ${PEERS[*]}"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PEERS[@]}" "torch==$TORCH_VERSION"
  fi
  printf '%s\n' "${PEERS[@]}" > "$VENV/peers.txt"
  echo "setup: ok (peers ${PEERS[*]})"
fi
