"""The training loop: the SABR loss goes down, gradients reach every parameter (BatchNorm
included), resuming is exact, third-party differentiable domains work, bad flags exit 2."""
import os

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from verikit.cli import main
from verikit.domains import Domain, DomainResult, register_domain
from verikit.domains.base import unregister_domain
from verikit.domains.box import propagate_box
from verikit.models import architectures
from verikit.spec import fold_spec
from verikit.train.config import TrainConfig
from verikit.train.loop import Trainer


def tiny_bn(in_shape, num_classes):
    c = in_shape[0]
    return [nn.Conv2d(c, 4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 9 * 9, 16),
            nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes)]


@pytest.fixture
def tiny_arch(monkeypatch):
    monkeypatch.setitem(architectures.ARCHITECTURES, "tiny-bn", tiny_bn)
    return "tiny-bn"


def fake_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    # class-dependent images so there is something to learn
    x = (torch.rand(n, 1, 28, 28, generator=g) * 0.3 + (y.float() / 10).view(-1, 1, 1, 1) * 0.7).clamp(0, 1)
    return x, y, x[:32], y[:32]


def make(tmp_path, arch, **kw):
    cfg = TrainConfig(model=arch, eps=0.1, sabr_lambda=0.4, epochs=2, batch_size=32, eval_samples=16,
                      warmup_epochs=0, ramp_epochs=0, seed=3, **kw)
    return Trainer(cfg, str(tmp_path), data=fake_data(), log=lambda s: None)


def test_few_steps_reduce_sabr_loss(tmp_path, tiny_arch):
    t = make(tmp_path, tiny_arch)
    x, y = t.xtr[:32], t.ytr[:32]

    def loss_now():
        gen = torch.Generator().manual_seed(0)
        return float(t.loss_on_batch(x, y, 0.1, 5, gen)[0].detach())

    first = loss_now()
    for _ in range(8):
        t.step(x, y, 0.1, 5, torch.Generator().manual_seed(0))
    assert loss_now() < 0.9 * first


@pytest.mark.parametrize("lam", [0.0, 0.4, 1.0])
def test_gradients_reach_every_parameter(tmp_path, tiny_arch, lam):
    t = make(tmp_path, tiny_arch)
    t.cfg.sabr_lambda = lam
    loss, _ = t.loss_on_batch(t.xtr[:32], t.ytr[:32], 0.1, 0)
    loss.backward()
    named = [(n, p) for n, p in t.model.named_parameters() if p.requires_grad]
    assert named
    for n, p in named:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} gets no gradient (λ={lam})"


def test_batchnorm_uses_clean_batch_statistics(tmp_path, tiny_arch):
    t = make(tmp_path, tiny_arch)
    x, y = t.xtr[:32], t.ytr[:32]
    t.model.train()
    bn = t.model[2]
    before = bn.running_mean.clone()
    t.loss_on_batch(x, y, 0.1, 0)
    assert not torch.equal(bn.running_mean, before)  # the train-mode forward updated them
    # λ = 0: the bound of a zero-width box is the network's output with the clean batch's BN
    # statistics, i.e. a train-mode forward normalised by the clean batch
    from verikit import EvalContext
    from verikit.train.losses import certified_loss
    from verikit.bounds import Box

    x_adv = (x + 0.05).clamp(0, 1)
    ctx = EvalContext(bn_mode="batch")
    t.graph.forward(x, ctx=ctx)
    lower = certified_loss(t.graph, t.domain, Box(x_adv, x_adv), y, 10, ctx).lower
    # reference, written directly: normalise every BN layer with the clean batch's statistics
    def bn_with(h, m, stats):
        shape = (1, -1) + (1,) * (h.dim() - 2)
        mean, var = stats
        return (h - mean.view(shape)) / torch.sqrt(var.view(shape) + m.eps) * m.weight.view(shape) + m.bias.view(shape)

    clean_stats = {}
    with torch.no_grad():
        h = x
        for k, m in enumerate(t.model):
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                dims = [0] + list(range(2, h.dim()))
                clean_stats[k] = (h.mean(dims), h.var(dims, unbiased=False))
                h = bn_with(h, m, clean_stats[k])
            else:
                h = m(h)
        h = x_adv
        for k, m in enumerate(t.model):
            h = bn_with(h, m, clean_stats[k]) if k in clean_stats else m(h)
    true = h.gather(1, y[:, None])
    assert torch.allclose(lower, true - h, atol=1e-4)


def test_resume_equals_uninterrupted_run(tmp_path, tiny_arch):
    straight = make(tmp_path / "a", tiny_arch)
    straight.fit(progress=False)
    first = make(tmp_path / "b", tiny_arch)
    first.cfg.epochs = 1  # "interrupted" after one epoch
    first.fit(progress=False)
    resumed = make(tmp_path / "b", tiny_arch)
    resumed.load_checkpoint(os.path.join(tmp_path / "b", "checkpoint.pt"))
    assert resumed.epoch == 1
    torch.manual_seed(12345)  # a different global RNG state must not matter
    resumed.fit(progress=False)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in straight.metrics] == [r["loss"] for r in resumed.metrics]
    with open(tmp_path / "b" / "metrics.csv") as f:
        assert len(f.read().strip().splitlines()) == 3  # header + 2 epochs


def test_third_party_differentiable_domain_trains(tmp_path, tiny_arch):
    calls = []

    @register_domain
    class PluginBox(Domain):
        name = "pluginbox"
        description = "test plug-in: box propagation"
        differentiable = True

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            calls.append(1)
            folded = fold_spec(graph, spec)
            out = propagate_box(folded, inputs, None, ctx)[folded.output]
            return DomainResult(out.lo, out.hi, None)  # no intermediate bounds: no regulariser

    try:
        t = make(tmp_path, tiny_arch, domain="pluginbox")
        loss, _ = t.loss_on_batch(t.xtr[:32], t.ytr[:32], 0.1, 0)
        loss.backward()
        assert calls and all(p.grad is not None for p in t.model.parameters())
    finally:
        unregister_domain("pluginbox")


@pytest.mark.parametrize("args, message", [
    (["--sabr-lambda", "1.5"], "--sabr-lambda must lie in [0, 1]"),
    (["--sabr-lambda", "-0.1"], "--sabr-lambda must lie in [0, 1]"),
    (["--eps", "-0.1"], "bad --eps value '-0.1': must be >= 0"),
    (["--model", "resnet999"], "unknown model 'resnet999'"),
    (["--domain", "nosuchdomain"], "unknown domain 'nosuchdomain'"),
    (["--domain", "notdiff"], "is not differentiable"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--epochs", "0"], "--epochs must be an integer >= 1"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no such run directory"),
])
def test_bad_flags_exit_2(args, message):
    @register_domain
    class NotDiff(Domain):
        name = "notdiff"
        description = "test: not differentiable"

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            raise AssertionError("never called")

    try:
        res = CliRunner().invoke(main, ["train"] + args)
    finally:
        unregister_domain("notdiff")
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output


def test_relu_shrinking_is_training_only(tmp_path, tiny_arch):
    from verikit.bounds import Box
    from verikit.domains.box import propagate_box as pb

    t = make(tmp_path, tiny_arch, relu_shrink=0.8)
    x = t.xtr[:8]
    ball = Box.linf_ball(x, 0.1)
    t.model.eval()
    with torch.no_grad():
        plain = pb(t.graph, ball)
        shrunk = pb(t.train_graph, ball)
    relu = next(n for n in t.graph.nodes if type(n.op).__name__ == "ReLU")
    pre = plain[relu.inputs[0]]
    unstable = (pre.lo < 0) & (pre.hi > 0)
    assert unstable.any()
    assert torch.allclose(shrunk[relu.name].hi[unstable], 0.8 * plain[relu.name].hi[unstable])
    assert torch.equal(shrunk[relu.name].lo, plain[relu.name].lo)
    # the verification graph (evaluation, export) keeps exact ReLUs
    assert all(type(n.op).__name__ != "ShrinkReLU" for n in t.graph.nodes)
    loss, _ = t.loss_on_batch(t.xtr[:32], t.ytr[:32], 0.1, 0)
    assert torch.isfinite(loss)


def test_running_statistics_update_like_a_train_forward(tmp_path, tiny_arch):
    import copy

    t = make(tmp_path, tiny_arch)
    assert t.bn_pairs is not None and len(t.bn_pairs) == 2
    x, y = t.xtr[:32], t.ytr[:32]
    reference = copy.deepcopy(t.model).train()
    for _ in range(2):
        with torch.no_grad():
            reference(x)
        t.loss_on_batch(x, y, 0.1, 0)
    for (name, buf), ref in zip(t.model.named_buffers(), reference.buffers()):
        assert torch.allclose(buf.float(), ref.float(), rtol=1e-5, atol=1e-6), name
