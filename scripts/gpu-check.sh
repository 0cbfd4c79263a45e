#!/usr/bin/env bash
# make gpu-check: every GPU check and benchmark in one call (kernels now; NCCL when it lands).
# On the device machine there is no Rust toolchain: `make gpu-bin` builds the binaries here into
# .gpu-bin/ (stripped), the call carries that folder, and this script points the loader at the
# host's own torch 2.11 and its nvidia wheel folders. Logs go to $OUT (or ./gpu-out).
# Usage: scripts/gpu-check.sh [all|nccl|model|train|kernels]
set -uo pipefail
cd "$(dirname "$0")/.."
ONLY="${1:-all}"
want() { [ "$ONLY" = all ] || [ "$ONLY" = "$1" ]; }
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && ! command -v nvidia-smi >/dev/null && PY=.venv/bin/python
SITE="$("$PY" -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))')"
[ -n "$SITE" ] || { echo "FAIL: $PY cannot import torch: the binaries need its libtorch and nvidia libraries"; exit 2; }
LIBS="$SITE/torch/lib"
for d in "$SITE"/nvidia/*/lib; do LIBS="$LIBS:$d"; done
# (no libnccl.so link needed: dist/nccl_lib.rs loads the wheel's libnccl.so.2 itself)
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LLAVA_SCO_CUDA_LIB_DIRS="$LIBS"
# outside $OUT: only 8 files come back from the device machine
export LLAVA_SCO_KERNEL_CACHE="${LLAVA_SCO_KERNEL_CACHE:-/tmp/llava-sco-kernel-cache}"
BIN="${GPU_BIN:-.gpu-bin}"
[ -x "$BIN/kernels-gpu-check" ] || [ -n "${GPU_BIN:-}" ] || BIN=target/debug
# (a device call without the binaries would spend its start on nothing but failures)
if [ ! -x "$BIN/kernels-gpu-check" ]; then
  echo "FAIL: no ${GPU_BIN:-.gpu-bin (nor target/debug)}/kernels-gpu-check: run \`make gpu-bin\` first, and carry .gpu-bin to the GPU host (run's carry: [\".gpu-bin\"]; it is not tracked)"
  exit 2
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv 2>&1 || echo "nvidia-smi: not available"; date -u; } | tee "$OUT/device.txt"
status=0
# model_gpu runs again with each candidate for the default (MODEL_VARIANTS=: none; at most two,
# each keeps a log beside the bundle and the device machine returns 8 files)
MODEL_VARIANTS="${MODEL_VARIANTS-v19,v20}"
# The device machine sends back at most 8 files from $OUT: on exit every log goes into one
# gpu-check-logs.tar.gz (training checkpoints left out), and only the files read first stay
# beside it.
KEEP="device.txt kernels-gpu-check.log kernels-gpu.jsonl model-gpu.log $(for v in ${MODEL_VARIANTS//,/ }; do printf 'model-gpu-%s.log ' "$v"; done)kernels-gpu-check-fallback.log"
# (an earlier run's copies in the same $OUT, inside its bundle, must not pass for this run's)
for k in $KEEP; do [ "$k" = device.txt ] || rm -f "$OUT/$k"; done
bundle() {
  local keep="$KEEP"
  local tmp; tmp="$(mktemp -d)"
  # (an earlier run's bundle in the same $OUT goes inside this one)
  # (status 1: a file changed while read, e.g. a rank still writing its log: the bundle is whole)
  tar -czf "$tmp/gpu-check-logs.tar.gz" --warning=no-file-changed -C "$OUT" --exclude='./*/ckpt' .
  [ $? -le 1 ] \
    && find "$OUT" -mindepth 1 -maxdepth 1 $(for k in $keep; do printf -- "! -name %s " "$k"; done) -exec rm -rf {} + \
    && mv "$tmp/gpu-check-logs.tar.gz" "$OUT/" && echo "logs: gpu-check-logs.tar.gz and $keep"
  rm -rf "$tmp"
}
trap bundle EXIT
trap 'exit 143' TERM
trap 'exit 130' INT
# The seconds this script may take (the device call's timeout less a margin): a step that would
# not fit is skipped, so the script always ends, and bundles its logs, inside the call.
# (420 with a device call of timeout_s 480 leaves a warm machine time for a second call)
BUDGET="${GPU_CHECK_BUDGET:-420}"
fits() { # seconds, name: whether that many seconds are left, else says so
  local left=$((BUDGET - SECONDS))
  [ "$left" -ge "$1" ] && return 0
  echo "SKIP $2: $left s of the $BUDGET s budget left, it needs $1 s"; status=1; return 1
}
budget_cap() { # seconds: at most that many, and no more than the budget leaves (after a margin)
  local left=$((BUDGET - SECONDS - 15))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
step() { # name, command...: runs one check (within the budget), logs it, remembers failures
  local name="$1"; shift
  echo "== $name"
  fits 30 "$name" || return 1
  # (a shell function, with_stacks, keeps its own limit: `timeout` runs programs only)
  local limit=(timeout -k 5 "$(budget_cap 100000)")
  [ "$(type -t "$1")" = function ] && limit=()
  local rc=0
  if "${limit[@]}" "$@" > "$OUT/$name.log" 2>&1; then echo "PASS $name"; else rc=1; echo "FAIL $name (see $name.log)"; status=1; fi
  tail -n 3 "$OUT/$name.log"
  return $rc
}
mkdir -p "$OUT/dist"
# Order: the kernels' checks and timings first (what is not yet verified on a GPU: the open
# work), then model_gpu with the candidates that passed them and with the default, the
# backward's profile, and last NCCL and training, which passed on an H200 before; a step that
# no longer fits the budget is skipped, so a slow or hung step costs only what comes after it.
# a table row of kernels-gpu-check's (not its header, an error line or a "libtorch SDPA runs" line)
table_row='^attn d[0-9]+ s[0-9]+ (full|causal) fwd .*TFLOP/s$'
# whether variant $1 passed every case (and, v19/v20, agreed with v15) in the main or the
# fallback log, and failed in neither
logs=("$OUT/kernels-gpu-check.log" "$OUT/kernels-gpu-check-fallback.log")
passed() {
  grep -qh "^attention variant $1: all correctness cases PASS" "${logs[@]}" 2>/dev/null \
    && ! grep -qh "^attention variant $1: .* FAILED" "${logs[@]}" 2>/dev/null
}
if want kernels; then
  # Without KERNELS_VARIANTS: the default (v15) and the candidates v19 (the same kernels with the
  # whole-tile mask cells; the tile-structured mask cases, VisionTiles, CrossTiles,
  # CrossTilesTextFirst and CausalPadded, are the first GPU check of that path) and v20 (v19 with
  # empty tiles), each also compared with v15 on the same inputs (out, lse, dK, dV should be
  # bitwise v15's). They run v15's kernels on unmasked calls, so the sweep times v15 alone
  # (--sweep-time) and the model's masked calls time all three, there v19/v15 reads the whole
  # tiles and v20/v19 the empty ones. (Older variants are history; `KERNELS_VARIANTS=` checks
  # all; every timed variant must be checked.)
  if [ -z "${KERNELS_VARIANTS+set}" ]; then
    KERNELS_VARIANTS=v15,v19,v20
    # (a KERNELS_BASELINE given instead decides the timed variants itself)
    [ -z "${KERNELS_BASELINE:-}" ] && KERNELS_TIME="${KERNELS_TIME:-v15,v19,v20}" && KERNELS_SWEEP="${KERNELS_SWEEP-v15}"
  fi
  # ~1-2 min on an H200 expected (NVRTC compile, the variants' correctness cases, timings of the
  # timed variants and SDPA); the cap keeps a hung kernel from eating a 15-minute device budget
  # KERNELS_VARIANTS (e.g. v13,v14,v15): the variants to check. Timed: KERNELS_TIME (e.g.
  # v13,v16; each must be checked; KERNELS_SWEEP: those of them the unmasked sweep times), else
  # KERNELS_BASELINE (all variants checked: the default variant) and every passing variant listed
  # after it, one table column each with the ratio of each to the one before it and to the
  # baseline, else the newest passing one and the one before it
  check_rc=1
  if fits 90 kernels-gpu-check; then
    cap=$(budget_cap 240)
    echo "kernels-gpu-check: at most $cap s"
    timeout -k 10 "$cap" "$BIN/kernels-gpu-check" --out "$OUT" ${KERNELS_VARIANTS:+--variants "$KERNELS_VARIANTS"} \
      ${KERNELS_BASELINE:+--baseline "$KERNELS_BASELINE"} ${KERNELS_TIME:+--time "$KERNELS_TIME"} \
      ${KERNELS_SWEEP:+--sweep-time "$KERNELS_SWEEP"} 2>&1 \
      | tee "$OUT/kernels-gpu-check.log"
    check_rc=${PIPESTATUS[0]}
    # (with --variants its JSON is kernels-gpu-<variants>.jsonl: the name the kept files list)
    main_json="$OUT/kernels-gpu-${KERNELS_VARIANTS//,/-}.jsonl"
    [ -n "$KERNELS_VARIANTS" ] && [ -e "$main_json" ] && mv "$main_json" "$OUT/kernels-gpu.jsonl"
  fi
  if [ "$check_rc" != 0 ]; then
    status=1
    # a kernel that traps (a barrier watchdog) or hangs takes the CUDA context or the process with
    # it ("CUDA context lost ..." in the log), and with them the timings and the variants after
    # it: without the final table, check each candidate beside the default in a process of its
    # own (so one that breaks does not take the other's verdict), timing the model's calls only
    if ! grep -Eq "$table_row" "$OUT/kernels-gpu-check.log" 2>/dev/null; then
      for pair in v15,v19 v15,v20; do
        fits 75 "the $pair fallback" || break
        echo "kernels-gpu-check ended without its table: $pair alone (kernels-gpu-check-fallback.log)"
        KERNELS_BENCH=model timeout -k 10 "$(budget_cap 150)" "$BIN/kernels-gpu-check" --variants "$pair" --out "$OUT" 2>&1 \
          | tee -a "$OUT/kernels-gpu-check-fallback.log" | tail -n 24
      done
    fi
  fi
fi
# model_gpu (the whole model's loss and gradients, fused against sdpa) with each candidate that
# passed the kernels' checks (one that failed may hang: not run), then with the default
if want model && [ ! -x "$BIN/model_gpu" ]; then
  echo "SKIP model-gpu: no $BIN/model_gpu (make gpu-bin builds it)"; status=1
fi
for v in ${MODEL_VARIANTS//,/ }; do
  want model && [ -x "$BIN/model_gpu" ] || break
  if want kernels && ! passed "$v"; then
    echo "== model-gpu-$v: not run ($v did not pass the kernels' checks)"; continue
  fi
  LLAVA_SCO_ATTN_VARIANT="$v" step "model-gpu-$v" timeout -k 5 150 "$BIN/model_gpu" --nocapture --test-threads 1
done
want model && [ -x "$BIN/model_gpu" ] && step model-gpu timeout -k 5 200 "$BIN/model_gpu" --nocapture --test-threads 1
if want kernels; then
  # where the default's backward time goes (v15, when it passed its checks: a variant that
  # failed is not profiled, it may hang again): the profiling builds print the clock cycles of
  # each step per tile (two blocks; the last call of each (variant, Sk, causal, block,
  # warpgroup) is kept, so shapes sharing Sk share a line)
  profile_variants=v12
  passed v15 && profile_variants=v15
  if ! fits 75 kernels-bwd-profile; then
    :
  elif ! LLAVA_SCO_ATTN_BWD_PROFILE=1 KERNELS_BENCH=quick timeout -k 10 "$(budget_cap 120)" "$BIN/kernels-gpu-check" \
    --variants "$profile_variants" > "$OUT/kernels-bwd-profile.log" 2>&1; then
    echo "FAIL kernels-bwd-profile (see kernels-bwd-profile.log)"; tail -n 3 "$OUT/kernels-bwd-profile.log"; status=1
  fi
fi
want nccl && step nccl-world1 timeout -k 5 120 "$BIN/dist-selftest" --backend nccl --device cuda --out "$OUT/dist"
want nccl && step nccl-launcher-world1 timeout -k 5 120 "$BIN/launcher" --standalone --nproc-per-node 1 -- "$BIN/dist-selftest" --backend nccl --device cuda --out "$OUT/dist"
# dead-peer path: a collective that can never finish must fail after the 5 s timeout, not hang
# (world 1 with a blocked stream: NCCL refuses two ranks of one communicator on one GPU)
# A hang here is what this step looks for: after 60 s the threads' kernel stacks and (where
# cuda-gdb exists) their user stacks go to the log before the process is killed.
with_stacks() { # seconds, command...
  local secs="$1"; shift
  NCCL_DEBUG=WARN RUST_BACKTRACE=1 "$@" & local pid=$! i=0
  while kill -0 "$pid" 2>/dev/null && [ $i -lt "$secs" ]; do sleep 1; i=$((i + 1)); done
  if kill -0 "$pid" 2>/dev/null; then
    echo "HUNG after $secs s: thread stacks of $pid"
    for t in /proc/$pid/task/*; do echo "-- $(cat $t/comm) wchan=$(cat $t/wchan)"; cat $t/stack 2>/dev/null | head -n 12; done
    command -v cuda-gdb >/dev/null && timeout 60 cuda-gdb -p "$pid" -batch -ex 'thread apply all bt 25' 2>&1 | grep -v '^\[New\|^warning' | head -n 200
    kill -9 "$pid"; return 124
  fi
  wait "$pid"
}
# (a shell function keeps no `timeout`: it runs only with room for its 60 s, cuda-gdb's 60 and the kill)
want nccl && fits 130 nccl-timeout && step nccl-timeout with_stacks 60 "$BIN/dist-selftest" --mode nccl-timeout --out "$OUT/dist"
# training on the GPU through FSDP over NCCL (world 1): fp32 against the PyTorch golden losses, and bf16
for mp in fp32 bf16; do
  want train && [ -x "$BIN/trainer" ] && step "train-nccl-$mp" timeout 150 "$BIN/launcher" --standalone --nproc-per-node 1 -- \
    "$BIN/trainer" train tests/fixtures/train/train.yaml --set fsdp.enabled=true --set fsdp.backend=nccl \
    --set fsdp.mixed_precision=$mp --set "train.output_dir=$OUT/train-$mp" --set "checkpoint.dir=$OUT/train-$mp/ckpt" \
    && grep -o '"loss":[0-9.e+-]*' "$OUT/train-$mp/metrics.jsonl" | head -n 4 | tr '\n' ' ' && echo "(golden: $(grep -o '[0-9]\.[0-9]*' tests/fixtures/train/golden_losses.json | head -n 4 | tr '\n' ' '))"
done
if want kernels; then
  echo "backward profile (cycles per 64-query tile):"
  grep -- '-prof ' "$OUT/kernels-bwd-profile.log" 2>/dev/null \
    | awk '{k = $1 " " $2 " " $3 " " $4 " " $5; last[k] = $0} END {for (k in last) print last[k]}' | sort
  # the verdicts and the table again, last in the output (the call returns its tail)
  for log in kernels-gpu-check.log kernels-gpu-check-fallback.log; do
    grep -E '^v(19|20)=v15 .* (FAIL|ERROR)|^v(19|20) against v15: not compared' "$OUT/$log" 2>/dev/null || true
    sed -n '/^benchmark /,$p' "$OUT/$log" 2>/dev/null | grep -E '^(benchmark|attn|model|rmsnorm|attention variant)' | grep -v 'libtorch SDPA runs' || true
  done
fi
exit $status
