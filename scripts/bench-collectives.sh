#!/usr/bin/env bash
# make bench-collectives: our CPU backend (release build) and torch.distributed gloo, 2 ranks, same
# sizes, same machine, same run; prints both side by side with the ratio and keeps the JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES="${SIZES:-1,16,64,256}"
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
cargo build --release --quiet --bin trainer --bin launcher
target/release/launcher --standalone --nproc-per-node 2 -- target/release/trainer bench collectives --backend cpu --sizes "$SIZES" --json 2>/dev/null > "$OUT/collectives-ours.jsonl"
OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 scripts/bench_gloo.py --sizes "$SIZES" 2>/dev/null > "$OUT/collectives-gloo.jsonl"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
ours = [json.loads(l) for l in open(f"{out}/collectives-ours.jsonl") if l.strip()]
gloo = {(m["op"], m["bytes"]): m for m in (json.loads(l) for l in open(f"{out}/collectives-gloo.jsonl") if l.strip())}
print(f"{'op':<15} {'MiB':>6} {'ours GB/s':>10} {'gloo GB/s':>10} {'ratio':>7}   (busbw, world 2, cpu)")
for m in ours:
    g = gloo.get((m["op"], m["bytes"]))
    gb = g["busbw_gbps"] if g else float("nan")
    print(f"{m['op']:<15} {m['bytes'] / 2**20:>6.0f} {m['busbw_gbps']:>10.3f} {gb:>10.3f} {m['busbw_gbps'] / gb:>7.2f}")
PY
