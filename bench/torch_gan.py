#!/usr/bin/env python3
"""The PyTorch reference of Gantry's default job, for side-by-side benchmarks.

`--model mlp` (default) is the same model as crates/gantry-models/src/mlp.rs (G: 100-256-512-784, no bias, BatchNorm
momentum 0.01 / eps 1e-3, LeakyReLU 0.3, tanh; D: 784-512-256-1 with biases; Glorot-uniform
kernels, zero biases); `--model dcgan` the same as crates/gantry-models/src/dcgan.rs at 28x28
(G: Linear 100-6272 no bias, BatchNorm, ReLU, ConvTranspose 128-64 4/2/1 no bias, BatchNorm,
ReLU, ConvTranspose 64-1 with bias, tanh; D: Conv 1-64 and 64-128 4/2/1, LeakyReLU 0.2,
Linear 6272-1; weights N(0, 0.02), zero biases). Same loss (non-saturating BCE from logits), same optimiser (Adam,
lr 1e-3, betas 0.5/0.999), same data (the embedded MNIST-10k scaled to [-1, 1], a permutation
per epoch, each rank its slice of the global batch), same schedule as Gantry's default
`simultaneous`: one forward pass of G and of D on the real and the fake batch (apart, so that
G's backward pass through D covers the fake rows only), each network the gradient of its own
loss. Data parallel with torch.distributed DDP (gloo on CPU, NCCL on GPU); launch with
torchrun. DDP keeps its defaults except broadcast_buffers=False (Gantry does not synchronise
BatchNorm statistics every step either).

Prints one JSON object (rank 0): images/s over the timed steps and mean seconds per step by
phase. With DDP the gradient all-reduce runs inside backward, so phases are data, g_forward,
d_forward_backward (D's loss backward, including its all-reduce), g_backward (including G's),
optimizer.
"""

import argparse
import gzip
import json
import os
import struct
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_digits(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    assert magic == 2051, f"{path}: not an IDX image file"
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows * cols)
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0)


def glorot(layer):
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class Generator(nn.Module):
    def __init__(self, latent=100, pixels=784):
        super().__init__()
        self.l0 = nn.Linear(latent, 256, bias=False)
        self.n0 = nn.BatchNorm1d(256, momentum=0.01, eps=1e-3)
        self.l1 = nn.Linear(256, 512, bias=False)
        self.n1 = nn.BatchNorm1d(512, momentum=0.01, eps=1e-3)
        self.l2 = nn.Linear(512, pixels, bias=False)
        for layer in (self.l0, self.l1, self.l2):
            glorot(layer)

    def forward(self, z):
        x = F.leaky_relu(self.n0(self.l0(z)), 0.3)
        x = F.leaky_relu(self.n1(self.l1(x)), 0.3)
        return torch.tanh(self.l2(x))


class DcganGenerator(nn.Module):
    def __init__(self, latent=100):
        super().__init__()
        self.project = nn.Linear(latent, 128 * 7 * 7, bias=False)
        self.n0 = nn.BatchNorm2d(128)
        self.up0 = nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False)
        self.n1 = nn.BatchNorm2d(64)
        self.up1 = nn.ConvTranspose2d(64, 1, 4, 2, 1)
        normal_init(self)

    def forward(self, z):
        x = self.project(z).view(-1, 128, 7, 7)
        x = self.up0(F.relu(self.n0(x)))
        x = self.up1(F.relu(self.n1(x)))
        return torch.tanh(x)


class DcganDiscriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(1, 64, 4, 2, 1)
        self.c1 = nn.Conv2d(64, 128, 4, 2, 1)
        self.out = nn.Linear(128 * 7 * 7, 1)
        normal_init(self)

    def forward(self, x):
        x = F.leaky_relu(self.c0(x), 0.2)
        x = F.leaky_relu(self.c1(x), 0.2)
        return self.out(x.flatten(1))


def normal_init(module):
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(layer.weight, 0.0, 0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class Discriminator(nn.Module):
    def __init__(self, pixels=784):
        super().__init__()
        self.l0 = nn.Linear(pixels, 512)
        self.l1 = nn.Linear(512, 256)
        self.l2 = nn.Linear(256, 1)
        for layer in (self.l0, self.l1, self.l2):
            glorot(layer)

    def forward(self, x):
        x = F.leaky_relu(self.l0(x), 0.3)
        x = F.leaky_relu(self.l1(x), 0.3)
        return self.l2(x)


class Pair(nn.Module):
    """D on the real and the fake batch apart, in one call (so DDP sees one forward pass): G's
    backward pass through D then covers the fake rows only, where through one concatenated
    batch its input-gradient GEMMs would also cover the real rows. Gantry does the same."""

    def __init__(self, d):
        super().__init__()
        self.d = d

    def forward(self, real, fake):
        return self.d(real), self.d(fake)


def compiled_graphs():
    """Forward and backward graphs torch.compile has compiled so far in this process."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return sum(counters["stats"].values()) + sum(counters["aot_autograd"].values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "dcgan"], default="mlp")
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile both networks")
    parser.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile's mode (e.g. max-autotune: Inductor's own C++ GEMM kernels on a CPU)",
    )
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument(
        "--fused", action="store_true", help="Adam with fused=True (one kernel per optimiser)"
    )
    parser.add_argument(
        "--data", default=os.path.join(REPO, "data/mnist-10k/mnist-10k-images-idx3-ubyte.gz")
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = torch.device("cuda", torch.cuda.current_device())
    distributed = world > 1
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    torch.manual_seed(args.seed)
    if args.model == "dcgan":
        g, d = DcganGenerator().to(device), DcganDiscriminator().to(device)
    else:
        g, d = Generator().to(device), Discriminator().to(device)
    d = Pair(d)
    if distributed:
        g = nn.parallel.DistributedDataParallel(g, broadcast_buffers=False)
        d = nn.parallel.DistributedDataParallel(d, broadcast_buffers=False)
    if args.compile:
        g, d = torch.compile(g, mode=args.compile_mode), torch.compile(d, mode=args.compile_mode)
    # fused=True runs on CPU tensors since PyTorch 2.4; None keeps the default (foreach).
    fused = True if args.fused else None
    g_opt = torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.5, 0.999), fused=fused)
    d_opt = torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.5, 0.999), fused=fused)
    g_params, d_params = list(g.parameters()), list(d.parameters())

    digits = load_digits(args.data).to(device)
    if args.model == "dcgan":
        digits = digits.view(-1, 1, 28, 28)
    global_batch = args.batch_size * world
    generator = torch.Generator().manual_seed(args.seed)
    order, cursor = torch.randperm(len(digits), generator=generator), 0
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    phases = dict.fromkeys(
        ["data", "g_forward", "d_forward_backward", "g_backward", "optimizer"], 0.0
    )
    started = None
    graphs_at_warmup = 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync()
            if distributed:
                dist.barrier()
            graphs_at_warmup = compiled_graphs() if args.compile else 0
            started = time.perf_counter()
            phases = dict.fromkeys(phases, 0.0)
        mark = time.perf_counter()

        def lap(name):
            nonlocal mark
            sync()
            now = time.perf_counter()
            phases[name] += now - mark
            mark = now

        if cursor + global_batch > len(digits):
            order, cursor = torch.randperm(len(digits), generator=generator), 0
        indices = order[cursor + rank * args.batch_size : cursor + (rank + 1) * args.batch_size]
        cursor += global_batch
        real = digits[indices.to(device)]
        z = torch.randn(args.batch_size, 100, device=device)
        lap("data")

        with autocast:
            fake = g(z)
            lap("g_forward")
            real_logits, fake_logits = d(real, fake)
            d_loss = F.binary_cross_entropy_with_logits(
                real_logits, torch.ones_like(real_logits)
            ) + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
            g_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
        d_opt.zero_grad(set_to_none=True)
        g_opt.zero_grad(set_to_none=True)
        d_loss.backward(retain_graph=True, inputs=d_params)
        lap("d_forward_backward")
        g_loss.backward(inputs=g_params)
        lap("g_backward")
        d_opt.step()
        g_opt.step()
        lap("optimizer")

    sync()
    seconds = time.perf_counter() - started
    # Graphs torch.compile built during the timed steps (0 when the warm-up covered compiling).
    compiled_while_timed = compiled_graphs() - graphs_at_warmup if args.compile else 0
    if rank == 0:
        flags = ((args.bf16, "-bf16"), (args.compile, "-compile"), (args.fused, "-fused"))
        variant = "".join(suffix for flag, suffix in flags if flag)
        print(
            json.dumps(
                {
                    "system": "pytorch" + variant,
                    "compile": args.compile,
                    "fused_adam": args.fused,
                    "compiled_graphs_while_timed": compiled_while_timed,
                    "model": args.model,
                    "precision": "bf16" if args.bf16 else "fp32",
                    "world_size": world,
                    "batch_size": args.batch_size,
                    "steps": args.steps,
                    "images_per_second": args.steps * global_batch / seconds,
                    "step_seconds": seconds / args.steps,
                    "phases": {k: v / args.steps for k, v in phases.items()},
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                }
            ),
            flush=True,
        )
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
