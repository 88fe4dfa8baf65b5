"""The certifier's building blocks: PGD attack, domain chain, counterexample re-check,
normalisation wrapper."""
import numpy as np
import pytest
import torch
from torch import nn

from certify_tiny_model import tiny_mnist_model
from verikit import Box, Spec, from_torch
from verikit.certify.attack import pgd_attack, spec_margin
from verikit.certify.chain import Chain, ChainConfig
from verikit.certify.model import load_model, with_normalisation
from verikit.datasets import load_mnist
from verikit.domains import Domain, DomainResult, get_domain, register_domain
from verikit.domains.base import unregister_domain
from verikit.errors import VerikitError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These networks are tiny: one torch thread is fastest (and fair on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    model = load_model(tiny_mnist_model())
    x, y = load_mnist("test")
    return model, x[:40], y[:40]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def test_attack_points_stay_in_the_box_and_really_violate():
    net = _mlp()
    g = from_torch(net, (4,))
    x = torch.rand(64, 4)
    labels = net(x).argmax(1)
    box = Box.linf_ball(x, 0.3)
    spec = Spec.robustness(labels, 3)
    res = pgd_attack(g, box, spec, steps=30, restarts=2)
    assert bool(box.contains(res.x).all())
    with torch.no_grad():
        m = spec_margin(g, res.x, spec)
    assert torch.allclose(m, res.margin, atol=1e-6)
    found = res.found
    assert 0 < int(found.sum()) < 64  # some but not all samples break at this radius
    assert bool((net(res.x[found]).argmax(1) != labels[found]).all())


def test_attack_takes_gradients_of_the_input_only():
    net = _mlp(1)
    g = from_torch(net, (4,))  # live parameters with requires_grad
    x = torch.rand(8, 4)
    pgd_attack(g, Box.linf_ball(x, 0.2), Spec.robustness(net(x).argmax(1), 3), steps=5)
    assert all(p.grad is None for p in net.parameters())


def test_attack_restarts_do_not_depend_on_the_batch():
    net = _mlp(2)
    g = from_torch(net, (4,))
    x = torch.rand(10, 4)
    spec = Spec.robustness(net(x).argmax(1), 3)
    full = pgd_attack(g, Box.linf_ball(x, 0.25), spec, steps=10, restarts=3)
    part = pgd_attack(g, Box.linf_ball(x[3:6], 0.25), spec.select(slice(3, 6)), steps=10, restarts=3)
    assert torch.equal(full.x[3:6], part.x)  # same points (margins agree up to matmul rounding)
    assert torch.allclose(full.margin[3:6], part.margin, atol=1e-6)


def test_attack_falsified_samples_are_never_verified_by_the_domains(tiny):
    model, x, y = tiny
    with torch.no_grad():
        ok = model.graph.forward(x).argmax(1) == y
    x, y = x[ok], y[ok]
    box, spec = Box.linf_ball(x, 0.05), Spec.robustness(y, 10)
    attacked = Chain(model.graph, ChainConfig(domains=[], onnx_path=model.path)).run(box, spec)
    proved = Chain(model.graph, ChainConfig(domains=["box", "deeppoly", "crown"], attack=False)).run(box, spec)
    falsified = {i for i, o in enumerate(attacked) if o.status == "falsified"}
    verified = {i for i, o in enumerate(proved) if o.status == "verified"}
    assert falsified and verified  # both non-empty, so the check below means something
    assert not falsified & verified
    for i in falsified:
        o = attacked[i]
        assert o.by == "attack" and box[[i]].contains(o.counterexample[None]).all()
        assert int(np.argmax(o.output)) != int(y[i])  # onnxruntime's output at the counterexample


def test_chain_records_which_domain_proved_and_the_margin(tiny):
    model, x, y = tiny
    x, y = x[:16], y[:16]
    out = Chain(model.graph, ChainConfig(domains=["box", "deeppoly"], attack=False)).run(
        Box.linf_ball(x, 0.01), Spec.robustness(y, 10))
    for i, o in enumerate(out):
        if o.status == "verified":
            dom = get_domain(o.by)
            res = dom.bound(model.graph, Box.linf_ball(x[i:i + 1], 0.01), Spec.robustness(y[i:i + 1], 10))
            assert o.margin > 0 and res.lower.min().item() == pytest.approx(o.margin, abs=1e-5) or o.by == "deeppoly"
        assert set(o.times) <= {"box", "deeppoly"}
    assert any(o.by == "box" for o in out) and any(o.by == "deeppoly" for o in out)


@pytest.fixture
def fake_domains():
    names = []

    def add(cls):
        register_domain(cls)
        names.append(cls.name)
        return cls

    yield add
    for n in names:
        unregister_domain(n)


def test_lying_complete_domain_cannot_falsify_without_a_real_counterexample(fake_domains, tiny):
    model, x, y = tiny

    @fake_domains
    class Liar(Domain):
        name, description, complete = "liar", "claims every sample is falsified", True

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            B = inputs.lo.shape[0]
            lower = torch.full((B, spec.num_rows), -1.0)
            return DomainResult(lower, None, store, status=["falsified"] * B,
                                counterexamples=[inputs.center[b] for b in range(B)])  # the clean, correct input

    x, y = x[:4], y[:4]
    out = Chain(model.graph, ChainConfig(domains=["liar"], attack=False, onnx_path=model.path)).run(
        Box.linf_ball(x, 0.01), Spec.robustness(y, 10))
    correct = model.graph.forward(x).argmax(1) == y
    for o, c in zip(out, correct):
        if c:
            assert o.status == "unknown" and "re-check" in o.note


def test_third_party_domain_gets_the_store_and_only_its_options(fake_domains, tiny):
    model, x, y = tiny
    seen = {}

    @fake_domains
    class Probe(Domain):
        name, description = "probe", "records what it is given"
        options = {"alpha_steps": 0}

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            seen["config"] = dict(self.config)
            seen["store_nodes"] = len(store) if store is not None else 0
            seen["batch"] = inputs.lo.shape[0]
            return DomainResult(torch.full((inputs.lo.shape[0], spec.num_rows), -1.0), None, store)

    cfg = ChainConfig(domains=["box", "probe"], attack=False,
                      domain_options={"box": {"alpha_steps": 7, "solver": "highs"},
                                      "probe": {"alpha_steps": 7, "solver": "highs"}})
    out = Chain(model.graph, cfg).run(Box.linf_ball(x[:8], 0.2), Spec.robustness(y[:8], 10))
    assert seen["config"] == {"alpha_steps": 7}
    assert seen["store_nodes"] > 0  # bounds left by box are handed on
    undecided = sum(o.by != "box" for o in out)
    assert seen["batch"] == undecided and all(o.status == "unknown" for o in out if o.by != "box")


def test_domain_errors_become_verikit_errors(fake_domains, tiny):
    model, x, y = tiny

    @fake_domains
    class Broken(Domain):
        name, description = "broken", "always fails"

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            raise NotImplementedError("no rule for Sigmoid")

    with pytest.raises(VerikitError, match="domain 'broken' failed.*Sigmoid"):
        Chain(model.graph, ChainConfig(domains=["broken"], attack=False)).run(
            Box.linf_ball(x[:2], 0.3), Spec.robustness(y[:2], 10))


def test_time_limited_domain_gets_the_budget_left_and_timeouts_are_unknown(fake_domains, tiny):
    model, x, y = tiny
    limits = []

    @fake_domains
    class Slow(Domain):
        name, description, complete = "slowexact", "sleeps, then gives up", True
        options = {"time_limit": 60.0}

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            import time

            limits.append(self.config["time_limit"])
            time.sleep(0.2)
            return DomainResult(torch.full((1, spec.num_rows), -1.0), None, store, status=["unknown"])

    cfg = ChainConfig(domains=["slowexact", "slowexact"], attack=False, timeout=0.3)
    out = Chain(model.graph, cfg).run(Box.linf_ball(x[:3], 0.3), Spec.robustness(y[:3], 10))
    assert len(limits) == 6 and all(0 < t <= 0.3 for t in limits[:3])
    assert all(0 < t <= 0.11 for t in limits[3:])  # the second stage only gets what is left
    assert all(o.status == "unknown" and o.note == "timeout" for o in out)


def test_normalisation_wrapper_is_exact(tiny):
    model, x, _ = tiny
    mean, std = [0.1307], [0.3081]
    wrapped, to_onnx = with_normalisation(model.graph, mean, std)
    xs = x[:5]
    norm = (xs - mean[0]) / std[0]
    assert torch.allclose(wrapped.forward(xs), model.graph.forward(norm), atol=1e-5)
    assert torch.allclose(to_onnx(xs), norm, atol=1e-6)
    box = Box.linf_ball(xs, 0.02)
    a = get_domain("box").bound(wrapped, box)
    b = get_domain("box").bound(model.graph, Box((box.lo - mean[0]) / std[0], (box.hi - mean[0]) / std[0]))
    assert torch.allclose(a.lower, b.lower, atol=1e-4) and torch.allclose(a.upper, b.upper, atol=1e-4)
    with pytest.raises(VerikitError, match="channels"):
        with_normalisation(model.graph, [0.1, 0.2], [1.0, 1.0])
    with pytest.raises(VerikitError, match="positive"):
        with_normalisation(model.graph, [0.1], [0.0])


def test_domains_may_use_autograd_inside_the_chain(fake_domains, tiny):
    model, x, y = tiny

    @fake_domains
    class GradUser(Domain):
        name, description = "graduser", "takes a Jacobian, like milp's encoder"

        def bound(self, graph, inputs, spec=None, store=None, ctx=None):
            z = inputs.center.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(graph.forward(z).sum(), z)
            assert g.shape == z.shape
            return DomainResult(torch.full((z.shape[0], spec.num_rows), -1.0), None, store)

    out = Chain(model.graph, ChainConfig(domains=["graduser"], attack=False)).run(
        Box.linf_ball(x[:2], 0.1), Spec.robustness(y[:2], 10))
    assert [o.status for o in out] == ["unknown", "unknown"]


def test_attack_reaches_a_polytope_that_needs_every_row_at_once():
    # unsafe iff y_i <= -0.9 for all three i (one group of three rows), y = x on [-1, 1]^3: only
    # a corner is unsafe. Descending on the group margin (max of the rows) moves one coordinate
    # per step and needs 12 steps of 0.25; the sum of positive parts moves all three: 4 steps.
    lin = nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(3))
        lin.bias.zero_()
    g = from_torch(nn.Sequential(lin), (3,))
    spec = Spec(torch.eye(3), torch.full((3,), -0.9), ((0, 1, 2),))
    box = Box(-torch.ones(1, 3), torch.ones(1, 3))
    res = pgd_attack(g, box, spec, steps=10, restarts=1)
    assert bool(res.found[0]) and bool((res.x <= -0.9).all())
