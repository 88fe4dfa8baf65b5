"""DeepPoly / CROWN / alpha-CROWN on trained MNIST nets: soundness against sampling and a PGD
attack, tightness against Box, and identical bounds for a PyTorch net and its ONNX export."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import verikit
from verikit.datasets import load_mnist
from verikit.domains import get_domain

from conftest import SHARED

MNIST_256X2 = os.path.join(SHARED, "vnncomp2021", "mnistfc", "mnist-net_256x2.onnx")
DOMAINS = [("deeppoly", {}), ("crown", {}), ("crown", {"alpha_steps": 10})]


@pytest.fixture(scope="module")
def mnist():
    x, y = load_mnist("train")
    xt, yt = load_mnist("test")
    return x[:600], y[:600], xt[:16], yt[:16]


@pytest.fixture(scope="module")
def trained_mlp(mnist):
    """A small MLP trained for a few epochs on 600 images (about a second)."""
    x, y, _, _ = mnist
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(784, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(15):
        for i in range(0, 600, 100):
            loss = nn.functional.cross_entropy(net(x[i:i + 100]), y[i:i + 100])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def pgd_min_margins(graph, box, spec, steps=30):
    """Per sample and row: the smallest margin a PGD attack finds inside the box (an upper bound
    on the true minimum, so every sound lower bound must lie below it)."""
    x = box.center.clone()
    best = spec.values(graph(x))
    step = (box.hi - box.lo) / 8
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        margins = spec.values(graph(x))
        grad, = torch.autograd.grad(margins.sum(), x)
        x = torch.minimum(torch.maximum(x - step * grad.sign(), box.lo), box.hi)
        with torch.no_grad():
            best = torch.minimum(best, spec.values(graph(x)))
    return best


def _check_sound(graph, box, spec):
    attacked = pgd_min_margins(graph, box, spec)
    xs = box.sample(64, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sampled = torch.stack([spec.values(graph(x)) for x in xs]).amin(0)
    results = {}
    for name, opts in DOMAINS:
        res = get_domain(name, **opts).bound(graph, box, spec)
        assert (res.lower <= attacked + 1e-5).all(), name
        assert (res.lower <= sampled + 1e-5).all(), name
        assert (res.upper >= sampled - 1e-5).all(), name
        results[(name, bool(opts))] = res
    return results


def test_trained_mlp_sound_and_tighter_than_box(trained_mlp, mnist):
    _, _, xt, yt = mnist
    graph = verikit.from_torch(trained_mlp, (1, 28, 28))
    box = verikit.Box.linf_ball(xt, 0.03)
    spec = verikit.Spec.robustness(yt, 10)
    results = _check_sound(graph, box, spec)
    box_lower = get_domain("box").bound(graph, box, spec).lower
    for key in [("deeppoly", False), ("crown", False)]:
        raw = results[key].info["backsub_lower"]
        assert raw.mean() > box_lower.mean(), key  # clearly tighter on average, before intersecting
    crown, alpha = results[("crown", False)].lower, results[("crown", True)].lower
    assert (alpha >= crown).all()  # alpha-CROWN never looser, on every query


@pytest.mark.skipif(not os.path.exists(MNIST_256X2), reason="vnncomp2021 mnistfc not available")
def test_vnncomp_mnist_256x2_sound(mnist):
    _, _, xt, yt = mnist
    graph = verikit.from_onnx(MNIST_256X2)
    x = xt[:4].reshape((4,) + tuple(graph.input_shape))
    box = verikit.Box.linf_ball(x, 0.02)
    spec = verikit.Spec.robustness(yt[:4], 10)
    results = _check_sound(graph, box, spec)
    box_lower = get_domain("box").bound(graph, box, spec).lower
    assert results[("crown", False)].info["backsub_lower"].mean() > box_lower.mean()


class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, 2, 1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 7 * 7, 10)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(h, 1))


@pytest.mark.parametrize("which", ["mlp", "conv"])
def test_torch_and_onnx_export_give_the_same_bounds(which, trained_mlp, mnist, tmp_path):
    _, _, xt, yt = mnist
    if which == "mlp":
        net = trained_mlp
    else:
        torch.manual_seed(1)
        net = SmallConvNet()
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
        net.eval()
    path = str(tmp_path / f"{which}.onnx")
    torch.onnx.export(net, torch.zeros(1, 1, 28, 28), path, dynamo=False, input_names=["x"], output_names=["y"])
    g_torch = verikit.from_torch(net, (1, 28, 28))
    g_onnx = verikit.from_onnx(path)
    x = xt[:3].reshape((3,) + tuple(g_onnx.input_shape))
    if which == "conv":
        # MNIST's constant background gives exactly tied lower bounds inside a max-pooling
        # window; which tied input the relaxation picks then depends on how the (folded or
        # separate) BatchNorm rounds on this CPU, and a different, equally sound pick moves the
        # bound by ~1e-3. A little jitter breaks the ties, so the two imports are compared.
        jitter = 0.01 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
        x = (x + jitter).clamp(0, 1)
    box = verikit.Box.linf_ball(x, 0.02)
    spec = verikit.Spec.robustness(yt[:3], 10)
    for name, opts in DOMAINS:
        a = get_domain(name, **opts).bound(g_torch, box, spec)
        b = get_domain(name, **opts).bound(g_onnx, box, spec)
        torch.testing.assert_close(a.lower, b.lower, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.upper, b.upper, atol=1e-4, rtol=1e-4)
