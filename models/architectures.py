"""Reference architectures for certified training.

Inputs are images in [0, 1]; every network starts with a fixed normalisation layer, so the
exported ONNX model takes raw pixels and `verikit certify` can use an ε-ball in pixel space.
The normalisation is written with python-float arithmetic (one channel) or a frozen 1x1
grouped convolution (several channels), both of which import as exact affine ops.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from verikit.errors import VerikitError

# per-dataset (input shape, mean per channel, std per channel, classes)
DATASET_SHAPES = {
    "mnist": ((1, 28, 28), (0.1307,), (0.3081,), 10),
    "fashion-mnist": ((1, 28, 28), (0.2860,), (0.3530,), 10),
    "cifar10": ((3, 32, 32), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 10),
}


class Normalize(nn.Module):
    """(x - mean) / std with python-float constants: traced by torch.fx as exact affine ops."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.mean, self.std = float(mean), float(std)

    def forward(self, x):
        return (x - self.mean) / self.std


def normalization(mean, std) -> nn.Module:
    if len(mean) == 1:
        return Normalize(mean[0], std[0])
    c = len(mean)
    conv = nn.Conv2d(c, c, 1, groups=c)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0 / s for s in std]).view(c, 1, 1, 1))
        conv.bias.copy_(torch.tensor([-m / s for m, s in zip(mean, std)]))
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    conv.verikit_frozen = True  # skipped by the IBP initialisation
    return conv


def cnn7(in_shape, num_classes, width=64, linear=512) -> list[nn.Module]:
    """The CNN7 of the SABR paper (Müller et al. 2023): 5 convolutions + 2 linear, BatchNorm."""
    c, h, w = in_shape
    layers: list[nn.Module] = []
    chans = [(c, width, 1), (width, width, 1), (width, 2 * width, 2), (2 * width, 2 * width, 1), (2 * width, 2 * width, 1)]
    for cin, cout, stride in chans:
        layers += [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    layers += [nn.Flatten(), nn.Linear(2 * width * h2 * w2, linear), nn.BatchNorm1d(linear), nn.ReLU(),
               nn.Linear(linear, num_classes)]
    return layers


def cnn_small(in_shape, num_classes) -> list[nn.Module]:
    """Two strided convolutions and two linear layers (~83k parameters on MNIST): trains in
    minutes on a laptop CPU and is small enough for complete (MILP) verification."""
    c, h, w = in_shape
    h2, w2 = ((h - 4) // 2 + 1 - 4) // 2 + 1, ((w - 4) // 2 + 1 - 4) // 2 + 1
    return [nn.Conv2d(c, 16, 4, 2), nn.ReLU(), nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.Flatten(),
            nn.Linear(32 * h2 * w2, 100), nn.ReLU(), nn.Linear(100, num_classes)]


def mlp(in_shape, num_classes, hidden=(200, 200)) -> list[nn.Module]:
    n = 1
    for s in in_shape:
        n *= s
    layers: list[nn.Module] = [nn.Flatten()]
    for h in hidden:
        layers += [nn.Linear(n, h), nn.ReLU()]
        n = h
    return layers + [nn.Linear(n, num_classes)]


ARCHITECTURES: dict[str, Callable] = {"cnn7": cnn7, "cnn-small": cnn_small, "mlp": mlp}


def build_model(name: str, dataset: str = "mnist") -> nn.Sequential:
    """The architecture `name` for `dataset`, with the dataset's normalisation as first layer."""
    if name not in ARCHITECTURES:
        raise VerikitError(f"unknown model {name!r}; available: {', '.join(ARCHITECTURES)}")
    if dataset not in DATASET_SHAPES:
        raise VerikitError(f"unknown dataset {dataset!r}; available: {', '.join(DATASET_SHAPES)}")
    shape, mean, std, classes = DATASET_SHAPES[dataset]
    return nn.Sequential(normalization(mean, std), *ARCHITECTURES[name](shape, classes))
