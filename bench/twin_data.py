"""What the PyTorch twins of Gantry's model families share (bench/torch_vae.py,
bench/torch_pixelcnn.py): the embedded digits, Gantry's sampler order, and the data-parallel
timing harness `make bench` runs them through (torchrun + DDP over gloo at world > 1, each rank
its slice of the global batch; untimed warm-up steps; fused Adam or torch.compile on request)."""

import gzip
import os
import struct
import time

import torch
import torch.distributed as dist
import torch.nn as nn

# The first this many digits are the training set; the rest (the last 1,000) are held out.
TRAIN_IMAGES = 9000


def load_digits(path):
    """The IDX image file at `path` (gzip) as an N x rows x cols uint8 tensor."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, n, rows, cols = struct.unpack(">IIII", data[:16])
    assert magic == 2051, f"{path}: not an IDX image file"
    pixels = torch.frombuffer(bytearray(data[16 : 16 + n * rows * cols]), dtype=torch.uint8)
    return pixels.view(n, rows, cols)


class EpochStream:
    """Gantry's sampler order: an endless stream of positions cut into epochs, each epoch a
    fresh permutation of range(n); `take(k)` returns the next k example indices."""

    def __init__(self, n, generator):
        self.n, self.generator = n, generator
        self.order, self.cursor = torch.randperm(n, generator=generator), 0

    def take(self, k):
        parts = []
        while k > 0:
            if self.cursor == self.n:
                self.order, self.cursor = torch.randperm(self.n, generator=self.generator), 0
            m = min(k, self.n - self.cursor)
            parts.append(self.order[self.cursor : self.cursor + m])
            self.cursor += m
            k -= m
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def data_parallel():
    """(world, rank) of this process: under torchrun (WORLD_SIZE > 1) it joins the gloo group,
    as PyTorch DDP on CPU does; alone it is (1, 0)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    return world, rank


def add_speed_flags(parser):
    """The flags `make bench` (bench/compare.py) runs a twin with, shared with torch_gan.py."""
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps before the timed ones")
    parser.add_argument(
        "--fused", action="store_true", help="Adam with fused=True (one kernel per optimiser)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument(
        "--bf16", action="store_true",
        help="the training forward passes under bf16 autocast (Gantry's train.precision = bf16: "
             "the same layers in bf16, losses from fp32 outputs)",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")


def autocast(enabled):
    """The CPU bf16 autocast region of `--bf16` (a no-op region when not enabled)."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def prepare(model, args, world):
    """The model as trained (DDP-wrapped at world > 1, then compiled if asked) and its Adam."""
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if args.compile:
        trained = torch.compile(trained)
    # fused=True runs on CPU tensors since PyTorch 2.4; None keeps the default (foreach).
    optimizer = torch.optim.Adam(
        trained.parameters(), lr=args.lr, betas=(0.9, 0.999), fused=True if args.fused else None
    )
    return trained, optimizer


def timed_steps(step, warmup, steps, world):
    """Runs `warmup` untimed steps, then `steps` timed ones (each rank starts the clock after a
    barrier); returns the timed seconds. `step()` trains one step."""
    for _ in range(warmup):
        step()
    if world > 1:
        dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - started


def speed_report(args, world, seconds):
    """The fields of a twin's JSON line that bench/compare.py reads, as torch_gan.py prints them:
    images/s of the whole group over the timed steps and seconds per step."""
    flags = (
        (args.bf16, "-bf16"),
        (args.compile, "-compile"),
        (args.fused, "-fused"),
        (getattr(args, "channels_last", False), "-channels-last"),
        (getattr(args, "cropped_kernels", False), "-cropped"),
    )
    variant = "".join(s for flag, s in flags if flag)
    return {
        "system": "pytorch" + variant,
        "compile": args.compile,
        "fused_adam": args.fused,
        "precision": "bf16" if args.bf16 else "fp32",
        "world_size": world,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "train_seconds": seconds,
        "images_per_second": args.steps * args.batch_size * world / seconds,
        "step_seconds": seconds / args.steps,
        "phases": {},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
