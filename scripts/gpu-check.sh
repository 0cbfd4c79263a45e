#!/usr/bin/env bash
# make gpu-check: every GPU check and benchmark in one call (kernels now; NCCL when it lands).
# On the device machine there is no Rust toolchain: `make gpu-bin` builds the binaries here into
# .gpu-bin/ (stripped), the call carries that folder, and this script points the loader at the
# host's own torch 2.11 and its nvidia wheel folders. Logs go to $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && ! command -v nvidia-smi >/dev/null && PY=.venv/bin/python
SITE="$("$PY" -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
LIBS="$SITE/torch/lib"
for d in "$SITE"/nvidia/*/lib; do LIBS="$LIBS:$d"; done
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LLAVA_SCO_CUDA_LIB_DIRS="$LIBS"
export LLAVA_SCO_KERNEL_CACHE="$OUT/kernel-cache"
BIN="${GPU_BIN:-.gpu-bin}"
[ -x "$BIN/kernels-gpu-check" ] || BIN=target/release
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 || echo "nvidia-smi: not available"; date -u; } | tee "$OUT/device.txt"
timeout 500 "$BIN/kernels-gpu-check" --out "$OUT" 2>&1 | tee "$OUT/kernels-gpu-check.log"
exit "${PIPESTATUS[0]}"
