#!/usr/bin/env python3
"""The peer of `trainer bench data`: the seed's data path on the same files.

For each batch of records: Image.open(path).convert("RGB"), the seed's dialog (image on the first
user turn, contents stripped), apply_chat_template, transformers' MllamaProcessor (PIL image
processor, the folder's preprocessor_config.json) with padding=True, return_tensors="pt", and the
seed's label masking (cot_dataset.py's tokenize_dialogs, shared with the fixture script). One
process, torch pinned to one thread. Prints one JSON line: {"samples", "seconds", "cpu_seconds",
"samples_per_s"} (the pass with the median wall time over --reps passes).

    .venv/bin/python scripts/bench_data.py --model DIR --data train.jsonl --image-root IMGS
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "fixtures", "data"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--image-root", required=True)
    ap.add_argument("--samples", type=int, default=0, help="first N records (0: all)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()

    import torch
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.mllama.processing_mllama import MllamaProcessor

    from make_fixtures import dialog_of, seed_labels

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "right"
    template = json.load(open(os.path.join(a.model, "tokenizer_config.json")))["chat_template"]
    cfg = json.load(open(os.path.join(a.model, "preprocessor_config.json")))
    for k in ("processor_class", "image_processor_type"):
        cfg.pop(k, None)
    proc = MllamaProcessor(image_processor=MllamaImageProcessorPil(**cfg), tokenizer=tok)
    recs = [json.loads(l) for l in open(a.data) if l.strip()]
    if a.samples:
        recs = recs[: a.samples]

    def one_pass():
        n = 0
        for i in range(0, len(recs), a.batch_size):
            batch = recs[i : i + a.batch_size]
            images = [[Image.open(os.path.join(a.image_root, r["image"])).convert("RGB")] for r in batch]
            texts = [tok.apply_chat_template(dialog_of(r), tokenize=False, chat_template=template) for r in batch]
            b = proc(images=images, text=texts, padding=True, return_tensors="pt", add_special_tokens=False)
            labels = torch.tensor([seed_labels(row, tok) for row in b["input_ids"].tolist()])
            b["labels"] = labels
            n += len(batch)
        return n

    times = []
    n = 0
    for _ in range(max(1, a.reps)):
        t, c = time.perf_counter(), time.process_time()
        n = one_pass()
        times.append((time.perf_counter() - t, time.process_time() - c))
    s, cpu = sorted(times)[len(times) // 2]
    print(json.dumps({"samples": n, "seconds": s, "cpu_seconds": cpu, "samples_per_s": n / s}))


if __name__ == "__main__":
    main()
