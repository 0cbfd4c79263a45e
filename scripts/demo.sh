#!/usr/bin/env bash
# make demo (issue 11): the whole product on a CPU in a few minutes, no downloads.
#   1. data + model: rendered shape scenes with questions, SCo records (turn 1 sometimes wrong,
#      turn 2 the correction), a held-out bench, a tiny random Mllama with a tokenizer trained on
#      the corpus (data/demo/, cached: same seed and sizes -> reused)
#   2. train: launcher --nproc-per-node 2 configs/demo.yaml (2 CPU ranks, FSDP, full finetuning),
#      then trainer export --format merged turns the final checkpoint into a model folder
#   3. evaluate: trainer eval on 2 ranks (each scores half the bench), turns 0..2, before (base, cached with the data) and after training
#   4. show: the table (accuracy per turn, transitions, chance per question type, wall time)
# Every run writes a new folder runs/demo/run-<time>/ (nothing is overwritten).
# Environment: DEMO_STEPS (default from configs/demo.yaml), DEMO_TEST (bench questions to score,
# default 200 = all of them), DEMO_MAX_NEW (generation cap per turn, default 64), SKIP_SETUP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
if [[ "${SKIP_SETUP:-0}" != 1 ]]; then
  ./scripts/setup.sh >/dev/null
fi
echo "== building (cargo build --bins) =="
cargo build --bins --quiet
BIN="${CARGO_TARGET_DIR:-target}/debug"
CONFIG=configs/demo.yaml
DATA=data/demo
TEST_N=${DEMO_TEST:-200}
MAX_NEW=${DEMO_MAX_NEW:-64}
RUN=runs/demo/run-$(date +%Y%m%d-%H%M%S)
mkdir -p "$RUN"
t() { echo $(( $(date +%s) - $1 )); }

echo "== 1. data and model: trainer demo-data --out $DATA =="
t0=$(date +%s)
# 1280 training records = one pass of configs/demo.yaml's 160 steps of 8; 200 held-out questions:
# ~40 per question type, enough for a binomial test to tell a model that reads the image from one
# that learned the answer priors
"$BIN/trainer" demo-data --out "$DATA" --train 1280 --test 200
t_data=$(t "$t0")

sets=(--set "train.output_dir=$RUN" --set "checkpoint.dir=$RUN/checkpoints")
# checkpoint.every_steps = max_steps: the one checkpoint is the final one (trainer export's input)
if [[ -n "${DEMO_STEPS:-}" ]]; then
  sets+=(--set "train.max_steps=$DEMO_STEPS" --set "checkpoint.every_steps=$DEMO_STEPS")
fi
echo
echo "== 2. train: launcher --standalone --nproc-per-node 2 $CONFIG (new output folder $RUN) =="
t0=$(date +%s)
"$BIN/launcher" --standalone --nproc-per-node 2 --tee --log-dir "$RUN/logs" "$CONFIG" "${sets[@]}"
t_train=$(t "$t0")
# the newest checkpoint (step-NNNNNNNN sorts by step) -> a full model folder: full finetuning's
# trained weights replace the base tensors, LoRA (--set peft.method=lora) is merged into them
ckpt=$(find "$RUN/checkpoints" -maxdepth 1 -name 'step-*' -type d 2>/dev/null | sort | tail -n 1)
if [[ -z "$ckpt" ]]; then
  echo "no checkpoint under $RUN/checkpoints: checkpoint.every_steps must divide train.max_steps" >&2
  exit 1
fi
"$BIN/trainer" export --checkpoint "$ckpt" --format merged --out "$RUN/finetuned"
after_args=(--model "$RUN/finetuned")

# batches of 8 questions (greedy results do not depend on the batch size on the CPU in fp32): ~5x faster than one
# at a time, which leaves the time to training
eval_run() { # OUT MODEL-ARGS...
  local out=$1; shift
  "$BIN/launcher" --standalone --nproc-per-node 2 -- "$BIN/trainer" eval "$@" --data "$DATA/test.jsonl" --image-root "$DATA/images" --turns 3 \
    --out "$out" --max-new-tokens "$MAX_NEW" --limit "$TEST_N" --batch-size 8
}
echo
echo "== 3. evaluate: trainer eval --turns 3 on $TEST_N held-out questions, before and after =="
t0=$(date +%s)
BASE_EVAL="$DATA/eval-base-n$TEST_N-t$MAX_NEW"
eval_ok=1
# reused only when made from this very data/model by this very build (the "before" column must come
# from the code that made the "after" one): its key is the data manifest and the trainer's hash
{ cat "$DATA/manifest.json"; sha256sum < "$BIN/trainer"; } > "$RUN/base-eval.key"
if [[ -f "$BASE_EVAL/report.json" ]] && cmp -s "$RUN/base-eval.key" "$BASE_EVAL/key"; then
  echo "base model: reusing $BASE_EVAL (same model, bench and build)"
else
  # an interrupted base eval resumes only when made the same way (eval refuses other settings)
  cmp -s "$RUN/base-eval.key" "$BASE_EVAL.partial/key" 2>/dev/null || rm -rf "$BASE_EVAL.partial"
  mkdir -p "$BASE_EVAL.partial" && cp "$RUN/base-eval.key" "$BASE_EVAL.partial/key"
  if ! eval_run "$BASE_EVAL.partial" --model "$DATA/model"; then
    eval_ok=0
  else
    rm -rf "$BASE_EVAL" && mv "$BASE_EVAL.partial" "$BASE_EVAL"
  fi
fi
if [[ $eval_ok == 1 ]] && ! eval_run "$RUN/eval-after" "${after_args[@]}"; then eval_ok=0; fi
t_eval=$(t "$t0")
if [[ $eval_ok == 0 ]]; then
  echo "trainer eval failed or is not available in this build: the table below lacks accuracies" >&2
fi

echo
wall=$(t "$started")
"$BIN/trainer" demo-model table --base "$BASE_EVAL" --after "$RUN/eval-after" \
  --metrics "$RUN/metrics.jsonl" --bench "$DATA/test.jsonl" --chance "$DATA/chance.json" \
  --wall-seconds "$wall" --limit "$TEST_N" --out "$RUN"
echo "timings: data ${t_data}s, train ${t_train}s, eval ${t_eval}s, total ${wall}s (setup and build included)"
echo
echo "reports: $BASE_EVAL/report.md (before), $RUN/eval-after/report.md (after), $RUN/table.md"
echo "plots:   $RUN/loss.svg, $RUN/accuracy.svg; metrics: $RUN/metrics.jsonl; logs: $RUN/logs/"
[[ $eval_ok == 1 ]]
