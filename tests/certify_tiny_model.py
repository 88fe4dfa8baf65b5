"""A tiny MNIST MLP trained in a few seconds and exported to ONNX, for certifier tests and
benchmarks (no pre-trained file needed)."""
from __future__ import annotations

import torch
from torch import nn


def train_tiny_mnist(path: str, hidden: int = 32, n_train: int = 2000, epochs: int = 8, seed: int = 0,
                     flat_input: bool = False) -> str:
    """Train Flatten-Linear-ReLU-Linear-ReLU-Linear on MNIST's first `n_train` training images
    (about 90% test accuracy) and export it with torch.onnx (dynamo=False)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                        nn.Linear(hidden, 10))
    fit_on_mnist(net, n_train, epochs, lr=3e-3)
    example = torch.zeros(1, 784) if flat_input else torch.zeros(1, 1, 28, 28)
    model = net[1:] if flat_input else net
    torch.onnx.export(model, example, path, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return path


_CACHE: dict = {}


def tiny_mnist_model(flat_input: bool = False) -> str:
    """The tiny model: the committed tests/data/tiny_mnist_mlp.onnx (made by
    `train_tiny_mnist(path)`), else trained once per test process into a temporary directory."""
    import os
    import tempfile

    shipped = os.path.join(os.path.dirname(__file__), "data", "tiny_mnist_mlp.onnx")
    if not flat_input and os.path.exists(shipped):
        return shipped
    if flat_input not in _CACHE:
        d = tempfile.mkdtemp(prefix="verikit-tiny-")
        _CACHE[flat_input] = train_tiny_mnist(os.path.join(d, "tiny_mnist.onnx"), flat_input=flat_input)
    return _CACHE[flat_input]


def fit_on_mnist(net: nn.Module, n_train: int, epochs: int, lr: float = 2e-3) -> nn.Module:
    """Plain Adam training on MNIST's first `n_train` training images, batches of 100 (seed
    torch before calling); returns `net` in eval mode."""
    from verikit.datasets import load_mnist

    x, y = load_mnist("train")
    x, y = x[:n_train], y[:n_train]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(n_train)
        for s in range(0, n_train, 100):
            idx = perm[s:s + 100]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()
