# One entry point per job. `make test` is what the README and .ci/run call.
SHELL := /bin/bash
CARGO ?= cargo
VENV := .venv
SETUP_STAMP := $(VENV)/libtorch
# the benchmarks' Python peers (transformers, peft, Pillow), pinned in scripts/setup.sh
PEERS_STAMP := $(VENV)/peers.txt
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

.PHONY: setup bench-peers build release test lint unit kernels-check demo bench bench-collectives bench-checkpoint bench-decode bench-step bench-data gpu-check gpu-bin clean

setup:
	@./scripts/setup.sh

# Runs setup only when the venv is missing; `make setup` re-checks the torch version.
$(SETUP_STAMP):
	@./scripts/setup.sh

bench-peers:
	@./scripts/setup.sh --peers

# again when setup.sh (its pins) changes
$(PEERS_STAMP): scripts/setup.sh
	@./scripts/setup.sh --peers

build: $(SETUP_STAMP)
	$(CARGO) build

release: $(SETUP_STAMP)
	$(CARGO) build --release

lint: $(SETUP_STAMP)
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

# every test binary runs even after a failure, so one CI log names every failing test
unit: $(SETUP_STAMP)
	$(CARGO) test --all-targets --no-fail-fast

# NVRTC compiles every kernel to PTX for compute_80 and compute_90 (no GPU needed).
# Built with the whole workspace: `cargo run -p kernels` would unify features differently and
# rebuild libtorch's bindings.
kernels-check: $(SETUP_STAMP)
	$(CARGO) build -q --bins
	$(TARGET_DIR)/debug/kernels-check

test: lint unit kernels-check

demo: $(SETUP_STAMP)
	@./scripts/demo.sh

bench: bench-collectives bench-checkpoint bench-decode bench-step bench-data
# one benchmark at a time, also under `make -j`: each measures against a peer on the same cores
.NOTPARALLEL: bench

bench-collectives: $(PEERS_STAMP)
	@./scripts/bench-collectives.sh

bench-checkpoint: $(PEERS_STAMP)
	@./scripts/bench-checkpoint.sh

# Decode speed of `trainer infer`'s engine next to transformers' generate (scripts/bench_decode.py), tiny and ~100M models.
bench-decode: $(PEERS_STAMP)
	$(CARGO) build --release --quiet --bin trainer
	@mkdir -p bench-results
	$(TARGET_DIR)/release/trainer bench decode --out bench-results/decode.jsonl

# Optimizer-step time (LoRA and full, tiny and ~100M models) next to transformers + peft (scripts/bench_step.py)
# at 1 rank, and our FSDP engine next to PyTorch FSDP2 over gloo at 2 ranks.
bench-step: $(PEERS_STAMP)
	$(CARGO) build --release --quiet --bin trainer --bin launcher
	@mkdir -p bench-results
	$(TARGET_DIR)/release/trainer bench step --out bench-results/step-w1.jsonl
	$(TARGET_DIR)/release/launcher --standalone --nproc-per-node 2 -- $(TARGET_DIR)/release/trainer bench step --dir bench-results/step-tmp-w2 --out bench-results/step-w2.jsonl
	# the same over our TCP transport, as the peer's gloo: the engine alone against FSDP2's
	LLAVA_SCO_CPU_TRANSPORT=tcp $(TARGET_DIR)/release/launcher --standalone --nproc-per-node 2 -- $(TARGET_DIR)/release/trainer bench step --models 100m --dir bench-results/step-tmp-w2-tcp --out bench-results/step-w2-tcp.jsonl

# Data pipeline samples/s per core (1 and 2 workers) next to transformers' MllamaProcessor + the seed's masking (scripts/bench_data.py).
bench-data: $(PEERS_STAMP)
	$(CARGO) build --release --quiet --bin trainer
	@mkdir -p bench-results
	$(TARGET_DIR)/release/trainer bench data --out bench-results/data.jsonl

# GPU: build the check binaries here (make gpu-bin), then run scripts/gpu-check.sh on the GPU host.
gpu-bin: $(SETUP_STAMP)
	$(CARGO) build --bins
	rm -rf .gpu-bin && mkdir -p .gpu-bin
	cp $(TARGET_DIR)/debug/kernels-gpu-check $(TARGET_DIR)/debug/dist-selftest $(TARGET_DIR)/debug/launcher $(TARGET_DIR)/debug/trainer .gpu-bin/
	# (the test binary cargo names for this build, not the newest model_gpu-* file, which may be stale)
	set -o pipefail; $(CARGO) test --no-run -p trainer --test model_gpu --message-format=json-render-diagnostics \
	  | python3 -c 'import json, sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "model_gpu" and m.get("executable")][-1])' \
	  | xargs -I{} cp {} .gpu-bin/model_gpu
	test -x .gpu-bin/model_gpu
	strip .gpu-bin/*
	@du -sh .gpu-bin; echo "carry: [\".gpu-bin\"]; run: OUT=\$$OUT bash scripts/gpu-check.sh all (timeout_s 480)"

gpu-check:
	@./scripts/gpu-check.sh

clean:
	$(CARGO) clean
