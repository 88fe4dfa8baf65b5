"""The losses of the registry's methods: each reduces to the plain loss where it should
(MTL-IBP α = 0 is PGD training, α = 1 IBP, ...), gradients reach every parameter, and the
differentiable CROWN-IBP domain is sound (sampling, ε = 0, exact oracle) and gradient-checked."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import verikit
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.train.config import TrainConfig
from verikit.train.loop import Trainer
from verikit.train.losses import margin_spec
from verikit.train.methods import StepInputs, available_methods, get_method

from exact_oracle import exact_min
from test_train_bitwise import _data


def trainer(model="cnn-small", **kw):
    cfg = TrainConfig(model=model, eps=0.1, epochs=4, batch_size=32, eval_samples=16, seed=0, **kw)
    return Trainer(cfg, "/tmp/verikit-methods-unused", data=_data(64), log=lambda s: None)


def method_loss(tr, name, eps=0.08, seed=3, **options):
    """The method's loss on the trainer's first batch, the attack's random start fixed by `seed`."""
    m = get_method(name, "mnist", 0.1, **options)
    m.setup(tr)  # as the Trainer does before any step
    tr.model.train()
    gen = torch.Generator().manual_seed(seed)
    return m.loss(StepInputs(tr, tr.xtr[:32], tr.ytr[:32], eps, 0.1, 1, gen))


@pytest.fixture(scope="module")
def tr():
    torch.manual_seed(0)
    return trainer()


@pytest.mark.parametrize("name", ["mtl-ibp", "exp-ibp", "cc-ibp"])
def test_expressive_losses_reduce_to_ibp_at_alpha_one(tr, name):
    assert torch.equal(method_loss(tr, name, alpha=1.0).loss, method_loss(tr, "ibp").loss)


@pytest.mark.parametrize("name", ["mtl-ibp", "exp-ibp", "cc-ibp"])
def test_expressive_losses_reduce_to_pgd_training_at_alpha_zero(tr, name):
    """Same attack (8 steps, same random start): the PGD method's loss is CE(-margins) of a
    zero-width box at the attack's point, the same number as CE(logits) up to rounding."""
    ours, pgd = method_loss(tr, name, alpha=0.0).loss, method_loss(tr, "pgd").loss
    assert torch.allclose(ours, pgd, rtol=1e-5, atol=1e-6), (float(ours), float(pgd))
    assert not torch.allclose(ours, method_loss(tr, "ibp").loss, rtol=1e-2)  # the two ends differ


def test_expressive_losses_in_between(tr):
    a = 0.3
    adv, ibp = method_loss(tr, "mtl-ibp", alpha=0.0).loss, method_loss(tr, "ibp").loss
    assert torch.allclose(method_loss(tr, "mtl-ibp", alpha=a).loss, (1 - a) * adv + a * ibp, rtol=1e-5)
    assert torch.allclose(method_loss(tr, "exp-ibp", alpha=a).loss, adv ** (1 - a) * ibp ** a, rtol=1e-5)
    cc = method_loss(tr, "cc-ibp", alpha=a).loss  # convex in the margins: between the two ends
    assert min(adv, ibp) - 1e-5 <= cc <= (1 - a) * adv + a * ibp + 1e-5  # CE is convex in its logits


def test_crown_ibp_reduces_to_ibp_clean_and_crown(tr):
    ibp = method_loss(tr, "ibp").loss
    only_ibp = dict(beta_start=0.0, beta_end=0.0, kappa_start=0.0, kappa_end=0.0)
    assert torch.equal(method_loss(tr, "crown-ibp", **only_ibp).loss, ibp)
    clean = dict(beta_start=0.0, beta_end=0.0, kappa_start=1.0, kappa_end=1.0)
    with torch.no_grad():
        ce = F.cross_entropy(tr.model(tr.xtr[:32]), tr.ytr[:32])
    assert torch.allclose(method_loss(tr, "crown-ibp", **clean).loss, ce, rtol=1e-6)
    crown_only = dict(beta_start=1.0, beta_end=1.0, kappa_start=0.0, kappa_end=0.0)
    ball = Box.linf_ball(tr.xtr[:32], 0.08)
    spec = margin_spec(tr.ytr[:32], 10)
    low = get_domain("crown-ibp").bound(tr.train_graph, ball, spec).info["crown_ibp_lower"]
    assert torch.allclose(method_loss(tr, "crown-ibp", **crown_only).loss, F.cross_entropy(-low, tr.ytr[:32]))


def test_crown_ibp_schedule_follows_the_eps_ramp():
    m = get_method("crown-ibp")
    assert m.weights(0.0) == (1.0, 1.0) and m.weights(1.0) == (0.0, 0.0)
    assert m.weights(0.25) == (0.75, 0.75)
    s = StepInputs(None, None, None, 0.05, 0.1, 1)
    assert s.progress == 0.5


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    t = trainer(model="mlp")
    out = method_loss(t, name, eps=0.05)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for pname, p in t.model.named_parameters():
        assert p.grad is not None and bool((p.grad != 0).any()), f"{name}: no gradient for {pname}"


# ---- the CROWN-IBP domain ---------------------------------------------------------------------

def tiny_net(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)).to(dtype)


def test_crown_ibp_bounds_hold_on_samples_and_collapse_at_eps_zero():
    net = tiny_net(dtype=torch.float32)
    graph = verikit.from_torch(net, (3,))
    x = torch.randn(6, 3)
    spec = verikit.Spec.robustness(net(x).argmax(1), 3)
    dom = get_domain("crown-ibp")
    ball = Box.linf_ball(x, 0.3, data_range=(-10, 10))
    res = dom.bound(graph, ball, spec)
    box = get_domain("box").bound(graph, ball, spec)
    assert bool((res.lower >= box.lower - 1e-6).all())  # intersected with the interval bounds
    raw = res.info["crown_ibp_lower"]
    ys = net(ball.sample(4000, torch.Generator().manual_seed(1)))
    for b in range(6):
        m = spec.select([b]).values(ys[:, b].detach())
        assert bool((m >= raw[b] - 1e-5).all()) and bool((m >= res.lower[b] - 1e-5).all())
        assert bool((m <= res.upper[b] + 1e-5).all())
    point = dom.bound(graph, Box(x, x), spec)
    exact = spec.values(net(x).detach())
    assert torch.allclose(point.info["crown_ibp_lower"], exact, atol=1e-5)


def test_crown_ibp_is_never_below_the_exact_minimum():
    net = tiny_net(seed=2)
    graph = verikit.from_torch(net, (3,))
    x = torch.randn(4, 3, dtype=torch.float64)
    ball = Box.linf_ball(x, 0.4, data_range=(-10, 10))
    raw = get_domain("crown-ibp").bound(graph, ball, None).info["crown_ibp_lower"]
    for b in range(4):
        for j in range(3):
            c = torch.zeros(3, dtype=torch.float64)
            c[j] = 1
            exact = exact_min(graph, ball.lo[b].numpy(), ball.hi[b].numpy(), c.numpy())
            assert float(raw[b, j].detach()) <= exact + 1e-7
    # and it is tighter than IBP on some row of this net (else the domain would be pointless)
    box = get_domain("box").bound(graph, ball, None).lower
    assert bool((raw > box + 1e-6).any())


def test_crown_ibp_gradcheck_float64():
    """d(lower bound)/d(weights, input) by autograd equals finite differences (tiny net, float64)."""
    net = tiny_net(seed=4)
    graph = verikit.from_torch(net, (3,))
    linears = [n.op for n in graph.nodes if isinstance(n.op, verikit.ir.Linear)]
    x = torch.randn(2, 3, dtype=torch.float64)
    y = torch.tensor([0, 2])
    spec = margin_spec(y, 3, dtype=torch.float64)
    dom = get_domain("crown-ibp")
    saved = [(op.weight, op.bias) for op in linears]

    def lower(x0, w0, b0, w2):
        linears[0].weight, linears[0].bias, linears[2].weight = w0, b0, w2
        try:
            return dom.bound(graph, Box(x0 - 0.25, x0 + 0.25), spec).info["crown_ibp_lower"]
        finally:
            for op, (w, b) in zip(linears, saved):
                op.weight, op.bias = w, b

    args = (x.requires_grad_(True), saved[0][0].detach().clone().requires_grad_(True),
            saved[0][1].detach().clone().requires_grad_(True), saved[2][0].detach().clone().requires_grad_(True))
    assert torch.autograd.gradcheck(lower, args, eps=1e-6, atol=1e-5)
