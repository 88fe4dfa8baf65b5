"""Import an ONNX model into the verikit IR.

Conventions. ONNX tensors of the data path either carry a leading batch dimension of size 1
(`batched`; the IR keeps that dimension as its batch dimension) or none at all (a rank-1
input such as VNN-COMP's `test_nano`: the IR adds the batch dimension in front). Constant
sub-graphs (Shape -> Gather -> Concat -> Reshape, Constant, ...) are evaluated with numpy at
import time. Every node that cannot be represented exactly is collected and reported together;
nothing is ever mapped to identity except ops that *are* identities at inference (Identity,
Dropout).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from . import ir
from .errors import ModelLoadError, UnsupportedOpsError
from .onnx_constants import UnsupportedConstantOp, fold_constant, node_attributes


@dataclass
class _Var:
    node: str  # IR node name
    batched: bool  # does the ONNX tensor carry the batch dimension?


class _Unsupported(Exception):
    pass


def load_onnx_model(path: str):
    """Read and check an ONNX file, turning every failure into a `ModelLoadError`."""
    import onnx

    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise ModelLoadError(f"model path is a directory, not an ONNX file: {path}")
    try:
        model = onnx.load(path)
    except Exception as e:  # protobuf raises a variety of decode errors
        raise ModelLoadError(f"cannot read {path} as ONNX (corrupt or truncated file?): {type(e).__name__}: {e}") from None
    if len(model.graph.node) == 0:
        raise ModelLoadError(f"{path} contains no ONNX graph nodes (corrupt or not an ONNX model)")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelLoadError(f"{path} is not a valid ONNX model: {str(e).splitlines()[0]}") from None
    return model


def from_onnx(path_or_model, dtype=torch.float32) -> ir.Graph:
    """Import an ONNX file (or loaded `onnx.ModelProto`) into a `verikit.ir.Graph`."""
    model = load_onnx_model(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else path_or_model
    source = str(path_or_model) if isinstance(path_or_model, (str, os.PathLike)) else "<onnx model>"
    return _Importer(model, dtype, source).run()


_attrs = node_attributes


class _Importer:
    def __init__(self, model, dtype, source):
        import onnx.numpy_helper as nh

        self.model, self.dtype, self.source = model, dtype, source
        g = model.graph
        self.consts: dict[str, np.ndarray] = {t.name: nh.to_array(t) for t in g.initializer}
        inputs = [i for i in g.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise UnsupportedOpsError([("<graph>", "inputs", f"verikit needs exactly one data input, the model has {len(inputs)}")])
        inp = inputs[0]
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
        # a leading dynamic or size-1 dimension of a rank >= 2 input is the batch dimension
        batched = len(dims) >= 2 and dims[0] in (None, 1)
        sample = dims[1:] if batched else dims
        if any(d is None for d in sample):
            raise UnsupportedOpsError([(inp.name, "input", f"input shape {dims} has dynamic non-batch dimensions")])
        self.builder = ir.GraphBuilder(inp.name, tuple(sample), dtype, source)
        self.vars: dict[str, _Var] = {inp.name: _Var(inp.name, batched)}
        self.onnx_map: dict[str, str] = {inp.name: inp.name}
        self.consumers: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                self.consumers[i] = self.consumers.get(i, 0) + 1
        for o in g.output:
            self.consumers[o.name] = self.consumers.get(o.name, 0) + 1

    # -------------------------------------------------------------- helpers
    def t(self, a) -> torch.Tensor:
        a = np.asarray(a)
        return torch.as_tensor(a.astype(np.float64), dtype=self.dtype) if a.dtype.kind in "fiub" else torch.as_tensor(a)

    def onnx_shape(self, v: _Var) -> tuple:
        s = self.builder.shape(v.node)
        return (1,) + s if v.batched else s

    def ir_axis(self, v: _Var, axis: int) -> int:
        rank = len(self.onnx_shape(v))
        axis = axis + rank if axis < 0 else axis
        if v.batched:
            if axis == 0:
                raise _Unsupported("operation along the batch dimension")
            return axis
        return axis + 1

    def reshape_to(self, name: str, v: _Var, out_shape) -> _Var:
        """Any shape-only op (Reshape, Flatten, Squeeze, Unsqueeze) as an IR Reshape."""
        out_shape = tuple(int(s) for s in out_shape)
        batched = v.batched and len(out_shape) >= 1 and out_shape[0] == 1
        sample = out_shape[1:] if batched else out_shape
        if int(np.prod(sample)) != int(np.prod(self.builder.shape(v.node))):
            raise _Unsupported(f"reshape to {out_shape} mixes samples of a batch")
        return _Var(self.builder.add(name, ir.Reshape(tuple(sample)), [v.node]), batched)

    # -------------------------------------------------------------- main loop
    def run(self) -> ir.Graph:
        problems: list[tuple[str, str, str]] = []
        poisoned: set[str] = set()
        for node in self.model.graph.node:
            if any(i in poisoned for i in node.input if i):
                poisoned.update(node.output)
                continue
            try:
                self.convert(node)
            except _Unsupported as e:
                problems.append((node.name, node.op_type, str(e)))
                poisoned.update(node.output)
        if problems:
            raise UnsupportedOpsError(problems)
        outs = self.model.graph.output
        if len(outs) != 1:
            raise UnsupportedOpsError([("<graph>", "outputs", f"verikit needs exactly one output, the model has {len(outs)}")])
        if outs[0].name not in self.vars or outs[0].name == self.builder.input_name:
            raise UnsupportedOpsError([("<graph>", "outputs", "the output does not depend on the input")])
        graph = self.builder.build(self.vars[outs[0].name].node)
        graph.meta["onnx_map"] = {k: v for k, v in self.onnx_map.items() if k == graph.input_name or k in graph._by_name or v in graph._by_name}
        graph.meta["batched_input"] = self.vars[graph.input_name].batched
        graph.meta["output_name"] = outs[0].name
        return graph

    def set_var(self, onnx_name: str, v: _Var):
        self.vars[onnx_name] = v
        self.onnx_map[onnx_name] = v.node

    def convert(self, node):
        op = node.op_type
        ins = list(node.input)
        present = [i for i in ins if i]
        if all(i in self.consts for i in present) and op != "Shape":
            try:
                self.consts_out(node, fold_constant(node, [self.consts.get(i) if i else None for i in ins]))
            except UnsupportedConstantOp as e:
                raise _Unsupported(str(e)) from None
            return
        if op == "Shape":
            shape = np.array(self.onnx_shape(self.vars[ins[0]]), dtype=np.int64)
            a = _attrs(node)
            start, end = a.get("start", 0), a.get("end", None)
            self.consts[node.output[0]] = shape[start:end]
            return
        handler = getattr(self, "op_" + op, None)
        if handler is None:
            raise _Unsupported("operator not supported")
        for extra in node.output[1:]:
            if extra and self.consumers.get(extra, 0):
                raise _Unsupported(f"secondary output {extra} is used")
        v = handler(node, _attrs(node))
        self.set_var(node.output[0], v)

    def consts_out(self, node, values):
        for name, val in zip(node.output, values):
            self.consts[name] = val

    def var_and_const(self, node):
        a, b = node.input[0], node.input[1]
        if a in self.vars and b in self.consts:
            return self.vars[a], self.consts[b], False
        if b in self.vars and a in self.consts:
            return self.vars[b], self.consts[a], True
        raise _Unsupported("needs one data input and one constant")

    # -------------------------------------------------------------- affine ops
    def op_Gemm(self, node, a):
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        A, B = node.input[0], node.input[1]
        if A not in self.vars or B not in self.consts:
            raise _Unsupported("Gemm needs the data as A and a constant B")
        v = self.vars[A]
        if a.get("transA", 0):
            raise _Unsupported("transA=1 on the data input would move the batch dimension")
        W = self.consts[B]
        W = W if a.get("transB", 0) else W.T  # -> (out, in)
        bias = None
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in self.consts:
                raise _Unsupported("Gemm bias must be constant")
            c = np.asarray(self.consts[node.input[2]], dtype=np.float64) * beta
            bias = np.broadcast_to(c.reshape(-1), (W.shape[0],)) if c.size in (1, W.shape[0]) else None
            if bias is None:
                raise _Unsupported(f"Gemm bias of shape {c.shape}")
        op = ir.Linear(self.t(W * alpha), None if bias is None else self.t(np.array(bias)))
        return _Var(self.builder.add(node.name or "gemm", op, [v.node]), v.batched)

    def op_MatMul(self, node, a):
        v, W, swapped = self.var_and_const(node)
        W = np.asarray(W)
        if swapped:  # W @ x: a linear map when x is an un-batched vector
            if v.batched or len(self.onnx_shape(v)) != 1 or W.ndim != 2:
                raise _Unsupported("constant @ data is only supported for a 1-D data vector")
            return _Var(self.builder.add(node.name or "matmul", ir.Linear(self.t(W)), [v.node]), False)
        if W.ndim == 1:
            lin = self.builder.add(node.name or "matmul", ir.Linear(self.t(W[None, :])), [v.node])
            out_shape = self.onnx_shape(v)[:-1]
            return self.reshape_to((node.name or "matmul") + "_squeeze", _Var(lin, v.batched), out_shape)
        if W.ndim != 2:
            raise _Unsupported(f"batched MatMul with a {W.ndim}-D constant")
        return _Var(self.builder.add(node.name or "matmul", ir.Linear(self.t(W.T)), [v.node]), v.batched)

    def _elementwise(self, node, scale=None, shift=None, v=None):
        op = ir.ElementwiseAffine(None if scale is None else self.t(scale), None if shift is None else self.t(shift))
        v = v or self.vars[node.input[0]]
        c = scale if scale is not None else shift
        if c is not None and np.ndim(c) > len(self.onnx_shape(v)):
            raise _Unsupported("constant has more dimensions than the data")
        out = self.builder.add(node.name or node.op_type.lower(), op, [v.node])
        if self.builder.shape(out) != self.builder.shape(v.node):
            raise _Unsupported("constant broadcasting changes the data shape")
        return _Var(out, v.batched)

    def _two_vars(self, node):
        a, b = node.input[0], node.input[1]
        return a in self.vars and b in self.vars

    def _var_const_on_ir(self, v, c):
        """A constant with a leading batch-1 dimension lines up with the IR tensor as is."""
        return np.asarray(c, dtype=np.float64)

    def op_Add(self, node, a):
        if self._two_vars(node):
            x, y = self.vars[node.input[0]], self.vars[node.input[1]]
            out = self.builder.add(node.name or "add", ir.Add(), [x.node, y.node])
            return _Var(out, x.batched or y.batched)
        v, c, _ = self.var_and_const(node)
        c = self._var_const_on_ir(v, c)
        prev = self.builder.nodes[-1] if self.builder.nodes else None
        # MatMul + Add(bias) -> one Linear, so specs fold into it and solvers see one layer
        if prev is not None and prev.name == v.node and type(prev.op) is ir.Linear and prev.op.weight.dim() == 2 \
                and self._single_use(v.node) and np.squeeze(c).shape in ((prev.op.weight.shape[0],), ()) \
                and c.ndim <= len(self.onnx_shape(v)) and len(self.builder.shape(v.node)) == 1:
            b = self.t(np.broadcast_to(np.squeeze(c), (prev.op.weight.shape[0],)).copy())
            prev.op.bias = b if prev.op.bias is None else prev.op.bias + b
            self._forget(v.node)
            with torch.no_grad():
                self.builder.examples[v.node] = prev.op.forward(self.builder.examples[prev.inputs[0]])
            return v
        return self._elementwise(node, shift=c, v=v)

    def op_Sub(self, node, a):
        if self._two_vars(node):
            x, y = self.vars[node.input[0]], self.vars[node.input[1]]
            neg = self.builder.add((node.name or "sub") + "_neg", ir.ElementwiseAffine(self.t(-1.0)), [y.node])
            return _Var(self.builder.add(node.name or "sub", ir.Add(), [x.node, neg]), x.batched or y.batched)
        v, c, swapped = self.var_and_const(node)
        c = self._var_const_on_ir(v, c)
        if swapped:  # c - x
            return self._elementwise(node, scale=np.array(-1.0), shift=c, v=v)
        return self._elementwise(node, shift=-c, v=v)

    def op_Mul(self, node, a):
        if self._two_vars(node):
            raise _Unsupported("product of two data tensors is not linear")
        v, c, _ = self.var_and_const(node)
        return self._elementwise(node, scale=self._var_const_on_ir(v, c), v=v)

    def op_Div(self, node, a):
        if self._two_vars(node):
            raise _Unsupported("division of two data tensors is not linear")
        v, c, swapped = self.var_and_const(node)
        if swapped:
            raise _Unsupported("constant divided by data is not linear")
        c = self._var_const_on_ir(v, c)
        if np.any(c == 0):
            raise _Unsupported("division by zero constant")
        return self._elementwise(node, scale=1.0 / c, v=v)

    def op_Neg(self, node, a):
        return self._elementwise(node, scale=np.array(-1.0))

    def op_Conv(self, node, a):
        v = self.vars[node.input[0]]
        if node.input[1] not in self.consts or (len(node.input) > 2 and node.input[2] and node.input[2] not in self.consts):
            raise _Unsupported("Conv weights must be constant")
        W = np.asarray(self.consts[node.input[1]])
        if W.ndim != 4 or not v.batched:
            raise _Unsupported("only 2-D convolutions on batched NCHW data")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise _Unsupported(f"auto_pad={a['auto_pad']}")
        b = self.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        pads = list(a.get("pads", [0, 0, 0, 0]))
        src = v.node
        if pads[0] != pads[2] or pads[1] != pads[3]:
            src = self.builder.add((node.name or "conv") + "_pad", ir.Pad((pads[1], pads[3], pads[0], pads[2])), [src])
            pads = [0, 0, 0, 0]
        op = ir.Conv2d(self.t(W), None if b is None else self.t(b), tuple(a.get("strides", [1, 1])),
                       (pads[0], pads[1]), tuple(a.get("dilations", [1, 1])), int(a.get("group", 1)))
        return _Var(self.builder.add(node.name or "conv", op, [src]), True)

    def op_BatchNormalization(self, node, a):
        v = self.vars[node.input[0]]
        if any(i not in self.consts for i in node.input[1:5]):
            raise _Unsupported("BatchNormalization parameters must be constant")
        if a.get("training_mode", 0):
            raise _Unsupported("training_mode=1")
        scale, bias, mean, var = (np.asarray(self.consts[i], dtype=np.float64) for i in node.input[1:5])
        eps = float(a.get("epsilon", 1e-5))
        mult = scale / np.sqrt(var + eps)
        add = bias - mean * mult
        prev = self.builder.nodes[-1] if self.builder.nodes else None
        # fold into the affine op right before when nothing else reads its output
        if prev is not None and prev.name == v.node and isinstance(prev.op, (ir.Conv2d, ir.Linear)) \
                and prev.op.weight.dim() == 2 + (2 if isinstance(prev.op, ir.Conv2d) else 0) \
                and self._single_use(v.node) and (isinstance(prev.op, ir.Conv2d) or len(self.builder.shape(v.node)) == 1):
            m, s = self.t(mult), self.t(add)
            w = prev.op.weight * m.reshape((-1,) + (1,) * (prev.op.weight.dim() - 1))
            b0 = prev.op.bias if prev.op.bias is not None else torch.zeros_like(m)
            prev.op.weight, prev.op.bias = w, b0 * m + s
            self._forget(v.node)
            with torch.no_grad():  # keep the example value in step with the folded weights
                self.builder.examples[v.node] = prev.op.forward(self.builder.examples[prev.inputs[0]])
            return v
        op = ir.BatchNorm(None, None, self.t(mean), self.t(var), eps)
        op.weight, op.bias = self.t(scale), self.t(bias)
        return _Var(self.builder.add(node.name or "batchnorm", op, [v.node]), v.batched)

    def _forget(self, ir_node: str) -> None:
        """A fused node no longer computes what its old ONNX tensors held: drop them from the map."""
        for k in [k for k, v in self.onnx_map.items() if v == ir_node]:
            del self.onnx_map[k]

    def _single_use(self, ir_node: str) -> bool:
        onnx_names = [k for k, v in self.onnx_map.items() if v == ir_node]
        return sum(self.consumers.get(k, 0) for k in onnx_names) == 1

    def op_AveragePool(self, node, a):
        v = self.vars[node.input[0]]
        k = tuple(a["kernel_shape"])
        if len(k) != 2:
            raise _Unsupported("only 2-D pooling")
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if pads[0] != pads[2] or pads[1] != pads[3]:
            raise _Unsupported("asymmetric pads")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise _Unsupported("auto_pad")
        op = ir.AvgPool2d(k, tuple(a.get("strides", [1, 1])), (pads[0], pads[1]), bool(a.get("ceil_mode", 0)),
                          bool(a.get("count_include_pad", 0)))
        return _Var(self.builder.add(node.name or "avgpool", op, [v.node]), v.batched)

    def op_GlobalAveragePool(self, node, a):
        v = self.vars[node.input[0]]
        return _Var(self.builder.add(node.name or "gap", ir.GlobalAvgPool(), [v.node]), v.batched)

    def op_Pad(self, node, a):
        v = self.vars[node.input[0]]
        mode = a.get("mode", b"constant")
        if mode not in (b"constant", "constant"):
            raise _Unsupported(f"mode={mode.decode() if isinstance(mode, bytes) else mode}")
        if len(node.input) > 1 and node.input[1]:
            if node.input[1] not in self.consts:
                raise _Unsupported("pads must be constant")
            pads = [int(p) for p in self.consts[node.input[1]]]
        else:
            pads = list(a.get("pads", []))
        value = float(a.get("value", 0.0))
        if len(node.input) > 2 and node.input[2]:
            value = float(np.asarray(self.consts[node.input[2]]).reshape(-1)[0]) if np.asarray(self.consts[node.input[2]]).size else 0.0
        rank = len(self.onnx_shape(v))
        axes = list(range(rank))
        if len(node.input) > 3 and node.input[3]:
            axes = [int(x) % rank for x in self.consts[node.input[3]]]
        n = len(axes)
        begin, end = dict(zip(axes, pads[:n])), dict(zip(axes, pads[n:]))
        if any(p < 0 for p in pads):
            raise _Unsupported("negative pads (cropping)")
        if v.batched and (begin.get(0, 0) or end.get(0, 0)):
            raise _Unsupported("padding the batch dimension")
        torch_pads = []
        for ax in reversed(range(rank)):
            torch_pads += [begin.get(ax, 0), end.get(ax, 0)]
        while torch_pads and torch_pads[-2:] == [0, 0]:
            torch_pads = torch_pads[:-2]
        return _Var(self.builder.add(node.name or "pad", ir.Pad(tuple(torch_pads), value), [v.node]), v.batched)

    # -------------------------------------------------------------- shape ops
    def op_Flatten(self, node, a):
        v = self.vars[node.input[0]]
        s = self.onnx_shape(v)
        axis = a.get("axis", 1)
        axis = axis + len(s) if axis < 0 else axis
        return self.reshape_to(node.name or "flatten", v, (int(np.prod(s[:axis])), int(np.prod(s[axis:]))))

    def op_Reshape(self, node, a):
        v = self.vars[node.input[0]]
        if node.input[1] not in self.consts:
            raise _Unsupported("target shape is not constant")
        target = [int(x) for x in self.consts[node.input[1]]]
        s = self.onnx_shape(v)
        if not a.get("allowzero", 0):
            target = [s[i] if t == 0 else t for i, t in enumerate(target)]
        return self.reshape_to(node.name or "reshape", v, np.empty(s, dtype=np.uint8).reshape(target).shape)

    def _axes(self, node, a):
        if len(node.input) > 1 and node.input[1]:
            return [int(x) for x in self.consts[node.input[1]]]
        return list(a.get("axes", [])) if "axes" in a else None

    def op_Squeeze(self, node, a):
        v = self.vars[node.input[0]]
        s = self.onnx_shape(v)
        axes = self._axes(node, a)
        axes = [i for i, d in enumerate(s) if d == 1] if axes is None else [x % len(s) for x in axes]
        return self.reshape_to(node.name or "squeeze", v, tuple(d for i, d in enumerate(s) if i not in axes))

    def op_Unsqueeze(self, node, a):
        v = self.vars[node.input[0]]
        s = list(self.onnx_shape(v))
        axes = sorted(x % (len(s) + len(self._axes(node, a))) for x in self._axes(node, a))
        for ax in axes:
            s.insert(ax, 1)
        return self.reshape_to(node.name or "unsqueeze", v, tuple(s))

    def op_Transpose(self, node, a):
        v = self.vars[node.input[0]]
        rank = len(self.onnx_shape(v))
        perm = list(a.get("perm", list(reversed(range(rank)))))
        if v.batched:
            if perm[0] != 0:
                raise _Unsupported("transpose moves the batch dimension")
            ir_perm = tuple(perm)
        else:
            ir_perm = (0,) + tuple(p + 1 for p in perm)
        return _Var(self.builder.add(node.name or "transpose", ir.Transpose(ir_perm), [v.node]), v.batched)

    def op_Concat(self, node, a):
        if any(i not in self.vars for i in node.input):
            raise _Unsupported("concatenating data with constants")
        vs = [self.vars[i] for i in node.input]
        if len({x.batched for x in vs}) != 1:
            raise _Unsupported("inputs disagree on the batch dimension")
        axis = self.ir_axis(vs[0], int(a["axis"]))
        return _Var(self.builder.add(node.name or "concat", ir.Concat(axis), [x.node for x in vs]), vs[0].batched)

    def op_Identity(self, node, a):
        return self.vars[node.input[0]]

    def op_Dropout(self, node, a):
        # inference semantics: identity (the mask output, if read, was rejected in convert)
        if len(node.input) > 2 and node.input[2] and node.input[2] in self.consts and bool(self.consts[node.input[2]]):
            raise _Unsupported("training_mode=True")
        return self.vars[node.input[0]]

    # -------------------------------------------------------------- non-linear
    def _unary(self, node, op):
        v = self.vars[node.input[0]]
        return _Var(self.builder.add(node.name or node.op_type.lower(), op, [v.node]), v.batched)

    def op_Relu(self, node, a):
        return self._unary(node, ir.ReLU())

    def op_LeakyRelu(self, node, a):
        alpha = float(a.get("alpha", 0.01))
        if alpha < 0:
            raise _Unsupported("negative alpha")
        return self._unary(node, ir.LeakyReLU(alpha))

    def op_Sigmoid(self, node, a):
        return self._unary(node, ir.Sigmoid())

    def op_Tanh(self, node, a):
        return self._unary(node, ir.Tanh())

    def op_MaxPool(self, node, a):
        k = tuple(a["kernel_shape"])
        if len(k) != 2:
            raise _Unsupported("only 2-D pooling")
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if pads[0] != pads[2] or pads[1] != pads[3]:
            raise _Unsupported("asymmetric pads")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise _Unsupported("auto_pad")
        op = ir.MaxPool2d(k, tuple(a.get("strides", [1, 1])), (pads[0], pads[1]), tuple(a.get("dilations", [1, 1])),
                          bool(a.get("ceil_mode", 0)))
        return self._unary(node, op)
