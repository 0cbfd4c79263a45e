#!/usr/bin/env bash
# make bench-checkpoint: `trainer bench checkpoint` (release build, 2 ranks, CPU backend) next to the
# disk's own write rate (dd, 1 GiB, conv=fdatasync) and torch.distributed.checkpoint (gloo, from .venv),
# same state size, same folder, same run. The disk is noisy, so the three are interleaved over ROUNDS
# rounds (dd, ours, dd, DCP; ours and DCP each report the median of REPS reps) and the table gives
# medians over all rounds, plus the median of the per-round ratios. Keeps the raw results in $OUT.
set -Eeuo pipefail  # -E: the ERR trap fires inside functions too
cd "$(dirname "$0")/.."
# the release binaries (cargo honours CARGO_TARGET_DIR; so do we)
BIN="${CARGO_TARGET_DIR:-target}/release"
MIB="${MIB:-1024}"
REPS="${REPS:-3}"
ROUNDS="${ROUNDS:-3}"
OUT="${OUT:-bench-results}"
DIR="${BENCH_DIR:-$OUT/checkpoint-tmp}"
mkdir -p "$OUT" "$DIR"
: > "$OUT/checkpoint-stderr.log"
trap "echo \"bench-checkpoint failed; the ranks' stderr is in $OUT/checkpoint-stderr.log\" >&2" ERR
cargo build --release --quiet --bin trainer --bin launcher
dd_once() {
  # one line per run: "<round> <dd's summary line>"
  echo "$1 $(dd if=/dev/zero of="$DIR/dd.bin" bs=1M count="$MIB" conv=fdatasync 2>&1 | tail -1)" >> "$OUT/checkpoint-dd.txt"
  rm -f "$DIR/dd.bin"
}
: > "$OUT/checkpoint-dd.txt"
: > "$OUT/checkpoint-ours.jsonl"
: > "$OUT/checkpoint-dcp.jsonl"
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
  dd_once "$round"
  "$BIN/launcher" --standalone --nproc-per-node 2 -- "$BIN/trainer" bench checkpoint \
    --mib "$MIB" --reps "$REPS" --dir "$DIR/ours" --json 2>>"$OUT/checkpoint-stderr.log" \
    | sed "s/^{/{\"round\": $round, /" >> "$OUT/checkpoint-ours.jsonl"
  dd_once "$round"
  OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 scripts/bench_checkpoint.py \
    --mib "$MIB" --reps "$REPS" --dir "$DIR/dcp" 2>>"$OUT/checkpoint-stderr.log" \
    | sed "s/^{/{\"round\": $round, /" >> "$OUT/checkpoint-dcp.jsonl"
done
rm -rf "$DIR"
.venv/bin/python - "$OUT" "$MIB" "$ROUNDS" <<'PY'
import json, re, statistics, sys
out, mib, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
med = statistics.median
dd = {}  # round -> dd GB/s of its runs
for l in open(f"{out}/checkpoint-dd.txt"):
    m = re.match(r"(\d+) .*copied, ([0-9.]+) s", l)
    if m:
        dd.setdefault(int(m.group(1)), []).append((mib << 20) / float(m.group(2)) / 1e9)
def load(name):
    rows = {}  # (round, op) -> measurement
    for l in open(f"{out}/checkpoint-{name}.jsonl"):
        if l.strip():
            m = json.loads(l)
            rows[(m["round"], m["op"])] = m
    return rows
ours, dcp = load("ours"), load("dcp")
rs = [r for r in range(1, rounds + 1) if r in dd and (r, "save") in ours and (r, "save") in dcp]
disk = med([g for r in rs for g in dd[r]])
print(f"disk (dd {mib} MiB, conv=fdatasync): median {disk:.3f} GB/s over {sum(len(dd[r]) for r in rs)} runs "
      f"({min(g for r in rs for g in dd[r]):.3f}-{max(g for r in rs for g in dd[r]):.3f})")
print(f"{'op':<6} {'ours GB/s':>10} {'DCP GB/s':>9} {'ours/DCP':>9} {'ours/disk':>10}   "
      f"(world 2, cpu, {mib} MiB of state, medians of {len(rs)} rounds; in brackets: median of per-round ratios)")
for op in ("save", "load"):
    o, d = med([ours[(r, op)]["gbps"] for r in rs]), med([dcp[(r, op)]["gbps"] for r in rs])
    od = med([ours[(r, op)]["gbps"] / dcp[(r, op)]["gbps"] for r in rs])
    odisk = med([ours[(r, op)]["gbps"] / med(dd[r]) for r in rs])
    disk_col = f"{o / disk:>5.2f} [{odisk:.2f}]" if op == "save" else f"{'-':>10}"
    print(f"{op:<6} {o:>10.3f} {d:>9.3f} {o / d:>4.2f} [{od:.2f}] {disk_col}")
blk = med([ours[(r, "async_block")]["seconds"] for r in rs])
save = med([ours[(r, "save")]["seconds"] for r in rs])
pct = med([100 * ours[(r, "async_block")]["seconds"] / ours[(r, "save")]["seconds"] for r in rs])
print(f"async_block {blk:.3f} s blocking training = {100 * blk / save:.1f}% of the synchronous save ({save:.3f} s) "
      f"[per-round median {pct:.1f}%]")
if all((r, "async_block_first") in ours for r in rs):
    first = med([ours[(r, "async_block_first")]["seconds"] for r in rs])
    print(f"async_block_first {first:.3f} s (the first background save; its buffers were reserved before, as trainer train does after step 1)")
json.dump({"disk_gbps": disk, "dd_gbps": dd, "ours": list(ours.values()), "dcp": list(dcp.values())},
          open(f"{out}/checkpoint.json", "w"), indent=1, default=str)
PY
