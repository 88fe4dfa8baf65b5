"""The property is proven as written (issue 14, items 3 and 7): float64 coefficients and
thresholds, strict comparisons strict; counterexamples re-checked against the exact property;
VNN-LIB properties placed on rounding edges never get a wrong answer from any domain."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from onnx_models import N, make_model, run_ort
from verikit import Box, Spec
from verikit.certify.vnnlib import parse_vnnlib
from verikit.cli import main
from verikit.domains import get_domain
from verikit.onnx_import import from_onnx

C_INEXACT = 1.0000000605359674  # half an ulp of float32 above 1: rounds to 1 + 2^-23


def _cli(*args):
    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(main, [str(a) for a in args] + ["--threads", "1"])
    finally:
        torch.set_num_threads(threads)


def _vnnlib(n_in, n_out, box, asserts):
    head = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in))
    head += "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out))
    head += "".join(f"(assert (>= X_{i} {lo!r}))\n(assert (<= X_{i} {hi!r}))\n" for i, (lo, hi) in enumerate(box))
    return head + "".join(f"(assert {a})\n" for a in asserts)


def test_spec_keeps_the_exact_property_through_conversions():
    spec = Spec(torch.tensor([[C_INEXACT, -1.0]], dtype=torch.float64), torch.tensor([1e-4], dtype=torch.float64),
                strict=torch.tensor([True]))
    s32 = spec.to(dtype=torch.float32)
    assert s32.C.dtype == torch.float32 and float(s32.C[0, 0]) == 1 + 2 ** -23  # rounded to nearest
    assert float(s32.d[0]) >= 1e-4  # thresholds rounded up
    assert s32.exact[0].dtype == torch.float64 and float(s32.exact_C[0, 0]) == C_INEXACT
    back = s32.expand(3).select([1, 2]).to(dtype=torch.float64)
    assert float(back.C[0, 0, 0]) == C_INEXACT and back.exact is None and bool(back.strict[0])


def test_rows_near_zero_are_decided_in_exact_arithmetic():
    # float64 gives 2^60 + 1 - 2^60 = 0 (a boundary point); exactly it is 1 > 0: not violated
    spec = Spec(torch.tensor([[1.0, 1.0]], dtype=torch.float64), torch.tensor([2.0 ** 60], dtype=torch.float64))
    y = torch.tensor([[2.0 ** 60, 1.0]], dtype=torch.float64)
    assert float(spec.exact_values(y)[0, 0]) == 0.0
    assert not bool(spec.violated_by(y)[0])
    assert bool(spec.violated_by(torch.tensor([[2.0 ** 60, 0.0]], dtype=torch.float64))[0])


def test_strict_rows_are_violated_only_strictly():
    y = torch.tensor([[0.0]])
    non_strict = Spec(torch.tensor([[1.0]]), torch.tensor([0.0]))
    strict = Spec(torch.tensor([[1.0]]), torch.tensor([0.0]), strict=torch.tensor([True]))
    assert bool(non_strict.violated_by(y)[0]) and not bool(strict.violated_by(y)[0])
    assert bool(strict.violated_by(torch.tensor([[-1e-30]]))[0])


def test_vnnlib_strict_comparisons_are_kept():
    prop = parse_vnnlib(_vnnlib(1, 2, [(0.0, 1.0)], ["(< Y_0 0)", "(<= Y_1 2)"]))
    (case,) = prop.cases
    assert case.spec.strict.tolist() == [True, False]
    prop = parse_vnnlib(_vnnlib(1, 1, [(-1.0, 1.0)], ["(> X_0 0.5)", "(<= Y_0 0)"]))
    (case,) = prop.cases
    assert case.lo[0] == 0.5 and case.inner_lo[0] > 0.5 and not case.contains(np.array([0.5]))


def test_vnnlib_input_bounds_with_inexact_division_are_exact():
    prop = parse_vnnlib(_vnnlib(1, 1, [], ["(<= (* 3 X_0) 1)", "(>= X_0 0)", "(<= Y_0 0)"]))
    (case,) = prop.cases
    from fractions import Fraction

    assert Fraction(case.hi[0]) >= Fraction(1, 3) >= Fraction(case.inner_hi[0])


def _coefficient_model(tmp_path):
    """y = (W x + 1000, W x + 1000): identical outputs near 1e3 for x in [0, 1]^2."""
    W = np.array([[1e-3, 2e-3], [1e-3, 2e-3]], dtype=np.float32)
    return make_model([N("Gemm", ["x", "W", "b"], ["y"], transB=1)], (1, 2),
                      [("W", W), ("b", np.array([1000.0, 1000.0], dtype=np.float32))], str(tmp_path / "c.onnx"))


def test_inexact_coefficient_is_not_proven_by_its_rounded_copy(tmp_path):
    """C y = 1.0000000605359674 y0 - y1 = 6.05e-5 <= 1e-4 everywhere: violated. Rounded to
    float32 (1 + 2^-23) the row is 1.19e-4 > 1e-4: the old spec proved it "holds"."""
    path = _coefficient_model(tmp_path)
    prop = tmp_path / "p.vnnlib"
    prop.write_text(_vnnlib(2, 2, [(0.0, 1.0), (0.0, 1.0)], [f"(<= (- (* {C_INEXACT!r} Y_0) Y_1) 0.0001)"]))
    for domains in ("box", "crown", "box,crown,milp"):
        res = _cli("certify", path, "--vnnlib", prop, "--domains", domains)
        assert res.exit_code == 0 and res.stdout.strip() == "violated", res.output
        res = _cli("certify", path, "--vnnlib", prop, "--domains", domains, "--no-attack", "--timeout", "10")
        assert res.exit_code == 0 and res.stdout.strip() != "holds", (domains, res.output)
    from verikit.certify.vnnlib import load_vnnlib
    from verikit.domains.vnnlib_verify import verify_vnnlib

    ans = verify_vnnlib(from_onnx(path), load_vnnlib(str(prop)), time_limit=20, pre=("crown",), solver="highs")
    assert ans.answer == "violated"


def test_the_exact_property_is_what_a_domain_verdict_proves():
    g = torch.Generator().manual_seed(0)
    from verikit.torch_import import from_torch

    net = torch.nn.Sequential(torch.nn.Linear(2, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1e-3, 2e-3], [1e-3, 2e-3]]))
        net[0].bias.fill_(1000.0)
    graph = from_torch(net, (2,))
    box = Box(torch.zeros(1, 2), torch.ones(1, 2))
    spec = Spec(torch.tensor([[C_INEXACT, -1.0]], dtype=torch.float64), torch.tensor([1e-4], dtype=torch.float64))
    s32 = spec.to(dtype=torch.float32)
    for name in ("box", "deeppoly", "crown", "milp"):
        res = get_domain(name).bound(graph, box, s32)
        assert not bool(res.verified(s32)[0]), name
    assert bool(spec.violated_by(graph.forward(torch.rand(1, 2, generator=g)))[0])


def test_strict_unsafe_region_is_not_violated_on_its_boundary(tmp_path):
    """(< Y_0 0) with Y_0 = relu(X_0) is unreachable: the old parser read it as <= 0 and
    reported a "counterexample" with Y_0 = 0."""
    path = make_model([N("Relu", ["x"], ["y"])], (1, 1), [], str(tmp_path / "relu.onnx"))
    strict = tmp_path / "strict.vnnlib"
    strict.write_text(_vnnlib(1, 1, [(-1.0, 1.0)], ["(< Y_0 0)"]))
    for domains in ("box", "box,crown,milp"):
        res = _cli("certify", path, "--vnnlib", strict, "--domains", domains, "--timeout", "2")
        assert res.exit_code == 0 and res.stdout.strip() in ("holds", "unknown"), res.output
    non_strict = tmp_path / "non_strict.vnnlib"
    non_strict.write_text(_vnnlib(1, 1, [(-1.0, 1.0)], ["(<= Y_0 0)"]))
    res = _cli("certify", path, "--vnnlib", non_strict, "--domains", "box", "--result-file", tmp_path / "r.txt")
    assert res.stdout.strip() == "violated"
    x = float((tmp_path / "r.txt").read_text().split("(X_0 ")[1].split(")")[0])
    assert -1.0 <= x <= 0.0


def _edge_cases(seed):
    """An MLP, a point x0, onnxruntime's output there, and thresholds on its rounding edges."""
    rng = np.random.default_rng(seed)
    W1, b1 = rng.standard_normal((6, 3)).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    W2 = (rng.standard_normal((2, 6)) * 30).astype(np.float32)
    b2 = (np.sign(rng.standard_normal(2)) * rng.uniform(500, 2000, 2)).astype(np.float32)  # outputs near 1e3
    x0 = rng.uniform(-1, 1, 3).astype(np.float32)
    return (W1, b1, W2, b2), x0, rng


@pytest.mark.parametrize("seed", range(6))
def test_properties_on_rounding_edges_never_get_a_wrong_answer(seed, tmp_path):
    """A point box x0, thresholds at onnxruntime's output there and a few float32/float64
    ulps away, a coefficient that is no float32, strict and non-strict: onnxruntime's output
    at x0 decides the truth exactly; no domain may prove a violated property, and certify
    (attack + box, crown) never answers against the truth."""
    (W1, b1, W2, b2), x0, rng = _edge_cases(seed)
    path = make_model([N("Gemm", ["x", "W1", "b1"], ["h"], transB=1), N("Relu", ["h"], ["r"]),
                       N("Gemm", ["r", "W2", "b2"], ["y"], transB=1)], (1, 3),
                      [("W1", W1), ("b1", b1), ("W2", W2), ("b2", b2)], str(tmp_path / "m.onnx"))
    y0 = run_ort(path, x0[None]).astype(np.float64)[0]
    c = 1.0 + float(rng.uniform(0.5, 0.6)) * 2.0 ** -23  # not a float32: rounds up by ~0.45 ulp
    c = c if y0[0] > 0 else -c  # so that the rounded copy makes the row larger (the unsafe direction)
    base = float(c * y0[0] - y0[1])
    f32 = float(np.spacing(np.float32(abs(base) + 1)))
    gap = (float(np.float32(c)) - c) * float(y0[0])  # what the rounded coefficient adds to the row
    graph = from_onnx(path)
    box = Box(torch.from_numpy(x0[None]), torch.from_numpy(x0[None]))
    answers = {}
    # on the edge, an ulp either side, and between the exact row and its rounded copy
    shifts = (0.0, f32, -f32, 2.0 ** -40, -(2.0 ** -40), gap / 3, gap / 2, 2 * gap / 3, -gap / 2)
    for k, shift in enumerate(shifts):
        for op in ("<=", "<"):
            text = _vnnlib(3, 2, [(float(v), float(v)) for v in x0], [f"({op} (- (* {c!r} Y_0) Y_1) {base + shift!r})"])
            case = parse_vnnlib(text).cases[0]
            truth = bool(case.spec.violated_by(torch.tensor(y0[None]))[0])  # the box holds one point
            spec = case.spec.to(dtype=torch.float32)
            for name in ("box", "crown", "milp"):
                if bool(get_domain(name).bound(graph, box, spec).verified(spec)[0]):
                    assert not truth, (name, k, op)  # "holds" while onnxruntime violates it
            answers[(k, op)] = truth
            if k in (0, 1, 2, 6):  # the command line too: on the edge, an ulp away, between
                p = tmp_path / f"edge_{k}_{op}.vnnlib"
                p.write_text(text)
                res = _cli("certify", path, "--vnnlib", p, "--domains", "box,crown")
                assert res.exit_code == 0, res.output
                assert res.stdout.strip() != ("holds" if truth else "violated"), (k, op, text)
    assert any(answers.values()) and not all(answers.values())  # the edges do cut both ways
