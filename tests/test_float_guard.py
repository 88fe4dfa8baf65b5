"""The rounding guard and the regressions of issue 14 items 5, 6 and 8 outside the importer:
proofs that rest on cancelling large magnitudes, relaxation lines that miss by an ulp, milp
counterexamples under --mean/--std, and crashes of milp and of the back-substitution engine."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from onnx_models import N, make_model, run_ort
from verikit import Box, Spec, ir
from verikit.cli import main
from verikit.domains import get_domain
from verikit.onnx_import import from_onnx

F32 = np.float32
DOMAINS = ("box", "deeppoly", "crown", "milp")


def _cli(*args):
    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(main, [str(a) for a in args] + ["--threads", "1"])
    finally:
        torch.set_num_threads(threads)


def _cancellation_model(tmp_path):
    """y = relu(1e6 x + 1e6) - relu(1e6 x) - 1e6: exactly 0 on [0, 1] in real arithmetic,
    -0.0625 in float32 (onnxruntime) on about a fifth of the inputs."""
    nodes = [N("Gemm", ["x", "A", "a"], ["z1"]), N("Relu", ["z1"], ["r1"]), N("Gemm", ["x", "A"], ["z2"]),
             N("Relu", ["z2"], ["r2"]), N("Sub", ["r1", "r2"], ["s"]), N("Sub", ["s", "k"], ["y"])]
    return make_model(nodes, (1, 1), [("A", np.array([[1e6]], F32)), ("a", np.array([1e6], F32)),
                                      ("k", np.array([1e6], F32))], str(tmp_path / "cancel.onnx"))


def test_the_cancellation_really_is_violated_in_float32(tmp_path):
    path = _cancellation_model(tmp_path)
    ys = [float(run_ort(path, np.array([[x]], F32))[0, 0]) for x in np.linspace(0, 1, 200)]
    assert min(ys) == -0.0625 and max(ys) == 0.0625


@pytest.mark.parametrize("name", DOMAINS)
def test_no_domain_proves_what_only_cancellation_gives(name, tmp_path):
    graph = from_onnx(_cancellation_model(tmp_path))
    box = Box(torch.zeros(1, 1), torch.ones(1, 1))
    spec = Spec(torch.tensor([[1.0]]), torch.tensor([-0.05]))  # y > -0.05
    res = get_domain(name).bound(graph, box, spec)
    assert not bool(res.verified(spec)[0])
    if res.status is None:  # the bound itself is 0 (exact in real arithmetic): only the guard refuses it
        assert res.guard is not None and float(res.guard[0, 0]) > 0.0625


def test_certify_without_attack_does_not_say_holds_and_with_it_finds_the_violation(tmp_path):
    path = _cancellation_model(tmp_path)
    prop = tmp_path / "p.vnnlib"
    prop.write_text("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (>= X_0 0))(assert (<= X_0 1))"
                    "(assert (<= Y_0 -0.05))")
    for domains in ("box", "deeppoly", "crown", "milp"):
        res = _cli("certify", path, "--vnnlib", prop, "--domains", domains, "--no-attack", "--timeout", "5")
        assert res.exit_code == 0 and res.stdout.strip() != "holds", (domains, res.output)
    res = _cli("certify", path, "--vnnlib", prop, "--domains", "box,crown", "--result-file", tmp_path / "r.txt")
    assert res.stdout.strip() == "violated"
    assert "(Y_0 -0.0625)" in (tmp_path / "r.txt").read_text()


def test_guard_costs_no_proof_on_a_trained_net(test_data):
    """The guard is small next to real margins: on the tiny MNIST MLP it decides exactly what
    the old relative guard decided (and it is computed only for verdicts)."""
    import os

    from verikit.datasets import load_mnist

    graph = from_onnx(os.path.join(test_data, "tiny_mnist_mlp.onnx"))
    x, y = load_mnist("test")
    x, y = x[:32].reshape((32,) + graph.input_shape), y[:32]
    box, spec = Box.linf_ball(x, 0.03), Spec.robustness(y, 10)
    res = get_domain("crown").bound(graph, box, spec)
    new, old = res.verified(spec), spec.holds_given_lower(res.lower)
    assert bool(new.any()) and torch.equal(new, old)
    assert float(res.guard.max()) < 1e-2 and float(res.guard.min()) > 0


# ------------------------------------------------------------------ relaxation lines in floating point
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_chord_is_above_relu_at_both_ends_exactly(dtype):
    from fractions import Fraction

    from verikit.domains.relaxations import leaky_relu_relaxation, relu_relaxation

    g = torch.Generator().manual_seed(0)
    u = (40 + 4 * torch.rand(20000, generator=g)).to(dtype)  # u about 42: the chord missed f(l) by an ulp
    l = (-10 * torch.rand(20000, generator=g)).to(dtype)
    for rel, f in ((relu_relaxation(l, u), lambda v: max(v, 0)),
                   (leaky_relu_relaxation(l, u, op=ir.LeakyReLU(0.3)), lambda v: v if v >= 0 else 0.3 * v)):
        s, b = rel.upper_slope.double().numpy(), rel.upper_bias.double().numpy()
        for k in range(0, 20000, 97):  # exact rational check of s p + b >= f(p) at p = l, u
            for p in (float(l[k]), float(u[k])):
                assert Fraction(s[k]) * Fraction(p) + Fraction(b[k]) >= Fraction(f(p))


def test_concave_leaky_relu_chord_is_below():
    from fractions import Fraction

    from verikit.domains.relaxations import leaky_relu_relaxation

    g = torch.Generator().manual_seed(1)
    u, l = 40 + 4 * torch.rand(5000, generator=g), -10 * torch.rand(5000, generator=g)
    rel = leaky_relu_relaxation(l, u, op=ir.LeakyReLU(2.5))
    s, b = rel.lower_slope.double().numpy(), rel.lower_bias.double().numpy()
    for k in range(0, 5000, 37):
        for p in (float(l[k]), float(u[k])):
            fp = p if p >= 0 else 2.5 * p
            assert Fraction(s[k]) * Fraction(p) + Fraction(b[k]) <= Fraction(fp)


# ------------------------------------------------------------------ item 6: milp under --mean/--std
def test_milp_counterexamples_are_confirmed_with_the_normalisation(tmp_path):
    """y = (z, -z, 0) with z the normalised first input (x0 - 0.5) / 0.1: around x0 = 0.52 the
    label is 0 and every x0 < 0.5 is a counterexample. Fed to onnxruntime without the
    normalisation (the old re-check), such a point looks correctly classified."""
    from verikit.certify.chain import Chain, ChainConfig
    from verikit.certify.model import load_model

    W = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], F32)
    nodes = [N("Gemm", ["x", "W"], ["h"], transB=1), N("Relu", ["h"], ["r"]), N("Sub", ["h", "r"], ["n"]),
             N("Add", ["r", "n"], ["y"])]  # relu(h) + (h - relu(h)) = h, through a ReLU
    path = make_model(nodes, (1, 2), [("W", W)], str(tmp_path / "m.onnx"))
    model = load_model(path, mean=[0.5], std=[0.1])
    x = torch.tensor([[0.52, 0.3], [0.9, 0.3]])
    labels = model.graph.forward(x).argmax(1)
    assert labels.tolist() == [0, 0]
    box, spec = Box.linf_ball(x, 0.05), Spec.robustness(labels, 3)
    cfg = ChainConfig(domains=["milp"], attack=False, onnx_path=model.path, onnx_input=model.onnx_input,
                      domain_options={"milp": {"solver": "highs", "time_limit": 10.0, "input_split": False}})
    first, second = Chain(model.graph, cfg).run(box, spec)
    assert first.status == "falsified" and first.by == "milp", first
    assert second.status == "verified"
    cex = first.counterexample.numpy()
    assert 0.47 - 1e-6 <= cex[0] <= 0.5  # the file sees (x - 0.5) / 0.1 <= 0: class 0 is not ahead
    assert int(np.argmax(run_ort(path, ((cex - 0.5) / 0.1)[None]))) != 0


# ------------------------------------------------------------------ item 8: crashes
def _conv_pad_model(tmp_path, act):
    rng = np.random.default_rng(5)
    extra = dict(kernel_shape=[2, 2]) if act == "MaxPool" else {}
    side = 7 if act == "MaxPool" else 8
    nodes = [N("Conv", ["x", "W0"], ["c0"], pads=[1, 1, 1, 1]), N("Relu", ["c0"], ["r0"]),
             N("Conv", ["r0", "W", "b"], ["c"], pads=[2, 2, 2, 2]), N(act, ["c"], ["a"], **extra),
             N("Flatten", ["a"], ["f"]), N("Gemm", ["f", "W2"], ["y"], transB=1)]
    inits = [("W0", rng.standard_normal((2, 1, 3, 3)).astype(F32)), ("W", rng.standard_normal((2, 2, 1, 1)).astype(F32)),
             ("b", rng.standard_normal(2).astype(F32)), ("W2", rng.standard_normal((3, 2 * side * side)).astype(F32))]
    return make_model(nodes, (1, 1, 4, 4), inits, str(tmp_path / f"{act}.onnx"))


@pytest.mark.parametrize("act", ["Sigmoid", "Tanh", "MaxPool"])
@pytest.mark.parametrize("name", ["deeppoly", "crown"])
def test_conv_tiles_entirely_in_the_padding_are_bounded_soundly(act, name, tmp_path):
    path = _conv_pad_model(tmp_path, act)
    graph = from_onnx(path)
    x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    box = Box.linf_ball(x, 0.1)
    res = get_domain(name).bound(graph, box, None)  # raw outputs: (1, 3)
    for p in box.sample(64, torch.Generator().manual_seed(2)):
        y = torch.from_numpy(run_ort(path, p.numpy()))
        assert bool((y >= res.lower - 1e-4).all() and (y <= res.upper + 1e-4).all())


def test_milp_on_a_point_box_through_maxpool(tmp_path):
    """Stored (float32) and encoded (float64) intervals of a point differ by an ulp; their
    intersection used to be empty and every max-pool candidate was dropped (a crash)."""
    rng = np.random.default_rng(1)
    nodes = [N("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]),
             N("MaxPool", ["c"], ["a"], kernel_shape=[2, 2], strides=[2, 2]), N("Flatten", ["a"], ["f"]),
             N("Gemm", ["f", "W2"], ["y"], transB=1)]
    path = make_model(nodes, (1, 1, 4, 4), [("W", (rng.standard_normal((2, 1, 3, 3)) * 0.5).astype(F32)),
                                            ("b", rng.standard_normal(2).astype(F32)),
                                            ("W2", rng.standard_normal((3, 8)).astype(F32))], str(tmp_path / "mp.onnx"))
    graph = from_onnx(path)
    for seed in range(3):
        x = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 3
        label = graph.forward(x).argmax(1)
        res = get_domain("milp", solver="highs", bounds_from="none", input_split=False).bound(
            graph, Box.point(x), Spec.robustness(label, 3))
        assert res.status[0] in ("verified", "unknown")
