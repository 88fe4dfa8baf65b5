"""Training datasets: MNIST ships with verikit; Fashion-MNIST and CIFAR-10 are downloaded once
into a cache folder ($VERIKIT_DATA, default ~/.cache/verikit)."""
from __future__ import annotations

import os
import pickle
import tarfile
import urllib.request

import numpy as np
import torch

from verikit.datasets import load_mnist, parse_idx
from verikit.errors import VerikitError

DATASETS = ("mnist", "fashion-mnist", "cifar10")
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def cache_dir() -> str:
    d = os.environ.get("VERIKIT_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "verikit")
    os.makedirs(d, exist_ok=True)
    return d


def _download(url: str, path: str) -> str:
    if not os.path.exists(path):
        try:
            tmp = path + ".part"
            urllib.request.urlretrieve(url, tmp)
            os.replace(tmp, path)
        except OSError as e:
            raise VerikitError(f"could not download {url} ({e}); place the file at {path} by hand") from None
    return path


def _fashion(split: str):
    import gzip

    prefix = "train" if split == "train" else "t10k"
    out = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte.gz"
        path = _download(FASHION_URL + name, os.path.join(cache_dir(), "fashion-" + name))
        with open(path, "rb") as f:
            out.append(parse_idx(gzip.decompress(f.read())))
    x = torch.from_numpy(out[0].astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(out[1].astype(np.int64))


def _cifar(split: str):
    path = _download(CIFAR_URL, os.path.join(cache_dir(), "cifar-10-python.tar.gz"))
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    with tarfile.open(path) as tar:
        for n in names:
            d = pickle.load(tar.extractfile(f"cifar-10-batches-py/{n}"), encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0), torch.from_numpy(np.concatenate(ys))


def load_dataset(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, C, H, W) in [0, 1], labels int64) of `name` ∈ DATASETS."""
    if name == "mnist":
        return load_mnist(split)
    if name == "fashion-mnist":
        return _fashion(split)
    if name == "cifar10":
        return _cifar(split)
    raise VerikitError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
