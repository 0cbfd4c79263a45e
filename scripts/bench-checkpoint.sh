#!/usr/bin/env bash
# make bench-checkpoint: `trainer bench checkpoint` (release build, 2 ranks, CPU backend) next to the
# disk's own write rate (dd, 1 GiB, conv=fdatasync) and torch.distributed.checkpoint (gloo, from .venv),
# same state size, same folder, same run. Prints a table and keeps the JSON lines in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB="${MIB:-1024}"
REPS="${REPS:-3}"
OUT="${OUT:-bench-results}"
DIR="${BENCH_DIR:-$OUT/checkpoint-tmp}"
mkdir -p "$OUT" "$DIR"
cargo build --release --quiet --bin trainer --bin launcher
dd_runs() {
  for _ in $(seq "$REPS"); do
    dd if=/dev/zero of="$DIR/dd.bin" bs=1M count="$MIB" conv=fdatasync 2>&1 | tail -1
    rm -f "$DIR/dd.bin"
  done
}
dd_runs > "$OUT/checkpoint-dd.txt"
target/release/launcher --standalone --nproc-per-node 2 -- target/release/trainer bench checkpoint --mib "$MIB" --reps "$REPS" --dir "$DIR/ours" --json 2>/dev/null > "$OUT/checkpoint-ours.jsonl"
OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 scripts/bench_checkpoint.py --mib "$MIB" --reps "$REPS" --dir "$DIR/dcp" 2>/dev/null > "$OUT/checkpoint-dcp.jsonl"
dd_runs >> "$OUT/checkpoint-dd.txt"
rm -rf "$DIR"
.venv/bin/python - "$OUT" "$MIB" <<'PY'
import json, re, statistics, sys
out, mib = sys.argv[1], int(sys.argv[2])
secs = [float(re.search(r"copied, ([0-9.]+) s", l).group(1)) for l in open(f"{out}/checkpoint-dd.txt") if "copied" in l]
dd = (mib << 20) / statistics.median(secs) / 1e9
ours = {m["op"]: m for m in (json.loads(l) for l in open(f"{out}/checkpoint-ours.jsonl") if l.strip())}
dcp = {m["op"]: m for m in (json.loads(l) for l in open(f"{out}/checkpoint-dcp.jsonl") if l.strip())}
print(f"disk (dd {mib} MiB, conv=fdatasync, median of {len(secs)}): {dd:.3f} GB/s")
print(f"{'op':<12} {'ours GB/s':>10} {'DCP GB/s':>9} {'ours/DCP':>9} {'ours/disk':>10}   (world 2, cpu, {mib} MiB of state)")
for op in ("save", "load"):
    o, d = ours[op]["gbps"], dcp[op]["gbps"]
    print(f"{op:<12} {o:>10.3f} {d:>9.3f} {o / d:>9.2f} {o / dd if op == 'save' else float('nan'):>10.2f}")
blk, save = ours["async_block"]["seconds"], ours["save"]["seconds"]
print(f"async_block  {blk:.3f} s blocking training = {100 * blk / save:.1f}% of the synchronous save ({save:.3f} s)")
json.dump({"disk_gbps": dd, "dd_seconds": secs, "ours": list(ours.values()), "dcp": list(dcp.values())},
          open(f"{out}/checkpoint.json", "w"), indent=1)
PY
