"""The forward-mode pre-screen of the back-substitution engine (domains/forward_bounds.py, its
windowed coefficients in forward_windows.py, and the hand-over of flat rows to the forward
functions): every forward bound holds on sampled points, is exact at eps = 0, the windows
give the dense coefficients' bounds, and CROWN with the pre-screen is sound and never looser
than without it."""
from __future__ import annotations

import pytest
import torch

from verikit import ir
from verikit.bounds import Box
from verikit.domains import forward_bounds as fb, forward_windows as fw, linear_bounds as lb
from verikit.domains.box import propagate_box

import backsub_graphs as bg

DT = torch.float64


def conv_net(seed=0, c_in=2, side=12, act=ir.ReLU, residual=False, pool=False, dilation=False):
    """conv 3x3 -> BN -> act -> conv stride 2 (or dilated) -> per-channel affine -> act ->
    [residual conv + Add] [avg-pool] -> conv -> act -> Flatten -> Linear -> act -> Linear."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (c_in, side, side), DT)
    h = b.add("conv0", bg._conv(gen, 4, c_in), ["x"])
    h = b.add("act0", act(), [b.add("bn0", bg._bn(gen, 4), [h])])
    second = bg._conv(gen, 5, 4, k=3, stride=2, pad=1)
    if dilation:
        second = ir.Conv2d(second.weight, second.bias, (1, 1), (2, 2), (2, 2))
    h = b.add("conv1", second, [h])
    scale = torch.rand(1, 5, 1, 1, generator=gen, dtype=DT) + 0.5
    h = b.add("act1", act(), [b.add("aff1", ir.ElementwiseAffine(scale, -0.1 * scale), [h])])
    if residual:
        r = b.add("conv_r", bg._conv(gen, 5, 5), [h])
        h = b.add("act_r", act(), [b.add("sum", ir.Add(), [r, h])])
    if pool:
        h = b.add("pool", ir.AvgPool2d((2, 2), (2, 2)), [h])
    h = b.add("conv2", bg._conv(gen, 3, 5), [h])
    h = b.add("act2", act(), [h])
    n = 3 * (side // (2 if not dilation else 1) // (2 if pool else 1)) ** 2
    h = b.add("flat", ir.Reshape((n,)), [h])
    h = b.add("act3", act(), [b.add("fc", bg._lin(gen, 8, n), [h])])
    return b.build(b.add("out", bg._lin(gen, 3, 8), [h])), (c_in, side, side)


def mixed_linear_net(seed=0):
    """Windows turned dense by ops without a window rule: conv -> ReLU -> {Pad with a value ->
    conv, conv 1x1} -> Concat -> Transpose -> ReLU -> GlobalAvgPool -> Reshape -> Linear."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (2, 12, 12), DT)
    h = b.add("relu0", ir.ReLU(), [b.add("conv0", bg._conv(gen, 3, 2), ["x"])])
    a = b.add("conv_a", bg._conv(gen, 2, 3, pad=0), [b.add("pad", ir.Pad((1, 1, 1, 1), 0.3), [h])])
    c = b.add("conv_b", bg._conv(gen, 2, 3, k=1, pad=0), [h])
    h = b.add("perm", ir.Transpose((0, 1, 3, 2)), [b.add("cat", ir.Concat(1), [a, c])])
    h = b.add("relu1", ir.ReLU(), [h])
    h = b.add("flat", ir.Reshape((4,)), [b.add("gap", ir.GlobalAvgPool(), [h])])
    h = b.add("relu2", ir.ReLU(), [b.add("fc", bg._lin(gen, 6, 4), [h])])
    return b.build(b.add("out", bg._lin(gen, 3, 6), [h])), (2, 12, 12)


GRAPHS = {
    "mixed-linear-ops": mixed_linear_net(),
    "conv": conv_net(0),
    "conv-tanh": conv_net(1, act=ir.Tanh),
    "conv-leaky": conv_net(2, act=lambda: ir.LeakyReLU(0.1)),
    "conv-residual": conv_net(3, residual=True),
    "conv-pool": conv_net(4, pool=True),
    "conv-dilated": conv_net(5, dilation=True),
    "conv-one-channel": conv_net(6, c_in=1, side=16),
    "mlp": (bg.dense_net(ir.ReLU, 0), (6,)),
}


def _forward_all(graph, box):
    """Forward bounds of every pre-activation node, as refine_intermediate would compute them
    (without the back-substitution in between)."""
    with torch.no_grad():
        store = propagate_box(graph, box)
        engine = lb.LinearBoundEngine(graph, store)
        nodes = engine.preactivation_nodes()
        forward = fb.ForwardBounds(engine, nodes)
        out = {}
        for name in nodes:
            out[name] = store.update(name, forward.bounds(name))
    return out, forward


def _samples(box, n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((n,) + tuple(box.lo.shape), generator=g, dtype=box.lo.dtype)
    corners = torch.randint(0, 2, (n // 3,) + tuple(box.lo.shape), generator=g).to(box.lo.dtype)
    u = torch.cat([u, corners])  # vertices reach the extremes of the linear pieces
    return box.lo + u * (box.hi - box.lo)


def _values(graph, x):
    B = x.shape[1]
    vals = graph.forward(x.reshape((-1,) + tuple(x.shape[2:])), return_all=True)
    return {k: v.reshape((x.shape[0], B) + tuple(v.shape[1:])) for k, v in vals.items()}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_forward_bounds_hold_on_sampled_points(name):
    graph, shape = GRAPHS[name]
    box = bg.input_box(torch.Generator().manual_seed(1), shape, batch=2, width=0.3)
    bounds, _ = _forward_all(graph, box)
    vals = _values(graph, _samples(box))
    for node, b in bounds.items():
        v = vals[node]
        slack = 1e-9 * (1 + v.abs())
        assert bool((v >= b.lo - slack).all()), node
        assert bool((v <= b.hi + slack).all()), node
        assert bool((b.hi - b.lo).max() > 0), node  # a real interval, not a point


@pytest.mark.parametrize("name", list(GRAPHS))
def test_forward_bounds_exact_at_eps_zero(name):
    graph, shape = GRAPHS[name]
    x = torch.randn((2,) + shape, generator=torch.Generator().manual_seed(2), dtype=DT)
    bounds, _ = _forward_all(graph, Box(x, x))
    vals = graph.forward(x, return_all=True)
    for node, b in bounds.items():
        torch.testing.assert_close(b.lo, vals[node], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b.hi, vals[node], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", [n for n in GRAPHS if n != "mlp"])
def test_windows_give_the_dense_bounds(name, monkeypatch):
    graph, shape = GRAPHS[name]
    box = bg.input_box(torch.Generator().manual_seed(3), shape, batch=2, width=0.3)
    windowed, forward = _forward_all(graph, box)
    assert forward.used_windows  # the windowed path ran (the dense one is compared below)
    monkeypatch.setattr(fw, "initial", lambda *a: None)
    dense, forward = _forward_all(graph, box)
    assert not forward.used_windows
    for node in dense:
        torch.testing.assert_close(windowed[node].lo, dense[node].lo, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(windowed[node].hi, dense[node].hi, rtol=1e-12, atol=1e-12)


def test_windowed_conv_matches_dense_on_every_geometry():
    """Strides, paddings, dilations and kernel sizes whose windows cross the map's edges."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 2, 16, 16, generator=gen, dtype=DT)
    r = torch.rand(1, 2, 16, 16, generator=gen, dtype=DT)
    start = fw.initial(x, r)
    dense_in = fw.densify(start, start.mc, 2 * 16 * 16).flatten(0, 1)
    first = ir.Conv2d(torch.randn(2, 2, 3, 3, generator=gen, dtype=DT), None, (1, 1), (1, 1))
    checked = 0
    for k, stride, pad, dil in [(3, 1, 1, 1), (3, 2, 1, 1), (4, 2, 1, 1), (5, 1, 2, 1), (3, 1, 2, 2),
                                (2, 2, 0, 1), (3, 3, 0, 1), (1, 1, 0, 1), (5, 2, 0, 1)]:
        w = torch.randn(3, 2, k, k, generator=gen, dtype=DT)
        op = ir.Conv2d(w, None, (stride, stride), (pad, pad), (dil, dil))
        # two convolutions in a row: the second reads the first one's positions past the map
        mid = first.forward(x)
        out = op.forward(mid)
        tiled = fw.conv(first, start, tuple(mid.shape[1:]), mid, None)
        tiled = fw.conv(op, tiled, tuple(out.shape[1:]), out, None)
        expect = op.forward(first.forward(dense_in)).reshape((1, 512) + tuple(out.shape[1:]))
        if tiled is None:  # windows too large for this map, or stride-misaligned tiles: dense then
            continue
        torch.testing.assert_close(fw.densify(tiled, tiled.mc, 512), expect, rtol=1e-12, atol=1e-12)
        checked += 1
    assert checked >= 6


def test_hand_over_to_forward_functions_is_sound(monkeypatch):
    """lower_bound(..., stop=node): back-substitution down to `node`, then its forward functions."""
    monkeypatch.setattr(fb, "MIN_BELOW_STOP", 0)
    graph, shape = GRAPHS["conv"]
    box = bg.input_box(torch.Generator().manual_seed(7), shape, batch=2, width=0.3)
    with torch.no_grad():
        engine = lb.prepare(graph, box, None, None, "crown", 4096, forward_prescreen=False)
        nodes = engine.preactivation_nodes()
        engine.forward = fb.ForwardBounds(engine, nodes)
        for name in nodes:
            engine.forward.bounds(name)
        stop = engine.forward.stop_for("fc")
        assert stop == "aff1"
        lam = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(8), dtype=DT)
        hybrid = engine.lower_bound("fc", lam, stop=stop)
        full = engine.lower_bound("fc", lam)
    vals = torch.einsum("nbk,bmk->nbm", _values(graph, _samples(box))["fc"], lam).amin(0)
    assert bool((hybrid <= vals + 1e-9).all())
    assert bool((full <= vals + 1e-9).all())
    # not vacuous: within the gap between the full bound and the sampled minimum, doubled
    assert bool((vals - hybrid <= 2 * (vals - full) + 1e-6).all())


def _crown(graph, box, prescreen):
    with torch.no_grad():
        engine = lb.prepare(graph, box, None, None, "crown", 4096, forward_prescreen=prescreen)
        return lb.output_bounds(engine)


def _crown_and_rows(graph, box):
    """CROWN with the pre-screen on: output bounds and the rows back-substituted for the
    intermediate bounds (before the output's own rows)."""
    with torch.no_grad():
        engine = lb.prepare(graph, box, None, None, "crown", 4096, forward_prescreen=True)
        rows = engine.rows_bounded
        return (*lb.output_bounds(engine), rows)


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("width", [0.05, 0.3])
def test_crown_with_prescreen_is_sound_and_never_looser(name, width, monkeypatch):
    monkeypatch.setattr(fb, "MIN_BELOW_STOP", 0)  # hand over even on these shallow nets
    graph, shape = GRAPHS[name]
    box = bg.input_box(torch.Generator().manual_seed(5), shape, batch=3, width=width)
    handed_over = []
    original = lb.LinearBoundEngine.lower_bound

    def spy(self, *a, stop=None, **k):
        if stop is not None:
            handed_over.append(stop)
        return original(self, *a, stop=stop, **k)

    monkeypatch.setattr(lb.LinearBoundEngine, "lower_bound", spy)
    lo, hi = _crown(graph, box, True)
    if name not in ("mlp", "conv-tanh") and width == 0.3:  # (Tanh rows are all bounded in full)
        assert handed_over  # the hand-over to the forward functions ran
    lo0, hi0 = _crown(graph, box, False)
    tol = 1e-9 * (1 + lo0.abs())
    assert bool((lo >= lo0 - tol).all()) and bool((hi <= hi0 + 1e-9 * (1 + hi0.abs())).all())
    out = _values(graph, _samples(box))[graph.output]
    assert bool((out.amin(0) >= lo - 1e-9).all()) and bool((out.amax(0) <= hi + 1e-9).all())


def test_prescreen_runs_only_where_it_pays(monkeypatch):
    monkeypatch.setattr(fb, "ROWS_PER_INPUT", 1.5)  # this small net has 536 unstable rows for K = 288
    graph, shape = GRAPHS["conv"]
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        wide = lb.LinearBoundEngine(graph, propagate_box(graph, bg.input_box(gen, shape, batch=1, width=2.0)))
        narrow = lb.LinearBoundEngine(graph, propagate_box(graph, bg.input_box(gen, shape, batch=1, width=1e-4)))
        assert fb.ForwardBounds.samples_per_pass(wide, wide.preactivation_nodes()) == 1  # most rows unstable
        assert fb.ForwardBounds.samples_per_pass(narrow, narrow.preactivation_nodes()) == 0
        assert fb.ForwardBounds.samples_per_pass(narrow, narrow.preactivation_nodes(), force=True) == 1
        narrow.errors = {"conv0": torch.zeros(1)}  # the float-sound mode never uses it
        assert fb.ForwardBounds.samples_per_pass(narrow, narrow.preactivation_nodes(), force=True) == 0
    # under autograd (training domains) it does not run either
    assert fb.ForwardBounds.samples_per_pass(wide, wide.preactivation_nodes(), force=True) == 0


@pytest.mark.parametrize("node", ["aff1", "conv2"])
def test_contract_is_the_extreme_of_the_forward_functions(node):
    """contract(node, lam) as a function of e is lam+ . L(e) + lam- . U(e), with the node's lower
    and upper functions L = M - D, U = M + D (checked at random e, against the dense state)."""
    graph, shape = GRAPHS["conv"]
    box = bg.input_box(torch.Generator().manual_seed(9), shape, batch=2, width=1.0)
    _, forward = _forward_all(graph, box)
    s = forward._dense(forward.states[node])
    assert s.dc is not None and bool(s.dc.abs().max() > 1e-3)  # a real gap between L and U
    gen = torch.Generator().manual_seed(10)
    lam = torch.randn((2, 5) + tuple(s.m0.shape[1:]), generator=gen, dtype=DT)
    const, coef = forward.contract(node, lam)
    e = torch.rand(2, forward.K, generator=gen, dtype=DT) * 2 - 1
    M = torch.einsum("bk...,bk->b...", s.mc, e) + s.m0
    D = torch.einsum("bk...,bk->b...", s.dc, e) + s.d0
    expect = (lam.clamp(min=0) * (M - D).unsqueeze(1) + lam.clamp(max=0) * (M + D).unsqueeze(1)).flatten(2).sum(-1)
    torch.testing.assert_close(const + torch.einsum("bmk,bk->bm", coef, e), expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(bg.graphs()))
def test_prescreen_on_the_engine_test_graphs(name):
    """Wherever the pre-screen can run on the engine's test graphs (DAGs, every activation,
    pads with a value, transposes), CROWN with it is sound and never looser than without it."""
    graph, shape = bg.graphs()[name]
    box = bg.input_box(torch.Generator().manual_seed(11), shape, batch=3, width=0.4)
    with torch.no_grad():
        store = propagate_box(graph, box)
        engine = lb.LinearBoundEngine(graph, store)
        can = fb.ForwardBounds.samples_per_pass(engine, engine.preactivation_nodes(), force=True) > 0
    if not can:
        assert not fb.supported(graph, engine.preactivation_nodes()[-1])  # only unsupported ops stop it
        return
    lo, hi = _crown(graph, box, True)
    lo0, hi0 = _crown(graph, box, False)
    assert bool((lo >= lo0 - 1e-9 * (1 + lo0.abs())).all()) and bool((hi <= hi0 + 1e-9 * (1 + hi0.abs())).all())
    out = _values(graph, _samples(box))[graph.output].flatten(2)
    assert bool((out.amin(0) >= lo - 1e-9).all()) and bool((out.amax(0) <= hi + 1e-9).all())


@pytest.mark.parametrize("graph_name", ["conv", "conv-one-channel", "conv-leaky", "conv-tanh"])
def test_contract_of_a_window_equals_the_dense_coefficients(graph_name):
    """Windows of coefficients at every offset and size (corners and edges of the map included),
    and the same coefficients placed in the full map, contracted through the position table,
    give the same function of e as the full map contracted with the dense forward coefficients."""
    graph, shape = GRAPHS[graph_name]
    box = bg.input_box(torch.Generator().manual_seed(12), shape, batch=2, width=1.0)
    _, forward = _forward_all(graph, box)
    tiled = [n for n, st in forward.states.items() if isinstance(st, fw.Tiled) and n != graph.input_name]
    assert tiled, "the test needs a node whose forward coefficients are windows"
    gen = torch.Generator().manual_seed(13)
    for node in tiled:
        C, H, W = graph.shapes[node]
        dense = fb.ForwardBounds.__new__(fb.ForwardBounds)  # the same state, made dense
        dense.K, dense.states = forward.K, {node: forward._dense(forward.states[node])}
        for _ in range(12):
            hh, ww = int(torch.randint(1, H + 1, (1,), generator=gen)), int(torch.randint(1, W + 1, (1,), generator=gen))
            top, left = int(torch.randint(0, H - hh + 1, (1,), generator=gen)), int(torch.randint(0, W - ww + 1, (1,), generator=gen))
            part = torch.randn(2, 4, C, hh, ww, generator=gen, dtype=DT)
            full = torch.zeros(2, 4, C, H, W, dtype=DT)
            full[..., top: top + hh, left: left + ww] = part
            want = dense.contract(node, full)
            for got in (forward.contract(node, lb.Window(part, top, left)), forward.contract(node, full)):
                for a, b in zip(got, want):  # a window of the map, and the whole map
                    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        table = forward.states[node].table
        forward.contract(node, lb.Window(part, top, left))
        assert forward.states[node].table is table  # built once per state


def test_batches_beyond_the_memory_budget_go_one_sample_at_a_time(monkeypatch):
    """Where only a few samples' coefficients fit, the batch is refined one sample at a time:
    each sample's bounds are then those of the sample alone, sound and never looser than without."""
    graph, shape = GRAPHS["conv"]
    box = bg.input_box(torch.Generator().manual_seed(14), shape, batch=5, width=0.3)
    per_sample = 288 * 4 * 12 * 12 * 8  # K * widest node * float64
    monkeypatch.setattr(fb, "MEMORY_BUDGET", 2 * per_sample)
    lo, hi, rows = _crown_and_rows(graph, box)
    lo0, hi0 = _crown(graph, box, False)
    assert bool((lo >= lo0 - 1e-9 * (1 + lo0.abs())).all()) and bool((hi <= hi0 + 1e-9 * (1 + hi0.abs())).all())
    rows_alone = 0
    for b in range(5):
        glo, ghi, grows = _crown_and_rows(graph, Box(box.lo[b:b + 1], box.hi[b:b + 1]))
        torch.testing.assert_close(lo[b:b + 1], glo, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hi[b:b + 1], ghi, rtol=1e-12, atol=1e-12)
        rows_alone += grows
    assert rows == rows_alone  # no union of several samples' unstable rows: each bounds exactly its own


def test_groups_with_a_per_sample_spec(monkeypatch):
    """A robustness spec folded into the last layer holds one matrix per sample (the whole
    batch's): refining in groups must not run it on a group (CNN7 at batch 32 crashed there).
    Each sample's margins are those of the sample alone, and sound by sampling."""
    from verikit.domains import get_domain
    from verikit.spec import Spec

    graph, shape = GRAPHS["conv"]
    box = bg.input_box(torch.Generator().manual_seed(16), shape, batch=5, width=0.3)
    labels = torch.tensor([0, 1, 2, 0, 1])
    n_out = graph.shapes[graph.output][0]
    per_sample = 288 * 4 * 12 * 12 * 8  # K * widest node * float64
    monkeypatch.setattr(fb, "MEMORY_BUDGET", 2 * per_sample)
    crown = get_domain("crown", forward_prescreen="on")
    with torch.no_grad():
        res = crown.bound(graph, box, Spec.robustness(labels, n_out, DT))
        for b in range(5):
            part = Box(box.lo[b:b + 1], box.hi[b:b + 1])
            alone = crown.bound(graph, part, Spec.robustness(labels[b:b + 1], n_out, DT))
            torch.testing.assert_close(res.lower[b:b + 1], alone.lower, rtol=1e-12, atol=1e-12)
        xs = box.sample(300, torch.Generator().manual_seed(1))
        y = graph.forward(xs.reshape((-1,) + tuple(xs.shape[2:]))).reshape(xs.shape[0], 5, -1)
    margins = y.gather(2, labels.view(1, 5, 1).expand(xs.shape[0], 5, 1)) - y  # y_label - y_j
    others = torch.ones(5, n_out, dtype=torch.bool)
    others[torch.arange(5), labels] = False
    lower = res.lower  # one row per margin y_label - y_j, j != label ascending
    assert lower.shape == (5, n_out - 1)
    want = margins[:, others].reshape(xs.shape[0], 5, n_out - 1)
    assert bool((want >= lower - 1e-9).all())


@pytest.mark.parametrize("domain", ["crown", "deeppoly"])
def test_domain_option_switches_the_prescreen(domain):
    from verikit.domains import get_domain
    from verikit.errors import VerikitError
    graph, shape = GRAPHS["conv"]
    box = bg.input_box(torch.Generator().manual_seed(15), shape, batch=2, width=0.3)
    res = {s: get_domain(domain, forward_prescreen=s).bound(graph, box) for s in ("on", "off", False)}
    assert res["on"].info["rows_bounded"] < res["off"].info["rows_bounded"] == res[False].info["rows_bounded"]
    assert bool((res["on"].lower >= res["off"].lower - 1e-9 * (1 + res["off"].lower.abs())).all())
    with pytest.raises(VerikitError, match="forward_prescreen must be auto, on or off"):
        get_domain(domain, forward_prescreen="sometimes")
