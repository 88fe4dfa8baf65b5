"""Input splitting (domains/bab_input.py): verdicts against the exact oracle and the MILP,
soundness of the batched sub-box bounds, limits, determinism, real counterexamples."""
import math
import os
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from exact_oracle import exact_min
from test_milp import mlp
from conftest import SHARED
from verikit.bounds import Box
from verikit.domains import get_domain
from verikit.domains.bab_input import InputSplitOptions, _bound, input_split_search
from verikit.spec import Spec, fold_spec
from verikit.torch_import import from_torch

ACAS = os.path.join(SHARED, "vnncomp2021", "acasxu")


def search(graph, spec, box, seconds=30.0, **opts):
    return input_split_search(graph, spec, box, deadline=time.perf_counter() + seconds,
                              options=InputSplitOptions(**opts))


def check_counterexample(graph, spec, box, res):
    assert res.counterexample is not None
    x = res.counterexample[None]
    assert bool(box.contains(x)[0])
    with torch.no_grad():
        assert bool(spec.violated_by(graph.forward(x))[0])


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), n_in=st.integers(1, 3), hidden=st.integers(2, 6), depth=st.integers(1, 2),
       eps=st.floats(0.05, 1.0), gap=st.floats(0.01, 0.3), holds=st.booleans())
def test_single_row_verdicts_equal_the_exact_oracle(seed, n_in, hidden, depth, eps, gap, holds):
    graph = from_torch(mlp(seed, [n_in] + [hidden] * depth + [2]), (n_in,))
    gen = torch.Generator().manual_seed(seed)
    box = Box.linf_ball(torch.rand(1, n_in, generator=gen), eps, None)
    c = torch.randn(2, generator=gen)
    with torch.no_grad():
        spread = float((graph.forward(box.sample(500, generator=gen)[:, 0]) @ c).std()) + 1e-3
    low = exact_min(graph, box.lo[0].double().numpy(), box.hi[0].double().numpy(), c.double().numpy())
    d = low - gap * spread if holds else low + gap * spread  # the margin's minimum is -+ gap * spread
    spec = Spec(c[None], torch.tensor([d]))
    res = search(graph, spec, box)
    assert res.status == ("verified" if holds else "falsified")
    if res.status == "falsified":
        check_counterexample(graph, spec, box, res)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.1, 1.0), shift=st.floats(-0.3, 0.3))
def test_disjunctive_group_verdicts_equal_the_milp(seed, eps, shift):
    """Groups of several rows (a VNN-LIB disjunction): proven only where some row is positive
    on the whole sub-box; the verdict must equal the exact MILP's."""
    graph = from_torch(mlp(seed, [2, 8, 8, 3]), (2,))
    gen = torch.Generator().manual_seed(seed)
    box = Box.linf_ball(torch.rand(1, 2, generator=gen), eps, None)
    with torch.no_grad():
        y = graph.forward(box.sample(1000, generator=gen)[:, 0])
    a = float(y[:, 0].median()) + shift * float(y[:, 0].std())
    # unsafe: (y0 <= a and y1 <= y0) or (y2 >= y0 + 1): rows are the negated constraints
    C = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [1.0, 0.0, -1.0]])
    spec = Spec(C, torch.tensor([a, 0.0, -1.0]), groups=((0, 1), (2,)))
    ref = get_domain("milp", solver="highs", input_split=False, time_limit=60).bound(graph, box, spec)
    assert ref.status[0] != "unknown"
    res = search(graph, spec, box)
    assert res.status == ref.status[0]
    if res.status == "falsified":
        check_counterexample(graph, spec, box, res)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_sub_box_bounds_hold_on_sampled_points(seed):
    graph = from_torch(mlp(seed, [3, 10, 10, 4]), (3,))
    gen = torch.Generator().manual_seed(seed)
    spec = Spec(torch.randn(3, 4, generator=gen), torch.randn(3, generator=gen))
    folded = fold_spec(graph, spec)
    lo = torch.rand(16, 3, generator=gen) * 2 - 1
    hi = lo + torch.rand(16, 3, generator=gen) * torch.tensor([2.0, 0.5, 0.0])  # one side of width 0
    lower, guard, coeffs = _bound(folded, lo, hi, InputSplitOptions(), None)
    assert coeffs.shape == (16, 3, 3) and bool((guard >= 0).all())
    assert bool((coeffs[:, :, 2] != 0).any())
    pts = Box(lo, hi).sample(500, generator=gen)  # (500, 16, 3)
    with torch.no_grad():
        vals = spec.values(graph.forward(pts.reshape(-1, 3))).reshape(500, 16, 3)
    assert bool((vals >= lower.unsqueeze(0) - 1e-5).all())


def test_point_box_bounds_are_the_concrete_values():
    graph = from_torch(mlp(4, [3, 10, 10, 4]), (3,))
    spec = Spec(torch.eye(4)[:2], torch.zeros(2))
    x = torch.rand(5, 3)
    lower, _, _ = _bound(fold_spec(graph, spec), x, x.clone(), InputSplitOptions(), None)
    with torch.no_grad():
        torch.testing.assert_close(lower, spec.values(graph.forward(x)), atol=1e-5, rtol=0)


def test_alpha_steps_never_loosen_and_decide_the_same():
    graph = from_torch(mlp(5, [2, 12, 12, 3]), (2,))
    spec = Spec.robustness(torch.tensor([0]), 3).for_sample(0)
    box = Box(torch.tensor([[-0.3, -0.3]]), torch.tensor([[0.3, 0.3]]))
    folded = fold_spec(graph, spec)
    plain, _, _ = _bound(folded, box.lo, box.hi, InputSplitOptions(), None)
    alpha, _, _ = _bound(folded, box.lo, box.hi, InputSplitOptions(alpha_steps=10), None)
    assert bool((alpha >= plain).all())
    assert search(graph, spec, box).status == search(graph, spec, box, alpha_steps=5).status


def test_timeout_zero_and_domain_cap_give_unknown():
    graph = from_torch(mlp(7, [2, 6, 6, 3]), (2,))
    spec = Spec(torch.tensor([[1.0, -1.0, 0.0]]), torch.zeros(1))
    box = Box(torch.full((1, 2), -2.0), torch.full((1, 2), 2.0))
    res = input_split_search(graph, spec, box, deadline=time.perf_counter())
    assert res.status == "unknown" and res.reason == "timeout" and res.visited == 0
    low = exact_min(graph, box.lo[0].double().numpy(), box.hi[0].double().numpy(), np.array([1.0, -1.0, 0.0]))
    tight = Spec(spec.C, torch.tensor([low - 1e-3]))  # holds, barely: needs many sub-boxes
    capped = search(graph, tight, box, max_domains=2, batch_size=1)
    assert capped.status == "unknown" and capped.reason == "max_domains"
    assert search(graph, tight, box).status == "verified"


def test_deterministic_repeats_exactly():
    graph = from_torch(mlp(7, [3, 12, 12, 3]), (3,))
    spec = Spec.robustness(torch.tensor([1]), 3).for_sample(0)
    box = Box(torch.full((1, 3), -0.5), torch.full((1, 3), 0.5))
    a, b = search(graph, spec, box, batch_size=4), search(graph, spec, box, batch_size=4)
    assert (a.status, a.visited, a.depth) == (b.status, b.visited, b.depth)
    if a.counterexample is not None:
        assert torch.equal(a.counterexample, b.counterexample)


def test_a_rejected_candidate_is_not_reported():
    """confirm() decides what counts: a search whose candidates are all refused never says
    falsified (and never verified on a property that is violated)."""
    graph = from_torch(mlp(8, [2, 6, 2]), (2,))
    box = Box(torch.full((1, 2), -1.0), torch.full((1, 2), 1.0))
    spec = Spec(torch.tensor([[1.0, 0.0]]), torch.tensor([1e6]))  # violated everywhere
    res = input_split_search(graph, spec, box, deadline=time.perf_counter() + 1.0, confirm=lambda x: None)
    assert res.status == "unknown"
    assert search(graph, spec, box).status == "falsified"


@pytest.mark.skipif(not os.path.isdir(ACAS), reason="shared/vnncomp2021 not present")
@pytest.mark.parametrize("net,prop,expected", [("2_1", "prop_2", "violated"), ("2_1", "prop_4", "holds")])
def test_acasxu_instances_are_decided_without_the_milp(net, prop, expected):
    from verikit.certify.vnnlib import load_vnnlib
    from verikit.domains.vnnlib_verify import _inside_property_box, case_box
    from verikit.onnx_import import from_onnx

    graph = from_onnx(os.path.join(ACAS, f"ACASXU_run2a_{net}_batch_2000.onnx"))
    (case,) = load_vnnlib(os.path.join(ACAS, f"{prop}.vnnlib")).cases
    spec = case.spec.to(dtype=graph.dtype)
    res = input_split_search(graph, spec, case_box(graph, case), deadline=time.perf_counter() + 60,
                             confirm=lambda x: _inside_property_box(graph, case, spec, x))
    assert res.status == {"holds": "verified", "violated": "falsified"}[expected]
    if expected == "violated":
        x = res.counterexample.double().numpy()
        assert case.contains(x)


@pytest.mark.skipif(not os.path.isdir(ACAS), reason="shared/vnncomp2021 not present")
def test_readme_block_runs(monkeypatch, capsys):
    from test_readme import ROOT, _python_block

    monkeypatch.chdir(ROOT)
    exec(compile(_python_block("Input splitting (`domains/bab_input.py`)"), "README.md", "exec"), {})
    assert capsys.readouterr().out.startswith("falsified ")


# ------------------------------------------------------------------ through the bab domain
def test_bab_dispatches_low_dimensional_inputs_to_input_splitting():
    graph = from_torch(mlp(7, [2, 6, 6, 3]), (2,))
    box = Box(torch.full((1, 2), -2.0), torch.full((1, 2), 2.0))
    c = np.array([1.0, -1.0, 0.0])
    low = exact_min(graph, box.lo[0].double().numpy(), box.hi[0].double().numpy(), c)
    holds = Spec(torch.tensor([c.tolist()]), torch.tensor([low - 1e-3]))
    res = get_domain("bab", timeout=30.0).bound(graph, box, holds)
    assert res.status == ["verified"]
    info = res.info["samples"][0]
    assert info["visited"] > 1 and info["rounds"] == 0  # sub-boxes, no ReLU-split rounds
    assert float(res.lower[0, 0]) <= low - 1e-3 + 1e-5  # the root's valid lower bound
    violated = Spec(holds.C, torch.tensor([low + 1e-2]))
    res = get_domain("bab", timeout=30.0).bound(graph, box, violated)
    assert res.status == ["falsified"]
    with torch.no_grad():
        assert bool(violated.violated_by(graph.forward(res.counterexamples[0][None]))[0])
    assert get_domain("bab", timeout=0.0).bound(graph, box, holds).status == ["unknown"]
    with pytest.raises(Exception, match="input_split"):
        get_domain("bab", input_split="sometimes")


def test_bab_decides_a_small_sigmoid_mlp_by_input_splitting_and_by_activation_splits():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Sigmoid(), torch.nn.Linear(16, 16),
                                torch.nn.Sigmoid(), torch.nn.Linear(16, 2)).eval()
    graph = from_torch(model, (2,))
    box = Box(torch.full((1, 2), -1.5), torch.full((1, 2), 1.5))
    g = torch.linspace(-1.5, 1.5, 401)
    with torch.no_grad():
        vals = graph.forward(torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)) @ torch.tensor([1.0, -1.0])
    L = 0.25 ** 2 * math.sqrt(2) * math.prod(float(torch.linalg.matrix_norm(m.weight.detach(), 2))
                                              for m in model if isinstance(m, torch.nn.Linear))
    spec = Spec(torch.tensor([[1.0, -1.0]]), torch.tensor([float(vals.min()) - L * 3 / 400 - 0.01]))
    assert not bool(spec.holds_given_lower(get_domain("crown").bound(graph, box, spec).lower)[0])  # crown cannot
    assert get_domain("bab", timeout=60.0).bound(graph, box, spec).status == ["verified"]  # input splitting
    # splitting the Sigmoid neurons' input intervals (GenBaB, bab_activation_split.py) decides it too
    assert get_domain("bab", timeout=60.0, input_split=False).bound(graph, box, spec).status == ["verified"]


@pytest.mark.skipif(not os.path.isdir(ACAS), reason="shared/vnncomp2021 not present")
def test_vnnlib_certify_with_bab_decides_acasxu():
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "verikit", "certify", os.path.join(ACAS, "ACASXU_run2a_2_1_batch_2000.onnx"),
           "--vnnlib", os.path.join(ACAS, "prop_4.vnnlib"), "--domains", "box,crown,bab"]
    env = {**os.environ, "VERIKIT_PROGRESS_INTERVAL": "0.1"}  # progress lines (stderr is not a terminal)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "holds" and "settled by bab" in done.stderr
    # a progress bar for the property (the search writes its info into it: see the in-process
    # progress tests; whether a tick falls inside this short search depends on the machine's load)
    assert "property: 0/1 properties done" in done.stderr and "1/1 properties done (100%), holds" in done.stderr
