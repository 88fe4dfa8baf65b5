"""A network (one sample of a batch) as an exact mixed-integer linear model, solver-neutral.

Every node's value is kept as an affine expression `A v + c` over the model variables (a
sparse matrix and a constant), so affine ops add no variables or constraints: their matrix is
computed generically from `op.forward` on basis vectors (exact for linear maps), which covers
Linear, Conv2d, Reshape, Pad, AvgPool, BatchNorm, Concat, Add, ... without per-op code.
Only non-linear ops add variables:
- ReLU: stable neurons (by the tightest pre-activation bounds) are the identity or zero; an
  unstable one gets y in [0, u], a binary a, and y >= z, y <= z - l (1 - a), y <= u a.
- LeakyReLU(alpha) = alpha z + (1 - alpha) relu(z): a ReLU plus an affine combination.
- MaxPool: y >= z_i for every candidate and, with one binary per candidate summing to 1,
  y <= z_i + (max u - l_i)(1 - a_i); candidates that can never be the maximum are dropped.
- Sign: fixed-sign neurons are constants; the others get binaries p (y = 1) and n (y = -1),
  p + n <= 1, y = p - n, with z >= l (1 - p), z <= u (1 - n) and l (p + n) <= z <= u (p + n)
  (p = n = 0 forces z = 0). Exact up to the solver's tolerance, which only adds points (a
  counterexample is re-checked concretely before it is reported).
Sigmoid/Tanh/Exp/Softmax are not piecewise linear, and a product of two data tensors (Mul) is
bilinear: all are rejected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import scipy.sparse as sp
import torch

from verikit import ir
from verikit.bounds import BoundStore
from verikit.errors import UnsupportedOpsError

INF = np.inf


class MilpModel:
    """Variables with bounds and integrality, and sparse rows lo <= A v <= hi."""

    def __init__(self):
        self._lb: list = []
        self._ub: list = []
        self._int: list = []
        self._blocks: list = []  # (csr block with <= num_vars columns, lo, hi)
        self._nrows = 0

    def add_vars(self, lb, ub, integer: bool = False) -> np.ndarray:
        lb, ub = np.atleast_1d(np.asarray(lb, np.float64)), np.atleast_1d(np.asarray(ub, np.float64))
        start = self.num_vars()
        self._lb.append(lb)
        self._ub.append(ub)
        self._int.append(np.full(lb.shape[0], integer))
        return np.arange(start, start + lb.shape[0])

    def add_rows(self, A, lo, hi) -> None:
        A = sp.csr_matrix(A)
        k = A.shape[0]
        if k == 0:
            return
        self._blocks.append((A, np.broadcast_to(np.asarray(lo, np.float64), (k,)).copy(),
                             np.broadcast_to(np.asarray(hi, np.float64), (k,)).copy()))
        self._nrows += k

    def num_vars(self) -> int:
        return int(sum(a.shape[0] for a in self._lb))

    def num_rows(self) -> int:
        return self._nrows

    def num_integer(self) -> int:
        return int(sum(a.sum() for a in self._int))

    def lb_array(self):
        return np.concatenate(self._lb) if self._lb else np.zeros(0)

    def ub_array(self):
        return np.concatenate(self._ub) if self._ub else np.zeros(0)

    def integer_array(self):
        return np.concatenate(self._int) if self._int else np.zeros(0, bool)

    def row_lo_array(self):
        return np.concatenate([b[1] for b in self._blocks]) if self._blocks else np.zeros(0)

    def row_hi_array(self):
        return np.concatenate([b[2] for b in self._blocks]) if self._blocks else np.zeros(0)

    def matrix(self) -> sp.csr_matrix:
        n = self.num_vars()
        if not self._blocks:
            return sp.csr_matrix((0, n))
        return sp.vstack([pad(b[0], n) for b in self._blocks]).tocsr()

    def copy(self) -> "MilpModel":
        m = MilpModel()
        m._lb, m._ub, m._int, m._blocks, m._nrows = list(self._lb), list(self._ub), list(self._int), list(self._blocks), self._nrows
        return m


def pad(A: sp.spmatrix, ncols: int) -> sp.csr_matrix:
    """The same sparse matrix with `ncols` columns (new variables appear as zero columns)."""
    A = sp.csr_matrix(A)
    if A.shape[1] == ncols:
        return A
    return sp.csr_matrix((A.data, A.indices, A.indptr), shape=(A.shape[0], ncols))


@dataclass
class Expr:
    """Affine expression A v + c of the model variables, one row per element of a node."""

    A: sp.csr_matrix
    c: np.ndarray

    def interval(self, model: MilpModel):
        """Bounds of every row from the variable bounds alone."""
        n = self.A.shape[1]
        lb, ub = model.lb_array()[:n], model.ub_array()[:n]
        Ap, An = self.A.maximum(0), self.A.minimum(0)
        return self.c + Ap @ lb + An @ ub, self.c + Ap @ ub + An @ lb


@dataclass
class Encoding:
    model: MilpModel
    input_vars: np.ndarray  # variable index of every input element (flattened sample)
    output: Expr  # expression of every output element (the spec rows for a folded graph)
    pre_bounds: dict  # node -> (lo, hi) flattened pre-activation bounds used (after tightening)
    num_binaries: int


UNSUPPORTED = (ir.Sigmoid, ir.Tanh, ir.Exp, ir.Softmax, ir.Mul)

# a tightener gets (model, expression of a layer's pre-activations, current lo, hi) and returns
# tighter (lo, hi) arrays; used by the optional LP/MILP bound tightening
Tightener = Callable[[MilpModel, Expr, np.ndarray, np.ndarray, str], tuple]


def check_supported(graph: ir.Graph) -> None:
    why = lambda op: "a product of two data tensors is bilinear" if isinstance(op, ir.Mul) else "not piecewise linear"
    bad = [(n.name, n.op.op_type, "milp does not support " + n.op.op_type + f" ({why(n.op)})")
           for n in graph.nodes if isinstance(n.op, UNSUPPORTED)]
    if bad:
        raise UnsupportedOpsError(bad)


class JacobianCache:
    """Linear maps of affine ops (shared by all samples unless the op has per-sample weights)."""

    def __init__(self, graph: ir.Graph, ctx=None):
        self.graph, self.ctx, self._cache = graph, ctx, {}

    def get(self, node: ir.Node, b: int):
        op = node.op
        if isinstance(op, ir.Linear) and op.weight.dim() == 3 and len(self.graph.shapes[node.inputs[0]]) == 1:
            # per-sample (folded spec) weights
            W = op.weight[b].detach().double().cpu().numpy()
            bias = op.bias[b] if op.bias is not None and op.bias.dim() == 2 else op.bias
            f0 = np.zeros(W.shape[0]) if bias is None else bias.detach().double().cpu().numpy().reshape(-1)
            return [sp.csr_matrix(W)], f0
        if node.name not in self._cache:
            self._cache[node.name] = self._compute(node)
        return self._cache[node.name]

    def _compute(self, node: ir.Node):
        op = node.op
        if isinstance(op, ir.Linear) and len(self.graph.shapes[node.inputs[0]]) == 1:
            W = op.weight.detach().double().cpu().numpy()
            f0 = np.zeros(W.shape[0]) if op.bias is None else op.bias.detach().double().cpu().numpy().reshape(-1)
            return [sp.csr_matrix(W)], f0
        op64 = op.to(device="cpu", dtype=torch.float64)
        shapes = [tuple(self.graph.shapes[i]) for i in node.inputs]
        with torch.no_grad():
            zeros = [torch.zeros((1,) + s, dtype=torch.float64) for s in shapes]
            f0 = op64.forward(*zeros, ctx=self.ctx).reshape(-1)
            mats = []
            for k, s in enumerate(shapes):
                n = int(np.prod(s))
                parts = []
                for start, stop in _chunks(n, f0.numel()):
                    eye = torch.zeros(stop - start, n, dtype=torch.float64)
                    eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                    eye = eye.reshape((stop - start,) + s)
                    args = [eye if j == k else zeros[j].expand((stop - start,) + shapes[j]) for j in range(len(shapes))]
                    cols = op64.forward(*args, ctx=self.ctx).reshape(stop - start, -1) - f0  # rows: inputs
                    parts.append(sp.csr_matrix(cols.numpy()))
                mats.append(sp.vstack(parts).T.tocsr())  # (out, in)
        return mats, f0.numpy()


def _chunks(n: int, out_size: int, budget: int = 20_000_000):
    """Basis vectors in batches whose images stay within `budget` numbers (big conv layers)."""
    step = max(1, min(n, budget // max(out_size, n, 1)))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _window_members(op: ir.MaxPool2d, in_shape: tuple) -> sp.csr_matrix:
    """(out, in) 0/1 matrix: which inputs lie in each output's pooling window (padding excluded)."""
    n = int(np.prod(in_shape))
    out_size = int(np.prod(op.forward(torch.zeros((1,) + tuple(in_shape))).shape))
    parts = []
    with torch.no_grad():
        for start, stop in _chunks(n, out_size):
            eye = torch.zeros(stop - start, n, dtype=torch.float64)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            M = op.forward(eye.reshape((stop - start,) + tuple(in_shape))).reshape(stop - start, -1)
            parts.append(sp.csr_matrix((M.numpy() > 0.5).astype(np.float64)))
    return sp.vstack(parts).T.tocsr()


def _relu(model: MilpModel, z: Expr, lo: np.ndarray, hi: np.ndarray) -> tuple[Expr, int]:
    n = z.A.shape[0]
    active, inactive = lo >= 0, hi <= 0
    unstable = np.flatnonzero(~active & ~inactive)
    nv0 = model.num_vars()
    k = unstable.size
    if k:
        y = model.add_vars(np.zeros(k), hi[unstable])
        a = model.add_vars(np.zeros(k), np.ones(k), integer=True)
        nv = model.num_vars()
        Az = pad(z.A[unstable], nv)
        cz, l, u = z.c[unstable], lo[unstable], hi[unstable]
        Y = sp.csr_matrix((np.ones(k), (np.arange(k), y)), shape=(k, nv))
        Aa = lambda coef: sp.csr_matrix((coef, (np.arange(k), a)), shape=(k, nv))
        model.add_rows(Y - Az, cz, INF)  # y >= z
        model.add_rows(Y - Az - Aa(l), -INF, cz - l)  # y <= z - l (1 - a)
        model.add_rows(Y - Aa(u), -INF, 0.0)  # y <= u a
    nv = model.num_vars()
    # output rows: active -> z, inactive -> 0, unstable -> y
    keep = sp.diags(active.astype(np.float64)) @ pad(z.A, nv)
    rows_u = sp.csr_matrix((np.ones(k), (unstable, np.arange(nv0, nv0 + k))), shape=(n, nv)) if k else sp.csr_matrix((n, nv))
    return Expr((keep + rows_u).tocsr(), np.where(active, z.c, 0.0)), k


def _sign(model: MilpModel, z: Expr, lo: np.ndarray, hi: np.ndarray) -> tuple[Expr, int]:
    n = z.A.shape[0]
    fixed = (lo > 0) | (hi < 0) | ((lo == 0) & (hi == 0))
    free = np.flatnonzero(~fixed)
    k = free.size
    if k:
        p = model.add_vars(np.zeros(k), np.ones(k), integer=True)
        q = model.add_vars(np.zeros(k), np.ones(k), integer=True)
        nv = model.num_vars()
        Az, cz, l, u = pad(z.A[free], nv), z.c[free], lo[free], hi[free]
        r = np.arange(k)
        P = lambda coef: sp.csr_matrix((coef, (r, p)), shape=(k, nv))
        Q = lambda coef: sp.csr_matrix((coef, (r, q)), shape=(k, nv))
        model.add_rows(P(np.ones(k)) + Q(np.ones(k)), -INF, 1.0)  # p + n <= 1
        model.add_rows(Az + P(l), l - cz, INF)  # z >= l (1 - p)
        model.add_rows(Az + Q(u), -INF, u - cz)  # z <= u (1 - n)
        model.add_rows(Az - P(u) - Q(u), -INF, -cz)  # z <= u (p + n)
        model.add_rows(Az - P(l) - Q(l), -cz, INF)  # z >= l (p + n)
    nv = model.num_vars()
    A = sp.csr_matrix((n, nv))
    if k:
        A = sp.csr_matrix((np.concatenate([np.ones(k), -np.ones(k)]),
                           (np.concatenate([free, free]), np.concatenate([p, q]))), shape=(n, nv))
    const = np.where(lo > 0, 1.0, np.where(hi < 0, -1.0, 0.0))  # the fixed ones' value (free ones: 0)
    return Expr(A, np.where(fixed, const, 0.0)), 2 * k


def _maxpool(model: MilpModel, z: Expr, lo, hi, members: sp.csr_matrix) -> tuple[Expr, int]:
    rows, consts, nbin = [], [], 0
    out_idx = []  # for each output: ("expr", input i) or ("var", var index)
    for o in range(members.shape[0]):
        cand = members.indices[members.indptr[o]:members.indptr[o + 1]]
        best_lo = lo[cand].max()
        cand = cand[hi[cand] >= best_lo]  # the others are always below some candidate
        if cand.size == 1:
            out_idx.append(("expr", int(cand[0])))
            continue
        umax = hi[cand].max()
        (y,) = model.add_vars([best_lo], [umax])
        a = model.add_vars(np.zeros(cand.size), np.ones(cand.size), integer=True)
        nbin += cand.size
        nv = model.num_vars()
        Az = pad(z.A[cand], nv)
        Y = sp.csr_matrix((np.ones(cand.size), (np.arange(cand.size), np.full(cand.size, y))), shape=(cand.size, nv))
        M = umax - lo[cand]
        Am = sp.csr_matrix((M, (np.arange(cand.size), a)), shape=(cand.size, nv))
        model.add_rows(Y - Az, z.c[cand], INF)  # y >= z_i
        model.add_rows(Y - Az + Am, -INF, z.c[cand] + M)  # y <= z_i + M (1 - a_i)
        model.add_rows(sp.csr_matrix((np.ones(cand.size), (np.zeros(cand.size, int), a)), shape=(1, nv)), 1.0, 1.0)
        out_idx.append(("var", int(y)))
    nv = model.num_vars()
    data, ri, ci, c = [], [], [], np.zeros(len(out_idx))
    A_in = pad(z.A, nv)
    for o, (kind, j) in enumerate(out_idx):
        if kind == "var":
            data.append(np.ones(1)); ri.append(np.full(1, o)); ci.append(np.array([j]))
        else:
            row = A_in[j]
            data.append(row.data); ri.append(np.full(row.nnz, o)); ci.append(row.indices)
            c[o] = z.c[j]
    A = sp.csr_matrix((np.concatenate(data), (np.concatenate(ri), np.concatenate(ci))), shape=(len(out_idx), nv))
    return Expr(A, c), nbin


def encode(graph: ir.Graph, store: BoundStore, b: int, jac: Optional[JacobianCache] = None,
           tightener: Optional[Tightener] = None, ctx=None) -> Encoding:
    """The MILP model of sample `b` of `graph`, whose input box is store[graph.input_name][b]
    and whose pre-activation bounds are the tightest in `store` (box bounds must be there)."""
    check_supported(graph)
    jac = jac or JacobianCache(graph, ctx)
    model = MilpModel()
    box = store[graph.input_name]
    lo_in = box.lo[b].detach().double().cpu().numpy().reshape(-1)
    hi_in = box.hi[b].detach().double().cpu().numpy().reshape(-1)
    x = model.add_vars(lo_in, hi_in)
    exprs = {graph.input_name: Expr(sp.identity(x.size, format="csr"), np.zeros(x.size))}
    pre_bounds, nbin = {}, 0

    def bounds_of(name, z: Expr):
        bx = store[name]
        lo = bx.lo[b].detach().double().cpu().numpy().reshape(-1)
        hi = bx.hi[b].detach().double().cpu().numpy().reshape(-1)
        ilo, ihi = z.interval(model)
        lo, hi = np.maximum(lo, ilo), np.minimum(hi, ihi)
        if tightener is not None:
            lo, hi = tightener(model, z, lo, hi, name)
        # two valid enclosures of the same value can miss each other by rounding (a point
        # interval stored in float32, recomputed in float64): keep both ends, never an empty one
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        pre_bounds[name] = (lo, hi)
        return lo, hi

    for node in graph.nodes:
        op = node.op
        ins = [exprs[i] for i in node.inputs]
        nv = model.num_vars()
        if op.is_affine:
            mats, f0 = jac.get(node, b)
            A = sum((J @ pad(e.A, nv) for J, e in zip(mats, ins)), sp.csr_matrix((f0.size, nv)))
            c = f0 + sum(J @ e.c for J, e in zip(mats, ins))
            A = sp.csr_matrix(A)
            A.eliminate_zeros()
            exprs[node.name] = Expr(A, np.asarray(c, np.float64).reshape(-1))
        elif isinstance(op, (ir.ReLU, ir.LeakyReLU)):
            z = ins[0]
            lo, hi = bounds_of(node.inputs[0], z)
            r, k = _relu(model, z, lo, hi)
            nbin += k
            if isinstance(op, ir.LeakyReLU):
                al = float(op.alpha)
                nv = model.num_vars()
                r = Expr((al * pad(z.A, nv) + (1 - al) * r.A).tocsr(), al * z.c + (1 - al) * r.c)
            exprs[node.name] = r
        elif isinstance(op, ir.Sign):
            z = ins[0]
            lo, hi = bounds_of(node.inputs[0], z)
            exprs[node.name], k = _sign(model, z, lo, hi)
            nbin += k
        elif isinstance(op, ir.MaxPool2d):
            z = ins[0]
            lo, hi = bounds_of(node.inputs[0], z)
            members = _window_members(op, tuple(graph.shapes[node.inputs[0]]))
            exprs[node.name], k = _maxpool(model, z, lo, hi, members)
            nbin += k
        else:
            raise UnsupportedOpsError([(node.name, op.op_type, "milp has no encoding for it")])
    out = exprs[graph.output]
    return Encoding(model, x, Expr(pad(out.A, model.num_vars()), out.c), pre_bounds, nbin)
