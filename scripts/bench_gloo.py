"""The peer of `trainer bench collectives`: torch.distributed with gloo on the same sizes.

Run: .venv/bin/torchrun --standalone --nproc-per-node 2 scripts/bench_gloo.py [--sizes 1,16,64,256] [--reps 5]
Prints one JSON object per measurement on rank 0, in the trainer's format (backend "gloo").
"""
import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,16,64,256")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    w, rank = dist.get_world_size(), dist.get_rank()
    for mib in [int(s) for s in args.sizes.split(",")]:
        n = max(1, (mib << 20) // 4 // w)
        big = torch.ones(n * w)
        small = torch.ones(n)
        for op in ["all_gather", "reduce_scatter", "all_reduce"]:
            times = []
            # (as many untimed runs as ours takes, trainer/src/bench/collectives.rs WARMUPS)
            for i in range(args.reps + 3):
                dist.barrier()
                t = time.perf_counter()
                if op == "all_gather":
                    dist.all_gather_into_tensor(big, small)
                elif op == "reduce_scatter":
                    # the faster of gloo's two ways: its reduce_scatter_tensor (torch >= 2.3, an
                    # all_reduce inside too) took the same at 1 MiB and 1.2x as long at 16 MiB
                    # (median of 10, 2 ranks, 2026-11-27, this machine)
                    dist.all_reduce(big)
                    small.copy_(big[rank * n:(rank + 1) * n])
                else:
                    dist.all_reduce(big)
                if i >= 3:
                    times.append(time.perf_counter() - t)
            sec = statistics.median(times)
            nbytes = n * w * 4
            factor = (w - 1) / w * (2 if op == "all_reduce" else 1)
            if rank == 0:
                print(json.dumps({"op": op, "backend": "gloo", "world": w, "bytes": nbytes,
                                  "seconds": sec, "busbw_gbps": round(nbytes * factor / sec / 1e9, 3)}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
