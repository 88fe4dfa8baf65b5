"""The soundness suite that found issue 14, kept: an optimising attacker against every stored
bound of every domain, and randomly generated ONNX models checked against onnxruntime (every
tensor's values and shapes) with bounds that must contain onnxruntime's own outputs."""
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from onnx_models import N, make_model, run_ort
from op_graphs import OP_GRAPHS
from verikit import Box, from_onnx
from verikit.domains import get_domain
from verikit.domains.box import propagate_box
from verikit.errors import UnsupportedOpsError
from verikit.onnx_check import compare_with_onnxruntime

SLOW = pytest.mark.slow
DOMAINS = [("box", {}), ("crown", {}), ("crown", {"sound": True}),
           pytest.param("deeppoly", {}, marks=SLOW), pytest.param("crown", {"alpha_steps": 5}, marks=SLOW),
           pytest.param("box", {"sound": True}, marks=SLOW)]
MILP_GRAPHS = ["linear", "relu", "leaky-relu", "mlp", "maxpool", "concat", "avgpool"]


def _attack_node(graph, box: Box, node: str, steps: int = 15) -> tuple:
    """PGD inside the box for the largest and the smallest value of every element of `node`
    (each element and direction its own batch row): returns (min found, max found)."""
    lo, hi = box.lo, box.hi
    B = lo.shape[0]
    with torch.no_grad():
        n = graph.forward(lo, return_all=True)[node].reshape(B, -1).shape[1]
    rows = 2 * n
    # rows: (element, direction) x batch; start at random points of the box
    lo_r, hi_r = lo.repeat((rows,) + (1,) * (lo.dim() - 1)), hi.repeat((rows,) + (1,) * (lo.dim() - 1))
    gen = torch.Generator().manual_seed(0)
    x = lo_r + torch.rand(lo_r.shape, generator=gen) * (hi_r - lo_r)
    sign = torch.cat([torch.ones(n), -torch.ones(n)]).repeat_interleave(B)
    target = torch.cat([torch.arange(n), torch.arange(n)]).repeat_interleave(B)
    best_lo = torch.full((B, n), float("inf"))
    best_hi = torch.full((B, n), float("-inf"))
    step = (hi_r - lo_r) / 8
    for k in range(steps + 1):
        x = x.detach().requires_grad_(k < steps)
        v = graph.forward(x, return_all=True)[node].reshape(rows * B, -1)
        picked = v.gather(1, target[:, None])[:, 0]
        with torch.no_grad():
            got = v.detach().reshape(rows, B, n)
            best_lo = torch.minimum(best_lo, got.amin(0))
            best_hi = torch.maximum(best_hi, got.amax(0))
        if k == steps:
            break
        (g,) = torch.autograd.grad((sign * picked).sum(), x)
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x + step * g.sign(), lo_r), hi_r)
            step = step * 0.9
    return best_lo, best_hi


@pytest.mark.parametrize("label", sorted(OP_GRAPHS))
@pytest.mark.parametrize("name,opts", DOMAINS, ids=lambda v: v if isinstance(v, str) else ",".join(v) or "-")
def test_optimising_attacker_stays_inside_every_stored_bound(label, name, opts):
    graph, box = OP_GRAPHS[label](seed=11, width=0.8)
    res = get_domain(name, **opts).bound(graph, box)
    for node in [n.name for n in graph.nodes]:
        stored = res.store[node]
        found_lo, found_hi = _attack_node(graph, box, node)
        B = found_lo.shape[0]
        lo, hi = stored.lo.double().reshape(B, -1), stored.hi.double().reshape(B, -1)
        tol = 1e-5 * (1 + found_hi.abs().double())
        assert bool((found_lo.double() >= lo - tol).all()), (label, node, float((lo - found_lo.double()).max()))
        assert bool((found_hi.double() <= hi + tol).all()), (label, node, float((found_hi.double() - hi).max()))


@pytest.mark.parametrize("label", MILP_GRAPHS)
def test_optimising_attacker_against_milp_bounds(label):
    from verikit import Spec

    graph, box = OP_GRAPHS[label](seed=4, width=0.6)
    n = int(np.prod(graph.output_shape))
    spec = Spec(torch.eye(n).repeat(box.lo.shape[0], 1, 1), torch.zeros(box.lo.shape[0], n))
    res = get_domain("milp", solver="highs", exact_bounds=True, input_split=False).bound(graph, box, spec)
    found_lo, _ = _attack_node(graph, box, graph.output)
    assert bool((found_lo.double().reshape(res.lower.shape) >= res.lower.double() - 1e-5).all())


# ------------------------------------------------------------------ random ONNX models
def _image_op(draw, c: int, h: int, w: int, rng):
    """One random op on (., c, h, w) data: (nodes, initializers, new c, h, w)."""
    kind = draw(st.sampled_from(["conv", "bn", "act", "maxpool", "avgpool", "pad", "affine", "transpose", "concat"]))
    i = draw(st.integers(0, 10 ** 6))
    x, y = "t", f"t{i}"
    if kind == "conv":
        k, s, d = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        g = draw(st.sampled_from([1, c]))
        co = c * draw(st.integers(1, 2)) if g == c else draw(st.integers(1, 4))
        pads = [draw(st.integers(0, 2)) for _ in range(4)]
        W = (rng.standard_normal((co, c // g, k, k)) * 0.5).astype(np.float32)
        node = N("Conv", [x, f"W{i}", f"b{i}"], [y], kernel_shape=[k, k], strides=[s, s], dilations=[d, d], group=g,
                 pads=pads)
        oh = (h + pads[0] + pads[2] - d * (k - 1) - 1) // s + 1
        ow = (w + pads[1] + pads[3] - d * (k - 1) - 1) // s + 1
        return [node], [(f"W{i}", W), (f"b{i}", rng.standard_normal(co).astype(np.float32))], co, oh, ow
    if kind == "bn":
        p = [rng.standard_normal(c).astype(np.float32) for _ in range(3)] + [rng.uniform(0.5, 2, c).astype(np.float32)]
        names = [f"{n}{i}" for n in ("g", "b", "m", "v")]
        return [N("BatchNormalization", [x] + names, [y], epsilon=1e-3)], list(zip(names, p)), c, h, w
    if kind == "act":
        op = draw(st.sampled_from(["Relu", "LeakyRelu", "Sigmoid", "Tanh"]))
        return [N(op, [x], [y])], [], c, h, w
    if kind in ("maxpool", "avgpool"):
        k, s = draw(st.integers(1, 3)), draw(st.integers(1, 2))
        pads = [draw(st.integers(0, k - 1)) for _ in range(4)]
        ceil = draw(st.integers(0, 1))
        extra = {"count_include_pad": draw(st.integers(0, 1))} if kind == "avgpool" else {}
        op = "MaxPool" if kind == "maxpool" else "AveragePool"
        node = N(op, [x], [y], kernel_shape=[k, k], strides=[s, s], pads=pads, ceil_mode=ceil, **extra)
        return [node], [], c, None, None  # shape: recomputed from onnxruntime
    if kind == "pad":
        p = [0, 0] + [draw(st.integers(0, 2)) for _ in range(2)] + [0, 0] + [draw(st.integers(0, 2)) for _ in range(2)]
        return [N("Pad", [x, f"p{i}"], [y], mode="constant")], [(f"p{i}", np.array(p, np.int64))], c, None, None
    if kind == "affine":
        op = draw(st.sampled_from(["Add", "Sub", "Mul", "Div"]))
        shape = draw(st.sampled_from([(c, 1, 1), (1, c, 1, 1), (w,), (1,), (h, w), (2, c, 1, 1)]))
        k = rng.uniform(0.5, 1.5, shape).astype(np.float32) * (1 if op == "Div" else np.sign(rng.standard_normal(shape)))
        return [N(op, [x, f"k{i}"], [y])], [(f"k{i}", k.astype(np.float32))], c, None, None
    if kind == "transpose":
        return [N("Transpose", [x], [y], perm=[0, 1, 3, 2])], [], c, w, h
    return [N("Relu", [x], [f"r{i}"]), N("Concat", [x, f"r{i}"], [y], axis=1)], [], 2 * c, h, w


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_random_onnx_models_match_onnxruntime_with_shapes_and_bound_it(data, tmp_path):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31)))
    batched = data.draw(st.booleans())
    lead = 1 if batched else data.draw(st.integers(2, 3))
    c, h, w = data.draw(st.integers(1, 3)), data.draw(st.integers(3, 6)), data.draw(st.integers(3, 6))
    shape = (lead, c, h, w)
    nodes, inits, src = [], [], "x"
    for _ in range(data.draw(st.integers(1, 4))):
        new, more, c, _, _ = _image_op(data.draw, c, h, w, rng)
        for n in new:
            n.input[:] = [src if v == "t" else v for v in n.input]
        nodes += new
        inits += more
        src = new[-1].output[0]
    nodes[-1].output[:] = ["y"]
    _check_random_model(nodes, shape, inits, batched, tmp_path)


def _dense_op(draw, m: Optional[int], k: int, rng):
    """One random op on (m, k) data (m None: a vector (k,)): (nodes, initializers, new k)."""
    kind = draw(st.sampled_from(["gemm", "matmul", "matmul-add", "act", "affine", "bn"] if m else
                                ["matmul", "act", "affine"]))
    i = draw(st.integers(0, 10 ** 6))
    x, y = "t", f"t{i}"
    if kind == "gemm":
        n, transB = draw(st.integers(1, 5)), draw(st.integers(0, 1))
        W = rng.standard_normal((n, k) if transB else (k, n)).astype(np.float32)
        bias = rng.standard_normal(draw(st.sampled_from([(n,), (1, n), (m, 1), (m, n), (1,)]))).astype(np.float32)
        node = N("Gemm", [x, f"W{i}", f"c{i}"], [y], transB=transB, alpha=draw(st.sampled_from([1.0, 0.5])),
                 beta=draw(st.sampled_from([1.0, 2.0])))
        return [node], [(f"W{i}", W), (f"c{i}", bias)], n
    if kind in ("matmul", "matmul-add"):
        n = draw(st.integers(1, 5))
        nodes = [N("MatMul", [x, f"W{i}"], [y if kind == "matmul" else f"h{i}"])]
        inits = [(f"W{i}", rng.standard_normal((k, n)).astype(np.float32))]
        if kind == "matmul-add":
            shape = draw(st.sampled_from([(n,), (1, n), (n, 1), (m, n)]))
            nodes.append(N("Add", [f"h{i}", f"c{i}"], [y]))
            inits.append((f"c{i}", rng.standard_normal(shape).astype(np.float32)))
        return nodes, inits, n
    if kind == "act":
        return [N(draw(st.sampled_from(["Relu", "LeakyRelu", "Sigmoid", "Tanh"])), [x], [y])], [], k
    if kind == "bn":  # (m, k): channels are the columns
        p = [rng.standard_normal(k).astype(np.float32) for _ in range(3)] + [rng.uniform(0.5, 2, k).astype(np.float32)]
        names = [f"{n}{i}" for n in ("g", "b", "m", "v")]
        return [N("BatchNormalization", [x] + names, [y])], list(zip(names, p)), k
    op = draw(st.sampled_from(["Add", "Sub", "Mul", "Div"]))
    shape = draw(st.sampled_from([(k,), (1, k), (1,)] + ([(m, 1), (m, k), (2, k)] if m else [(k, 1)])))
    c = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return [N(op, [x, f"k{i}"], [y])], [(f"k{i}", c)], k


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_random_dense_onnx_models_match_onnxruntime_with_shapes_and_bound_it(data, tmp_path):
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 31)))
    form = data.draw(st.sampled_from(["batched", "matrix", "vector"]))
    m = {"batched": 1, "matrix": data.draw(st.integers(2, 4)), "vector": None}[form]
    k = data.draw(st.integers(1, 5))
    shape = (k,) if m is None else (m, k)
    nodes, inits, src = [], [], "x"
    for _ in range(data.draw(st.integers(1, 4))):
        new, more, k = _dense_op(data.draw, m, k, rng)
        for n in new:
            n.input[:] = [src if v == "t" else v for v in n.input]
        nodes += new
        inits += more
        src = new[-1].output[0]
    nodes[-1].output[:] = ["y"]
    _check_random_model(nodes, shape, inits, form == "batched", tmp_path)


def _check_random_model(nodes, shape, inits, batched, tmp_path):
    """Refused with every node named, or imported so that onnxruntime agrees on every tensor's
    values and shapes, and Box and float-sound CROWN bounds contain onnxruntime's outputs."""
    path = str(tmp_path / "random.onnx")
    try:
        make_model(nodes, shape, inits, path)
    except Exception:  # an invalid combination (onnxruntime or the checker refuses it): not a model
        assume(False)
    try:
        graph = from_onnx(path)
    except UnsupportedOpsError as e:  # refusing is always allowed; every refusal names its node
        assert e.nodes and all(why for _, _, why in e.nodes)
        return
    rep = compare_with_onnxruntime(path, graph, num_inputs=2, low=-1.0, high=1.0)
    assert not rep.shape_mismatches and rep.max_rel_error <= 1e-5, (rep.shape_mismatches, rep.per_node, nodes)
    x = torch.rand((1,) + graph.input_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    box = Box.linf_ball(x, 0.05, None)
    out = propagate_box(graph, box)[graph.output]
    crown = get_domain("crown", sound=True).bound(graph, box)
    onnx_shape = tuple(shape)
    assert graph.meta["batched_input"] == (batched and len(shape) >= 2)
    for p in box.sample(8, torch.Generator().manual_seed(1)):
        p = torch.minimum(torch.maximum(p, box.lo), box.hi)
        y = torch.from_numpy(run_ort(path, p.numpy().reshape(onnx_shape))).reshape(out.lo.shape).double()
        assert bool((y >= out.lo - 1e-5).all() and (y <= out.hi + 1e-5).all())
        flat = y.reshape(1, -1)
        assert bool((flat >= crown.lower).all() and (flat <= crown.upper).all())  # float32-sound: no tolerance
