"""Small graphs exercising every IR op type, for soundness tests of every domain.

`OP_GRAPHS` maps a label to a factory returning (graph, input_box). Each graph puts the op
under test behind a random affine layer, so its inputs have mixed signs and non-trivial
widths. Every op type in `verikit.ir.ALL_OP_TYPES` appears in at least one graph (a test checks
this), so a domain tested over `OP_GRAPHS` is tested on every op.
"""
from __future__ import annotations

import torch

from verikit import ir
from verikit.bounds import Box


def _lin(gen, n_out, n_in):
    return ir.Linear(torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5, torch.randn(n_out, generator=gen) * 0.3)


def _conv(gen, c_out, c_in, k=3, stride=1, pad=1):
    return ir.Conv2d(torch.randn(c_out, c_in, k, k, generator=gen) / (c_in * k * k) ** 0.5,
                     torch.randn(c_out, generator=gen) * 0.3, (stride, stride), (pad, pad))


def _box(gen, shape, batch=2, width=0.5):
    c = torch.randn((batch,) + shape, generator=gen)
    r = torch.rand((batch,) + shape, generator=gen) * width
    return Box(c - r, c + r)


def _dense_graph(op_factory, n=6):
    def make(seed=0, batch=2, width=0.5):
        gen = torch.Generator().manual_seed(seed)
        b = ir.GraphBuilder("x", (n,))
        h = b.add("pre", _lin(gen, n, n), ["x"])
        out = b.add("op", op_factory(gen), [h])
        return b.build(out), _box(gen, (n,), batch, width)
    return make


def _conv_graph(op_factory, c=2, hw=6):
    def make(seed=0, batch=2, width=0.5):
        gen = torch.Generator().manual_seed(seed)
        b = ir.GraphBuilder("x", (c, hw, hw))
        h = b.add("pre", _conv(gen, c, c), ["x"])
        out = b.add("op", op_factory(gen), [h])
        return b.build(out), _box(gen, (c, hw, hw), batch, width)
    return make


def _residual(seed=0, batch=2, width=0.5):
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (2, 5, 5))
    a = b.add("a", _conv(gen, 2, 2), ["x"])
    r = b.add("relu", ir.ReLU(), [a])
    c = b.add("b", _conv(gen, 2, 2), [r])
    out = b.add("add", ir.Add(), [c, "x"])
    return b.build(out), _box(gen, (2, 5, 5), batch, width)


def _concat(seed=0, batch=2, width=0.5):
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (4,))
    a = b.add("a", _lin(gen, 3, 4), ["x"])
    r = b.add("relu", ir.ReLU(), [a])
    c = b.add("c", _lin(gen, 2, 4), ["x"])
    out = b.add("cat", ir.Concat(1), [r, c])
    return b.build(out), _box(gen, (4,), batch, width)


def _product(square: bool):
    """Bilinear Mul of two affine images of the input, a size-1 dimension broadcast (or of one
    tensor with itself: correlated factors)."""
    def make(seed=0, batch=2, width=0.5):
        gen = torch.Generator().manual_seed(seed)
        b = ir.GraphBuilder("x", (2, 4))
        a = b.add("a", _lin(gen, 3, 4), ["x"])
        if square:
            return b.build(b.add("op", ir.Mul(), [a, a])), _box(gen, (2, 4), batch, width)
        c = b.add("c", ir.Take(1, torch.tensor([1]), (1,)), [b.add("cl", _lin(gen, 3, 4), ["x"])])
        return b.build(b.add("op", ir.Mul(), [a, c])), _box(gen, (2, 4), batch, width)
    return make


def _resize(n_in, n_out, mode):
    from verikit.onnx_upsample_ops import resize_matrix

    return torch.tensor(resize_matrix(n_in, n_out, n_out / n_in, mode, "half_pixel", "round_prefer_floor"),
                        dtype=torch.float32)


def _batchnorm(gen):
    c = 2
    op = ir.BatchNorm(torch.randn(c, generator=gen), torch.randn(c, generator=gen), torch.randn(c, generator=gen),
                      torch.rand(c, generator=gen) + 0.5, 1e-5)
    return op


def _mlp(seed=0, batch=2, width=0.5):
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (5,))
    h = "x"
    for i, n in enumerate((8, 8)):
        h = b.add(f"fc{i}", _lin(gen, n, 5 if i == 0 else 8), [h])
        h = b.add(f"relu{i}", ir.ReLU(), [h])
    out = b.add("out", _lin(gen, 3, 8), [h])
    return b.build(out), _box(gen, (5,), batch, width)


OP_GRAPHS = {
    "linear": _dense_graph(lambda g: _lin(g, 4, 6)),
    "conv": _conv_graph(lambda g: ir.Conv2d(torch.randn(3, 2, 3, 3, generator=g), torch.randn(3, generator=g), (2, 2), (1, 1), (1, 1), 1)),
    "conv-groups-dilation": _conv_graph(lambda g: ir.Conv2d(torch.randn(4, 1, 2, 2, generator=g), None, (1, 1), (0, 0), (2, 2), 2)),
    "elementwise-affine": _dense_graph(lambda g: ir.ElementwiseAffine(torch.randn(6, generator=g), torch.randn(6, generator=g))),
    "batchnorm": _conv_graph(_batchnorm),
    "avgpool": _conv_graph(lambda g: ir.AvgPool2d((2, 2), (2, 2), (1, 1), False, False)),
    # ceil mode: the last window is partial and averages fewer entries
    "avgpool-ceil": _conv_graph(lambda g: ir.AvgPool2d((2, 2), (2, 2), (0, 0), True, False), hw=5),
    "global-avgpool": _conv_graph(lambda g: ir.GlobalAvgPool()),
    "pad": _conv_graph(lambda g: ir.Pad((1, 0, 2, 1), 0.7)),
    "reshape": _conv_graph(lambda g: ir.Reshape((6, 12))),
    "transpose": _conv_graph(lambda g: ir.Transpose((0, 2, 3, 1))),
    "concat": _concat,
    "residual-add": _residual,
    "relu": _dense_graph(lambda g: ir.ReLU()),
    "leaky-relu": _dense_graph(lambda g: ir.LeakyReLU(0.1)),
    "sigmoid": _dense_graph(lambda g: ir.Sigmoid()),
    "tanh": _dense_graph(lambda g: ir.Tanh()),
    "exp": _dense_graph(lambda g: ir.Exp()),
    "sign": _dense_graph(lambda g: ir.Sign()),
    "softmax": _dense_graph(lambda g: ir.Softmax(1)),
    "maxpool": _conv_graph(lambda g: ir.MaxPool2d((2, 2), (2, 2))),
    "maxpool-overlap-pad": _conv_graph(lambda g: ir.MaxPool2d((3, 3), (2, 2), (1, 1))),
    "mlp": _mlp,
    "mul-broadcast": _product(square=False),
    "mul-square": _product(square=True),
    "take-slice-negative-step": _conv_graph(lambda g: ir.Take(3, torch.tensor([5, 3, 1]), (3,))),
    "take-gather-scalar-index": _conv_graph(lambda g: ir.Take(2, torch.tensor([4]), ())),
    "take-gather-2d-index": _dense_graph(lambda g: ir.Take(1, torch.tensor([0, 5, 5, 2]), (2, 2))),
    "conv-transpose": _conv_graph(lambda g: ir.ConvTranspose2d(torch.randn(2, 3, 3, 3, generator=g), torch.randn(3, generator=g),
                                                             (2, 2), (1, 1), 1, (1, 0), (1, 0, 0, 2))),
    "resample-linear-nearest": _conv_graph(lambda g: ir.Resample((2, 3), (_resize(6, 9, "linear"), _resize(6, 4, "nearest")))),
}


def op_types_covered() -> set:
    types = set()
    for make in OP_GRAPHS.values():
        g, _ = make()
        types.update(type(n.op) for n in g.nodes)
    return types
