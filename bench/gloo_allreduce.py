#!/usr/bin/env python3
"""All-reduce bus bandwidth of PyTorch's gloo backend on CPU over loopback.

Mirrors crates/gantry-collective/benches/ring_allreduce.rs: ranks are
processes, float32 tensors of the given MiB sizes, per iteration a barrier then
a timed all_reduce(SUM); per iteration the slowest rank counts, median over
iterations, busbw = bytes * 2(n-1)/n / time. Prints
`gloo <ranks> <MiB> <busbw GB/s> <median ms>` per line.
"""

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, sizes_mb, iters: int, warmup: int) -> None:
    # Loopback only, and one compute thread per rank like the Rust ranks.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    buf = torch.ones(max(sizes_mb) * 2**20 // 4, dtype=torch.float32)
    for mb in sizes_mb:
        data = buf[: mb * 2**20 // 4]
        times = []
        for i in range(warmup + iters):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(data)
            dt = time.perf_counter() - t0
            if i >= warmup:
                times.append(dt)
        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if rank == 0:
            median = statistics.median(t.tolist())
            busbw = mb * 2**20 * 2 * (world - 1) / world / median / 1e9
            print(f"gloo\t{world}\t{mb}\t{busbw:.3f}\t{median * 1e3:.2f}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--sizes-mb", default="1,4,8,16,64,256")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args()
    sizes = [int(x) for x in a.sizes_mb.split(",")]
    for world in (int(x) for x in a.ranks.split(",")):
        mp.spawn(worker, args=(world, free_port(), sizes, a.iters, a.warmup), nprocs=world)


if __name__ == "__main__":
    main()
