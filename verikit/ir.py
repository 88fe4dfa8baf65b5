"""A small graph IR of typed ops, evaluated with torch.

Every tensor flowing through a `Graph` has a leading batch dimension: shape (B, *sample_shape).
Ops are dataclasses holding torch tensors (constants, or references to live `nn.Parameter`s
when imported from PyTorch, so anything computed from them stays differentiable).

Ops come in three families, which is all a bound domain needs to know about most of them:
- affine ops (`is_affine = True`): y = L(x1, ..., xk) + b. They implement `forward` and
  `abs_linear` (|L| applied to non-negative radii), and the linear part is `forward` minus
  `forward(zeros)`; back-substitution domains use its vector-Jacobian product.
- monotone element-wise activations (ReLU, LeakyReLU, Sigmoid, Tanh, Exp): non-decreasing per element.
- MaxPool2d: non-decreasing in every input, but not element-wise.
- Softmax and the bilinear Mul (ir_ops.py) have rules of their own in every domain.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class EvalContext:
    """Per-call evaluation settings.

    `bn_mode="batch"` makes BatchNorm normalise with the statistics of the batch it sees and
    record them in `bn_stats`; a bound propagation given the same context then reuses exactly
    those statistics (SABR/IBP training needs the clean batch's statistics). `bn_reduce(x, dims)`
    replaces the local (mean, biased variance) of a batch, e.g. by statistics over every rank
    of a data-parallel run (train/distributed.py).
    """

    bn_mode: str = "running"  # "running" | "batch"
    bn_stats: dict = field(default_factory=dict)
    bn_reduce: Optional[Callable] = None


class Op:
    """Base class of all IR ops."""

    op_type: ClassVar[str] = "Op"
    is_affine: ClassVar[bool] = False
    is_activation: ClassVar[bool] = False  # monotone element-wise

    def forward(self, *xs: Tensor, ctx: Optional[EvalContext] = None) -> Tensor:
        raise NotImplementedError

    def abs_linear(self, *rs: Tensor, ctx: Optional[EvalContext] = None) -> Tensor:
        """|L| applied to radii (affine ops only)."""
        raise NotImplementedError(f"{self.op_type} is not affine")

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                yield f.name, v

    def to(self, device=None, dtype=None) -> "Op":
        """A copy with every tensor moved (parameters of torch-imported graphs are moved by
        moving the module itself, so this is meant for constant-only graphs)."""
        changes = {}
        for name, t in self.tensors():
            changes[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                parts.append(f"{f.name}={tuple(v.shape)}")
            elif f.name not in ("key",):
                parts.append(f"{f.name}={v}")
        return f"{self.op_type}({', '.join(parts)})"


# ---------------------------------------------------------------- affine ops
def _abs_weight(op: Op) -> Tensor:
    """|W| of a Linear/Conv2d, kept on the op while its weight is the same tensor at the same
    version (in-place updates such as an optimiser step bump the version): box passes over a
    fixed network (a certifier's chain, branch and bound, the forward pre-screen) recomputed
    it on every call. Not cached where autograd must see it (a weight that requires grad, in
    a grad-enabled pass), nor for inference tensors (no version counter), nor where the weight
    is derived anew on every access (a property, e.g. a folded spec's C W: never the same tensor)."""
    w = op.weight
    if "weight" not in op.__dict__ or (w.requires_grad and torch.is_grad_enabled()) or w.is_inference():
        return w.abs()
    cached = op.__dict__.get("_abs_cache")  # (weight, version, |weight|); holding it pins its storage
    if cached is None or cached[0] is not w or cached[1] != w._version:
        cached = (w, w._version, w.detach().abs())
        op.__dict__["_abs_cache"] = cached
    return cached[2]


@dataclass(eq=False)
class Linear(Op):
    """y = x @ W^T + b on the last dimension. W may be batched (B, out, in) for folded specs."""

    weight: Tensor
    bias: Optional[Tensor] = None
    op_type: ClassVar[str] = "Linear"
    is_affine: ClassVar[bool] = True

    def _apply(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        if w.dim() == 3:  # per-sample weights
            y = torch.einsum("bmn,bn->bm", w, x)
            return y if b is None else y + b
        return F.linear(x, w, b)

    def forward(self, x, ctx=None):
        return self._apply(x, self.weight, self.bias)

    def abs_linear(self, r, ctx=None):
        return self._apply(r, _abs_weight(self), None)


@dataclass(eq=False)
class Conv2d(Op):
    weight: Tensor
    bias: Optional[Tensor] = None
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    op_type: ClassVar[str] = "Conv2d"
    is_affine: ClassVar[bool] = True

    def _conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x, ctx=None):
        return self._conv(x, self.weight, self.bias)

    def abs_linear(self, r, ctx=None):
        return self._conv(r, _abs_weight(self), None)


def _broadcast_channel(v: Tensor, ndim: int) -> Tensor:
    """Shape a per-channel vector (C,) to broadcast against (B, C, ...) with `ndim` dims."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


@dataclass(eq=False)
class ElementwiseAffine(Op):
    """y = x * scale + shift, constants broadcast against the batched tensor (Sub/Div/Mul/Add/Neg)."""

    scale: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    op_type: ClassVar[str] = "ElementwiseAffine"
    is_affine: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        y = x if self.scale is None else x * self.scale
        return y if self.shift is None else y + self.shift

    def abs_linear(self, r, ctx=None):
        y = r if self.scale is None else r * self.scale.abs()
        if self.shift is not None and torch.broadcast_shapes(y.shape, self.shift.shape) != y.shape:
            y = y + torch.zeros_like(self.shift)  # the shift enlarges the shape: keep forward's shape
        return y


@dataclass(eq=False)
class BatchNorm(Op):
    """Per-channel normalisation over dim 1. Parameters may be live module tensors."""

    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Tensor
    running_var: Tensor
    eps: float = 1e-5
    key: str = ""  # node name, used to store/reuse batch statistics in an EvalContext
    op_type: ClassVar[str] = "BatchNorm"
    is_affine: ClassVar[bool] = True

    def _stats(self, x: Tensor, ctx: Optional[EvalContext], record: bool = True):
        if ctx is not None and ctx.bn_mode == "batch":
            if self.key in ctx.bn_stats:
                return ctx.bn_stats[self.key]
            if not record:
                raise RuntimeError(f"BatchNorm {self.key}: no batch statistics recorded; run a forward pass with this context first")
            dims = [0] + list(range(2, x.dim()))
            stats = ctx.bn_reduce(x, dims) if ctx.bn_reduce else (x.mean(dims), x.var(dims, unbiased=False))
            ctx.bn_stats[self.key] = stats
            return stats
        return self.running_mean, self.running_var

    def scale_shift(self, x: Tensor, ctx=None, record: bool = True):
        mean, var = self._stats(x, ctx, record)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return _broadcast_channel(scale, x.dim()), _broadcast_channel(shift, x.dim())

    def forward(self, x, ctx=None):
        scale, shift = self.scale_shift(x, ctx)
        return x * scale + shift

    def abs_linear(self, r, ctx=None):
        scale, _ = self.scale_shift(r, ctx, record=False)  # statistics of a radius are meaningless
        return r * scale.abs()


@dataclass(eq=False)
class AvgPool2d(Op):
    kernel: tuple
    stride: tuple
    padding: tuple = (0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = True
    op_type: ClassVar[str] = "AvgPool2d"
    is_affine: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad)

    def abs_linear(self, r, ctx=None):
        return self.forward(r)


@dataclass(eq=False)
class GlobalAvgPool(Op):
    op_type: ClassVar[str] = "GlobalAvgPool"
    is_affine: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)

    def abs_linear(self, r, ctx=None):
        return self.forward(r)


@dataclass(eq=False)
class Pad(Op):
    """Constant padding; `pads` in torch.nn.functional.pad order (last dim first)."""

    pads: tuple
    value: float = 0.0
    op_type: ClassVar[str] = "Pad"
    is_affine: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        return F.pad(x, self.pads, value=self.value)

    def abs_linear(self, r, ctx=None):
        return F.pad(r, self.pads, value=0.0)


@dataclass(eq=False)
class Reshape(Op):
    """Reshape each sample to `shape` (the batch dimension is kept)."""

    shape: tuple
    op_type: ClassVar[str] = "Reshape"
    is_affine: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        return x.reshape((x.shape[0],) + tuple(self.shape))

    def abs_linear(self, r, ctx=None):
        return self.forward(r)


@dataclass(eq=False)
class Transpose(Op):
    """Permute dimensions; perm[0] is always 0 (the batch dimension stays first)."""

    perm: tuple
    op_type: ClassVar[str] = "Transpose"
    is_affine: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        return x.permute(self.perm)

    def abs_linear(self, r, ctx=None):
        return self.forward(r)


@dataclass(eq=False)
class Concat(Op):
    axis: int  # in batched coordinates (>= 1)
    op_type: ClassVar[str] = "Concat"
    is_affine: ClassVar[bool] = True

    def forward(self, *xs, ctx=None):
        return torch.cat(xs, dim=self.axis)

    def abs_linear(self, *rs, ctx=None):
        return torch.cat(rs, dim=self.axis)


@dataclass(eq=False)
class Add(Op):
    """Sum of two or more graph tensors (residual connections), with broadcasting."""

    op_type: ClassVar[str] = "Add"
    is_affine: ClassVar[bool] = True

    def forward(self, *xs, ctx=None):
        y = xs[0]
        for x in xs[1:]:
            y = y + x
        return y

    def abs_linear(self, *rs, ctx=None):
        return self.forward(*rs)


# ---------------------------------------------------------------- non-linear ops
@dataclass(eq=False)
class ReLU(Op):
    op_type: ClassVar[str] = "ReLU"
    is_activation: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        return torch.relu(x)


@dataclass(eq=False)
class LeakyReLU(Op):
    alpha: float = 0.01
    op_type: ClassVar[str] = "LeakyReLU"
    is_activation: ClassVar[bool] = True

    def __post_init__(self):
        if self.alpha < 0:
            # a negative slope makes the op non-monotone; no domain here handles that soundly
            raise ValueError("LeakyReLU with negative alpha is not supported")

    def forward(self, x, ctx=None):
        return F.leaky_relu(x, self.alpha)


@dataclass(eq=False)
class Sigmoid(Op):
    op_type: ClassVar[str] = "Sigmoid"
    is_activation: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        return torch.sigmoid(x)


@dataclass(eq=False)
class Tanh(Op):
    op_type: ClassVar[str] = "Tanh"
    is_activation: ClassVar[bool] = True

    def forward(self, x, ctx=None):
        return torch.tanh(x)


@dataclass(eq=False)
class MaxPool2d(Op):
    kernel: tuple
    stride: tuple
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    ceil_mode: bool = False
    op_type: ClassVar[str] = "MaxPool2d"

    def forward(self, x, ctx=None):
        return F.max_pool2d(x, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)


from .ir_ops import ConvTranspose2d, Exp, Mul, Resample, Sign, Softmax, Take  # noqa: E402  (new op types live in ir_ops.py; it needs Op from here)

ALL_OP_TYPES: tuple[type[Op], ...] = (
    Linear, Conv2d, ElementwiseAffine, BatchNorm, AvgPool2d, GlobalAvgPool, Pad, Reshape,
    Transpose, Concat, Add, ReLU, LeakyReLU, Sigmoid, Tanh, Exp, Sign, Softmax, MaxPool2d, Take, ConvTranspose2d, Resample, Mul,
)


# ---------------------------------------------------------------- graph
@dataclass(eq=False)
class Node:
    name: str
    op: Op
    inputs: tuple[str, ...]


@dataclass(eq=False)
class Graph:
    """A DAG of ops in topological order with one input and one output.

    `input_shape` is the per-sample input shape (no batch dimension); `shapes` maps every
    node (and the input) to its per-sample output shape.
    """

    input_name: str
    input_shape: tuple
    nodes: list[Node]
    output: str
    shapes: dict = field(default_factory=dict)
    source: str = ""  # where the graph came from (file path or module class), for messages
    meta: dict = field(default_factory=dict)  # importer details, e.g. ONNX tensor name -> node

    def __post_init__(self):
        self._by_name = {n.name: n for n in self.nodes}

    # what domains cache on a graph (its folded spec, the box pass's fused groups) is rebuilt
    # on demand: a pickled graph (sent to a Ray worker) or a copy carries none of it
    _CACHES = ("_folded", "_fusion_groups")

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._CACHES}

    def node(self, name: str) -> Node:
        return self._by_name[name]

    @property
    def output_shape(self) -> tuple:
        return self.shapes[self.output]

    def consumers(self) -> dict[str, list[str]]:
        users: dict[str, list[str]] = {self.input_name: []}
        for n in self.nodes:
            users.setdefault(n.name, [])
            for i in n.inputs:
                users.setdefault(i, []).append(n.name)
        return users

    def check_input(self, x: Tensor) -> None:
        from .errors import ShapeError

        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ShapeError(
                f"input has per-sample shape {tuple(x.shape[1:])}, but the model expects {tuple(self.input_shape)}"
            )

    def forward(self, x: Tensor, ctx: Optional[EvalContext] = None, return_all: bool = False):
        self.check_input(x)
        values = {self.input_name: x}
        for n in self.nodes:
            values[n.name] = n.op.forward(*(values[i] for i in n.inputs), ctx=ctx)
        return values if return_all else values[self.output]

    __call__ = forward

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op.op_type] = counts.get(n.op.op_type, 0) + 1
        return counts

    def num_parameters(self) -> int:
        seen, total = set(), 0
        for n in self.nodes:
            for fname, t in n.op.tensors():
                if fname in ("running_mean", "running_var") or id(t) in seen or not t.is_floating_point():
                    continue
                seen.add(id(t))
                total += t.numel()
        return total

    def to(self, device=None, dtype=None) -> "Graph":
        nodes = [Node(n.name, n.op.to(device, dtype), n.inputs) for n in self.nodes]
        return dataclasses.replace(self, nodes=nodes)

    @property
    def device(self) -> torch.device:
        for n in self.nodes:
            for _, t in n.op.tensors():
                return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for n in self.nodes:
            for _, t in n.op.tensors():
                if t.is_floating_point():
                    return t.dtype
        return torch.float32

    def replace_output(self, extra: Sequence[Node], output: str, shapes: dict) -> "Graph":
        """A new graph sharing these ops, with `extra` nodes appended and a new output."""
        return Graph(self.input_name, self.input_shape, list(self.nodes) + list(extra), output,
                     {**self.shapes, **shapes}, self.source, self.meta)

    def summary(self) -> str:
        lines = [f"input {self.input_name}: {tuple(self.input_shape)}"]
        for n in self.nodes:
            lines.append(f"  {n.name} = {n.op.describe()}({', '.join(n.inputs)}) -> {tuple(self.shapes.get(n.name, ()))}")
        lines.append(f"output {self.output}: {tuple(self.output_shape)}")
        return "\n".join(lines)


class GraphBuilder:
    """Builds a `Graph` node by node, tracking an example (batch-1) value per node so that every
    node's shape is known and importers can fold constant sub-graphs."""

    def __init__(self, input_name: str, input_shape: tuple, dtype=torch.float32, source: str = ""):
        self.input_name = input_name
        self.input_shape = tuple(int(s) for s in input_shape)
        self.nodes: list[Node] = []
        self.examples: dict[str, Tensor] = {input_name: torch.zeros((1,) + self.input_shape, dtype=dtype)}
        self.source = source
        self._names: set[str] = {input_name}

    def fresh(self, base: str) -> str:
        name, k = base or "node", 1
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        return name

    def add(self, name: str, op: Op, inputs: Sequence[str]) -> str:
        name = self.fresh(name)
        if isinstance(op, BatchNorm):
            op.key = name
        with torch.no_grad():
            self.examples[name] = op.forward(*(self.examples[i] for i in inputs))
        self.nodes.append(Node(name, op, tuple(inputs)))
        self._names.add(name)
        return name

    def shape(self, name: str) -> tuple:
        return tuple(self.examples[name].shape[1:])

    def build(self, output: str) -> Graph:
        shapes = {k: tuple(v.shape[1:]) for k, v in self.examples.items()}
        # drop nodes the output does not depend on (e.g. dead branches after folding)
        needed, order = {output}, []
        for n in reversed(self.nodes):
            if n.name in needed:
                needed.update(n.inputs)
                order.append(n)
        return Graph(self.input_name, self.input_shape, list(reversed(order)), output, shapes, self.source)
