"""ε ramp, learning-rate milestones, IBP initialisation and the warm-up regulariser."""
import math

import pytest
import torch
import torch.nn as nn

import verikit
from verikit.bounds import Box, BoundStore
from verikit.train.config import TrainConfig, paper_lambda
from verikit.train.init import ibp_init
from verikit.train.losses import warmup_regularizer
from verikit.train.schedule import EpsSchedule, lr_at, smoothed_ramp


def test_smoothed_ramp_is_monotone_continuous_and_ends_at_one():
    ts = torch.linspace(0, 1, 2001).tolist()
    vals = [smoothed_ramp(t) for t in ts]
    assert vals[0] == 0.0 and vals[-1] == 1.0
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    assert max(b - a for a, b in zip(vals, vals[1:])) < 2e-3  # no jump
    # polynomial start: much slower than linear early on
    assert smoothed_ramp(0.1) < 0.1 * 0.1
    # continuous slope at the switch point (0.25)
    h = 1e-6
    left = (smoothed_ramp(0.25) - smoothed_ramp(0.25 - h)) / h
    right = (smoothed_ramp(0.25 + h) - smoothed_ramp(0.25)) / h
    assert left == pytest.approx(right, rel=1e-3)


def test_eps_schedule_phases():
    s = EpsSchedule(eps=0.3, warmup_epochs=1, ramp_epochs=2, steps_per_epoch=10)
    assert all(s(0, k) == 0.0 for k in range(10))
    ramp = [s(e, k) for e in (1, 2) for k in range(10)]
    assert all(b >= a for a, b in zip(ramp, ramp[1:])) and 0 < ramp[0] < 0.01
    assert ramp[-1] == pytest.approx(0.3)
    assert s(3, 0) == 0.3 and s(9, 5) == 0.3
    assert s.in_ramp(1) and s.in_ramp(2) and not s.in_ramp(0) and not s.in_ramp(3)


def test_lr_milestones_and_paper_defaults():
    assert lr_at(0, 5e-4, (50, 60)) == 5e-4
    assert lr_at(50, 5e-4, (50, 60)) == pytest.approx(1e-4)
    assert lr_at(65, 5e-4, (50, 60)) == pytest.approx(2e-5)
    c = TrainConfig(epochs=70).resolved()
    assert c.lr_milestones == (50, 60) and c.ramp_epochs == 20 and c.sabr_lambda == 0.4
    assert paper_lambda("mnist", 0.3) == 0.6 and paper_lambda("cifar10", 8 / 255) == 0.7
    assert paper_lambda("cifar10", 2 / 255) == 0.1
    assert TrainConfig(sabr_lambda=1.0).resolved().kind == "ibp"
    assert TrainConfig(sabr_lambda=0.0).resolved().kind == "pgd"
    assert TrainConfig(method="standard").resolved().kind == "standard"


def test_ibp_init_statistics():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(400, 300), nn.Conv2d(8, 16, 3))
    ibp_init(lin, torch.Generator().manual_seed(0))
    for m, fan_in in ((lin[0], 400), (lin[1], 8 * 9)):
        expected = math.sqrt(2 * math.pi) / fan_in
        assert m.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert m.weight.mean().abs().item() < 0.05 * expected * 10
        assert torch.all(m.bias == 0)


def _graph_with_relu():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    return verikit.from_torch(net, (4,))


def test_regularizer_penalises_dead_layers_and_loose_bounds():
    g = _graph_with_relu()
    relu = next(n for n in g.nodes if isinstance(n.op, verikit.ir.ReLU))
    inp = Box(torch.zeros(3, 4), torch.full((3, 4), 0.2))  # input radius 0.1

    def reg(lo, hi):
        store = BoundStore()
        store.update(relu.inputs[0], Box(lo, hi))
        return float(warmup_regularizer(g, store, inp))

    tight_balanced = reg(torch.full((3, 6), -0.1), torch.full((3, 6), 0.1))  # radius 0.1, balanced
    dead = reg(torch.full((3, 6), -0.3), torch.full((3, 6), -0.1))  # radius 0.1, all inactive
    loose = reg(torch.full((3, 6), -5.0), torch.full((3, 6), 5.0))  # radius 5, balanced
    assert tight_balanced == 0.0
    assert dead == pytest.approx(1.0)  # balance term: (τ - 0)/τ
    assert loose == pytest.approx((0.5 - 0.1 / 5.0) / 0.5)  # tightness term only
    assert float(warmup_regularizer(g, None, inp)) == 0.0
