"""Small graphs for the back-substitution domains, each non-linear op *inside* the network
(followed by more layers), so that its relaxation — not just interval bounds — decides the
result. Together they contain every IR op type (a test checks it)."""
from __future__ import annotations

import torch

from verikit import ir
from verikit.bounds import Box

DT = torch.float64


def _lin(gen, n_out, n_in):
    return ir.Linear(torch.randn(n_out, n_in, generator=gen, dtype=DT) / n_in ** 0.5,
                     torch.randn(n_out, generator=gen, dtype=DT) * 0.3)


def _conv(gen, c_out, c_in, k=3, stride=1, pad=1):
    return ir.Conv2d(torch.randn(c_out, c_in, k, k, generator=gen, dtype=DT) / (c_in * k * k) ** 0.5,
                     torch.randn(c_out, generator=gen, dtype=DT) * 0.3, (stride, stride), (pad, pad))


def _bn(gen, c):
    return ir.BatchNorm(torch.randn(c, generator=gen, dtype=DT), torch.randn(c, generator=gen, dtype=DT),
                        torch.randn(c, generator=gen, dtype=DT) * 0.2, torch.rand(c, generator=gen, dtype=DT) + 0.5)


def input_box(gen, shape, batch=2, width=0.4):
    c = torch.randn((batch,) + tuple(shape), generator=gen, dtype=DT)
    r = torch.rand((batch,) + tuple(shape), generator=gen, dtype=DT) * width
    return Box(c - r, c + r)


def dense_net(act_factory, seed=0, widths=(6, 8, 8, 3)):
    """Linear -> act -> Linear -> act -> Linear."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (widths[0],), DT)
    h = "x"
    for i in range(len(widths) - 1):
        h = b.add(f"fc{i}", _lin(gen, widths[i + 1], widths[i]), [h])
        if i < len(widths) - 2:
            h = b.add(f"act{i}", act_factory(), [h])
    return b.build(h)


def conv_mix(seed=0):
    """conv, BN, ReLU, MaxPool, Pad, AvgPool, LeakyReLU, Transpose, Reshape, Linear,
    ElementwiseAffine, Tanh."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (2, 6, 6), DT)
    h = b.add("conv", _conv(gen, 3, 2), ["x"])
    h = b.add("bn", _bn(gen, 3), [h])
    h = b.add("relu", ir.ReLU(), [h])
    h = b.add("pool", ir.MaxPool2d((3, 3), (2, 2), (1, 1)), [h])  # overlapping windows, padding
    h = b.add("conv2", _conv(gen, 3, 3), [h])
    h = b.add("pad", ir.Pad((1, 0, 0, 1), 0.3), [h])
    h = b.add("avg", ir.AvgPool2d((2, 2), (1, 1)), [h])
    h = b.add("leaky", ir.LeakyReLU(0.2), [h])
    h = b.add("perm", ir.Transpose((0, 2, 3, 1)), [h])
    h = b.add("flat", ir.Reshape((27,)), [h])
    h = b.add("fc", _lin(gen, 6, 27), [h])
    h = b.add("scale", ir.ElementwiseAffine(torch.randn(6, generator=gen, dtype=DT), torch.randn(6, generator=gen, dtype=DT)), [h])
    h = b.add("tanh", ir.Tanh(), [h])
    h = b.add("out", _lin(gen, 4, 6), [h])
    return b.build(h)


def dag_net(seed=0):
    """Residual Add, Concat, GlobalAvgPool, Sigmoid, MaxPool without padding."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (2, 4, 4), DT)
    a = b.add("a", _conv(gen, 2, 2), ["x"])
    r = b.add("relu", ir.ReLU(), [a])
    c = b.add("c", _conv(gen, 2, 2), [r])
    s = b.add("res", ir.Add(), [c, "x"])
    r2 = b.add("relu2", ir.ReLU(), [s])
    p = b.add("pool", ir.MaxPool2d((2, 2), (2, 2)), [r2])
    g = b.add("gap", ir.GlobalAvgPool(), [r2])
    g = b.add("gflat", ir.Reshape((2,)), [g])
    pf = b.add("pflat", ir.Reshape((8,)), [p])
    cat = b.add("cat", ir.Concat(1), [pf, g])
    h = b.add("fc", _lin(gen, 5, 10), [cat])
    h = b.add("sig", ir.Sigmoid(), [h])
    h = b.add("out", _lin(gen, 3, 5), [h])
    return b.build(h), (2, 4, 4)


def take_net(seed=0):
    """Take (ONNX Slice with a negative step, Gather with a 2-D index, Split) between ReLUs."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (2, 5, 5), DT)
    h = b.add("conv", _conv(gen, 3, 2), ["x"])
    h = b.add("slice", ir.Take(3, torch.tensor([4, 2, 0]), (3,)), [h])  # x[..., ::-2]
    h = b.add("relu", ir.ReLU(), [h])
    h = b.add("flat", ir.Reshape((45,)), [h])
    g = b.add("gather", ir.Take(1, torch.tensor([44, 0, 7, 7, 30, 12]), (2, 3)), [h])
    g = b.add("gflat", ir.Reshape((6,)), [g])
    g = b.add("relu2", ir.ReLU(), [g])
    left = b.add("split0", ir.Take(1, torch.arange(0, 20), (20,)), [h])
    right = b.add("split1", ir.Take(1, torch.arange(20, 45), (25,)), [h])
    cat = b.add("cat", ir.Concat(1), [right, g, left])
    h = b.add("out", _lin(gen, 4, 51), [cat])
    return b.build(h), (2, 5, 5)


def upsample_net(seed=0):
    """ConvTranspose -> ReLU -> Resample (linear along H, nearest along W) -> ReLU -> Linear."""
    from verikit.onnx_upsample_ops import resize_matrix

    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (2, 3, 3), DT)
    up = ir.ConvTranspose2d(torch.randn(2, 2, 3, 3, generator=gen, dtype=DT) / 3, torch.randn(4, generator=gen, dtype=DT),
                            (2, 2), (1, 1), 2, (1, 1), (1, 0, 0, 1))
    h = b.add("up", up, ["x"])  # (4, 7, 7): groups 2
    h = b.add("relu", ir.ReLU(), [h])
    mh = torch.tensor(resize_matrix(7, 5, 5 / 7, "linear", "half_pixel", "round_prefer_floor"), dtype=DT)
    mw = torch.tensor(resize_matrix(7, 9, 9 / 7, "nearest", "asymmetric", "floor"), dtype=DT)
    h = b.add("resize", ir.Resample((2, 3), (mh, mw)), [h])  # (4, 5, 9)
    h = b.add("relu2", ir.ReLU(), [h])
    h = b.add("flat", ir.Reshape((180,)), [h])
    h = b.add("out", _lin(gen, 3, 180), [h])
    return b.build(h), (2, 3, 3)


def product_net(seed=0):
    """Bilinear Mul: an attention-like product of two ReLU branches (a size-1 dimension
    broadcast) and a square of one tensor (two correlated factors), then ReLU and Linear."""
    gen = torch.Generator().manual_seed(seed)
    b = ir.GraphBuilder("x", (6,), DT)
    a = b.add("fa", _lin(gen, 6, 6), ["x"])
    a = b.add("ra", ir.ReLU(), [a])
    q = b.add("q", ir.Reshape((2, 3)), [a])
    k = b.add("fk", _lin(gen, 3, 6), ["x"])
    k = b.add("k", ir.Reshape((1, 3)), [k])
    p = b.add("qk", ir.Mul(), [q, k])  # (2, 3) * (1, 3)
    p = b.add("pflat", ir.Reshape((6,)), [p])
    sq = b.add("sq", ir.Mul(), [p, p])
    h = b.add("relu", ir.ReLU(), [b.add("mix", ir.Add(), [b.add("fc", _lin(gen, 6, 6), [p]), sq])])
    h = b.add("out", _lin(gen, 3, 6), [h])
    return b.build(h), (6,)


def graphs():
    """label -> (graph, per-sample input shape)."""
    out = {
        "relu-mlp": (dense_net(ir.ReLU), (6,)),
        "leaky-mlp": (dense_net(lambda: ir.LeakyReLU(0.1)), (6,)),
        "leaky-concave-mlp": (dense_net(lambda: ir.LeakyReLU(2.0)), (6,)),
        "sigmoid-mlp": (dense_net(ir.Sigmoid), (6,)),
        "tanh-mlp": (dense_net(ir.Tanh), (6,)),
        "exp-mlp": (dense_net(ir.Exp), (6,)),
        "sign-mlp": (dense_net(ir.Sign), (6,)),
        "softmax-mlp": (dense_net(lambda: ir.Softmax(1)), (6,)),
        "conv-mix": (conv_mix(), (2, 6, 6)),
        "dag": dag_net(),
        "take": take_net(),
        "upsample": upsample_net(),
        "product": product_net(),
    }
    return out


def linear_graphs():
    """Graphs made of affine ops only (their bounds must be exact)."""
    gen = torch.Generator().manual_seed(3)
    b = ir.GraphBuilder("x", (2, 5, 5), DT)
    h = b.add("conv", _conv(gen, 3, 2, stride=2), ["x"])
    h = b.add("bn", _bn(gen, 3), [h])
    h = b.add("pad", ir.Pad((1, 1, 0, 1), -0.5), [h])
    h = b.add("avg", ir.AvgPool2d((2, 2), (1, 1)), [h])
    side = b.add("side", _conv(gen, 3, 2, k=1, stride=3, pad=0), ["x"])
    g = b.add("gap", ir.GlobalAvgPool(), [side])
    h = b.add("perm", ir.Transpose((0, 2, 3, 1)), [h])
    h = b.add("flat", ir.Reshape((36,)), [h])
    h = b.add("take", ir.Take(1, torch.arange(35, -1, -1), (36,)), [h])  # reversed: Slice with step -1
    gf = b.add("gflat", ir.Reshape((3,)), [g])
    cat = b.add("cat", ir.Concat(1), [h, gf])
    h = b.add("fc", _lin(gen, 5, 39), [cat])
    h2 = b.add("ew", ir.ElementwiseAffine(torch.randn(5, generator=gen, dtype=DT), torch.randn(5, generator=gen, dtype=DT)), [h])
    out = b.add("sum", ir.Add(), [h, h2])
    conv_graph = b.build(out)
    return {"linear-conv-dag": (conv_graph, (2, 5, 5)),
            "linear-chain": (dense_net(lambda: ir.ElementwiseAffine(torch.tensor(-1.5, dtype=DT), None)), (6,))}
