"""Datasets for certification and training: MNIST (bundled), Fashion-MNIST and CIFAR-10 (downloaded once
into a cache and checksum-verified), or any `.npz` file.

Cache directory: `$VERIKIT_DATA`, default `~/.cache/verikit/data` (or `$XDG_CACHE_HOME/verikit/data`).
Files are downloaded from their canonical locations, verified against the published MD5
checksums, and only then decoded. CIFAR-10's python batches are pickles: they are unpickled only
after the archive's checksum matched, and even then with an unpickler that accepts nothing but
numpy arrays, lists, dicts and strings.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from verikit.datasets import load_mnist, parse_idx
from verikit.errors import VerikitError

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {  # split, kind -> (file name, md5 of the .gz file as published)
    ("train", "images"): ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("train", "labels"): ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("test", "images"): ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}

DATASETS = ("mnist", "fashion-mnist", "cifar10")


def data_dir() -> Path:
    env = os.environ.get("VERIKIT_DATA")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "verikit" / "data"


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """`dest` if it exists with the right checksum, else download `url` to it and verify.
    A file with a wrong checksum is never used (a corrupt download is deleted)."""
    if dest.exists():
        if _md5(dest) == md5:
            return dest
        raise VerikitError(f"{dest}: checksum mismatch (md5 {_md5(dest)}, expected {md5}); "
                           f"delete the file to download it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as f:
            for block in iter(lambda: resp.read(1 << 20), b""):
                f.write(block)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        raise VerikitError(f"cannot download {url} ({getattr(e, 'reason', e)}); offline? put the file at {dest} "
                           f"(or set VERIKIT_DATA to a directory holding it)") from None
    got = _md5(tmp)
    if got != md5:
        tmp.unlink(missing_ok=True)
        raise VerikitError(f"download of {url} is corrupt (md5 {got}, expected {md5}); not used")
    tmp.replace(dest)
    return dest


def load_fashion_mnist(split: str = "test", root: Optional[Path] = None):
    _check_split(split)
    root = Path(root) if root is not None else data_dir() / "fashion-mnist"
    arrays = []
    for kind in ("images", "labels"):
        name, md5 = FASHION_MNIST_FILES[(split, kind)]
        path = fetch(FASHION_MNIST_URL + name, root / name, md5)
        arrays.append(parse_idx(gzip.decompress(path.read_bytes())))
    images = torch.from_numpy(arrays[0].astype(np.float32) / 255.0).unsqueeze(1)
    return images, torch.from_numpy(arrays[1].astype(np.int64))


class _ArrayUnpickler(pickle.Unpickler):
    """Accepts only what CIFAR-10 batches contain (numpy arrays); anything else is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"),
               ("_codecs", "encode")}  # how protocol-2 pickles written by Python 3 store bytes

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_cifar10(split: str = "test", root: Optional[Path] = None):
    _check_split(split)
    root = Path(root) if root is not None else data_dir() / "cifar10"
    name, md5 = CIFAR10_ARCHIVE
    archive = fetch(CIFAR10_URL, root / name, md5)  # verified before anything is unpickled
    xs, ys = [], []
    with tarfile.open(archive, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for batch in CIFAR10_BATCHES[split]:
            if batch not in members:
                raise VerikitError(f"{archive}: no {batch} inside the archive")
            raw = tar.extractfile(members[batch]).read()
            try:
                d = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
            except Exception as e:
                raise VerikitError(f"{archive}: cannot decode {batch} ({e})") from None
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    images = torch.from_numpy(np.concatenate(xs).astype(np.float32) / 255.0)
    return images, torch.from_numpy(np.concatenate(ys))


def load_npz(path: str):
    """`x`/`images` (N, ...) (uint8 scaled to [0, 1], floats as they are) and `y`/`labels` (N,)."""
    if not os.path.exists(path):
        raise VerikitError(f"dataset file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            xk = next((k for k in ("x", "images", "x_test", "data") if k in keys), None)
            yk = next((k for k in ("y", "labels", "y_test", "targets") if k in keys), None)
            if xk is None or yk is None:
                raise VerikitError(f"{path}: expected arrays 'x' and 'y' (or 'images'/'labels'), found {sorted(keys)}")
            x, y = f[xk], f[yk]
    except (OSError, ValueError) as e:
        raise VerikitError(f"{path}: not a readable .npz file ({e})") from None
    if x.shape[0] != y.reshape(-1).shape[0]:
        raise VerikitError(f"{path}: {x.shape[0]} inputs but {y.reshape(-1).shape[0]} labels")
    xf = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    return torch.from_numpy(xf), torch.from_numpy(y.reshape(-1).astype(np.int64))


def load_dataset(name: str, split: str = "test"):
    """(images (N, ...) float32, labels (N,) int64) for a dataset name or an .npz path."""
    if name == "mnist":
        return load_mnist(split)
    if name in ("fashion-mnist", "fashion_mnist", "fmnist"):
        return load_fashion_mnist(split)
    if name in ("cifar10", "cifar-10"):
        return load_cifar10(split)
    if name.endswith(".npz") or os.path.exists(name):
        return load_npz(name)
    raise VerikitError(f"unknown dataset {name!r}; use one of {', '.join(DATASETS)} or a .npz file")


def fit_to_model(images: torch.Tensor, input_shape: tuple) -> torch.Tensor:
    """Reshape data to the model's per-sample input shape: same layout, channels-last
    (N, H, W, C) transposed, or flattened when only the element count agrees."""
    shape = tuple(input_shape)
    if tuple(images.shape[1:]) == shape:
        return images
    if images.dim() == 4 and len(shape) == 3 and tuple(images.shape[1:]) == (shape[1], shape[2], shape[0]):
        return images.permute(0, 3, 1, 2).contiguous()
    if images[0].numel() == int(np.prod(shape)):
        return images.reshape((images.shape[0],) + shape)
    from verikit.errors import ShapeError

    raise ShapeError(f"dataset samples have shape {tuple(images.shape[1:])}, the model expects {shape}")


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise VerikitError(f"unknown split {split!r}; use 'train' or 'test'")
