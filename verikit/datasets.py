"""Datasets. MNIST ships inside the package (the original gzip IDX files, sha256-checked at
load time), so everything works offline."""
from __future__ import annotations

import gzip
import hashlib
from importlib import resources

import numpy as np
import torch

from .errors import VerikitError

# sha256 of the *decompressed* IDX files
MNIST_FILES = {
    ("train", "images"): ("train-images-idx3-ubyte.gz", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    ("train", "labels"): ("train-labels-idx1-ubyte.gz", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    ("test", "images"): ("t10k-images-idx3-ubyte.gz", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte.gz", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}


def parse_idx(raw: bytes) -> np.ndarray:
    """Decode an IDX file (the MNIST container format: magic, dims, big-endian uint8 data)."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise VerikitError("not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise VerikitError(f"IDX file holds {data.size} values, its header promises {int(np.prod(dims))}")
    return data.reshape(dims)


def read_checked_gzip(data: bytes, sha256: str, what: str) -> bytes:
    raw = gzip.decompress(data)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise VerikitError(f"{what}: checksum mismatch (sha256 {digest}, expected {sha256}); the file is corrupt")
    return raw


def load_mnist(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """(images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)) from the bundled files."""
    if split not in ("train", "test"):
        raise VerikitError(f"unknown split {split!r}; use 'train' or 'test'")
    out = []
    for kind in ("images", "labels"):
        fname, sha = MNIST_FILES[(split, kind)]
        blob = resources.files("verikit").joinpath("data", "mnist", fname).read_bytes()
        out.append(parse_idx(read_checked_gzip(blob, sha, f"bundled MNIST {fname}")))
    images = torch.from_numpy(out[0].astype(np.float32) / 255.0).unsqueeze(1)
    labels = torch.from_numpy(out[1].astype(np.int64))
    return images, labels
