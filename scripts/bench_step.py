"""The peer of `trainer bench step`: optimizer-step time of transformers + peft + torch.optim.AdamW
on the same model folder and the same batches (written by the Rust side), single process, or at
--world W ranks with PyTorch FSDP2 (`fully_shard` per decoder / encoder layer + the root) over
gloo on the CPU; if fully_shard refuses the CPU, DDP over gloo, and the result says so.

    .venv/bin/python scripts/bench_step.py --model DIR --batches F --mode lora|full \
        --steps N --warmup N --world W --threads T [--sharding full_shard|shard_grad_op|no_shard]

--sharding no_shard (our engine's DDP-like strategy) runs DistributedDataParallel over gloo instead
of FSDP2.

Prints one JSON object: {"median_s", "median_cpu_s", "steps", "engine", "loss0", "threads", "world"}
(median_cpu_s: CPU seconds of rank 0's process per step, all threads). Every
rank takes rows [r*b, (r+1)*b) of the global batch; a step is forward + backward of that
micro-batch, gradient clipping at 1.0 and AdamW (fp32). Our side normalizes the loss by the
global supervised-token count, transformers by the local one: the same work either way.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

LAYER_TYPES = (
    "MllamaSelfAttentionDecoderLayer",
    "MllamaCrossAttentionDecoderLayer",
    "MllamaVisionEncoderLayer",
)


def build(args):
    from transformers import MllamaForConditionalGeneration

    # the vision encoder's intermediate features as Meta defines them (tests/fixtures/mllama_reference.py)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
    import mllama_reference  # noqa: F401

    model = MllamaForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="sdpa"
    )
    if args.mode == "lora":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, cfg)
    model.train()
    return model


def batch_rows(args, rank, world):
    b = load_file(args.batches)
    n = b["input_ids"].shape[0] // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in b.items()}


def time_steps(args, model, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
    times, cpu, loss0 = [], [], None
    for i in range(args.warmup + args.steps):
        if dist.is_initialized():
            dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if loss0 is None:
            loss0 = out.loss.item()
        if i >= args.warmup:
            times.append(dt)
            cpu.append(dc)
    return statistics.median(times), statistics.median(cpu), loss0


def shard(model, sharding):
    """FSDP2 per layer + root (DDP for no_shard); DDP if fully_shard refuses the CPU / gloo."""
    from torch.nn.parallel import DistributedDataParallel

    if sharding == "no_shard":
        return DistributedDataParallel(model), "ddp (gloo)"
    try:
        from torch.distributed.fsdp import fully_shard

        # reshard_after_forward=False: each layer stays gathered from its forward to its
        # backward, as our engine keeps its units without activation checkpointing (FSDP2's
        # default, True, gathers every layer a second time in backward: ~10 % of its step here)
        for m in model.modules():
            if type(m).__name__ in LAYER_TYPES:
                fully_shard(m, reshard_after_forward=False)
        fully_shard(model, reshard_after_forward=False)
        return model, "fsdp2 (fully_shard, gloo)"
    except Exception as e:  # noqa: BLE001 - the reason goes into the result
        return DistributedDataParallel(model), f"ddp (gloo; fully_shard failed: {type(e).__name__}: {e})"


def worker(rank, args, port, out):
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world)
    model = build(args)
    model, engine = shard(model, args.sharding)
    batch = batch_rows(args, rank, args.world)
    try:
        median, median_cpu, loss0 = time_steps(args, model, batch)
    except Exception as e:  # noqa: BLE001 - FSDP2 may accept the wrap and fail in the step
        if not engine.startswith("fsdp2"):
            raise
        dist.destroy_process_group()
        raise SystemExit(f"fsdp2 step failed: {type(e).__name__}: {e}")
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"median_s": median, "median_cpu_s": median_cpu, "engine": engine, "loss0": loss0}, f)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batches", required=True)
    p.add_argument("--mode", choices=["lora", "full"], required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sharding", choices=["full_shard", "shard_grad_op", "no_shard"], default="full_shard")
    args = p.parse_args()
    torch.manual_seed(0)
    if args.world == 1:
        torch.set_num_threads(args.threads)
        model = build(args)
        median, median_cpu, loss0 = time_steps(args, model, batch_rows(args, 0, 1))
        res = {"median_s": median, "median_cpu_s": median_cpu, "engine": "transformers+peft (1 process)", "loss0": loss0}
    else:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "result.json")
            mp.spawn(worker, args=(args, port, out), nprocs=args.world, join=True)
            with open(out) as f:
                res = json.load(f)
    res.update(steps=args.steps, threads=args.threads, world=args.world)
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
