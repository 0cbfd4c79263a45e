#!/usr/bin/env bash
# make bench-collectives: our CPU backend (release build) over shared memory ("cpu") and over TCP
# ("tcp", forced on one host), and torch.distributed gloo, 2 ranks, same sizes, same machine, same
# run; prints them side by side with the ratios to gloo and keeps the JSON lines.
# SKIP_BUILD=1 uses the existing target/release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES="${SIZES:-1,16,64,256}"
REPS="${REPS:-5}"
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --quiet --bin trainer --bin launcher
for backend in cpu tcp; do
  OMP_NUM_THREADS=1 target/release/launcher --standalone --nproc-per-node 2 -- target/release/trainer bench collectives --backend "$backend" --sizes "$SIZES" --reps "$REPS" --json 2>/dev/null > "$OUT/collectives-$backend.jsonl"
done
OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 scripts/bench_gloo.py --sizes "$SIZES" --reps "$REPS" 2>/dev/null > "$OUT/collectives-gloo.jsonl"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
def load(name):
    return {(m["op"], m["bytes"]): m for m in (json.loads(l) for l in open(f"{out}/collectives-{name}.jsonl") if l.strip())}
cpu, tcp, gloo = load("cpu"), load("tcp"), load("gloo")
bw = lambda d, k: d[k]["busbw_gbps"] if k in d else float("nan")
print(f"{'op':<15} {'MiB':>5} {'cpu GB/s':>9} {'tcp GB/s':>9} {'gloo GB/s':>10} {'cpu/gloo':>9} {'tcp/gloo':>9}   (busbw, world 2)")
for k in cpu:
    c, t, g = bw(cpu, k), bw(tcp, k), bw(gloo, k)
    print(f"{k[0]:<15} {k[1] / 2**20:>5.0f} {c:>9.3f} {t:>9.3f} {g:>10.3f} {c / g:>9.2f} {t / g:>9.2f}")
PY
