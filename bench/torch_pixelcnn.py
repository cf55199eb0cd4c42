#!/usr/bin/env python3
"""The PyTorch twin of Gantry's PixelCNN, for side-by-side benchmarks of speed and likelihood.

The same model as crates/gantry-models/src/pixelcnn.rs with `output = "bernoulli"`: with C =
--channels (32) and R = --residual-blocks (5), a masked 7x7 convolution of type A, 1-C, padding
3 (the mask is 1 at the kernel positions strictly before the centre in raster order, 0 at and
after it); R residual blocks h = h + conv1x1(ReLU(maskB3x3(ReLU(h)))), type B also keeping the
centre, padding 1, the 1x1 "mix" C-C; then ReLU, 1x1 C-C ("head"), ReLU, 1x1 C-1 ("out"), one
Bernoulli logit per pixel. Every convolution has a bias, and weights and biases start
U(+-1/sqrt(fan_in)) with fan_in = in_channels * k * k, which is nn.Conv2d's default, so plain
nn.Conv2d layers with the mask multiplied into the weight at every forward are the twin.
Matched as well: the loss (per image, summed binary cross-entropy with logits, averaged over the
batch, in nats), the optimiser (Adam, lr 1e-3, betas 0.9/0.999, eps 1e-8), the batch (64) and
steps (2000), the data (the embedded MNIST-10k, trained on the first 9,000 digits only, drawn as
an endless stream of per-epoch permutations, a batch may straddle two epochs; the last 1,000
held out) and the binarisation: dynamic for training, each pixel x = (intensity > u) with
intensity = uint8 / 255 and u ~ U[0, 1) drawn afresh every step, the binary image being both
the network's input and its target; the held-out digits binarised once, with a fixed seed, and
scored exactly (-log p(x), the summed cross-entropy) in nats per image and bits per dimension.

What cannot be matched bit for bit is the randomness: Gantry draws its data order and its
binarisation uniforms from ChaCha streams keyed by (seed, step, row), so its step is independent
of the world size; here the permutations come from a torch.Generator seeded with --seed, the
training uniforms from another (--seed + 1), the held-out binarisation from a third seeded 0
(Gantry's has its own fixed seed), and the initial weights from torch's global generator seeded
with --seed. Same distributions, different draws: the held-out digits are binarised
differently too, so held-out NLLs agree to within the binarisation's noise, not exactly. Gantry
also skips an update whose gradient is not finite; this twin does not (it never happens in
practice at these settings).

Run and timed as bench/torch_vae.py is (bench/twin_data.py's harness: alone or under
torchrun); its JSON line carries the held-out NLL unless --no-eval.
"""

import argparse
import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from twin_data import (
    TRAIN_IMAGES,
    EpochStream,
    add_speed_flags,
    autocast,
    data_parallel,
    load_digits,
    prepare,
    speed_report,
    timed_steps,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The held-out digits' one fixed binarisation.
HELDOUT_BINARISATION_SEED = 0
# Held-out images per forward pass.
EVAL_CHUNK = 250


class MaskedConv2d(nn.Conv2d):
    """A square convolution whose kernel is multiplied by a fixed causal mask at every use;
    `include_centre` makes it type B (the pixel's own features) rather than type A, and
    `cropped` convolves only the kernel rows the mask keeps (see forward)."""

    def __init__(self, inputs, outputs, size, include_centre, cropped=False):
        super().__init__(inputs, outputs, size, padding=size // 2)
        centre = size // 2
        self.cropped = cropped
        self.rows = centre + 1
        mask = torch.zeros(size, size)
        mask[:centre, :] = 1.0
        mask[centre, :centre] = 1.0
        if include_centre:
            mask[centre, centre] = 1.0
        self.register_buffer("mask", mask.view(1, 1, size, size))

    def forward(self, x):
        if not self.cropped:
            return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)
        # The rows below the centre are masked out: convolve the kept rows only (with the full
        # padding, output row r sees input rows r - centre ..= r) and cut the extra rows, as
        # Gantry's PixelCNN does. Same sums, a third fewer multiplications.
        kernel = self.weight[:, :, : self.rows] * self.mask[:, :, : self.rows]
        return F.conv2d(x, kernel, self.bias, padding=self.padding)[:, :, : x.shape[2]]


class Block(nn.Module):
    def __init__(self, channels, cropped=False):
        super().__init__()
        self.masked = MaskedConv2d(channels, channels, 3, include_centre=True, cropped=cropped)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, h):
        return h + self.mix(F.relu(self.masked(F.relu(h))))


class PixelCnn(nn.Module):
    def __init__(self, channels=32, residual_blocks=5, cropped=False):
        super().__init__()
        self.input = MaskedConv2d(1, channels, 7, include_centre=False, cropped=cropped)
        self.blocks = nn.ModuleList(Block(channels, cropped) for _ in range(residual_blocks))
        self.head = nn.Conv2d(channels, channels, 1)
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        """Bernoulli logits (N x 1 x H x W) of every pixel of binary images x."""
        h = self.input(x)
        for block in self.blocks:
            h = block(h)
        return self.out(F.relu(self.head(F.relu(h))))


def nll_nats(model, x, bf16=False):
    """Per-image -log p(x) in nats of binary images x (0/1 floats); with bf16 the network runs
    under autocast and the likelihood takes its fp32 logits, as Gantry's training step does."""
    with autocast(bf16):
        logits = model(x)
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), x, reduction="none")
    return per_pixel.flatten(1).sum(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--residual-blocks", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--seed", type=int, default=42)
    add_speed_flags(parser)
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="weights and activations in torch.channels_last (NHWC), which oneDNN's convolutions "
        "take without reordering",
    )
    parser.add_argument(
        "--cropped-kernels",
        action="store_true",
        help="convolve only the kernel rows the masks keep (the same sums), as Gantry does",
    )
    parser.add_argument(
        "--data", default=os.path.join(REPO, "data/mnist-10k/mnist-10k-images-idx3-ubyte.gz")
    )
    args = parser.parse_args()
    for name in ("channels", "batch_size", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.residual_blocks < 0:
        parser.error("--residual-blocks must be at least 0")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")

    torch.set_num_threads(args.threads)
    world, rank = data_parallel()
    digits = load_digits(args.data)
    assert len(digits) > TRAIN_IMAGES, f"{args.data}: {len(digits)} images, need > {TRAIN_IMAGES}"
    intensities = digits.unsqueeze(1).float() / 255.0  # N x 1 x H x W in [0, 1]
    train, held = intensities[:TRAIN_IMAGES], intensities[TRAIN_IMAGES:]
    pixels = train[0].numel()

    torch.manual_seed(args.seed)
    model = PixelCnn(args.channels, args.residual_blocks, cropped=args.cropped_kernels)
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    trained, optimizer = prepare(model, args, world)
    # Every rank draws the same global order and trains on its slice of each global batch; the
    # binarisation uniforms are each rank's own.
    stream = EpochStream(len(train), torch.Generator().manual_seed(args.seed))
    binarisation = torch.Generator().manual_seed(args.seed + 1 + rank)
    mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)

    def step():
        v = train[stream.take(args.batch_size * world)[mine]]
        x = (v > torch.rand(v.shape, generator=binarisation)).float().contiguous(memory_format=layout)
        loss = nll_nats(trained, x, args.bf16).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed_steps(step, args.warmup, args.steps, world)
    if rank != 0:
        dist.destroy_process_group()
        return
    report = {
        "model": "pixelcnn",
        "channels": args.channels,
        "residual_blocks": args.residual_blocks,
        **speed_report(args, world, seconds),
        "channels_last": args.channels_last,
        "cropped_kernels": args.cropped_kernels,
    }
    if not args.no_eval:
        model.eval()
        fixed = torch.Generator().manual_seed(HELDOUT_BINARISATION_SEED)
        held_binary = (held > torch.rand(held.shape, generator=fixed)).float()
        total = 0.0
        with torch.inference_mode():
            for first in range(0, len(held_binary), EVAL_CHUNK):
                chunk = held_binary[first : first + EVAL_CHUNK]
                total += nll_nats(model, chunk).double().sum().item()
        nll = total / len(held_binary)
        report.update(heldout_nll_nats=nll, bits_per_dim=nll / (pixels * math.log(2.0)))
    print(json.dumps(report), flush=True)
    if world > 1:
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
