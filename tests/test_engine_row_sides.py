"""Two engine shortcuts (issue 15) against the engine without them:

- upper_first (row_refinement.py): rows of a node read by ReLUs only get their upper bounds
  first and lower bounds only where the upper bound is still above 0;
- fold_input (relu_chain.py): a Linear/ReLU chain ending at the graph input minimises over the
  input box itself instead of handing coefficients on the input back.

Each switch is a class attribute of LinearBoundEngine; off, the engine follows its plain rules.
With it on, the output bounds are the same to float64 rounding, a stored bound differs only
on a neuron that is dead (hi <= 0) in both, where the ReLU is 0 anyway, and the shortcut was
taken."""
from __future__ import annotations

import pytest
import torch

from verikit import ir
from verikit.bounds import Box
from verikit.domains import linear_bounds as lb
from verikit.domains.crown import optimise_alpha

import backsub_graphs as bg
from test_engine_fast_paths import GRAPHS, assert_holds_on, assert_same_where_live, read_by_relus_only, relu_mlp

DT = torch.float64
TOL = 1e-9


def run(graph, box, monkeypatch, variant="crown", max_rows=4096, then=None, **switches):
    """(engine, lower, upper) of the fast-path engine with the given class switches, and
    then(engine, lower) where given, still under those switches."""
    with monkeypatch.context() as m:
        for name, value in switches.items():
            m.setattr(lb.LinearBoundEngine, name, value)
        with torch.no_grad():
            e = lb.prepare(graph, box, None, None, variant, max_rows, True, forward_prescreen=False)
            lo, hi = lb.output_bounds(e)
        return (e, lo, hi) if then is None else (e, lo, hi, then(e, lo))


def _box(shape, batch, seed, width=0.7, shared_radius=False):
    box = bg.input_box(torch.Generator().manual_seed(seed), shape, batch=batch, width=width)
    if shared_radius:  # one radius for the whole batch (branch and bound's activation-split children)
        # dyadic centre and radius: c +- r and (hi - lo) / 2 are exact, so the radii are equal
        c, r = (box.center * 1024).round() / 1024, (box.radius[:1] * 64).round().clamp(min=1) / 64
        box = Box(c - r, c + r)
        assert (box.radius == r).all()
    return box


MLPS = ["mlp", "mlp-flatten", "mlp-wide", "linear-bn", "relu-mlp", "shared-relu"]


@pytest.mark.parametrize("name", MLPS + ["conv-pool-1ch", "conv-mix"])
def test_upper_first_equals_both_sides(monkeypatch, name):
    graph, shape = GRAPHS[name]
    box = _box(shape, 6, 21)
    e0, lo0, hi0 = run(graph, box, monkeypatch, upper_first=False)
    e1, lo1, hi1 = run(graph, box, monkeypatch, upper_first=True)
    torch.testing.assert_close(lo1, lo0, rtol=TOL, atol=TOL)
    torch.testing.assert_close(hi1, hi0, rtol=TOL, atol=TOL)
    skipped = False
    for node in graph.nodes:
        a, b = e0.store[node.name], e1.store[node.name]
        if read_by_relus_only(graph, node.name):
            assert_same_where_live(a, b, TOL, node.name)
            skipped |= bool((b.lo < a.lo - TOL).any())
        else:
            torch.testing.assert_close(b.lo, a.lo, rtol=TOL, atol=TOL, msg=node.name)
            torch.testing.assert_close(b.hi, a.hi, rtol=TOL, atol=TOL, msg=node.name)
    assert e1.rows_bounded <= e0.rows_bounded
    if name in ("mlp", "mlp-wide", "mlp-flatten"):  # many neurons die: rows are saved
        assert e1.rows_bounded < e0.rows_bounded and skipped


def test_upper_first_is_off_at_batch_one_and_for_leaky_relu(monkeypatch):
    """Batch 1: both sides in one pass (cheaper there). A LeakyReLU is not 0 where hi <= 0,
    so its input's lower bounds still matter: all rows get both sides."""
    graph, shape = GRAPHS["mlp-wide"]
    box = _box(shape, 1, 3)
    assert run(graph, box, monkeypatch, upper_first=True)[0].rows_bounded == \
        run(graph, box, monkeypatch, upper_first=False)[0].rows_bounded
    graph, shape = GRAPHS["leaky-mlp"]
    box = _box(shape, 5, 3, width=1.0)
    on, off = run(graph, box, monkeypatch, upper_first=True), run(graph, box, monkeypatch, upper_first=False)
    assert on[0].rows_bounded == off[0].rows_bounded > 0
    for node in graph.nodes:
        torch.testing.assert_close(on[0].store[node.name].lo, off[0].store[node.name].lo, rtol=0, atol=0)


@pytest.mark.parametrize("shared_radius", [False, True])
@pytest.mark.parametrize("name", MLPS)
def test_fold_input_equals_coefficients_on_the_input(monkeypatch, name, shared_radius):
    graph, shape = GRAPHS[name]
    box = _box(shape, 5, 17, shared_radius=shared_radius)
    e0, lo0, hi0 = run(graph, box, monkeypatch, fold_input=False)
    e1, lo1, hi1 = run(graph, box, monkeypatch, fold_input=True)
    torch.testing.assert_close(lo1, lo0, rtol=TOL, atol=TOL)
    torch.testing.assert_close(hi1, hi0, rtol=TOL, atol=TOL)
    for node in graph.nodes:
        torch.testing.assert_close(e1.store[node.name].lo, e0.store[node.name].lo, rtol=TOL, atol=TOL)
        torch.testing.assert_close(e1.store[node.name].hi, e0.store[node.name].hi, rtol=TOL, atol=TOL)
    assert not e0.chains._input_folds
    folds = [(rows, f) for rows, *_, f in e1.chains._input_folds.values() if f is not None]
    # shared-relu: its first ReLU is read twice; linear-bn: a BatchNorm between: no chain to the input
    if name not in ("shared-relu", "linear-bn"):
        assert folds, "the input was never folded"
    for rows, (_, wr) in folds:  # one scaled weight for the batch where live rows and radius are shared
        assert wr.dim() == (2 if shared_radius and (rows is None or not rows.per_sample) else 3)


def test_fold_input_follows_a_new_box_and_skips_the_float_sound_mode(monkeypatch):
    """The fold is cached per input box: a second box on the same graph gets its own bounds.
    With rounding-error radii the engine does not fold."""
    graph, shape = GRAPHS["mlp-wide"]
    for seed in (1, 2):
        box = _box(shape, 3, seed)
        _, lo0, _ = run(graph, box, monkeypatch, fold_input=False)
        _, lo1, _ = run(graph, box, monkeypatch, fold_input=True)
        torch.testing.assert_close(lo1, lo0, rtol=TOL, atol=TOL)
    errors = {n.name: torch.zeros((3,) + tuple(graph.shapes[n.name]), dtype=DT) for n in graph.nodes}
    with torch.no_grad():
        e = lb.prepare(graph, _box(shape, 3, 1), None, None, "crown", 4096, errors=errors, forward_prescreen=False)
        lb.output_bounds(e)
    assert e.chains._live and not e.chains._input_folds


@pytest.mark.parametrize("batch", [1, 4])
def test_alpha_crown_equal_with_and_without_the_shortcuts(monkeypatch, batch):
    """alpha steps run through a folded input (their gradient reaches the slopes through lam)."""
    graph, shape = GRAPHS["mlp-wide"]
    box = _box(shape, batch, 5, width=0.6)
    found = [run(graph, box, monkeypatch, then=lambda e, lo: optimise_alpha(e, lo, 8, 0.1),
                 upper_first=on, fold_input=on)[1::2] for on in (False, True)]
    assert (found[0][1] > found[0][0] + 1e-6).any()  # the steps did something
    torch.testing.assert_close(found[1][0], found[0][0], rtol=TOL, atol=TOL)
    torch.testing.assert_close(found[1][1], found[0][1], rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_shortcuts_sound_by_sampling(monkeypatch, seed):
    """Random ReLU nets, both shortcuts on: every stored bound and the output bounds hold on
    samples of the box (and on its corners, where the input fold's minimum is reached)."""
    widths = [(4, 20, 20, 3), (7, 30, 12, 12, 4), (3, 50, 2), (6, 16, 16, 16, 16, 5)][seed]
    graph, shape = relu_mlp(100 + seed, widths=widths, dead_bias=-0.2, flat_input=seed % 2 == 1)
    box = _box(shape, 4, seed, width=0.9)
    e, lo, hi = run(graph, box, monkeypatch, upper_first=True, fold_input=True)
    gen = torch.Generator().manual_seed(seed)
    xs = box.sample(400, gen)
    corners = torch.where(torch.rand(xs.shape, generator=gen, dtype=DT) < 0.5, box.lo, box.hi)
    assert_holds_on(graph, e, lo, hi, torch.cat([xs, corners]))
    assert any(f is not None for *_, f in e.chains._input_folds.values())


def test_gradient_through_the_input_box_is_kept(monkeypatch):
    """Input-split search differentiates the bound with respect to the box centre: the fold
    steps aside there and the gradient is the plain engine's."""
    graph, shape = GRAPHS["mlp-wide"]
    box = _box(shape, 3, 9)
    grads = []
    for on in (False, True):
        centre = box.center.clone().requires_grad_(True)
        with monkeypatch.context() as m:
            m.setattr(lb.LinearBoundEngine, "fold_input", on)
            e = lb.prepare(graph, Box(centre - box.radius, centre + box.radius), None, None, "crown", 4096, True,
                           forward_prescreen=False)
            lo, _ = lb.output_bounds(e, upper=False)
        grads.append(torch.autograd.grad(lo.sum(), centre)[0])
        assert not e.chains._input_folds
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("case", range(60))
def test_shortcuts_on_random_nets_and_batches(monkeypatch, case):
    """Random ReLU MLPs (depth, widths, dead-neuron share, flat input), batch 1-9, box widths,
    folded robustness specs, CROWN and DeepPoly, row chunks of 8 to 4096: both shortcuts on
    against both off give the same output bounds and the same stored bounds wherever a neuron
    is not dead. (This found the dead neurons' upper bounds: rows already dead by their
    interval in one sample are skipped there, so their hi stays the interval's, <= 0.)"""
    import random

    from verikit.spec import Spec, fold_spec

    rng = random.Random(case)
    depth = rng.randint(1, 4)
    widths = tuple([rng.randint(2, 9)] + [rng.randint(2, 30) for _ in range(depth)] + [rng.randint(2, 5)])
    graph, shape = relu_mlp(case, widths=widths, dead_bias=rng.uniform(-0.6, 0.2), flat_input=case % 3 == 0)
    B = rng.randint(1, 9)
    box = bg.input_box(torch.Generator().manual_seed(case), shape, batch=B, width=rng.uniform(0.05, 1.5))
    if case % 2:
        labels = torch.randint(0, widths[-1], (B,), generator=torch.Generator().manual_seed(case))
        graph = fold_spec(graph, Spec.robustness(labels, widths[-1]).to(dtype=DT))
    variant, max_rows = rng.choice(["crown", "deeppoly"]), rng.choice([8, 64, 4096])
    (e0, lo0, hi0), (e1, lo1, hi1) = (run(graph, box, monkeypatch, variant, max_rows, upper_first=on, fold_input=on)
                                      for on in (False, True))
    torch.testing.assert_close(lo1, lo0, rtol=TOL, atol=TOL)
    torch.testing.assert_close(hi1, hi0, rtol=TOL, atol=TOL)
    for node in graph.nodes:
        a, b = e0.store[node.name], e1.store[node.name]
        if B > 1 and read_by_relus_only(graph, node.name):
            assert_same_where_live(a, b, TOL, node.name)
        else:
            torch.testing.assert_close(b.lo, a.lo, rtol=TOL, atol=TOL, msg=node.name)
            torch.testing.assert_close(b.hi, a.hi, rtol=TOL, atol=TOL, msg=node.name)
