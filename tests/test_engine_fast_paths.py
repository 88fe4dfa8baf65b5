"""The back-substitution engine's fast paths (issue 15) against its general rules: live-neuron
Linear/ReLU chains (domains/relu_chain.py), per-sample row selection (domains/linear_rows.py),
the reshape transpose and the partial interval refresh. Every bound the fast engine stores or
returns equals the general engine's to float64 rounding, and is sound by sampling."""
from __future__ import annotations

import pytest
import torch

from verikit import ir
from verikit.bounds import Box
from verikit.domains import float_sound, linear_bounds as lb, linear_rows, relu_chain
from verikit.domains.crown import optimise_alpha
from verikit.domains.guard import backsub_guard
from verikit.spec import Spec, fold_spec

import backsub_graphs as bg

DT = torch.float64


def relu_mlp(seed=0, widths=(5, 16, 16, 16, 4), dead_bias=-0.4, flat_input=False, dtype=DT):
    """Linear/ReLU layers with negative biases, so that many neurons are stably inactive."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, widths[0]) if flat_input else (widths[0],)
    b = ir.GraphBuilder("x", shape, dtype)
    h = b.add("flat", ir.Reshape((widths[0],)), ["x"]) if flat_input else "x"
    for i in range(len(widths) - 1):
        w = (torch.randn(widths[i + 1], widths[i], generator=gen, dtype=DT) / widths[i] ** 0.5).to(dtype)
        bias = (torch.randn(widths[i + 1], generator=gen, dtype=DT) * 0.3 + dead_bias).to(dtype)
        h = b.add(f"fc{i}", ir.Linear(w, bias), [h])
        if i < len(widths) - 2:
            h = b.add(f"relu{i}", ir.ReLU(), [h])
    return b.build(h), shape


def shared_relu_net(seed=0):
    """A ReLU read by two Linears (summed): a chain must stop there."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (4,), DT)
    h = b.add("fc0", bg._lin(gen, 10, 4), ["x"])
    r = b.add("relu0", ir.ReLU(), [h])
    a = b.add("fa", bg._lin(gen, 8, 10), [r])
    c = b.add("fb", bg._lin(gen, 8, 10), [r])
    s = b.add("sum", ir.Add(), [a, c])
    r2 = b.add("relu1", ir.ReLU(), [s])
    h = b.add("fc2", bg._lin(gen, 8, 8), [r2])
    r3 = b.add("relu2", ir.ReLU(), [h])
    return b.build(b.add("out", bg._lin(gen, 3, 8), [r3])), (4,)


def conv_pool_net(seed=0, c_in=1, side=9):
    """conv (few input channels: the fold path) -> ReLU -> 2x2 average pooling on an odd map
    (floor mode drops a row) -> conv -> ReLU -> Flatten -> Linear -> ReLU -> Linear."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (c_in, side, side), DT)
    h = b.add("conv0", bg._conv(gen, 4, c_in, k=4, stride=2, pad=1), ["x"])  # 9 -> 4
    h = b.add("relu0", ir.ReLU(), [h])
    h = b.add("conv1", bg._conv(gen, 5, 4, k=3, stride=1, pad=1), [h])  # 4 -> 4
    h = b.add("relu1", ir.ReLU(), [h])
    h = b.add("pool", ir.AvgPool2d((2, 2), (2, 2)), [h])  # 4 -> 2
    h = b.add("conv2", bg._conv(gen, 6, 5, k=3, stride=1, pad=1), [h])
    h = b.add("relu2", ir.ReLU(), [h])
    h = b.add("pool2", ir.AvgPool2d((3, 3), (3, 3)), [b.add("pad", ir.Pad((0, 1, 0, 1), 0.0), [h])])  # 3 -> 1
    h = b.add("flat", ir.Reshape((6,)), [h])
    h = b.add("fc", bg._lin(gen, 7, 6), [h])
    h = b.add("relu3", ir.ReLU(), [h])
    return b.build(b.add("out", bg._lin(gen, 3, 7), [h])), (c_in, side, side)


def linear_bn_net(seed=0, widths=(5, 12, 10, 3)):
    """Linear -> BatchNorm (running statistics, some negative scales) -> ReLU, twice, then a
    Linear: rows of a BatchNorm after a Linear start as scaled weight rows (linear_rows.row_form)."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (widths[0],), DT)
    h = "x"
    for i in range(len(widths) - 2):
        n = widths[i + 1]
        h = b.add(f"fc{i}", bg._lin(gen, n, widths[i]), [h])
        weight = torch.randn(n, generator=gen, dtype=DT)  # signs mixed: the upper rows flip
        bias, mean = torch.randn(n, generator=gen, dtype=DT) * 0.3, torch.randn(n, generator=gen, dtype=DT) * 0.2
        var = torch.rand(n, generator=gen, dtype=DT) + 0.5
        h = b.add(f"bn{i}", ir.BatchNorm(weight, bias, mean, var, 1e-5, f"bn{i}"), [h])
        h = b.add(f"relu{i}", ir.ReLU(), [h])
    return b.build(b.add("out", bg._lin(gen, widths[-1], widths[-2]), [h])), (widths[0],)


GRAPHS = {
    "linear-bn": linear_bn_net(),
    "conv-pool-1ch": conv_pool_net(0, 1),
    "conv-pool-3ch": conv_pool_net(1, 3, side=10),
    "conv-pool-8ch": conv_pool_net(2, 8),
    "mlp": relu_mlp(0),
    "mlp-flatten": relu_mlp(1, flat_input=True),
    "mlp-wide": relu_mlp(2, widths=(6, 40, 30, 20, 5), dead_bias=-0.2),
    "shared-relu": shared_relu_net(),
    **{k: v for k, v in bg.graphs().items()},
}


def engines(graph, box, variant="crown", errors=None, spatial_windows=True, **kw):
    out = []
    for fast in (False, True):
        with torch.no_grad():
            # the forward pre-screen stores other (never looser output) bounds: test_forward_bounds.py
            kw.setdefault("forward_prescreen", False)
            e = lb.prepare(graph, box, None, None, variant, 4096, spatial_windows, errors=errors, fast_paths=fast, **kw)
            lo, hi = lb.output_bounds(e)
        out.append((e, lo, hi))
    return out


def read_by_relus_only(graph, name):
    users = graph.consumers()[name]
    return bool(users) and all(type(graph.node(u).op) is ir.ReLU for u in users)


def assert_same(slow, fast, tol=1e-9):
    """Equal output bounds and stored bounds. One exception, by design (upper_first in
    row_refinement.py, batch > 1): a neuron read by ReLUs only is not refined where its upper
    bound is <= 0, as the ReLU is 0 there whatever its bounds are."""
    (es, los, his), (ef, lof, hif) = slow, fast
    torch.testing.assert_close(lof, los, rtol=tol, atol=tol)
    torch.testing.assert_close(hif, his, rtol=tol, atol=tol)
    for node in es.graph.nodes:
        a, b = es.store[node.name], ef.store[node.name]
        if ef.upper_first and es.batch >= ef.upper_first_min_batch and read_by_relus_only(es.graph, node.name):
            assert_same_where_live(a, b, tol, node.name)
        else:
            torch.testing.assert_close(b.lo, a.lo, rtol=tol, atol=tol, msg=node.name)
            torch.testing.assert_close(b.hi, a.hi, rtol=tol, atol=tol, msg=node.name)


def assert_same_where_live(a, b, tol, name):
    """Stored bounds a (both sides of every row) and b (upper bounds first): equal wherever the
    neuron is not dead (hi > 0); where it is dead, dead in both, and b never the tighter."""
    live = a.hi > 0
    torch.testing.assert_close(b.lo[live], a.lo[live], rtol=tol, atol=tol, msg=name)
    torch.testing.assert_close(b.hi[live], a.hi[live], rtol=tol, atol=tol, msg=name)
    assert (b.hi[~live] <= tol).all(), name
    assert (b.lo <= a.lo + tol).all() and (b.hi >= a.hi - tol).all(), name


def _box(shape, batch, seed, width=0.5):
    return bg.input_box(torch.Generator().manual_seed(seed), shape, batch=batch, width=width)


@pytest.mark.parametrize("variant", ["crown", "deeppoly"])
@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("name", list(GRAPHS))
def test_fast_paths_equal_general_rules(name, batch, variant):
    graph, shape = GRAPHS[name]
    assert_same(*engines(graph, _box(shape, batch, 3), variant))


@pytest.mark.parametrize("windows", ["patches", "tiles", "dense"])
@pytest.mark.parametrize("name", ["conv-pool-1ch", "conv-pool-3ch", "conv-pool-8ch", "conv-mix"])
def test_conv_rules_equal_general_rules(name, windows, monkeypatch):
    """Transposed convolutions without vmap (fold for few channels), average pooling spread
    over its windows: the general rules' bounds, with spatial windows (each row on its own
    field where it may, conv_patches.py, or tiles of rows only) and without."""
    from verikit.domains import row_refinement

    if windows == "tiles":
        monkeypatch.setattr(row_refinement, "patch_chain", lambda *a, **k: None)
    graph, shape = GRAPHS[name]
    assert_same(*engines(graph, _box(shape, 3, 12, width=0.6), spatial_windows=windows != "dense"))


@pytest.mark.parametrize("mode", ["per-sample", "shared"])
@pytest.mark.parametrize("name", ["mlp", "mlp-wide", "shared-relu"])
def test_forced_neuron_indexing_modes(monkeypatch, name, mode):
    """Per-sample and shared live-neuron indexing, each forced everywhere, give the general
    rules' bounds."""
    monkeypatch.setattr(relu_chain, "PER_SAMPLE_SHARE", 2.0 if mode == "per-sample" else 0.0)
    graph, shape = GRAPHS[name]
    slow, fast = engines(graph, _box(shape, 7, 4, width=0.8))
    assert_same(slow, fast)
    modes = {live.per_sample for _, live in fast[0].chains._live.values()}
    assert modes == {mode == "per-sample"}


@pytest.mark.parametrize("name", ["mlp", "mlp-flatten", "mlp-wide", "shared-relu", "relu-mlp", "conv-mix", "linear-bn"])
def test_per_sample_rows_equal_one_sample_at_a_time(monkeypatch, name):
    """per_sample_rows: each sample's bounds are those it gets alone (batch 1), from fewer rows
    than the union. (The union's bounds differ: its extra rows tighten intermediate bounds,
    which usually, not always, tightens the output: CROWN is not monotone in them.)"""
    monkeypatch.setattr(linear_rows, "PER_SAMPLE_SHARE", 2.0)  # per-sample wherever it applies
    monkeypatch.setattr(lb.LinearBoundEngine, "upper_first", False)  # the union bounds both sides of its rows
    graph, shape = GRAPHS[name]
    box = _box(shape, 5, 11, width=0.8)
    off = {"forward_prescreen": False}  # whether it runs depends on the batch's unstable rows
    with torch.no_grad():
        own = lb.prepare(graph, box, None, None, "crown", 4096, per_sample_rows=True, **off)
        union = lb.prepare(graph, box, None, None, "crown", 4096, **off)
        lo, hi = lb.output_bounds(own)
        ulo, uhi = lb.output_bounds(union)
        for b in range(5):
            one = lb.prepare(graph, Box(box.lo[b:b + 1], box.hi[b:b + 1]), None, None, "crown", 4096, **off)
            olo, ohi = lb.output_bounds(one)
            torch.testing.assert_close(lo[b:b + 1], olo, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(hi[b:b + 1], ohi, rtol=1e-9, atol=1e-9)
    assert own.rows_bounded <= union.rows_bounded
    if name == "mlp-flatten":  # samples with different unstable neurons
        assert own.rows_bounded < union.rows_bounded


def test_batchnorm_rows_take_the_weight_row_path():
    """The BatchNorm nodes' rows start at the Linear before them on the fast paths (scale and
    shift per neuron), and only there: the general rules and the rounding-error hook keep the
    one-hot rows."""
    graph, shape = GRAPHS["linear-bn"]
    (es, *_), (ef, *_) = engines(graph, _box(shape, 2, 8))
    for i in range(2):
        node = graph.node(f"bn{i}")
        lin, scale, shift = linear_rows.row_form(ef, node, (graph.shapes[node.name][0],))
        assert lin.name == f"fc{i}" and scale.shape == shift.shape == (graph.shapes[node.name][0],)
        assert linear_rows.row_form(es, node, (graph.shapes[node.name][0],)) is None
    errors = {n.name: torch.zeros((2,) + tuple(graph.shapes[n.name]), dtype=DT) for n in graph.nodes}
    with torch.no_grad():
        e = lb.prepare(graph, _box(shape, 2, 8), None, None, "crown", 4096, errors=errors, forward_prescreen=False)
    assert linear_rows.row_form(e, graph.node("bn0"), (graph.shapes["bn0"][0],)) is None


def test_abs_weight_follows_in_place_updates_and_autograd():
    """|W| is cached per op while the weight is unchanged; an in-place update (an optimiser
    step) is seen, and a weight that requires grad gets its gradient through abs_linear."""
    w = torch.randn(4, 3, dtype=DT)
    op = ir.Linear(w.clone(), None)
    r = torch.rand(2, 3, dtype=DT)
    torch.testing.assert_close(op.abs_linear(r), r @ w.abs().T, rtol=0, atol=0)
    with torch.no_grad():
        op.weight.mul_(-3.0)
    torch.testing.assert_close(op.abs_linear(r), r @ (3 * w).abs().T, rtol=0, atol=0)
    from verikit.spec import FoldedSpecLinear

    C = torch.randn(2, 4, dtype=DT)
    folded = FoldedSpecLinear(w, None, C, torch.zeros(2, dtype=DT))  # its weight C W is derived per access
    torch.testing.assert_close(folded.abs_linear(r), r @ (C @ w).abs().T, rtol=1e-12, atol=1e-12)
    assert "_abs_cache" not in folded.__dict__  # nothing pinned for a weight that is never the same tensor
    p = torch.nn.Parameter(w.clone())
    live = ir.Linear(p, None)
    live.abs_linear(r).sum().backward()
    torch.testing.assert_close(p.grad, r.sum(0).expand(4, 3) * w.sign(), rtol=0, atol=0)


def test_fast_path_is_taken_and_skips_dead_neurons():
    graph, shape = GRAPHS["mlp-wide"]
    (es, *_), (ef, *_) = engines(graph, _box(shape, 1, 5))
    assert ef.chains._live, "no chain was used"
    for name, (_, live) in ef.chains._live.items():
        n = graph.shapes[name][0]
        assert live.idx.numel() < n  # the dead neurons are left out
    assert ef.rows_bounded == es.rows_bounded


@pytest.mark.parametrize("name", ["mlp", "mlp-flatten", "mlp-wide", "shared-relu", "conv-pool-1ch", "conv-pool-3ch",
                                  "linear-bn"])
def test_fast_paths_sound_by_sampling(name):
    graph, shape = GRAPHS[name]
    box = _box(shape, 4, 6, width=0.7)
    _, (e, lo, hi) = engines(graph, box)
    assert_holds_on(graph, e, lo, hi, box.sample(500, torch.Generator().manual_seed(0)))


def assert_holds_on(graph, engine, lo, hi, xs, tol=1e-9):
    """Every bound the engine stored, and the output bounds lo, hi, hold at the points xs (n, B, ...)."""
    with torch.no_grad():
        values = graph.forward(xs.reshape((-1,) + tuple(xs.shape[2:])), return_all=True)
    for node, v in values.items():
        v = v.reshape(xs.shape[:2] + v.shape[1:])
        stored = engine.store[node]
        assert ((v >= stored.lo - tol) & (v <= stored.hi + tol)).all(), node
    y = values[graph.output].reshape(xs.shape[0], xs.shape[1], -1)
    assert (y >= lo - tol).all() and (y <= hi + tol).all()


@pytest.mark.parametrize("name", ["mlp", "mlp-wide", "conv-pool-1ch", "conv-pool-8ch", "linear-bn"])
def test_eps_zero_gives_the_output(name):
    graph, shape = GRAPHS[name]
    x = _box(shape, 3, 7).center
    _, (e, lo, hi) = engines(graph, Box(x, x))
    with torch.no_grad():
        y = graph.forward(x).reshape(3, -1)
    torch.testing.assert_close(lo, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hi, y, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch", [1, 5])
def test_alpha_crown_and_folded_spec_equal(batch):
    """The folded spec's per-sample weights start the chain; alpha steps run through it."""
    graph, shape = GRAPHS["mlp-wide"]
    box = _box(shape, batch, 8, width=0.6)
    spec = Spec.robustness(torch.arange(batch) % 5, 5)
    spec = spec.to(dtype=DT)
    folded = fold_spec(graph, spec)
    slow, fast = engines(folded, box)
    assert_same(slow, fast)
    a_slow = optimise_alpha(slow[0], slow[1], 8, 0.1)
    a_fast = optimise_alpha(fast[0], fast[1], 8, 0.1)
    assert (a_slow > slow[1] + 1e-6).any()  # the steps did something
    torch.testing.assert_close(a_fast, a_slow, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("flat_input", [False, True])
def test_rounding_guard_and_sound_mode_on_fast_paths(flat_input):
    """The errors hook: the guard (errors on the Linears only) and the float-sound mode (an
    error on every node, ReLUs included) give the general rules' figures."""
    graph, shape = relu_mlp(10, flat_input=flat_input, dtype=torch.float32)
    box = _box(shape, 3, 9).to(dtype=torch.float32)
    slow, fast = engines(graph, box)
    # the guard is a difference of two float32 bounds of size ~1: equal to their rounding
    torch.testing.assert_close(backsub_guard(fast[0]), backsub_guard(slow[0]), rtol=0, atol=1e-6)
    assert float(backsub_guard(fast[0]).max()) > 0
    sound = []
    for fast_paths in (False, True):
        folded, x64, store, errors = float_sound.sound_setup(graph, box, None, None, None)
        with torch.no_grad():
            e = lb.prepare(folded, x64, store, None, "crown", 4096, errors=errors, fast_paths=fast_paths)
            sound.append(lb.output_bounds(e))
        assert not fast_paths or e.chains._live
    torch.testing.assert_close(sound[1][0], sound[0][0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sound[1][1], sound[0][1], rtol=1e-9, atol=1e-12)
    assert (sound[1][0] < slow[1].double()).all()  # the error terms were charged


def _conv_vjp_reference(weight, stride, pad, side, rows, gen):
    """Random coefficients on the output of conv2d(weight, stride, pad) over a side x side map,
    and their vector-Jacobian products, one row at a time (the reference transpose)."""
    import torch.nn.functional as F

    x0 = torch.zeros(1, weight.shape[1], side, side, dtype=DT)
    y, vjp = torch.func.vjp(lambda x: F.conv2d(x, weight, None, stride, pad), x0)
    lam = torch.randn((rows,) + tuple(y.shape[1:]), generator=gen, dtype=DT)
    return lam, torch.cat([vjp(lam[i:i + 1])[0] for i in range(rows)])


@pytest.mark.parametrize("c_in,stride,pad,k,side", [(1, 2, 1, 4, 9), (3, 1, 1, 3, 8), (2, 3, 0, 3, 10), (1, 1, 2, 5, 7),
                                                 (1, 2, 1, 3, 9), (3, 2, 0, 5, 11)])  # the last two: fold at stride 2
def test_fold_transpose_is_the_transposed_convolution(c_in, stride, pad, k, side):
    """The fold form (few input channels; where the stride divides the kernel, the stride
    phases take these instead: the first and third case) against the vector-Jacobian product of
    the convolution."""
    from verikit.domains.conv_windows import _transpose

    gen = torch.Generator().manual_seed(c_in * 10 + k)
    weight = torch.randn(4, c_in, k, k, generator=gen, dtype=DT)
    lam, want = _conv_vjp_reference(weight, stride, pad, side, 6, gen)
    got = _transpose(lam, weight, (stride, stride), (pad, pad), (1, 1), 1, (side, side))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c_in,c_out,stride,pad,kernel,side", [
    (3, 8, (2, 2), 1, (4, 4), 32),   # the oval21-style first layer
    (8, 16, (2, 2), 1, (4, 4), 9),   # an odd map: the last input row is reached by no window (output padding)
    (2, 4, (2, 1), 0, (4, 3), 10),   # unequal strides, a non-square kernel
    (1, 5, (3, 3), 2, (6, 3), 11),   # stride 3
    (16, 16, (2, 2), 0, (2, 2), 8),  # the largest channel counts it takes
])
def test_phase_transpose_is_the_transposed_convolution(c_in, c_out, stride, pad, kernel, side):
    """Strided transposed convolutions with few channels go through their stride phases (one
    conv2d): the vector-Jacobian product of the convolution, with and without padding."""
    from verikit.domains.conv_windows import _phases_pay, _transpose

    gen = torch.Generator().manual_seed(c_in * 7 + side)
    weight = torch.randn((c_out, c_in) + kernel, generator=gen, dtype=DT)
    assert _phases_pay(weight, stride, (1, 1), 1)
    lam, want = _conv_vjp_reference(weight, stride, pad, side, 5, gen)
    got = _transpose(lam, weight, stride, (pad, pad), (1, 1), 1, (side, side))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not _phases_pay(weight, (1, 1), (1, 1), 1) and not _phases_pay(weight, stride, (2, 2), 1)


@pytest.mark.parametrize("strided", [True, False])
def test_phase_transpose_on_random_geometries(strided, monkeypatch):
    """The phase form against torch's conv_transpose2d over random strides, paddings, kernels
    (multiples of the stride), maps and output paddings: every output row and column, with the
    phases interleaved by strided copies (small outputs) and by a permuted copy (large ones)."""
    import torch.nn.functional as F

    from verikit.domains import conv_windows
    from verikit.domains.conv_windows import _phase_transpose, phase_kernel

    monkeypatch.setattr(conv_windows, "STRIDED_INTERLEAVE", 1 << 30 if strided else 0)

    gen = torch.Generator().manual_seed(77)
    ri = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=gen))
    for _ in range(40):
        sh, sw = ri(2, 3), ri(1, 3)
        kh, kw = sh * ri(1, 3), sw * ri(1, 3)
        ph, pw = ri(0, kh - 1), ri(0, kw - 1)
        side_h, side_w = ri(kh, 12), ri(kw, 12)
        c_in, c_out = ri(1, 3), ri(1, 4)
        weight = torch.randn(c_out, c_in, kh, kw, generator=gen, dtype=DT)
        h = (side_h + 2 * ph - kh) // sh + 1
        w = (side_w + 2 * pw - kw) // sw + 1
        if h < 1 or w < 1:
            continue
        lam = torch.randn(3, c_out, h, w, generator=gen, dtype=DT)
        extra = (side_h - ((h - 1) * sh - 2 * ph + kh), side_w - ((w - 1) * sw - 2 * pw + kw))
        want = F.conv_transpose2d(lam, weight, None, (sh, sw), (ph, pw), extra)
        got = _phase_transpose(lam, phase_kernel(weight, (sh, sw)), c_in, (sh, sw), (ph, pw), (side_h, side_w))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
