"""The float-sound mode (`sound=True`, `--sound`): bounds contain every value a float32 runtime
computes (torch's float32 forward pass, onnxruntime with its graph optimisations), on every IR
op, at eps = 0, and on constructions where real-arithmetic bounds do not; milp refuses it."""
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from onnx_models import N, make_model, run_ort
from op_graphs import OP_GRAPHS
from verikit import Box, Spec
from verikit.cli import main
from verikit.domains import available_domains, get_domain
from verikit.errors import VerikitError
from verikit.onnx_import import from_onnx

SOUND = ("box", "deeppoly", "crown")
F32 = np.float32


def _cli(*args):
    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(main, [str(a) for a in args] + ["--threads", "1"])
    finally:
        torch.set_num_threads(threads)


def _clamp(pts, box):
    """Sample points kept inside the box (lo + u (hi - lo) can round past hi by an ulp)."""
    return torch.minimum(torch.maximum(pts, box.lo), box.hi)


def _inside(values, box, tol=0.0):
    return bool(((values.double() >= box.lo.double() - tol) & (values.double() <= box.hi.double() + tol)).all())


@pytest.mark.parametrize("label", sorted(OP_GRAPHS))
@pytest.mark.parametrize("name", SOUND)
def test_every_node_contains_the_float32_execution(label, name):
    graph, box = OP_GRAPHS[label](seed=3)
    res = get_domain(name, sound=True).bound(graph, box)
    assert res.store.float_sound
    pts = _clamp(box.sample(400, torch.Generator().manual_seed(0)), box).reshape((-1,) + tuple(graph.input_shape))
    with torch.no_grad():
        vals = graph.forward(pts, return_all=True)  # float32 execution
    for node in [graph.input_name] + [n.name for n in graph.nodes]:
        stored = res.store[node]
        v = vals[node].reshape((400,) + tuple(stored.lo.shape))
        assert _inside(v, stored), (label, node)


@pytest.mark.parametrize("label", ["mlp", "conv", "sigmoid", "tanh", "batchnorm", "avgpool", "residual-add"])
@pytest.mark.parametrize("name", SOUND)
def test_eps_zero_bounds_are_tight_and_contain_the_float32_value(label, name):
    graph, box = OP_GRAPHS[label](seed=1)
    point = Box(box.lo, box.lo)
    res = get_domain(name, sound=True).bound(graph, point)
    with torch.no_grad():
        y = graph.forward(box.lo).reshape(res.lower.shape).double()
    assert bool((res.lower <= y).all() and (y <= res.upper).all())
    width = (res.upper - res.lower).max()
    assert float(width) <= 1e-4 * (1 + float(y.abs().max()))  # a few ulps of float32, not a blow-up


def _cancellation_model(tmp_path):
    nodes = [N("Gemm", ["x", "A", "a"], ["z1"]), N("Relu", ["z1"], ["r1"]), N("Gemm", ["x", "A"], ["z2"]),
             N("Relu", ["z2"], ["r2"]), N("Sub", ["r1", "r2"], ["s"]), N("Sub", ["s", "k"], ["y"])]
    return make_model(nodes, (1, 1), [("A", np.array([[1e6]], F32)), ("a", np.array([1e6], F32)),
                                      ("k", np.array([1e6], F32))], str(tmp_path / "cancel.onnx"))


@pytest.mark.parametrize("name", SOUND)
def test_sound_bounds_contain_what_real_arithmetic_excludes(name, tmp_path):
    path = _cancellation_model(tmp_path)
    graph = from_onnx(path)
    box = Box(torch.zeros(1, 1), torch.ones(1, 1))
    normal = get_domain(name).bound(graph, box)
    sound = get_domain(name, sound=True).bound(graph, box)
    if name != "box":  # real arithmetic: y = 0 on the whole box, and the bounds say so
        assert float(normal.lower) == 0.0 and float(normal.upper) == 0.0
    assert float(sound.lower) <= -0.0625 and float(sound.upper) >= 0.0625  # onnxruntime's values
    spec = Spec(torch.tensor([[1.0]]), torch.tensor([-0.05]))
    assert not bool(get_domain(name, sound=True).bound(graph, box, spec).verified(spec)[0])


def _random_onnx_net(tmp_path, seed, kind):
    """Nets whose float32 results are visibly rounded: large weights and biases that cancel."""
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        W1 = (rng.standard_normal((16, 4)) * 300).astype(F32)
        b1 = (rng.standard_normal(16) * 3000).astype(F32)
        W2 = (rng.standard_normal((3, 16)) * 30).astype(F32)
        nodes = [N("Gemm", ["x", "W1", "b1"], ["h"], transB=1), N("Relu", ["h"], ["r"]),
                 N("Gemm", ["r", "W2", "b2"], ["z"], transB=1, alpha=0.7, beta=1.3), N("Tanh", ["z"], ["t"]),
                 N("Div", ["t", "k"], ["y"])]
        inits = [("W1", W1), ("b1", b1), ("W2", W2), ("b2", (rng.standard_normal(3) * 1e4).astype(F32)),
                 ("k", np.array([3.0], F32))]
        return make_model(nodes, (1, 4), inits, str(tmp_path / f"mlp{seed}.onnx")), (1, 4)
    W = (rng.standard_normal((4, 2, 3, 3)) * 50).astype(F32)
    nodes = [N("Sub", ["x", "m"], ["xs"]), N("Conv", ["xs", "W", "b"], ["c"], pads=[1, 1, 1, 1]),
             N("BatchNormalization", ["c", "g", "be", "mu", "var"], ["n"]), N("Relu", ["n"], ["r"]),
             N("AveragePool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]), N("Sigmoid", ["p"], ["s"]),
             N("MaxPool", ["s"], ["q"], kernel_shape=[2, 2]), N("Flatten", ["q"], ["f"]),
             N("Gemm", ["f", "W2"], ["y"], transB=1)]
    inits = [("m", np.array([0.5], F32)), ("W", W), ("b", (rng.standard_normal(4) * 500).astype(F32)),
             ("g", rng.uniform(0.5, 2, 4).astype(F32)), ("be", (rng.standard_normal(4) * 100).astype(F32)),
             ("mu", (rng.standard_normal(4) * 500).astype(F32)), ("var", rng.uniform(100, 1000, 4).astype(F32)),
             ("W2", (rng.standard_normal((3, 16)) * 100).astype(F32))]
    return make_model(nodes, (1, 2, 6, 6), inits, str(tmp_path / f"cnn{seed}.onnx")), (1, 2, 6, 6)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("seed", range(2))
def test_onnxruntime_outputs_lie_inside_the_sound_bounds(kind, seed, tmp_path):
    path, shape = _random_onnx_net(tmp_path, seed, kind)
    graph = from_onnx(path)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    for eps in (0.0, 1e-6, 1e-3):
        box = Box((x - eps).float(), (x + eps).float())
        pts = [box.lo[0], box.hi[0]] + list(_clamp(box.sample(30, torch.Generator().manual_seed(1)), box)[:, 0])
        ys = torch.stack([torch.from_numpy(run_ort(path, p.numpy()[None])).reshape(-1) for p in pts]).double()
        for name in SOUND:
            res = get_domain(name, sound=True).bound(graph, box)
            assert bool((ys >= res.lower).all() and (ys <= res.upper).all()), (name, eps)


def test_normal_mode_bounds_can_exclude_float32_results_which_sound_ones_include(tmp_path):
    """Evidence that the tests above can fail: at eps = 0 the real-arithmetic (normal-mode)
    bounds of a net with large weights miss onnxruntime's float32 output almost always; the
    sound ones never do."""
    missed, total = 0, 0
    for seed in range(2):
        rng = np.random.default_rng(seed)
        nodes = [N("Gemm", ["x", "W1", "b1"], ["h"], transB=1), N("Relu", ["h"], ["r"]),
                 N("Gemm", ["r", "W2", "b2"], ["y"], transB=1)]
        inits = [("W1", (rng.standard_normal((16, 4)) * 300).astype(F32)),
                 ("b1", (rng.standard_normal(16) * 3000).astype(F32)),
                 ("W2", (rng.standard_normal((3, 16)) * 30).astype(F32)), ("b2", (rng.standard_normal(3) * 1e4).astype(F32))]
        path = make_model(nodes, (1, 4), inits, str(tmp_path / f"big{seed}.onnx"))
        graph = from_onnx(path)
        for k in range(5):
            x = torch.rand(1, 4, generator=torch.Generator().manual_seed(100 + k))
            y = torch.from_numpy(run_ort(path, x.numpy())).reshape(1, -1).double()
            for name in SOUND:
                normal = get_domain(name).bound(graph, Box(x, x))
                missed += int(not bool((y >= normal.lower.double()).all() and (y <= normal.upper.double()).all()))
                sound = get_domain(name, sound=True).bound(graph, Box(x, x))
                assert bool((y >= sound.lower).all() and (y <= sound.upper).all())
                total += 1
    assert missed > total // 2


def test_alpha_crown_in_sound_mode_contains_the_float32_execution():
    graph, box = OP_GRAPHS["mlp"](seed=5, width=1.0)
    spec = Spec.robustness(torch.tensor([0, 1]), 3)
    res = get_domain("crown", sound=True, alpha_steps=10).bound(graph, box, spec)
    plain = get_domain("crown", sound=True).bound(graph, box, spec)
    assert bool((res.lower >= plain.lower - 1e-12).all())
    pts = _clamp(box.sample(500, torch.Generator().manual_seed(0)), box)
    vals = torch.stack([spec.values(graph.forward(p)) for p in pts]).double()
    assert bool((vals >= res.lower).all())


def test_sound_lower_bounds_are_below_the_normal_ones_and_cost_little(test_data):
    from verikit.datasets import load_mnist

    graph = from_onnx(os.path.join(test_data, "tiny_mnist_mlp.onnx"))
    x, y = load_mnist("test")
    x, y = x[:16].reshape((16,) + graph.input_shape), y[:16]
    box, spec = Box.linf_ball(x, 0.03), Spec.robustness(y, 10)
    for name in SOUND:
        normal = get_domain(name).bound(graph, box, spec)
        sound = get_domain(name, sound=True).bound(graph, box, spec)
        assert bool((sound.lower <= normal.lower.double() + 1e-9).all())
        assert float((normal.lower.double() - sound.lower).max()) < 0.05  # a small price on a trained net
        assert int(sound.verified(spec).sum()) <= int(normal.verified(spec).sum())


def test_activations_of_onnxruntime_meet_the_assumed_accuracy(tmp_path):
    """The float-sound model assumes sigmoid/tanh accurate to 16 units of 2^-24 of the result
    plus 2^-24 absolute; check onnxruntime's kernels on a dense grid."""
    from verikit.rounding import ACTIVATION_ABS, ACTIVATION_ULPS, U32

    xs = np.concatenate([np.linspace(-20, 20, 20001), np.linspace(-1e-3, 1e-3, 2001)]).astype(F32)
    for op, exact in (("Sigmoid", lambda v: 1 / (1 + np.exp(-v))), ("Tanh", np.tanh)):
        path = make_model([N(op, ["x"], ["y"])], (1, xs.size), [], str(tmp_path / f"{op}.onnx"))
        got = run_ort(path, xs[None]).astype(np.float64)[0]
        want = exact(xs.astype(np.float64))
        top = 1.0 if op == "Sigmoid" else np.tanh(np.abs(xs.astype(np.float64)))
        assert np.all(np.abs(got - want) <= ACTIVATION_ULPS * U32 * top + ACTIVATION_ABS)


def test_domains_declare_whether_they_have_a_sound_mode():
    domains = available_domains()
    assert {n for n in ("box", "deeppoly", "crown") if domains[n].float_sound} == {"box", "deeppoly", "crown"}
    assert not domains["milp"].float_sound


def test_the_chain_refuses_domains_without_a_sound_mode():
    from verikit.certify.chain import Chain, ChainConfig

    graph, _ = OP_GRAPHS["mlp"]()
    with pytest.raises(VerikitError, match="milp"):
        Chain(graph, ChainConfig(domains=["box", "milp"], sound=True))
    chain = Chain(graph, ChainConfig(domains=["box", "crown"], sound=True))
    assert all(opts.get("sound") for _, _, opts in chain.stages)


def test_certify_sound_on_mnist_and_milp_refused_in_one_line(test_data):
    model = os.path.join(test_data, "tiny_mnist_mlp.onnx")
    args = ["certify", model, "--eps", "0.03", "--num-samples", "20", "--json"]
    normal = _cli(*args, "--domains", "box,crown")
    sound = _cli(*args, "--domains", "box,crown", "--sound")
    assert normal.exit_code == 0 and sound.exit_code == 0, sound.output
    import json

    verified = lambda out: json.loads(out)["results"][0]["verified"]
    assert 0 < verified(sound.stdout) <= verified(normal.stdout)
    refused = _cli(*args, "--domains", "box,crown,milp", "--sound")
    assert refused.exit_code == 2 and refused.stderr.startswith("error: --sound") and "milp" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_vnncomp_sound_with_milp_is_refused(tmp_path):
    from conftest import SHARED

    csv_path = os.path.join(SHARED, "vnncomp2021", "instances.csv")
    if not os.path.exists(csv_path):
        pytest.skip("shared VNN-COMP instances not present")
    res = _cli("vnncomp", csv_path, "--benchmark", "test", "--domains", "box,milp", "--sound", "-o", tmp_path / "r.csv")
    assert res.exit_code == 2 and "milp" in res.stderr and not (tmp_path / "r.csv").exists()
    ok = _cli("vnncomp", csv_path, "--benchmark", "test", "--domains", "box,crown", "--sound", "-o", tmp_path / "r.csv")
    assert ok.exit_code == 0, ok.output
    rows = (tmp_path / "r.csv").read_text().splitlines()[1:]
    assert len(rows) == 5 and all(",unknown," in r or ",True," in r for r in rows)  # never a wrong answer
