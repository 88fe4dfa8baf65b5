"""Rows of a convolution (or of a BatchNorm after one) started at the convolution's input as
kernels (domains/conv_rows.py): the window and constant are exactly the neuron as a function
of the convolution's input, at every geometry, and CROWN bounds the same with and without."""
from __future__ import annotations

import itertools

import pytest
import torch

from verikit import ir
from verikit.domains import conv_rows, linear_bounds as lb, row_refinement
from verikit.domains.box import propagate_box

import backsub_graphs as bg

DT = torch.float64
# (kernel, stride, padding, dilation, BatchNorm after the conv, bias)
GEOMETRIES = [g for g in itertools.product((1, 2, 3), (1, 2), (0, 1, 2), (1, 2), (False, True), (False, True))
              if g[2] < g[0] * g[3]]  # every output reads some input position
# unequal strides, paddings, dilations and kernel sides (rows and columns mixed up would show)
GEOMETRIES += [((3, 2), (1, 2), (1, 0), (2, 1), True, True), ((2, 3), (2, 1), (0, 2), (1, 2), False, True)]
_pair = lambda v: v if isinstance(v, tuple) else (v, v)


def _net(kernel, stride, pad, dilation, bn, bias, seed=0, c_in=3, side=9):
    """conv0 -> ReLU -> conv (the geometry) [-> BN] -> ReLU -> Flatten -> Linear."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (c_in, side, side), DT)
    h = b.add("relu0", ir.ReLU(), [b.add("conv0", bg._conv(gen, 4, c_in), ["x"])])
    (kh, kw), stride, pad, dilation = _pair(kernel), _pair(stride), _pair(pad), _pair(dilation)
    w = torch.randn(5, 4, kh, kw, generator=gen, dtype=DT) / (4 * kh * kw) ** 0.5
    conv = ir.Conv2d(w, torch.randn(5, generator=gen, dtype=DT) * 0.3 if bias else None, stride, pad, dilation)
    h = b.add("conv1", conv, [h])
    if bn:
        h = b.add("bn1", bg._bn(gen, 5), [h])
    top = h
    h = b.add("relu1", ir.ReLU(), [h])
    oh, ow = ((side + 2 * p - d * (k - 1) - 1) // s + 1 for k, s, p, d in zip((kh, kw), stride, pad, dilation))
    h = b.add("flat", ir.Reshape((5 * oh * ow,)), [h])
    return b, b.add("fc", bg._lin(gen, 3, 5 * oh * ow), [h]), top


def _graph(geometry, seed=0):
    b, h, top = _net(*geometry, seed=seed)
    graph = b.build(h)
    return graph, top


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}s{}p{}d{}{}{}".format(*g[:4], "-bn" * g[4], "-b" * g[5]).replace(" ", ""))
def test_kernel_rows_are_the_neurons_as_functions_of_the_conv_input(geometry):
    graph, top = _graph(geometry)
    shape = tuple(graph.shapes[top])
    box = bg.input_box(torch.Generator().manual_seed(1), graph.input_shape, batch=2)
    with torch.no_grad():
        store = propagate_box(graph, box)
        engine = lb.LinearBoundEngine(graph, store)
        form = conv_rows.conv_row_form(engine, graph.node(top), shape)
        assert form is not None and form[0].name == "conv1"
        n = shape[0] * shape[1] * shape[2]
        gen = torch.Generator().manual_seed(2)
        src = graph.node("conv1").inputs[0]
        x = torch.randn((2,) + tuple(graph.shapes[src]), generator=gen, dtype=DT)  # any point of the conv's input
        after = graph.node(top).op.forward(graph.node("conv1").op.forward(x)) if top != "conv1" else \
            graph.node("conv1").op.forward(x)
        for sides in ((1, -1), (1,), (-1,)):
            rows = torch.randperm(n, generator=gen)[: int(torch.randint(1, n + 1, (1,), generator=gen))]
            start = conv_rows.kernel_rows(engine, form, rows, shape, sides)
            assert start is not None
            window, const = start
            coef = window.dense(tuple(graph.shapes[src]))
            value = (coef * x.unsqueeze(1)).flatten(2).sum(-1) + (const if const is not None else 0)
            want = torch.cat([sign * after.flatten(1)[:, rows] for sign in sides], 1)
            torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("geometry", GEOMETRIES[::3] + GEOMETRIES[-2:],
                         ids=lambda g: "k{}s{}p{}d{}{}{}".format(*g[:4], "-bn" * g[4], "-b" * g[5]).replace(" ", ""))
@pytest.mark.parametrize("batch", [1, 3])
def test_crown_bounds_are_the_same_with_and_without_kernel_rows(geometry, batch, monkeypatch):
    graph, _ = _graph(geometry, seed=3)
    box = bg.input_box(torch.Generator().manual_seed(4), graph.input_shape, batch=batch)

    def crown():
        with torch.no_grad():
            store = propagate_box(graph, box)
            engine = lb.LinearBoundEngine(graph, store)
            engine.refine_intermediate()
            return {k: (v.lo.clone(), v.hi.clone()) for k, v in engine.store.items()}

    monkeypatch.setattr(row_refinement, "patch_chain", lambda *a, **k: None)  # the tiles' rows (not patches)
    with_rows = crown()
    monkeypatch.setattr(row_refinement, "conv_row_form", lambda *a, **k: None)
    without = crown()
    for name, (lo, hi) in without.items():
        torch.testing.assert_close(with_rows[name][0], lo, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(with_rows[name][1], hi, rtol=1e-10, atol=1e-10)


def test_no_kernel_rows_in_the_float_sound_mode_on_the_general_rules_or_past_a_stop():
    graph, top = _graph((3, 1, 1, 1, True, True))
    box = bg.input_box(torch.Generator().manual_seed(5), graph.input_shape)
    with torch.no_grad():
        store = propagate_box(graph, box)
        engine = lb.LinearBoundEngine(graph, store)
        shape = tuple(graph.shapes[top])
        assert conv_rows.conv_row_form(engine, graph.node(top), shape) is not None
        engine.errors = {"conv1": torch.zeros(1)}
        assert conv_rows.conv_row_form(engine, graph.node(top), shape) is None
        engine.errors = {}
        engine.fast_paths = False
        assert conv_rows.conv_row_form(engine, graph.node(top), shape) is None
        engine.fast_paths = True
        assert conv_rows.conv_row_form(engine, graph.node(top), shape, stop="conv1") is None
        assert conv_rows.conv_row_form(engine, graph.node("relu1"), shape) is None  # not a conv or BN
