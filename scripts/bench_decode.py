"""The transformers peer of `trainer bench decode`: greedy `generate` on the same model folder and the
same input tensors (inputs.safetensors written by the Rust side), fp32 on the CPU, sdpa attention.

  TTFT        = median time of generate(max_new_tokens=1)
  decode rate = (N - 1) / (median time of generate(max_new_tokens=N, min_new_tokens=N) - TTFT)

Prints one JSON object: ttft_s, decode_tok_s, ids (the N generated ids), threads, versions.
Usage: .venv/bin/python scripts/bench_decode.py --model DIR --inputs inputs.safetensors --new-tokens 64 --reps 5
"""
import argparse
import json
import statistics
import time

import os
import sys

import torch
import transformers
from safetensors.torch import load_file
from transformers import MllamaForConditionalGeneration

# the vision encoder's intermediate features as Meta defines them (tests/fixtures/mllama_reference.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
import mllama_reference  # noqa: E402,F401

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--inputs", required=True)
ap.add_argument("--new-tokens", type=int, default=64)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
a = ap.parse_args()
if a.threads > 0:
    torch.set_num_threads(a.threads)

model = MllamaForConditionalGeneration.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa").eval()
inputs = load_file(a.inputs)
inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
prompt_len = inputs["input_ids"].shape[1]


def gen(n):
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
    return out[0, prompt_len:].tolist()


gen(a.new_tokens)  # warm-up, as the Rust side
first, full = [], []
for _ in range(a.reps):
    t = time.perf_counter()
    gen(1)
    first.append(time.perf_counter() - t)
    t = time.perf_counter()
    ids = gen(a.new_tokens)
    full.append(time.perf_counter() - t)
ttft, total = statistics.median(first), statistics.median(full)
# null, as the Rust side writes it, where the decode was too short to time apart from the first token
decode_tok_s = (a.new_tokens - 1) / (total - ttft) if total > ttft else None
print(json.dumps({
    "ttft_s": ttft, "decode_tok_s": decode_tok_s, "ids": ids,
    "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
}))
