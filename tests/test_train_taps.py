"""TAPS / STAPS (train/method_taps.py): the cut, the rectified connector's gradients, the latent
PGD (exact where the classifier is one linear layer, always inside the latent box), the loss's
reductions (one linear layer without the IBP factor is IBP; STAPS with λ = 1 is TAPS; α scales
only the TAPS factor's gradient) and training through the loop."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from verikit import ir
from verikit.errors import VerikitError
from verikit.train.config import TrainConfig
from verikit.train.losses import certified_loss
from verikit.train.loop import Trainer
from verikit.train.method_taps import _others, connect, latent_pivots, split_graph
from verikit.domains.box import propagate_box
from verikit.bounds import Box

from test_methods_losses import method_loss, trainer
from test_train_bitwise import _data


@pytest.fixture(scope="module")
def tr():
    torch.manual_seed(0)
    return trainer(model="mlp")


def test_cut_before_the_last_linear_layers():
    for model, first_tail in (("mlp", "Linear"), ("cnn-small", "Linear")):
        g = trainer(model=model).train_graph
        for k in (1, 2):
            head, tail = split_graph(g, k)
            assert type(tail.nodes[0].op).__name__ == first_tail
            assert sum(isinstance(n.op, (ir.Linear, ir.Conv2d)) for n in tail.nodes) == k
            assert [n.name for n in head.nodes + tail.nodes] == [n.name for n in g.nodes]
            x = torch.rand((3,) + g.input_shape)
            assert torch.allclose(tail.forward(head.forward(x)), g.forward(x))
    with pytest.raises(VerikitError, match="pgd_layers must be between 1 and 2"):
        split_graph(trainer(model="mlp").train_graph, 3)


def test_a_skip_connection_across_the_cut_is_refused():
    b = ir.GraphBuilder("x", (4,))
    h = b.add("fc1", ir.Linear(torch.randn(4, 4), None), ["x"])
    r = b.add("relu", ir.ReLU(), [h])
    f = b.add("fc2", ir.Linear(torch.randn(4, 4), None), [r])  # the cut is relu, fc2's input
    s = b.add("res", ir.Add(), [f, h])  # reads fc1's output, from before the cut
    g = b.build(b.add("fc3", ir.Linear(torch.randn(3, 4), None), [s]))
    with pytest.raises(VerikitError, match="skip connection"):
        split_graph(g, 2)
    assert split_graph(g, 1)[1].nodes[0].name == "fc3"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10 ** 6), c=st.sampled_from([0.25, 0.5, 1.0]))
def test_connector_gradients_follow_the_rectified_linear_rule(seed, c):
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(2, 5, generator=g, dtype=torch.float64)
    hi = lo + torch.rand(2, 5, generator=g, dtype=torch.float64)
    hi[0, 0] = lo[0, 0]  # a degenerate coordinate: half to each bound
    pts = lo.unsqueeze(1) + (hi - lo).unsqueeze(1) * torch.rand(2, 3, 5, generator=g, dtype=torch.float64)
    pts[:, 0] = hi  # on the upper bound: all to it
    lo_, hi_ = lo.clone().requires_grad_(True), hi.clone().requires_grad_(True)
    out = connect(lo_, hi_, pts, c)
    assert torch.equal(out, pts)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    gl, gh = torch.autograd.grad((out * w).sum(), (lo_, hi_))
    slack = c * (hi - lo).unsqueeze(1)
    flat = slack <= 1e-5
    w_hi = torch.where(flat, 0.5, ((pts - hi.unsqueeze(1) + slack) / slack.clamp(min=1e-300)).clamp(0, 1))
    w_lo = torch.where(flat, 0.5, ((lo.unsqueeze(1) + slack - pts) / slack.clamp(min=1e-300)).clamp(0, 1))
    assert torch.allclose(gh, (w * w_hi).sum(1)) and torch.allclose(gl, (w * w_lo).sum(1))
    assert torch.allclose(torch.autograd.grad(connect(lo_, hi_, pts, c)[:, 0].sum(), hi_)[0][1], torch.ones(5, dtype=torch.float64))


def _pick_margins(logits, y, others):
    """(B, k): y_label - y_others[j] in row j of each sample's (k, n) logits."""
    B, k = others.shape
    return logits.gather(2, y.view(B, 1, 1).expand(B, k, 1)).squeeze(2) - logits.gather(2, others[..., None]).squeeze(2)


def _latent(tr, pgd_layers, eps=0.08):
    head, tail = split_graph(tr.train_graph, pgd_layers)
    x, y = tr.xtr[:16], tr.ytr[:16]
    with torch.no_grad():
        latent = propagate_box(head, Box.linf_ball(x, eps))[head.output]
    return tail, latent, y


def test_latent_pgd_is_exact_on_one_linear_layer(tr):
    """For a linear classifier part the worst margin over the box is at a corner, which IBP
    computes exactly; sign steps of at least 0.2 of the width reach it."""
    tail, latent, y = _latent(tr, 1)
    pts = latent_pivots(tail, latent.lo, latent.hi, y, 20, 1, torch.Generator().manual_seed(0))
    others = _others(y, 10)
    with torch.no_grad():
        logits = tail.forward(pts.flatten(0, 1)).reshape(16, 9, 10)
        m = _pick_margins(logits, y, others)
        ibp = certified_loss(tail, tr.domain, latent, y, 10).lower.gather(1, others)
    assert torch.allclose(m, ibp, rtol=1e-5, atol=1e-4)


def test_latent_points_stay_in_the_box_and_above_the_ibp_bound(tr):
    tail, latent, y = _latent(tr, 2)
    pts = latent_pivots(tail, latent.lo, latent.hi, y, 10, 2, torch.Generator().manual_seed(1))
    assert bool((pts >= latent.lo.unsqueeze(1)).all() and (pts <= latent.hi.unsqueeze(1)).all())
    others = _others(y, 10)
    with torch.no_grad():
        logits = tail.forward(pts.flatten(0, 1)).reshape(16, 9, 10)
        m = _pick_margins(logits, y, others)
        ibp = certified_loss(tail, tr.domain, latent, y, 10).lower.gather(1, others)
        centre = tail.forward(latent.center).unsqueeze(1).expand(16, 9, 10)
        mc = _pick_margins(centre, y, others)
    assert bool((m >= ibp - 1e-4).all())
    assert float((m < mc).float().mean()) > 0.9  # the search finds worse points than the box centre


def test_one_linear_layer_without_the_ibp_factor_is_ibp(tr):
    taps = method_loss(tr, "taps", pgd_layers=1, ibp_product=False).loss
    assert torch.allclose(taps, method_loss(tr, "ibp").loss, rtol=1e-5)


def test_staps_with_lambda_one_is_taps(tr):
    assert torch.equal(method_loss(tr, "staps", **{"lambda": 1.0}).loss, method_loss(tr, "taps").loss)
    assert not torch.equal(method_loss(tr, "staps").loss, method_loss(tr, "taps").loss)


def test_alpha_scales_only_the_taps_factor_gradient(tr):
    params = list(tr.model.parameters())
    grad = lambda **o: torch.autograd.grad(method_loss(tr, "taps", **o).loss, params)
    g1, g3 = grad(alpha=1.0), grad(alpha=3.0)
    alone = method_loss(tr, "taps", ibp_product=False).loss
    g_taps = torch.autograd.grad(alone, params)
    ibp = float(method_loss(tr, "ibp").loss)
    value = method_loss(tr, "taps", alpha=3.0).loss
    assert torch.allclose(value, alone * ibp, rtol=1e-5)
    for a, b, t in zip(g3, g1, g_taps):
        assert torch.allclose(a - b, 2 * ibp * t, rtol=1e-3, atol=1e-6 * (1 + t.abs().max()))


def test_options_and_their_checks():
    from verikit.train.methods import get_method

    assert get_method("staps", "mnist", 0.3).config["lambda"] == 0.6
    assert get_method("staps", "mnist", 0.1).config["lambda"] == 0.4
    assert get_method("taps").config == {"pgd_layers": 2, "steps": 20, "restarts": 1, "connector_c": 0.5,
                                         "alpha": 5.0, "ibp_product": True}
    for bad, msg in ((dict(connector_c=0.0), r"\(0, 1\]"), (dict(steps=0), "at least 1"), (dict(alpha=-1.0), "positive")):
        with pytest.raises(VerikitError, match=msg):
            get_method("taps", **bad)


@pytest.mark.parametrize("method", ["taps", "staps"])
def test_trains_through_the_loop_with_batchnorm(method):
    """cnn7-style BatchNorm in both parts (tiny-bn), two epochs through the trainer."""
    from test_train_bitwise import tiny_bn
    from verikit.models import architectures

    architectures.ARCHITECTURES["tiny-bn"] = tiny_bn
    try:
        cfg = TrainConfig(model="tiny-bn", method=method, epochs=2, batch_size=32, eval_samples=16, warmup_epochs=0,
                          ramp_epochs=1, eps=0.1, seed=0, method_options={"steps": "3"})
        t = Trainer(cfg, "/tmp/verikit-taps-unused", data=_data(64), log=lambda s: None)
        before = [p.detach().clone() for p in t.model.parameters()]
        loss, cert = t.loss_on_batch(t.xtr[:32], t.ytr[:32], 0.1, 1)
        assert torch.isfinite(loss) and 0.0 <= cert <= 1.0
        t.step(t.xtr[:32], t.ytr[:32], 0.1, 1, torch.Generator().manual_seed(0))
        assert all(not torch.equal(a, p) for a, p in zip(before, t.model.parameters()))
    finally:
        del architectures.ARCHITECTURES["tiny-bn"]


@pytest.mark.parametrize("method", ["taps", "staps"])
def test_a_domain_other_than_box_is_refused_at_start_up(method):
    with pytest.raises(VerikitError, match="box domain, not 'crown-ibp'"):
        trainer(model="mlp", domain="crown-ibp", method=method)


@pytest.mark.parametrize("args, message", [
    (["--method", "taps", "--domain", "crown-ibp"], "box domain, not 'crown-ibp'"),
    (["--method", "staps", "--method-option", "pgd_layers=9"], "pgd_layers"),
])
def test_the_cli_refuses_a_run_taps_cannot_train_before_training(tmp_path, args, message):
    from click.testing import CliRunner
    from verikit.cli import main

    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["train", "--model", "mlp", "--epochs", "1", "--train-samples", "64",
                                    "--out", str(out), "--quiet"] + args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (out / "metrics.csv").exists()  # refused before the first epoch
