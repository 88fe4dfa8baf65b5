"""domains/adam.py against torch.optim.Adam: the same iterates bit for bit (one group with a
learning rate, two groups with their own, a parameter without a gradient in some steps), and
zero_grad in both forms."""
from __future__ import annotations

import pytest
import torch

from verikit.domains.adam import Adam


def _problem(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(5, 7, generator=gen, dtype=dtype)
    b = torch.randn(3, 1, 4, generator=gen, dtype=dtype)
    target = torch.randn(7, generator=gen, dtype=dtype)
    return a, b, target


def _loss(a, b, target, step):
    loss = ((a.sum(0) - target) ** 2).sum() + (b.tanh() * (step + 1)).sum()
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("grouped", [False, True])
def test_iterates_equal_torch_adam(dtype, grouped):
    a0, b0, target = _problem(3, dtype)
    runs = []
    for cls in (torch.optim.Adam, Adam):
        a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
        opt = cls([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.03}]) if grouped else cls([a, b], lr=0.05)
        for step in range(25):
            opt.zero_grad(set_to_none=True)
            if step % 4 == 3:  # b gets no gradient this step: it is skipped, its state kept
                ((a.sum(0) - target) ** 2).sum().backward()
            else:
                _loss(a, b, target, step).backward()
            opt.step()
        runs.append((a.detach(), b.detach()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[1][0], a0)  # it moved


def test_zero_grad_forms():
    p = torch.ones(3, requires_grad=True)
    opt = Adam([p], lr=0.1)
    (p * 2).sum().backward()
    opt.zero_grad(set_to_none=False)
    assert torch.equal(p.grad, torch.zeros(3))
    opt.zero_grad()
    assert p.grad is None
    opt.step()  # no gradient: nothing moves
    assert torch.equal(p.detach(), torch.ones(3))


def test_certifying_imports_no_compiler():
    """The reason for this module: α-CROWN and branch and bound in a fresh process without
    torch._dynamo (1.4 s, imported by torch.optim) or torch._inductor (1.3 s, imported by
    torch.use_deterministic_algorithms, which bab's deterministic mode replaces)."""
    import subprocess
    import sys

    code = ("import sys, torch, verikit, verikit.domains as d\n"
            "net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))\n"
            "g = verikit.from_torch(net, (4,))\n"
            "x = torch.rand(2, 4)\n"
            "box, spec = verikit.Box.linf_ball(x, 0.1), verikit.Spec.robustness(torch.tensor([0, 1]), 3)\n"
            "d.get_domain('crown', alpha_steps=3).bound(g, box, spec)\n"
            "r = d.get_domain('bab', input_split=False, deterministic=True, timeout=30.0).bound(g, box, spec)\n"
            "assert not torch.are_deterministic_algorithms_enabled()\n"
            "print(r.status, 'torch._dynamo' in sys.modules or 'torch._inductor' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1].endswith("False")


def test_deterministic_switch_sets_and_restores():
    from verikit.domains.bab import _deterministic

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        _deterministic(True, warn_only=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        _deterministic(*before)
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before
