"""What the PyTorch twins of Gantry's model families share: the embedded digits and Gantry's
sampler order (bench/torch_vae.py, bench/torch_pixelcnn.py)."""

import gzip
import struct

import torch

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
