"""SABR region selection: the small box stays inside the ε-ball ∩ data range, λ = 1 is IBP
exactly, λ = 0 is the PGD point, and the attack uses input gradients only."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import verikit
from verikit.bounds import Box
from verikit.train.losses import certified_loss, get_training_domain, margin_spec
from verikit.train.sabr import pgd_attack, select_region, small_box


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))


@settings(max_examples=200, deadline=None)
@given(lam=st.floats(0, 1), eps=st.floats(0, 0.6), seed=st.integers(0, 10_000),
       saturate=st.booleans())
def test_small_box_inside_clipped_ball(lam, eps, seed, saturate):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 5, generator=g)
    if saturate:  # pixels at the data-range edges, where the clipped ball is narrow
        x = (x > 0.5).float() * torch.rand(4, 3, 5, generator=g).round()
    ball = Box.linf_ball(x, eps)
    center = ball.lo + torch.rand(x.shape, generator=g) * (ball.hi - ball.lo)
    # also centres outside the ball (the box must still be placed inside it)
    center = torch.where(torch.rand(x.shape, generator=g) < 0.2, center + 3 * eps * (torch.rand(x.shape, generator=g) - 0.5), center)
    sb = small_box(center, ball, lam * eps)
    assert bool((sb.lo >= ball.lo).all() and (sb.hi <= ball.hi).all() and (sb.lo <= sb.hi).all())
    width = sb.hi - sb.lo
    ball_width = ball.hi - ball.lo
    expected = torch.minimum(ball_width, torch.full_like(ball_width, 2 * lam * eps))
    assert torch.allclose(width, expected, atol=1e-6)
    # a centre inside the ball whose small box fits is the centre of the small box
    fits = (center - lam * eps >= ball.lo) & (center + lam * eps <= ball.hi) & (ball_width > 2 * lam * eps)
    assert torch.allclose(sb.center[fits], center[fits], atol=1e-6)


def test_lambda_one_is_ibp_loss_exactly():
    net = tiny_net()
    x = torch.rand(8, 1, 3, 4)
    y = torch.arange(8) % 10
    graph = verikit.from_torch(net, (1, 3, 4))
    box = get_training_domain("box")
    region = select_region(net, x, y, 0.1, 1.0)
    ball = Box.linf_ball(x, 0.1)
    assert torch.equal(region.lo, ball.lo) and torch.equal(region.hi, ball.hi)
    sabr = certified_loss(graph, box, region, y, 10).loss
    lower = box.bound(graph, ball, verikit.Spec.robustness(y, 10)).lower
    # the IBP loss written independently: CE with worst-case logits (0 for the true class)
    worst = torch.zeros(8, 10).scatter(1, torch.tensor([[j for j in range(10) if j != t] for t in y.tolist()]), -lower)
    ibp = F.cross_entropy(worst, y)
    assert torch.allclose(sabr, ibp, rtol=0, atol=1e-6)
    # and the SABR box (λ < 1) is strictly smaller, so its loss is not larger
    small = certified_loss(graph, box, select_region(net, x, y, 0.1, 0.3), y, 10).loss
    assert small <= sabr + 1e-6


def test_lambda_zero_is_the_pgd_point():
    net = tiny_net(1)
    x, y = torch.rand(16, 1, 3, 4), torch.randint(0, 10, (16,))
    region = select_region(net, x, y, 0.2, 0.0, generator=torch.Generator().manual_seed(5))
    ball = Box.linf_ball(x, 0.2)
    x_adv = pgd_attack(net, x, y, ball, 0.2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(region.lo, region.hi) and torch.equal(region.lo, x_adv)
    assert bool(ball.contains(x_adv).all())
    # the kept iterate is at least as bad as the random start (same generator state)
    start = ball.lo + torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) * (ball.hi - ball.lo)
    with torch.no_grad():
        l_adv = F.cross_entropy(net(x_adv), y, reduction="none")
        l_start = F.cross_entropy(net(start), y, reduction="none")
        l_clean = F.cross_entropy(net(x), y, reduction="none")
    assert bool((l_adv >= l_start - 1e-6).all())
    assert l_adv.mean() > l_clean.mean()  # the attack does find worse points


def test_attack_takes_input_gradients_only_and_keeps_mode():
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    net.train()
    before = net[2].running_mean.clone()
    x, y = torch.rand(6, 1, 3, 4), torch.randint(0, 10, (6,))
    select_region(net, x, y, 0.1, 0.5)
    assert all(p.grad is None for p in net.parameters())
    assert net.training
    assert torch.equal(net[2].running_mean, before)  # eval-mode attack: BN statistics untouched


def test_margin_spec_rows():
    y = torch.tensor([2, 0])
    spec = margin_spec(y, 4)
    out = torch.tensor([[1.0, 2.0, 5.0, 0.0], [3.0, 1.0, 1.0, 4.0]])
    vals = spec.values(out)
    assert torch.equal(vals, torch.tensor([[4.0, 3.0, 0.0, 5.0], [0.0, 2.0, 2.0, -1.0]]))


def test_fused_eval_forward_equals_eval_model():
    from verikit.models.architectures import Normalize
    from verikit.train.sabr import fused_eval_forward

    torch.manual_seed(0)
    net = nn.Sequential(Normalize(0.1, 0.3), nn.Conv2d(1, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4, affine=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 14 * 14, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(16, 1, 28, 28))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.uniform_(m.weight, 0.5, 2.0)
    net.eval()
    x = torch.rand(5, 1, 28, 28)
    fused = fused_eval_forward(net)
    assert fused is not net
    with torch.no_grad():
        assert torch.allclose(fused(x), net(x), atol=1e-5)
    plain = nn.Flatten()
    assert fused_eval_forward(plain) is plain
    # a conv with no BatchNorm after it (channels-last weights too) and a strided one
    net = nn.Sequential(nn.Conv2d(1, 3, 3, 1, 1), nn.ReLU(), nn.Conv2d(3, 5, 3, 2, 1, bias=False), nn.ReLU(),
                        nn.Flatten(), nn.Linear(5 * 14 * 14, 10)).eval()
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    fused = fused_eval_forward(net)
    g_fused, = torch.autograd.grad(fused(x).square().sum(), x)
    g_net, = torch.autograd.grad(net(x).square().sum(), x)
    assert torch.allclose(fused(x), net(x), atol=1e-5) and torch.allclose(g_fused, g_net, atol=1e-5)
