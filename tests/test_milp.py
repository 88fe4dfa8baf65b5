"""The milp domain: exactness against the enumeration oracle, soundness by sampling, solver
agreement, counterexamples, unsupported ops, solver selection and fallbacks, time limits."""
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from exact_oracle import exact_min
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains import milp_solvers
from verikit.errors import SolverError, UnsupportedOpsError, VerikitError
from verikit.spec import Spec
from verikit.torch_import import from_torch

HAVE_GUROBI = milp_solvers.gurobi_available()


def mlp(seed, sizes, act=torch.nn.ReLU):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return torch.nn.Sequential(*layers).eval()


def robustness_case(seed, n_in, n_out, batch, eps):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n_in, generator=g)
    labels = torch.randint(0, n_out, (batch,), generator=g)
    return Box.linf_ball(x, eps, None), Spec.robustness(labels, n_out)


def oracle_minima(graph, box, spec):
    out = np.zeros((box.lo.shape[0], spec.num_rows))
    for b in range(box.lo.shape[0]):
        for r in range(spec.num_rows):
            c = spec.C[b, r].double().numpy()
            out[b, r] = exact_min(graph, box.lo[b].double().numpy().reshape(-1),
                                  box.hi[b].double().numpy().reshape(-1), c) - float(spec.d[b, r])
    return out


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), hidden=st.integers(2, 6), eps=st.floats(0.05, 0.6))
def test_exact_minimum_of_every_margin_matches_oracle(seed, hidden, eps):
    graph = from_torch(mlp(seed, [3, hidden, hidden, 3]), (3,))
    box, spec = robustness_case(seed, 3, 3, 2, eps)
    res = get_domain("milp", solver="highs", exact_bounds=True, input_split=False).bound(graph, box, spec)
    np.testing.assert_allclose(res.lower.double().numpy(), oracle_minima(graph, box, spec), atol=2e-5)
    # the verdict agrees with the exact minima
    exact = torch.tensor(oracle_minima(graph, box, spec))
    for b, s in enumerate(res.status):
        assert s == ("verified" if bool((exact[b] > 1e-5).all()) else "falsified") or \
            (s == "unknown" and bool((exact[b].abs() < 1e-5).any()))


def test_conv_batchnorm_avgpool_net_matches_oracle():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 2), torch.nn.BatchNorm2d(2), torch.nn.ReLU(),
                              torch.nn.AvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3))
    net[1].running_mean.uniform_(-0.2, 0.2)
    net[1].running_var.uniform_(0.5, 1.5)
    net.eval()
    graph = from_torch(net, (1, 3, 3))
    x = torch.rand(1, 1, 3, 3)
    box = Box.linf_ball(x, 0.15, None)
    spec = Spec.robustness(torch.tensor([1]), 3)
    res = get_domain("milp", solver="highs", exact_bounds=True).bound(graph, box, spec)
    np.testing.assert_allclose(res.lower.double().numpy(), oracle_minima(graph, box, spec), atol=2e-5)


@pytest.mark.parametrize("act", [torch.nn.LeakyReLU, "maxpool"])
def test_non_relu_piecewise_linear_ops_are_exact(act):
    """No oracle for these ops: the minimum must be attained (value at the solver's argmin) and
    no sampled input may go below it."""
    torch.manual_seed(5)
    if act == "maxpool":
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 2, padding=1), torch.nn.MaxPool2d(2, stride=1),
                                  torch.nn.Flatten(), torch.nn.Linear(2 * 9, 3)).eval()
        shape = (1, 3, 3)
    else:
        net = mlp(5, [4, 6, 6, 3], lambda: torch.nn.LeakyReLU(0.2))
        shape = (4,)
    graph = from_torch(net, shape)
    x = torch.rand((1,) + shape)
    box = Box.linf_ball(x, 0.3, None)
    spec = Spec.robustness(torch.tensor([0]), 3)
    res = get_domain("milp", solver="highs", exact_bounds=True, input_split=False).bound(graph, box, spec)
    argmin = res.info["samples"][0]["argmin"]
    with torch.no_grad():
        pts = box.sample(4000)[:, 0]
        vals = spec.values(graph.forward(pts)).double()
        for r in range(spec.num_rows):
            xa = torch.tensor(argmin[r], dtype=torch.float32).reshape((1,) + shape)
            at = float(spec.values(graph.forward(xa))[0, r])
            assert at == pytest.approx(float(res.lower[0, r]), abs=1e-4)
            assert float(vals[:, r].min()) >= float(res.lower[0, r]) - 1e-5


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_verdicts_are_sound_by_sampling(eps):
    graph = from_torch(mlp(11, [4, 8, 8, 3]), (4,))
    box, spec = robustness_case(7, 4, 3, 3, eps)
    res = get_domain("milp", solver="highs").bound(graph, box, spec)
    with torch.no_grad():
        pts = box.sample(3000)  # (n, B, 4)
        for b, s in enumerate(res.status):
            vals = spec.select([b]).values(graph.forward(pts[:, b]))
            assert (vals >= res.lower[b] - 1e-5).all()
            if s == "verified":
                assert not spec.select([b]).violated_by(graph.forward(pts[:, b])).any()
            if s == "falsified":
                cex = res.counterexamples[b]
                assert box[b:b + 1].contains(cex[None])
                assert spec.select([b]).violated_by(graph.forward(cex[None]))[0]
    if eps == 0.0:  # a point: exact minima are the concrete margins
        exact = get_domain("milp", solver="highs", exact_bounds=True).bound(graph, box, spec)
        with torch.no_grad():
            concrete = spec.values(graph.forward(box.lo))
        torch.testing.assert_close(exact.lower, concrete, atol=1e-5, rtol=0)


def test_group_spec_uses_disjunction_of_rows():
    """A group is proven when *some* row is positive everywhere; rows alone may not be."""
    graph = from_torch(mlp(2, [2, 5, 2]), (2,))
    box = Box.linf_ball(torch.rand(1, 2), 0.5, None)
    with torch.no_grad():
        y = graph.forward(box.sample(4000)[:, 0])
    # row0 = y0 - a, row1 = a - y0 + 1e-3 ... one of them is always > 0 only if the group is a tautology
    a = float(y[:, 0].median())
    C = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    taut = Spec(C, torch.tensor([a, -a - 1e-3]), groups=((0, 1),))
    res = get_domain("milp", solver="highs").bound(graph, box, taut)
    assert res.status == ["verified"]
    impossible = Spec(C, torch.tensor([a, -a + 1e-3]), groups=((0, 1),))  # y0 == a is unsafe and reachable
    res = get_domain("milp", solver="highs").bound(graph, box, impossible)
    assert res.status[0] in ("falsified", "unknown")
    if res.status[0] == "falsified":
        assert impossible.violated_by(graph.forward(res.counterexamples[0][None]))[0]


@pytest.mark.skipif(not HAVE_GUROBI, reason="gurobipy not installed")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_highs_and_gurobi_agree(seed):
    graph = from_torch(mlp(seed, [5, 12, 12, 4]), (5,))
    box, spec = robustness_case(seed, 5, 4, 2, 0.25)
    opts = dict(exact_bounds=True, input_split=False)
    h = get_domain("milp", solver="highs", **opts).bound(graph, box, spec)
    g = get_domain("milp", solver="gurobi", **opts).bound(graph, box, spec)
    assert h.info["solver"] == "highs" and g.info["solver"] == "gurobi"
    torch.testing.assert_close(h.lower, g.lower, atol=1e-5, rtol=0)
    assert h.status == g.status


def test_sigmoid_and_tanh_are_rejected_clearly():
    graph = from_torch(mlp(0, [3, 4, 2], torch.nn.Sigmoid), (3,))
    box, spec = robustness_case(0, 3, 2, 1, 0.1)
    with pytest.raises(UnsupportedOpsError, match="milp does not support Sigmoid"):
        get_domain("milp", solver="highs").bound(graph, box, spec)


def test_bad_options_and_missing_solver(monkeypatch):
    with pytest.raises(VerikitError, match="tighten"):
        get_domain("milp", tighten="cg")
    with pytest.raises(SolverError, match="unknown MILP solver"):
        get_domain("milp", solver="cplex")
    monkeypatch.setitem(sys.modules, "gurobipy", None)
    with pytest.raises(SolverError, match="gurobipy"):
        get_domain("milp", solver="gurobi")
    assert get_domain("milp", solver="auto").solver.primary is None  # auto falls back to HiGHS
    monkeypatch.setitem(sys.modules, "highspy", None)
    with pytest.raises(SolverError, match="highspy"):
        get_domain("milp", solver="highs")


@pytest.mark.skipif(not HAVE_GUROBI, reason="gurobipy not installed")
def test_gurobi_licence_refusal_falls_back_to_highs_and_warns_once(monkeypatch):
    monkeypatch.setattr(milp_solvers, "_GUROBI_REFUSED_SIZE", None)
    monkeypatch.setattr(milp_solvers, "_GUROBI_WARNED", False)
    n = 700  # 700 unstable ReLUs: 1400 variables + 700 inputs, 2100 constraints > the pip licence
    lin1 = torch.nn.Linear(n, n)
    with torch.no_grad():
        lin1.weight.copy_(torch.eye(n))
        lin1.bias.zero_()
    lin2 = torch.nn.Linear(n, 1)
    with torch.no_grad():
        lin2.weight.fill_(1.0)
        lin2.bias.fill_(0.5)
    graph = from_torch(torch.nn.Sequential(lin1, torch.nn.ReLU(), lin2), (n,))
    box = Box(-torch.ones(2, n), torch.ones(2, n))
    spec = Spec(torch.ones(1, 1), torch.zeros(1))  # sum relu(x) + 0.5 > 0: holds, min 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = get_domain("milp", solver="gurobi", exact_bounds=True).bound(graph, box, spec)
    assert res.status == ["verified", "verified"]
    assert res.info["solver"] == "highs"
    torch.testing.assert_close(res.lower, torch.full((2, 1), 0.5), atol=1e-5, rtol=0)
    assert sum("falling back to HiGHS" in str(w.message) for w in caught) == 1


def test_time_limit_zero_is_unknown_never_verified():
    graph = from_torch(mlp(4, [6, 30, 30, 4]), (6,))
    box, spec = robustness_case(4, 6, 4, 1, 0.05)
    box_lower = get_domain("box").bound(graph, box, spec).lower
    assert not bool(spec.holds_given_lower(box_lower)[0])  # needs the solver
    t = time.perf_counter()
    res = get_domain("milp", solver="highs", time_limit=0).bound(graph, box, spec)
    assert time.perf_counter() - t < 5
    assert res.status == ["unknown"]


@pytest.mark.parametrize("mode", ["lp", "milp"])
def test_bound_tightening_keeps_answers_and_tightens_store(mode):
    graph = from_torch(mlp(8, [4, 10, 10, 10, 3]), (4,))
    box, spec = robustness_case(8, 4, 3, 2, 0.3)
    plain = get_domain("milp", solver="highs", exact_bounds=True, input_split=False).bound(graph, box, spec)
    tight = get_domain("milp", solver="highs", exact_bounds=True, input_split=False, tighten=mode,
                       tighten_time=20).bound(graph, box, spec)
    torch.testing.assert_close(plain.lower, tight.lower, atol=2e-5, rtol=0)
    assert plain.status == tight.status
    # tightened pre-activation bounds are still sound and at least as tight as box's
    box_store = get_domain("box").bound(graph, box, spec).store
    with torch.no_grad():
        vals = graph.forward(box.sample(2000).reshape(-1, 4), return_all=True)
    widths = []
    for name in box_store:
        if name in tight.store and name in vals and name != graph.input_name:
            t = tight.store[name]
            v = vals[name].reshape(2000, 2, -1)
            assert (v >= t.lo.reshape(1, 2, -1) - 1e-5).all() and (v <= t.hi.reshape(1, 2, -1) + 1e-5).all()
            widths.append(float((t.hi - t.lo).detach().sum() - (box_store[name].hi - box_store[name].lo).detach().sum()))
    assert min(widths) < -1e-3  # some layer got strictly tighter


@pytest.mark.parametrize("solver", ["highs"] + (["gurobi"] if HAVE_GUROBI else []))
def test_deterministic_mode_repeats_exactly(solver):
    graph = from_torch(mlp(9, [5, 16, 16, 4]), (5,))
    box, spec = robustness_case(9, 5, 4, 2, 0.2)
    runs = [get_domain("milp", solver=solver, deterministic=True, input_split=False, threads=2).bound(graph, box, spec)
            for _ in range(2)]
    assert runs[0].status == runs[1].status
    assert torch.equal(runs[0].lower, runs[1].lower)
    for a, b in zip(runs[0].counterexamples, runs[1].counterexamples):
        assert (a is None and b is None) or torch.equal(a, b)


def test_residual_add_and_concat_graph_minimum_is_attained_and_sound():
    from verikit import ir

    torch.manual_seed(12)
    gb = ir.GraphBuilder("x", (4,), torch.float32)
    l1 = gb.add("l1", ir.Linear(torch.randn(4, 4), torch.randn(4) * 0.1), ["x"])
    r1 = gb.add("r1", ir.ReLU(), [l1])
    l2 = gb.add("l2", ir.Linear(torch.randn(4, 4), torch.randn(4) * 0.1), [r1])
    add = gb.add("add", ir.Add(), [l2, l1])
    r2 = gb.add("r2", ir.ReLU(), [add])
    cat = gb.add("cat", ir.Concat(axis=1), [r2, "x"])
    out = gb.add("out", ir.Linear(torch.randn(3, 8), torch.zeros(3)), [cat])
    graph = gb.build(out)
    box = Box.linf_ball(torch.rand(1, 4), 0.4, None)
    spec = Spec.robustness(torch.tensor([2]), 3)
    res = get_domain("milp", solver="highs", exact_bounds=True).bound(graph, box, spec)
    argmin = res.info["samples"][0]["argmin"]
    with torch.no_grad():
        vals = spec.values(graph.forward(box.sample(4000)[:, 0]))
        for r in range(spec.num_rows):
            at = spec.values(graph.forward(torch.tensor(argmin[r], dtype=torch.float32)[None]))[0, r]
            assert float(at) == pytest.approx(float(res.lower[0, r]), abs=1e-4)
            assert float(vals[:, r].min()) >= float(res.lower[0, r]) - 1e-5


@pytest.mark.parametrize("seed", [0, 3])
def test_input_splitting_verdicts_match_exact_minima_with_per_sample_specs(seed, monkeypatch):
    from verikit.domains import milp_split

    monkeypatch.setattr(milp_split, "MILP_MAX_UNSTABLE", 3)  # force real splitting on a small net
    graph = from_torch(mlp(seed, [2, 20, 20, 3]), (2,))
    x = torch.rand(4, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        labels = graph.forward(x).argmax(1)  # correctly classified centres: robustness is not trivial
    box = Box.linf_ball(x, torch.tensor([[0.3], [0.6], [1.0], [2.0]]), None)
    spec = Spec.robustness(labels, 3)  # spec.C is (B, m, n): one spec per sample
    res = get_domain("milp", solver="highs", input_split=True, time_limit=30).bound(graph, box, spec)
    assert max(s["subboxes"] for s in res.info["samples"]) > 1
    # reference: the exact minima of the unsplit MILP (itself checked against the oracle above)
    exact = get_domain("milp", solver="highs", exact_bounds=True).bound(graph, box, spec).lower
    for b, s in enumerate(res.status):
        if float(exact[b].abs().min()) < 1e-5:
            continue  # a tie at 0: either answer is numerically fair
        assert s == ("verified" if bool((exact[b] > 0).all()) else "falsified")
        if s == "falsified":
            cex = res.counterexamples[b]
            assert box[b:b + 1].contains(cex[None])
            assert spec.select([b]).violated_by(graph.forward(cex[None]))[0]
