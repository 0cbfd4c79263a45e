"""The peer of `trainer bench checkpoint`: torch.distributed.checkpoint (DCP) saving and loading the
same state (16 flat fp32 tensors x 3 states, MiB in total, each rank holding its 1/W element range
as a DTensor sharded on dim 0: what FSDP2 hands to DCP), gloo, CPU, the default FileSystemWriter
(one file per rank, fsync). Load reads from the page cache, as ours does.

Run: .venv/bin/torchrun --standalone --nproc-per-node 2 scripts/bench_checkpoint.py [--mib 1024] [--reps 3] [--dir D]
Prints one JSON object per measurement on rank 0, in the trainer's format with "impl": "dcp".
"""
import argparse
import json
import os
import shutil
import statistics
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard


def state(mesh, groups, numel, w, rank, fill):
    shard = (numel + w - 1) // w
    local = max(0, min(numel, (rank + 1) * shard) - rank * shard)
    return {f"unit{g}/0/{s}": DTensor.from_local(fill(local), mesh, [Shard(0)], run_check=False,
                                                  shape=torch.Size([numel]), stride=(1,))
            for g in range(groups) for s in ("param", "exp_avg", "exp_avg_sq")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default="bench-results/checkpoint-tmp/dcp")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    w, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (w,))
    numel = (args.mib << 20) // 12 // args.groups
    mine = state(mesh, args.groups, numel, w, rank, lambda n: torch.rand(n))
    saves, loads, nbytes = [], [], 0
    for i in range(args.reps):
        path = os.path.join(args.dir, f"step-{i}")
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()
        t = time.perf_counter()
        dcp.save(mine, checkpoint_id=path)
        dist.barrier()
        saves.append(time.perf_counter() - t)
        if rank == 0:
            nbytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".distcp"))
        target = state(mesh, args.groups, numel, w, rank, lambda n: torch.zeros(n))
        dist.barrier()
        t = time.perf_counter()
        dcp.load(target, checkpoint_id=path)
        dist.barrier()
        loads.append(time.perf_counter() - t)
        assert all(torch.equal(target[k].to_local(), mine[k].to_local()) for k in mine)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
    if rank == 0:
        for op, times in (("save", saves), ("load", loads)):
            sec = statistics.median(times)
            print(json.dumps({"bench": "checkpoint", "impl": "dcp", "op": op, "bytes": nbytes, "seconds": sec,
                              "gbps": round(nbytes / sec / 1e9, 3), "world": w, "reps": args.reps}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
