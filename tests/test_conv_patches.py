"""Rows of convolutional layers bounded as patches (domains/conv_patches.py): the same bounds as
the tiled windows on random chains of convolutions, poolings, BatchNorms and ReLUs (strides,
paddings, dilations, odd maps, a pooling that leaves rows out, convolutions back to back), each
sample's own rows equal to that sample alone, sound on samples, and used only where it may be."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from verikit import ir
from verikit.domains import conv_patches, linear_bounds as lb, row_refinement
from verikit.domains.box import propagate_box

import backsub_graphs as bg

DT = torch.float64


def _conv(gen, c_out, c_in, k, s, p, d, bias=True):
    w = torch.randn(c_out, c_in, k, k, generator=gen, dtype=DT) / (c_in * k * k) ** 0.5
    return ir.Conv2d(w, torch.randn(c_out, generator=gen, dtype=DT) * 0.3 if bias else None, (s, s), (p, p), (d, d))


def _random_chain(seed):
    """x -> a random chain of 2-4 blocks -> Flatten -> Linear; a block is a convolution of a
    random geometry, then maybe a BatchNorm, then a ReLU (or, once in a while, nothing: two
    convolutions back to back), then maybe a 2x2 pooling. Returns (graph, names of nodes)."""
    gen = torch.Generator().manual_seed(seed)
    ri = lambda a, b: int(torch.randint(a, b + 1, (1,), generator=gen))
    c, side = ri(1, 3), ri(8, 13)
    b = ir.GraphBuilder("x", (c, side, side), DT)
    h, n = "x", 0
    for block in range(ri(2, 4)):
        k, s, d = ri(1, 4), ri(1, 2) if side >= 7 else 1, ri(1, 2)
        p = ri(0, min(2, d * (k - 1)))
        out = (side + 2 * p - d * (k - 1) - 1) // s + 1
        if out < 2:
            k, s, p, d, out = 1, 1, 0, 1, side
        c_out = ri(2, 5)
        h = b.add(f"conv{n}", _conv(gen, c_out, c, k, s, p, d, bias=ri(0, 3) > 0), [h])
        bn = ri(0, 3)  # 0: a BatchNorm before the ReLU, 1: after it
        if bn == 0:
            h = b.add(f"bn{n}", bg._bn(gen, c_out), [h])
        if out >= 6 and ri(0, 5) == 0:  # a pooling read by the ReLU: rows start at a pooling
            h = b.add(f"poolfirst{n}", ir.AvgPool2d((2, 2), (2, 2)), [h])
            out //= 2
        if ri(0, 4) > 0 or block < 2:
            h = b.add(f"relu{n}", ir.ReLU() if ri(0, 3) else ir.LeakyReLU(0.1), [h])
            if bn == 1 and block > 0:
                h = b.add(f"bnafter{n}", bg._bn(gen, c_out), [h])
        if out >= 6 and ri(0, 3) == 0:
            h = b.add(f"pool{n}", ir.AvgPool2d((2, 2), (2, 2)), [h])  # an odd side leaves a row out
            out //= 2
        c, side, n = c_out, out, n + 1
    h = b.add("flat", ir.Reshape((c * side * side,)), [h])
    return b.build(b.add("fc", bg._lin(gen, 3, c * side * side), [h]))


def _crown_store(graph, box, patches: bool, monkeypatch, per_sample_rows=False):
    with monkeypatch.context() as m:
        if not patches:
            m.setattr(row_refinement, "patch_chain", lambda *a, **k: None)
        calls = []
        real = row_refinement.bound_patches
        m.setattr(row_refinement, "bound_patches", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
        with torch.no_grad():
            engine = lb.LinearBoundEngine(graph, propagate_box(graph, box), per_sample_rows=per_sample_rows)
            engine.refine_intermediate()
    return {k: (v.lo.clone(), v.hi.clone()) for k, v in engine.store.items()}, calls


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("batch", [1, 3])
def test_patches_give_the_tiled_windows_bounds_on_random_chains(seed, batch, monkeypatch):
    graph = _random_chain(seed)
    box = bg.input_box(torch.Generator().manual_seed(100 + seed), graph.input_shape, batch=batch, width=0.5)
    with_patches, _ = _crown_store(graph, box, True, monkeypatch)
    tiles, none = _crown_store(graph, box, False, monkeypatch)
    assert not none  # the reference ran without patches
    for name, (lo, hi) in tiles.items():
        torch.testing.assert_close(with_patches[name][0], lo, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(with_patches[name][1], hi, rtol=1e-9, atol=1e-9)


def test_the_random_chains_reach_every_kind_of_step(monkeypatch):
    """The chains above run through the patches (on all but a few, where no neuron of a chain's
    node is unstable) and exercise each step kind, the one-hot starts and the padding masks."""
    kinds, starts, masks, used = set(), set(), 0, 0
    for seed in range(40):
        graph = _random_chain(seed)
        box = bg.input_box(torch.Generator().manual_seed(100 + seed), graph.input_shape, batch=1, width=0.5)
        used += bool(_crown_store(graph, box, True, monkeypatch)[1])
        with torch.no_grad():
            engine = lb.LinearBoundEngine(graph, propagate_box(graph, box))
        for node in graph.nodes:
            chain = conv_patches.patch_chain(engine, node.name) if len(graph.shapes[node.name]) == 3 else None
            if chain:
                kinds |= {s.kind for s in chain}
                starts.add(chain[0].kind)
                masks += sum(1 for up, s in zip(chain, chain[1:]) if up.kind in ("conv", "pool") and s.kind != "act"
                             and not (s.kind == "pool" and s.exact_tiling))
    assert used >= 36 and kinds == {"conv", "pool", "bn", "act"} and {"conv", "bn", "pool"} <= starts and masks > 0


@pytest.mark.parametrize("seed", range(8))
def test_own_rows_per_sample_equal_each_sample_alone(seed, monkeypatch):
    """Upper bounds everywhere, lower bounds where the upper one is above 0 (the batch runs
    upper bounds first and skips lower ones under a ReLU that is 0 anyway; a lone sample does not)."""
    graph = _random_chain(seed)
    box = bg.input_box(torch.Generator().manual_seed(200 + seed), graph.input_shape, batch=3, width=0.5)
    together, calls = _crown_store(graph, box, True, monkeypatch, per_sample_rows=True)
    assert calls
    for i in range(3):
        alone, _ = _crown_store(graph, type(box)(box.lo[i:i + 1], box.hi[i:i + 1]), True, monkeypatch)
        for name in calls:
            alive = together[name][1][i:i + 1] > 0
            torch.testing.assert_close(together[name][1][i:i + 1], alone[name][1], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(together[name][0][i:i + 1][alive], alone[name][0][alive], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_patch_bounds_hold_on_samples(seed, monkeypatch):
    graph = _random_chain(seed)
    box = bg.input_box(torch.Generator().manual_seed(300 + seed), graph.input_shape, batch=2, width=0.3)
    store, calls = _crown_store(graph, box, True, monkeypatch)
    assert calls
    gen = torch.Generator().manual_seed(seed)
    x = box.lo + (box.hi - box.lo) * torch.rand((400,) + box.lo.shape, generator=gen, dtype=DT)
    x = torch.cat([x, box.lo.unsqueeze(0), box.hi.unsqueeze(0)]).flatten(0, 1)  # corners too
    values = graph.forward(x, return_all=True)
    for name in calls:
        v = values[name].view(-1, 2, *values[name].shape[1:])
        lo, hi = store[name]
        assert bool((v >= lo - 1e-9).all() and (v <= hi + 1e-9).all()), name


def test_gathered_fields_and_the_transpose_matrix():
    """A field cut out by unfold is the map at the row's positions (0 in the padding); the
    transpose matrix is the transposed convolution of the patch."""
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(3, 2, 7, 6, generator=gen, dtype=DT)
    b, i, j = torch.tensor([0, 2, 1, 2]), torch.tensor([0, 3, 1, 2]), torch.tensor([2, 0, 1, 3])
    fields = conv_patches._Fields(b, i, j, (4, 4))
    fields.through((2, 1), (1, 2))
    got = fields.gather(t, (4, 3), "t")
    for r in range(4):
        for u in range(4):
            for v in range(3):
                y, x = int(i[r]) * 2 - 1 + u, int(j[r]) - 2 + v
                inside = 0 <= y < 7 and 0 <= x < 6
                want = t[b[r], :, y, x] if inside else torch.zeros(2, dtype=DT)
                torch.testing.assert_close(got[r, :, u, v], want)
    conv = _conv(gen, 3, 2, 3, 2, 1, 1)
    step = conv_patches._Step(ir.Node("c", conv, ["x"]), "conv", (2, 2), (1, 1), (5, 5), (2, 9, 9))
    lam = torch.randn(6, 3, 2, 2, generator=gen, dtype=DT)
    mat = step.transpose_matrix((2, 2))
    assert mat is not None and mat.shape == (3 * 4, 2 * 25)
    want = F.conv_transpose2d(lam, conv.weight, None, (2, 2))
    torch.testing.assert_close((lam.reshape(6, -1) @ mat).view(6, 2, 5, 5), want)


def test_no_patches_where_the_chain_or_the_engine_rules_them_out():
    graph = _random_chain(0)
    box = bg.input_box(torch.Generator().manual_seed(1), graph.input_shape, batch=1)
    with torch.no_grad():
        engine = lb.LinearBoundEngine(graph, propagate_box(graph, box))
    top = next(n.name for n in graph.nodes if conv_patches.patch_chain(engine, n.name))
    for attr, value in (("errors", {top: torch.zeros(1)}), ("capture", {top}), ("fast_paths", False),
                        ("windows", False), ("differentiable", True)):
        old = getattr(engine, attr)
        setattr(engine, attr, value)
        assert conv_patches.patch_chain(engine, top) is None, attr
        setattr(engine, attr, old)
    assert conv_patches.patch_chain(engine, top) is not None
    # a node with two inputs on the way, a grouped convolution, a flat node: no chain
    gen = torch.Generator().manual_seed(2)
    b = ir.GraphBuilder("x", (2, 6, 6), DT)
    a = b.add("a", _conv(gen, 2, 2, 3, 1, 1, 1), ["x"])
    s = b.add("s", ir.Add(), [b.add("r", ir.ReLU(), [a]), "x"])
    g2 = b.add("g", ir.Conv2d(torch.randn(2, 1, 3, 3, generator=gen, dtype=DT), None, (1, 1), (1, 1), (1, 1), 2), [s])
    graph = b.build(b.add("fc", bg._lin(gen, 2, 72), [b.add("f", ir.Reshape((72,)), [g2])]))
    with torch.no_grad():
        engine = lb.LinearBoundEngine(graph, propagate_box(graph, bg.input_box(gen, (2, 6, 6), batch=1)))
    assert conv_patches.patch_chain(engine, "a") is not None
    assert conv_patches.patch_chain(engine, "s") is None and conv_patches.patch_chain(engine, "g") is None
    assert conv_patches.patch_chain(engine, "fc") is None


def test_large_batches_take_patches_too(monkeypatch):
    """At a batch where a tile holds one position the rows still go through patches (with
    the same bounds as the tiles)."""
    graph = _random_chain(1)
    box = bg.input_box(torch.Generator().manual_seed(2), graph.input_shape, batch=200, width=0.5)
    with_patches, calls = _crown_store(graph, box, True, monkeypatch)
    tiles, _ = _crown_store(graph, box, False, monkeypatch)
    with torch.no_grad():
        engine = lb.LinearBoundEngine(graph, propagate_box(graph, box))
    per_chunk = max(1, min(engine.max_rows, row_refinement.WINDOW_ROWS) // (2 * engine.batch))  # bound_rows'
    sides = [engine._tile_side(tuple(graph.shapes[n]), per_chunk) for n in calls]
    assert calls and max(sides) == 1
    for name, (lo, hi) in tiles.items():
        torch.testing.assert_close(with_patches[name][0], lo, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(with_patches[name][1], hi, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 3])
def test_lower_lines_with_an_intercept_take_the_same_constant(seed, monkeypatch):
    """The ReLU family's lower lines pass through 0; a relaxation whose lower lines are lowered
    by a constant (still below the ReLU) must add the same constant through patches and tiles."""
    import dataclasses

    real = lb.LinearBoundEngine.relaxation

    def lowered(self, node):
        rel = real(self, node)
        if node.name not in self._lowered:
            self._lowered[node.name] = dataclasses.replace(rel, lower_bias=rel.lower_bias - 0.05)
            self._relax[node.name] = self._lowered[node.name]
        return self._relax[node.name]

    monkeypatch.setattr(lb.LinearBoundEngine, "_lowered", {}, raising=False)
    monkeypatch.setattr(lb.LinearBoundEngine, "relaxation", lowered)
    graph = _random_chain(seed)
    box = bg.input_box(torch.Generator().manual_seed(400 + seed), graph.input_shape, batch=1, width=0.5)
    lb.LinearBoundEngine._lowered = {}
    with_patches, calls = _crown_store(graph, box, True, monkeypatch)
    lb.LinearBoundEngine._lowered = {}
    tiles, _ = _crown_store(graph, box, False, monkeypatch)
    assert calls
    for name, (lo, hi) in tiles.items():
        torch.testing.assert_close(with_patches[name][0], lo, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(with_patches[name][1], hi, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 5, 9, 14])
@pytest.mark.parametrize("per_sample", [False, True])
def test_many_small_chunks_give_the_same_bounds(seed, per_sample, monkeypatch):
    """A tiny chunk budget splits the groups into many chunks of different sizes (the fullest
    first, one group per chunk at the least): the same bounds as one chunk."""
    graph = _random_chain(seed)
    box = bg.input_box(torch.Generator().manual_seed(500 + seed), graph.input_shape, batch=3, width=0.5)
    one, calls = _crown_store(graph, box, True, monkeypatch, per_sample_rows=per_sample)
    assert calls
    monkeypatch.setattr(conv_patches, "PATCH_ELEMENTS", 1)
    many, _ = _crown_store(graph, box, True, monkeypatch, per_sample_rows=per_sample)
    monkeypatch.setattr(conv_patches, "PATCH_ELEMENTS", 3000)
    some, _ = _crown_store(graph, box, True, monkeypatch, per_sample_rows=per_sample)
    for name, (lo, hi) in one.items():
        for other in (many, some):
            torch.testing.assert_close(other[name][0], lo, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(other[name][1], hi, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 3, 9])
def test_fields_indexed_chunk_by_chunk_give_the_same_bounds(seed, monkeypatch):
    """Maps whose cut-out at every position would be too large are indexed per chunk instead
    (memory in proportion to the chunk): the same bounds."""
    graph = _random_chain(seed)
    box = bg.input_box(torch.Generator().manual_seed(600 + seed), graph.input_shape, batch=3, width=0.5)
    cut, calls = _crown_store(graph, box, True, monkeypatch)
    assert calls
    monkeypatch.setattr(conv_patches, "TABLE_ELEMENTS", 0)
    indexed, _ = _crown_store(graph, box, True, monkeypatch)
    for name, (lo, hi) in cut.items():
        torch.testing.assert_close(indexed[name][0], lo, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(indexed[name][1], hi, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_patch_bounds_at_eps_zero_are_the_values(seed):
    """A box of one point: each patch-bounded neuron's bounds are its value there (both)."""
    graph = _random_chain(seed)
    x = bg.input_box(torch.Generator().manual_seed(700 + seed), graph.input_shape, batch=2).lo
    box = type(bg.input_box(torch.Generator(), graph.input_shape))(x, x.clone())
    values = graph.forward(x, return_all=True)
    # at a point every neuron is stable, so refine_node has nothing to refine: bound every
    # neuron of each chain's node directly
    with torch.no_grad():
        engine = lb.LinearBoundEngine(graph, propagate_box(graph, box))
        engine.refine_intermediate()
        checked = 0
        for node in graph.nodes:
            chain = conv_patches.patch_chain(engine, node.name) if len(graph.shapes[node.name]) == 3 else None
            if not chain:
                continue
            n = int(torch.tensor(graph.shapes[node.name]).prod())
            b = torch.arange(2).repeat_interleave(n)
            neurons = torch.arange(n).repeat(2)
            lo, minus_hi = conv_patches.bound_patches(engine, node.name, chain, b, neurons, (1, -1))
            want = values[node.name].reshape(-1)
            torch.testing.assert_close(lo, want, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(-minus_hi, want, rtol=1e-9, atol=1e-9)
            checked += 1
    assert checked
