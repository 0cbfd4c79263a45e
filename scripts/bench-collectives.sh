#!/usr/bin/env bash
# make bench-collectives: our CPU backend (release build) over shared memory with single-copy reads
# ("cpu", cross-memory attach), over shared memory copying through the segment ("cpu-copy",
# LLAVA_SCO_CPU_SHM_CMA=0), over TCP ("tcp", forced on one host), and torch.distributed gloo,
# 2 ranks, same sizes, same machine, same run; prints them side by side with the ratios to gloo
# and keeps the JSON lines. Then the floor: a 64 MiB memcpy (numpy), alone and on both cores at once.
# SKIP_BUILD=1 uses the existing target/release binaries.
set -Eeuo pipefail  # -E: the ERR trap fires inside functions too
cd "$(dirname "$0")/.."
# the release binaries (cargo honours CARGO_TARGET_DIR; so do we)
BIN="${CARGO_TARGET_DIR:-target}/release"
SIZES="${SIZES:-1,16,64,256}"
REPS="${REPS:-5}"
OUT="${OUT:-bench-results}"
mkdir -p "$OUT"
: > "$OUT/collectives-stderr.log"
trap "echo \"bench-collectives failed; the ranks' stderr is in $OUT/collectives-stderr.log\" >&2" ERR
[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release --quiet --bin trainer --bin launcher
bench() { # NAME BACKEND [ENV=VALUE...]
  local name=$1 backend=$2
  shift 2
  env OMP_NUM_THREADS=1 "$@" "$BIN/launcher" --standalone --nproc-per-node 2 -- "$BIN/trainer" bench collectives --backend "$backend" --sizes "$SIZES" --reps "$REPS" --json 2>>"$OUT/collectives-stderr.log" > "$OUT/collectives-$name.jsonl"
}
bench cpu cpu LLAVA_SCO_CPU_SHM_CMA=auto
bench cpu-copy cpu LLAVA_SCO_CPU_SHM_CMA=0
bench tcp tcp
OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 scripts/bench_gloo.py --sizes "$SIZES" --reps "$REPS" 2>>"$OUT/collectives-stderr.log" > "$OUT/collectives-gloo.jsonl"
.venv/bin/python - "$OUT" "$REPS" <<'PY'
import json, sys, time, statistics
import multiprocessing
import numpy as np
out, reps = sys.argv[1], int(sys.argv[2])
def load(name):
    return {(m["op"], m["bytes"]): m for m in (json.loads(l) for l in open(f"{out}/collectives-{name}.jsonl") if l.strip())}
cpu, copy, tcp, gloo = load("cpu"), load("cpu-copy"), load("tcp"), load("gloo")
bw = lambda d, k: d[k]["busbw_gbps"] if k in d else float("nan")
print(f"{'op':<15} {'MiB':>5} {'cpu GB/s':>9} {'copy GB/s':>10} {'tcp GB/s':>9} {'gloo GB/s':>10} {'cpu/gloo':>9} {'copy/gloo':>10} {'tcp/gloo':>9}   (busbw, world 2)")
for k in cpu:
    c, s, t, g = bw(cpu, k), bw(copy, k), bw(tcp, k), bw(gloo, k)
    print(f"{k[0]:<15} {k[1] / 2**20:>5.0f} {c:>9.3f} {s:>10.3f} {t:>9.3f} {g:>10.3f} {c / g:>9.2f} {s / g:>10.2f} {t / g:>9.2f}")
# the floor: bytes copied per second by one 64 MiB memcpy, alone and with the other core copying too
def memcpy(q):
    src = np.ones(16 << 20, dtype=np.float32)
    dst = np.zeros_like(src)
    times = []
    for i in range(reps + 1):
        t = time.perf_counter()
        np.copyto(dst, src)
        if i:
            times.append(time.perf_counter() - t)
    q.put(src.nbytes / statistics.median(times) / 1e9)
def run(k):
    # (fork: the worker is defined in this stdin script, which spawn/forkserver cannot re-import;
    # a timeout and the exit codes: a worker that dies must not hang `make bench`)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    ps = [ctx.Process(target=memcpy, args=(q,)) for _ in range(k)]
    [p.start() for p in ps]
    got = [q.get(timeout=300) for _ in ps]
    [p.join() for p in ps]
    if any(p.exitcode for p in ps):
        sys.exit(f"a memcpy worker failed: exit codes {[p.exitcode for p in ps]}")
    return got
one, two = run(1), run(2)
print(f"memcpy 64 MiB: {one[0]:.2f} GB/s alone, {min(two):.2f}-{max(two):.2f} GB/s each with both cores copying")
with open(f"{out}/collectives-memcpy.json", "w") as f:
    json.dump({"bytes": 64 << 20, "alone_gbps": one[0], "both_gbps": two}, f)
PY
