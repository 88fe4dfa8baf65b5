"""Import an ONNX model into the verikit IR.

Conventions. ONNX tensors of the data path either carry a leading batch dimension of size 1
(`batched`; the IR keeps that dimension as its batch dimension) or none at all (an input such as
VNN-COMP's `test_nano` (rank 1) or a (4, 4) matrix: the IR adds the batch dimension in front,
so ONNX axis k is IR axis k + 1). Constants are moved into IR coordinates the same way
(`_const_on_ir`): a constant that would broadcast into the batch dimension, or add dimensions
in front of the data, is rejected. Constant sub-graphs (Shape -> Gather -> Concat -> Reshape,
Constant, ...) are evaluated with numpy at import time.

Every node is first checked by op type, attributes and which inputs are data
(`onnx_support.static_problem`), also downstream of an unsupported node, then converted; every
converted tensor's shape is compared with ONNX's own shape inference. All problems are
collected and reported together; nothing is ever mapped to identity except ops that *are*
identities at inference (Identity, Dropout).

Fused nodes (BatchNorm folded into the affine op before it, Gemm's alpha/beta, a bias merged
into a MatMul) record their extra roundings in `graph.meta["rounding"]` for the rounding
guard and the float-sound mode (`verikit.rounding`).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from . import ir
from .errors import ModelLoadError, UnsupportedOpsError
from .onnx_constants import UnsupportedConstantOp, fold_constant, node_attributes
from .onnx_bilinear_ops import BilinearOps
from .onnx_index_ops import IndexOps
from .onnx_piecewise_ops import PiecewiseOps
from .onnx_upsample_ops import UpsampleOps
from .onnx_shape_ops import ShapeOps, Unsupported, Var
from .onnx_support import static_problem

_attrs = node_attributes


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


def _inferred_shapes(model) -> dict:
    """ONNX's own static shape of every tensor it can infer (fully known dimensions only)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is a cross-check only; a model it cannot handle is still imported
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if all(d is not None for d in dims):
            out[vi.name] = tuple(dims)
    return out


class _Importer(ShapeOps, IndexOps, UpsampleOps, PiecewiseOps, BilinearOps):
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
        self.vars: dict[str, Var] = {inp.name: Var(inp.name, batched)}
        self.onnx_map: dict[str, str] = {inp.name: inp.name}
        self.rounding: dict[str, dict] = {}  # fused IR node -> extra roundings (verikit.rounding)
        self.inferred = _inferred_shapes(model)
        self.consumers: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                self.consumers[i] = self.consumers.get(i, 0) + 1
        for o in g.output:
            self.consumers[o.name] = self.consumers.get(o.name, 0) + 1

    # -------------------------------------------------------------- main loop
    def run(self) -> ir.Graph:
        problems: list[tuple[str, str, str]] = []
        dead_data: set[str] = set()  # outputs of unsupported nodes and of nodes depending on them
        dead_const: set[str] = set()  # constants whose value is unknown for the same reason
        is_data = lambda name: name in self.vars or name in dead_data
        for node in self.model.graph.node:
            problem = static_problem(node, is_data)
            dead_in = any(i in dead_data or i in dead_const for i in node.input if i)
            if problem is None and not dead_in:
                try:
                    self.convert(node)
                    continue
                except Unsupported as e:
                    problem = str(e)
                except Exception as e:  # an importer gap must be a reported problem, not a traceback
                    problem = f"cannot import it ({type(e).__name__}: {e})"
            if problem is not None:
                problems.append((node.name, node.op_type, problem))
            outputs_data = any(is_data(i) for i in node.input if i) and node.op_type != "Shape"
            (dead_data if outputs_data else dead_const).update(o for o in node.output if o)
        if problems:
            raise UnsupportedOpsError(problems)
        outs = self.model.graph.output
        if len(outs) != 1:
            raise UnsupportedOpsError([("<graph>", "outputs", f"verikit needs exactly one output, the model has {len(outs)}")])
        if outs[0].name not in self.vars or outs[0].name == self.builder.input_name:
            raise UnsupportedOpsError([("<graph>", "outputs", "the output does not depend on the input")])
        graph = self.builder.build(self.vars[outs[0].name].node)
        keep = lambda k, v: k == graph.input_name or k in graph._by_name or v in graph._by_name
        graph.meta["onnx_map"] = {k: v for k, v in self.onnx_map.items() if keep(k, v)}
        graph.meta["onnx_batched"] = {k: self.vars[k].batched for k in graph.meta["onnx_map"] if k in self.vars}
        graph.meta["batched_input"] = self.vars[graph.input_name].batched
        graph.meta["onnx_input"] = graph.input_name  # the file's own input (before any prepended node)
        graph.meta["output_name"] = outs[0].name
        graph.meta["rounding"] = {k: v for k, v in self.rounding.items() if k in graph._by_name}
        return graph

    def set_var(self, onnx_name: str, v: Var):
        got = self.onnx_shape(v)
        want = self.inferred.get(onnx_name)
        if want is not None and tuple(want) != tuple(got):
            raise Unsupported(f"imported with shape {list(got)}, but ONNX infers {list(want)}")
        if self.builder.examples[v.node].shape[0] != 1:  # an op broadcast into the batch dimension
            raise Unsupported("the result mixes samples of a batch")
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
                raise Unsupported(str(e)) from None
            return
        if op == "Shape":
            shape = np.array(self.onnx_shape(self.vars[ins[0]]), dtype=np.int64)
            a = _attrs(node)
            start, end = a.get("start", 0), a.get("end", None)
            self.consts[node.output[0]] = shape[start:end]
            return
        handler = getattr(self, "op_" + op, None)
        if handler is None:
            raise Unsupported("operator not supported")
        for extra in node.output[1:] if op != "Split" else ():
            if extra and self.consumers.get(extra, 0):
                raise Unsupported(f"secondary output {extra} is used")
        v = handler(node, _attrs(node))
        for name, part in zip(node.output, v if isinstance(v, list) else [v]):  # a list: one Var per output (Split)
            if name:
                self.set_var(name, part)

    def consts_out(self, node, values):
        for name, val in zip(node.output, values):
            self.consts[name] = val

    def var_and_const(self, node):
        a, b = node.input[0], node.input[1]
        if a in self.vars and b in self.consts:
            return self.vars[a], self.consts[b], False
        if b in self.vars and a in self.consts:
            return self.vars[b], self.consts[a], True
        raise Unsupported("needs one data input and one constant")

    def _fused(self, ir_node: str, extra: int, bias_magnitude=None) -> None:
        """Record that `ir_node` now stands for more float operations than its own op."""
        info = self.rounding.setdefault(ir_node, {"extra": 0})
        info["extra"] += extra
        if bias_magnitude is not None:
            old = info.get("bias_magnitude")
            new = torch.as_tensor(np.asarray(bias_magnitude, dtype=np.float64))
            info["bias_magnitude"] = new if old is None else old + new

    # -------------------------------------------------------------- affine ops
    def op_Gemm(self, node, a):
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        A, B = node.input[0], node.input[1]
        v = self.vars[A]
        s = self.onnx_shape(v)
        if len(s) != 2:
            raise Unsupported(f"Gemm needs a 2-D data input, got shape {list(s)}")
        W = np.asarray(self.consts[B])
        W = W if a.get("transB", 0) else W.T  # -> (out, in)
        name = node.name or "gemm"
        out = self.builder.add(name, ir.Linear(self.t(W * alpha)), [v.node])
        if alpha != 1.0:  # alpha * W is rounded when stored, and the runtime multiplies by alpha
            self._fused(out, 2)
        if len(node.input) > 2 and node.input[2]:
            c = np.asarray(self.consts[node.input[2]], dtype=np.float64) * beta
            try:
                cb = np.broadcast_to(c, (s[0], W.shape[0]))
            except ValueError:
                raise Unsupported(f"Gemm bias of shape {list(c.shape)} does not broadcast to {[s[0], W.shape[0]]}") from None
            if beta != 1.0:  # the same for beta * C
                self._fused(out, 2)
            if np.all(cb == cb[:1]):  # one bias row for every data row
                lin = self.builder.nodes[-1]
                lin.op.bias = self.t(cb[0].copy())
                with torch.no_grad():
                    self.builder.examples[out] = lin.op.forward(self.builder.examples[lin.inputs[0]])
            else:  # a bias that differs per data row (data without a batch dimension)
                out = self.builder.add(name + "_bias", ir.ElementwiseAffine(None, self.t(cb.copy())), [out])
        return Var(out, v.batched)

    def op_MatMul(self, node, a):
        if node.input[0] in self.vars and node.input[1] in self.vars:
            return self.data_matmul(node, self.vars[node.input[0]], self.vars[node.input[1]])
        v, W, swapped = self.var_and_const(node)
        W = np.asarray(W)
        s = self.onnx_shape(v)
        if swapped:  # W @ x: a linear map when x is an un-batched vector
            if v.batched or len(s) != 1 or W.ndim != 2:
                raise Unsupported("constant @ data is only supported for a 1-D data vector")
            return Var(self.builder.add(node.name or "matmul", ir.Linear(self.t(W)), [v.node]), False)
        if W.ndim == 1:
            lin = self.builder.add(node.name or "matmul", ir.Linear(self.t(W[None, :])), [v.node])
            return self.reshape_to((node.name or "matmul") + "_squeeze", Var(lin, v.batched), s[:-1])
        if W.ndim != 2:
            raise Unsupported(f"batched MatMul with a {W.ndim}-D constant")
        return Var(self.builder.add(node.name or "matmul", ir.Linear(self.t(W.T)), [v.node]), v.batched)

    def _elementwise(self, node, v, scale=None, shift=None):
        op = ir.ElementwiseAffine(None if scale is None else self.t(scale), None if shift is None else self.t(shift))
        out = self.builder.add(node.name or node.op_type.lower(), op, [v.node])
        if self.builder.shape(out) != self.builder.shape(v.node):
            raise Unsupported("constant broadcasting changes the data shape")
        return Var(out, v.batched)

    def _const_on_ir(self, v: Var, c) -> np.ndarray:
        """A constant in ONNX coordinates, as one that broadcasts against the IR tensor of v the
        same way: ONNX aligns trailing dimensions; the batch dimension must not be touched."""
        c = np.asarray(c, dtype=np.float64)
        rank = len(self.onnx_shape(v))
        if c.ndim > rank:
            raise Unsupported(f"constant of shape {list(c.shape)} adds dimensions in front of the data {list(self.onnx_shape(v))}")
        if v.batched and c.ndim == rank:
            if c.shape[0] != 1:
                raise Unsupported(f"constant of shape {list(c.shape)} broadcasts into the batch dimension")
            c = c[0]
        return c

    def _two_data(self, node):
        a, b = node.input[0], node.input[1]
        if not (a in self.vars and b in self.vars):
            return None
        x, y = self.vars[a], self.vars[b]
        if self.onnx_shape(x) != self.onnx_shape(y) or x.batched != y.batched:
            raise Unsupported(f"broadcasting between two data tensors ({list(self.onnx_shape(x))} and {list(self.onnx_shape(y))})")
        return x, y

    def op_Add(self, node, a):
        pair = self._two_data(node)
        if pair is not None:
            x, y = pair
            return Var(self.builder.add(node.name or "add", ir.Add(), [x.node, y.node]), x.batched)
        v, c, _ = self.var_and_const(node)
        c = self._const_on_ir(v, c)
        prev = self.builder.nodes[-1] if self.builder.nodes else None
        # MatMul + Add(bias) -> one Linear, so specs fold into it and solvers see one layer
        if prev is not None and prev.name == v.node and type(prev.op) is ir.Linear and prev.op.weight.dim() == 2 \
                and self._single_use(v.node) and len(self.builder.shape(v.node)) == 1 \
                and c.ndim <= 1 and c.size in (1, prev.op.weight.shape[0]):
            b = np.broadcast_to(c.reshape(-1), (prev.op.weight.shape[0],)).copy()
            if prev.op.bias is not None:  # b_old + c is rounded when stored, and the runtime adds twice
                self._fused(prev.name, 2, np.abs(prev.op.bias.detach().double().numpy()) + np.abs(b))
            prev.op.bias = self.t(b) if prev.op.bias is None else prev.op.bias + self.t(b)
            self._forget(v.node)
            with torch.no_grad():
                self.builder.examples[v.node] = prev.op.forward(self.builder.examples[prev.inputs[0]])
            return v
        return self._elementwise(node, v, shift=c)

    def op_Sub(self, node, a):
        pair = self._two_data(node)
        if pair is not None:
            x, y = pair
            neg = self.builder.add((node.name or "sub") + "_neg", ir.ElementwiseAffine(self.t(-1.0)), [y.node])
            return Var(self.builder.add(node.name or "sub", ir.Add(), [x.node, neg]), x.batched)
        v, c, swapped = self.var_and_const(node)
        c = self._const_on_ir(v, c)
        if swapped:  # c - x
            return self._elementwise(node, v, scale=np.array(-1.0), shift=c)
        return self._elementwise(node, v, shift=-c)

    def op_Mul(self, node, a):
        if node.input[0] in self.vars and node.input[1] in self.vars:
            return self.data_product(node, self.vars[node.input[0]], self.vars[node.input[1]])
        v, c, _ = self.var_and_const(node)
        return self._elementwise(node, v, scale=self._const_on_ir(v, c))

    def op_Div(self, node, a):
        v, c, _ = self.var_and_const(node)
        c = self._const_on_ir(v, c)
        if np.any(c == 0):
            raise Unsupported("division by zero constant")
        return self._elementwise(node, v, scale=1.0 / c)

    def op_Neg(self, node, a):
        return self._elementwise(node, self.vars[node.input[0]], scale=np.array(-1.0))

    def op_Conv(self, node, a):
        v = self.vars[node.input[0]]
        W = np.asarray(self.consts[node.input[1]])
        if W.ndim != 4 or not v.batched or len(self.onnx_shape(v)) != 4:
            raise Unsupported("only 2-D convolutions on batched NCHW data")
        if "kernel_shape" in a and tuple(a["kernel_shape"]) != tuple(W.shape[2:]):
            raise Unsupported(f"kernel_shape={list(a['kernel_shape'])} differs from the weights' {list(W.shape[2:])}")
        b = self.consts[node.input[2]] if len(node.input) > 2 and node.input[2] else None
        pads = list(a.get("pads", [0, 0, 0, 0]))
        src = v.node
        if pads[0] != pads[2] or pads[1] != pads[3]:
            src = self.builder.add((node.name or "conv") + "_pad", ir.Pad((pads[1], pads[3], pads[0], pads[2])), [src])
            pads = [0, 0, 0, 0]
        op = ir.Conv2d(self.t(W), None if b is None else self.t(b), tuple(a.get("strides", [1, 1])),
                       (pads[0], pads[1]), tuple(a.get("dilations", [1, 1])), int(a.get("group", 1)))
        return Var(self.builder.add(node.name or "conv", op, [src]), True)

    def op_BatchNormalization(self, node, a):
        v = self.vars[node.input[0]]
        s = self.onnx_shape(v)
        if len(s) < 2:
            raise Unsupported(f"BatchNormalization needs (N, C, ...) data, got shape {list(s)}")
        scale, bias, mean, var = (np.asarray(self.consts[i], dtype=np.float64) for i in node.input[1:5])
        eps = float(a.get("epsilon", 1e-5))
        mult = scale / np.sqrt(var + eps)
        add = bias - mean * mult
        per_feature = not a.get("spatial", 1)  # BatchNormalization-7/9 spatial=0: one value per (C, D1, ...)
        want = tuple(s[1:]) if per_feature else (s[1],)
        if mult.shape != want:
            raise Unsupported(f"parameters of shape {list(mult.shape)}, expected {list(want)}")
        unfused = np.abs(mean * mult) + np.abs(bias)  # magnitudes the runtime's own formula adds
        prev = self.builder.nodes[-1] if self.builder.nodes else None
        # fold into the affine op right before when nothing else reads its output
        if v.batched and not per_feature and prev is not None and prev.name == v.node \
                and isinstance(prev.op, (ir.Conv2d, ir.Linear)) \
                and prev.op.weight.dim() == 2 + (2 if isinstance(prev.op, ir.Conv2d) else 0) \
                and self._single_use(v.node) and (isinstance(prev.op, ir.Conv2d) or len(self.builder.shape(v.node)) == 1):
            m, sh = self.t(mult), self.t(add)
            w = prev.op.weight * m.reshape((-1,) + (1,) * (prev.op.weight.dim() - 1))
            b0 = prev.op.bias if prev.op.bias is not None else torch.zeros_like(m)
            self._fused(prev.name, 5, np.abs(b0.detach().double().numpy() * mult) + unfused)
            prev.op.weight, prev.op.bias = w, b0 * m + sh
            self._forget(v.node)
            with torch.no_grad():  # keep the example value in step with the folded weights
                self.builder.examples[v.node] = prev.op.forward(self.builder.examples[prev.inputs[0]])
            return v
        if v.batched and not per_feature:
            op = ir.BatchNorm(None, None, self.t(mean), self.t(var), eps)
            op.weight, op.bias = self.t(scale), self.t(bias)
            return Var(self.builder.add(node.name or "batchnorm", op, [v.node]), v.batched)
        # no batch dimension (ONNX's channel axis is not the IR's) or per-feature parameters:
        # an exact element-wise affine op whose constants line up with ONNX's axes
        shape = want + (1,) * (len(s) - 1 - len(want))
        out = self._elementwise(node, v, scale=mult.reshape(shape), shift=add.reshape(shape))
        self._fused(out.node, 5, unfused.reshape(shape))
        return out

    def _forget(self, ir_node: str) -> None:
        """A fused node no longer computes what its old ONNX tensors held: drop them from the map."""
        for k in [k for k, v in self.onnx_map.items() if v == ir_node]:
            del self.onnx_map[k]

    def _single_use(self, ir_node: str) -> bool:
        onnx_names = [k for k, v in self.onnx_map.items() if v == ir_node]
        return sum(self.consumers.get(k, 0) for k in onnx_names) == 1

    # -------------------------------------------------------------- non-linear
    def _unary(self, node, op):
        v = self.vars[node.input[0]]
        return Var(self.builder.add(node.name or node.op_type.lower(), op, [v.node]), v.batched)

    def op_Relu(self, node, a):
        return self._unary(node, ir.ReLU())

    def op_LeakyRelu(self, node, a):
        return self._unary(node, ir.LeakyReLU(float(a.get("alpha", 0.01))))

    def op_Sigmoid(self, node, a):
        return self._unary(node, ir.Sigmoid())

    def op_Tanh(self, node, a):
        return self._unary(node, ir.Tanh())

    def op_Exp(self, node, a):
        return self._unary(node, ir.Exp())

    def op_Sign(self, node, a):
        return self._unary(node, ir.Sign())

    def op_Softmax(self, node, a):
        v = self.vars[node.input[0]]
        rank = len(self.onnx_shape(v))
        axis = int(a.get("axis", -1 if self.model_opset() >= 13 else 1))
        # before opset 13 Softmax flattened the input to 2-D at `axis`: the same as the per-axis
        # softmax only when that axis is the last one
        if self.model_opset() < 13 and axis % rank != rank - 1:
            raise Unsupported(f"Softmax-{self.model_opset()} over axis {axis} of a rank-{rank} tensor (flattening "
                              "semantics) is not supported")
        return Var(self.builder.add(node.name or "softmax", ir.Softmax(self.ir_axis(v, axis)), [v.node]), v.batched)
