#!/usr/bin/env bash
# Launcher start-up benchmark: our `launcher` against torchrun on the same machine, same run.
#
#   scripts/bench-launcher.sh [RUNS] [NPROC]        (defaults: 7 runs, 4 ranks)
#
# Two figures per tool, medians over RUNS:
#   start->running : from just before the launcher is exec'd until the last rank has started
#                    (each rank writes `date +%s%N`; the latest one counts)
#   start->exit    : wall time of a whole run whose ranks do nothing (`true`)
# Uses target/release/launcher when built (cargo build --release -p launcher), else target/debug.
# torchrun comes from .venv (make setup). Prints a table, and JSON lines with --json.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-7}"
NPROC="${2:-4}"
JSON="${JSON:-0}"
LAUNCHER="${LAUNCHER:-target/release/launcher}"
[ -x "$LAUNCHER" ] || LAUNCHER=target/debug/launcher
[ -x "$LAUNCHER" ] || { echo "build the launcher first: cargo build --release -p launcher" >&2; exit 2; }
TORCHRUN="${TORCHRUN:-.venv/bin/torchrun}"
[ -x "$TORCHRUN" ] || { echo "torchrun not found at $TORCHRUN (run make setup)" >&2; exit 2; }
export OMP_NUM_THREADS=1 # neither tool should print its OMP notice into the timing
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

now_ns() { date +%s%N; }

median() { sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

# $1: tool name; the rest: the command prefix that runs one program per rank.
measure() {
  local name="$1"; shift
  local running=() total=()
  for i in $(seq "$RUNS"); do
    local dir="$WORK/$name-$i"; mkdir -p "$dir"
    local t0; t0=$(now_ns)
    "$@" sh -c 'date +%s%N > "$0/$RANK"' "$dir" >/dev/null 2>&1
    local last; last=$(cat "$dir"/* | sort -n | tail -1)
    local n; n=$(ls "$dir" | wc -l)
    [ "$n" = "$NPROC" ] || { echo "$name: only $n of $NPROC ranks ran" >&2; exit 1; }
    running+=($(( (last - t0) / 1000 )))
    t0=$(now_ns)
    "$@" true >/dev/null 2>&1
    total+=($(( ($(now_ns) - t0) / 1000 )))
  done
  local r t
  r=$(printf '%s\n' "${running[@]}" | median)
  t=$(printf '%s\n' "${total[@]}" | median)
  echo "$name $r $t"
}

ours=$(measure launcher "$LAUNCHER" --standalone --nproc-per-node "$NPROC" --)
theirs=$(measure torchrun "$TORCHRUN" --standalone --nproc-per-node "$NPROC" --no-python)

read -r _ our_run our_total <<<"$ours"
read -r _ tr_run tr_total <<<"$theirs"
ms() { awk -v us="$1" 'BEGIN {printf "%.1f", us / 1000}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", a / b}'; }

echo "launcher start-up, $NPROC ranks, median of $RUNS runs, $(getconf _NPROCESSORS_ONLN) cores, $(date -u +%F)"
echo "launcher binary: $LAUNCHER"
printf '%-16s %12s %12s %10s\n' measure launcher torchrun speedup
printf '%-16s %10s ms %10s ms %9sx\n' "start->running" "$(ms "$our_run")" "$(ms "$tr_run")" "$(ratio "$tr_run" "$our_run")"
printf '%-16s %10s ms %10s ms %9sx\n' "start->exit" "$(ms "$our_total")" "$(ms "$tr_total")" "$(ratio "$tr_total" "$our_total")"
if [ "$JSON" = 1 ]; then
  for m in "start_to_running $our_run $tr_run" "start_to_exit $our_total $tr_total"; do
    read -r what ours_us peer_us <<<"$m"
    printf '{"name":"launcher_%s","ranks":%s,"seconds":%s,"peer":"torchrun","peer_seconds":%s,"ratio":%s}\n' \
      "$what" "$NPROC" "$(awk -v u="$ours_us" 'BEGIN{print u/1e6}')" "$(awk -v u="$peer_us" 'BEGIN{print u/1e6}')" \
      "$(ratio "$peer_us" "$ours_us")"
  done
fi
