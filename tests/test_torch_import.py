"""Import from PyTorch: equal forward, live parameters, fx-traced modules, clear errors."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from verikit import Box, Spec, from_torch
from verikit.domains import get_domain
from verikit.domains.box import propagate_box
from verikit.errors import UnsupportedOpsError


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = (x - 0.5) / 0.25  # normalisation inside the model
        h = F.relu(self.bn(self.c1(x)))
        h = h + torch.tanh(self.c2(h))
        h = F.leaky_relu(self.pool(h), 0.1)
        h = torch.cat([h, torch.sigmoid(h)], dim=1)
        return self.fc(torch.flatten(h, 1))


MODULES = {
    "sequential": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 20), nn.ReLU(), nn.Dropout(0.5), nn.Linear(20, 4)), (1, 8, 8)),
    "cnn": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)), (1, 8, 8)),
    "residual-fx": (Residual, (1, 8, 8)),
    "global-pool-sigmoid": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Sigmoid(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                  nn.Linear(3, 2)), (2, 6, 6)),
}


def _randomise_bn(m):
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)


@pytest.mark.parametrize("label", sorted(MODULES))
def test_forward_equals_module_and_box_is_sound(label):
    torch.manual_seed(0)
    make, shape = MODULES[label]
    m = make().eval()
    _randomise_bn(m)
    g = from_torch(m, shape)
    x = torch.rand((3,) + shape)
    torch.testing.assert_close(g.forward(x), m(x), rtol=1e-5, atol=1e-5)
    box = Box.linf_ball(x, 0.05)
    out = propagate_box(g, box)[g.output]
    pts = box.sample(1000, torch.Generator().manual_seed(1)).reshape((-1,) + shape)
    y = m(pts).reshape(1000, 3, -1)
    assert bool(((y >= out.lo - 1e-5) & (y <= out.hi + 1e-5)).all())


def test_parameters_are_live_references():
    m = nn.Sequential(nn.Linear(3, 2))
    g = from_torch(m, (3,))
    with torch.no_grad():
        m[0].weight.mul_(2.0)
    x = torch.randn(4, 3)
    torch.testing.assert_close(g.forward(x), m(x))


def test_box_gradient_reaches_every_parameter_of_a_traced_module():
    torch.manual_seed(0)
    m = Residual().eval()
    g = from_torch(m, (1, 8, 8))
    x = torch.rand(2, 1, 8, 8)
    res = get_domain("box").bound(g, Box.linf_ball(x, 0.01), Spec.robustness(torch.tensor([1, 3]), 5))
    (-res.lower).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


class TwoBadBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.soft, self.gelu = nn.Linear(4, 4), nn.Linear(4, 4), nn.Softmax(dim=1), nn.GELU()

    def forward(self, x):
        return self.soft(self.a(x)) + self.gelu(self.b(x))


def test_unsupported_modules_are_all_listed():
    m = TwoBadBranches()
    with pytest.raises(UnsupportedOpsError) as err:
        from_torch(m, (4,))
    kinds = sorted(op for _, op, _ in err.value.nodes)
    assert kinds == ["GELU", "Softmax"]
