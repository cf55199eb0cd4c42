#!/usr/bin/env python3
"""The PyTorch twin of Gantry's MLP VAE, for side-by-side benchmarks of speed and likelihood.

The same model as crates/gantry-models/src/vae.rs with `vae.kind = "mlp"` and its defaults:
enc_hidden Linear 784-400, ReLU; enc_mu and enc_log_var Linear 400-20; dec_hidden Linear
20-400, ReLU; dec_out Linear 400-784, the per-pixel Bernoulli logits of p(x|z). Every layer has
a bias and PyTorch's default initialisation (weights and biases U(+-1/sqrt(fan_in))), which is
what Gantry uses, so plain nn.Linear layers are the twin. Matched as well: the loss (per image,
summed binary cross-entropy with logits of the intensities plus the analytic
KL(N(mu, sigma^2) || N(0, I)), averaged over the batch, in nats), the reparameterisation
z = mu + exp(log_var / 2) * eps with eps ~ N(0, I), the optimiser (Adam, lr 1e-3, betas
0.9/0.999, eps 1e-8), the batch (128) and steps (3000), and the data: the embedded MNIST-10k,
pixel intensities uint8 / 255 in [0, 1], trained on the first 9,000 digits only, drawn as an
endless stream of per-epoch permutations (a batch may straddle two epochs; nothing is dropped),
the last 1,000 held out. The held-out evaluation is Gantry's too: the negative ELBO with one
noise draw per image, and the importance-weighted bound on -log p(x) with K samples (IWAE),
log p(x) ~ logsumexp_k[log p(x|z_k) + log N(z_k; 0, I) - log N(z_k; mu, sigma^2)] - log K
(the 2 pi terms cancel), in nats per image and bits per dimension.

What cannot be matched bit for bit is the randomness: Gantry draws its data order and its
noise eps from ChaCha streams keyed by (seed, step, row), so its step is independent of the
world size; here the permutations come from a torch.Generator seeded with --seed, the training
noise from another (--seed + 1), the evaluation noise from a third with a fixed seed, and the
initial weights from torch's global generator seeded with --seed. Same distributions, different
draws, so the two runs agree in distribution, not value by value. Gantry also skips an update
whose gradient is not finite; this twin does not (it never happens in practice at these
settings).

CPU, --threads intra-op threads per rank (default 1); alone, or data parallel under torchrun
(DDP over gloo, each rank --batch-size rows of every global batch, as Gantry's ranks). Only the
training steps after --warmup are timed. Prints one JSON object (rank 0): images/s of the
group over the timed steps, and the held-out likelihood unless --no-eval.
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

# The evaluation's importance-sample noise has a generator of its own (Gantry's IMPORTANCE_SEED).
IMPORTANCE_SEED = 0x69776165


class Vae(nn.Module):
    def __init__(self, pixels=784, hidden=400, latent=20, bf16=False):
        super().__init__()
        self.bf16 = bf16
        self.enc_hidden = nn.Linear(pixels, hidden)
        self.enc_mu = nn.Linear(hidden, latent)
        self.enc_log_var = nn.Linear(hidden, latent)
        self.dec_hidden = nn.Linear(latent, hidden)
        self.dec_out = nn.Linear(hidden, pixels)

    def encode(self, x):
        h = F.relu(self.enc_hidden(x))
        return self.enc_mu(h), self.enc_log_var(h)

    def decode(self, z):
        return self.dec_out(F.relu(self.dec_hidden(z)))

    def forward(self, x, eps):
        """(decoder logits, mu, log_var) of one training pass: z = mu + exp(log_var / 2) eps.
        With bf16, encoder and decoder run under autocast and z, the KL term and the likelihood
        take fp32 values, as Gantry's training step does."""
        with autocast(self.bf16):
            mu, log_var = self.encode(x)
        mu, log_var = mu.float(), log_var.float()
        with autocast(self.bf16):
            logits = self.decode(mu + (0.5 * log_var).exp() * eps)
        return logits.float(), mu, log_var


def reconstruction_nats(logits, x):
    """Per-image -log p(x|z): summed Bernoulli cross-entropy of intensities `x`."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)


def kl_nats(mu, log_var):
    """Per-image KL(N(mu, sigma^2) || N(0, I))."""
    return -0.5 * (1.0 + log_var - mu.square() - log_var.exp()).sum(1)


def heldout(model, x, k, latent):
    """(negative ELBO, importance-weighted -log p(x) bound), nats per image, for intensities x."""
    generator = torch.Generator().manual_seed(IMPORTANCE_SEED)
    with torch.inference_mode():
        mu, log_var = model.encode(x)
        std = (0.5 * log_var).exp()
        kl = kl_nats(mu, log_var)
        log_weights = torch.empty(x.shape[0], k)
        neg_elbo = None
        for j in range(k):
            eps = torch.randn(x.shape[0], latent, generator=generator)
            z = mu + std * eps
            log_px_z = -reconstruction_nats(model.decode(z), x)
            if j == 0:
                neg_elbo = (kl - log_px_z).double().mean().item()
            # log N(z; 0, I) - log N(z; mu, sigma^2); the 2 pi terms cancel.
            log_pz = -0.5 * z.square().sum(1)
            log_qz = -0.5 * (eps.square() + log_var).sum(1)
            log_weights[:, j] = log_px_z + log_pz - log_qz
        log_px = torch.logsumexp(log_weights.double(), 1) - math.log(k)
        return neg_elbo, -log_px.mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128, help="per rank")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--importance-samples", type=int, default=100, help="K of the IWAE bound")
    add_speed_flags(parser)
    parser.add_argument(
        "--data", default=os.path.join(REPO, "data/mnist-10k/mnist-10k-images-idx3-ubyte.gz")
    )
    args = parser.parse_args()
    for name in ("batch_size", "steps", "threads", "importance_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")

    torch.set_num_threads(args.threads)
    world, rank = data_parallel()
    digits = load_digits(args.data)
    assert len(digits) > TRAIN_IMAGES, f"{args.data}: {len(digits)} images, need > {TRAIN_IMAGES}"
    intensities = digits.reshape(len(digits), -1).float() / 255.0
    train, held = intensities[:TRAIN_IMAGES], intensities[TRAIN_IMAGES:]
    pixels, latent = train.shape[1], 20

    torch.manual_seed(args.seed)
    model = Vae(pixels=pixels, hidden=400, latent=latent, bf16=args.bf16)
    trained, optimizer = prepare(model, args, world)
    # Every rank draws the same global order and trains on its slice of each global batch; the
    # noise is each rank's own.
    stream = EpochStream(len(train), torch.Generator().manual_seed(args.seed))
    noise = torch.Generator().manual_seed(args.seed + 1 + rank)
    mine = slice(rank * args.batch_size, (rank + 1) * args.batch_size)

    def step():
        x = train[stream.take(args.batch_size * world)[mine]]
        eps = torch.randn(args.batch_size, latent, generator=noise)
        # DDP's hooks run on the wrapper's forward: encode and decode go through it as one call.
        logits, mu, log_var = trained(x, eps)
        loss = (reconstruction_nats(logits, x) + kl_nats(mu, log_var)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    seconds = timed_steps(step, args.warmup, args.steps, world)
    if rank != 0:
        dist.destroy_process_group()
        return
    report = {"model": "vae", **speed_report(args, world, seconds)}
    if not args.no_eval:
        model.eval()
        neg_elbo, nll = heldout(model, held, args.importance_samples, latent)
        report.update(
            heldout_neg_elbo_nats=neg_elbo,
            heldout_nll_nats=nll,
            bits_per_dim=nll / (pixels * math.log(2.0)),
        )
    print(json.dumps(report), flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
