"""Linear output properties and how they are folded into a network's last layer.

A `Spec` says: for every group g, at least one row i in g satisfies  C_i · y > d_i.
- Robustness (all margins y_true - y_j positive) is the special case where every row is its
  own group.
- A VNN-LIB unsafe region that is a disjunction of polytopes {A_k y <= b_k} compiles to one
  group per polytope, with rows -A_k y > -b_k: the region is empty iff every group has a row
  that can never be <= 0.

Domains bound the rows  s = C y - d  directly (C folded into the last affine layer, which is
tighter than bounding y and combining afterwards).
"""
from __future__ import annotations

import weakref

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .errors import SpecError
from .ir import Graph, Linear, Node


@dataclass
class Spec:
    C: Tensor  # (m, n) shared by the batch, or (B, m, n) per sample
    d: Tensor  # (m,) or (B, m)
    groups: Optional[tuple] = None  # tuple of tuples of row indices; None: every row its own group
    # (m,) bool: rows whose unsafe side is strict (C_i y - d_i < 0, from a VNN-LIB `<` / `>`);
    # None: every unsafe side is non-strict (C_i y - d_i <= 0)
    strict: Optional[Tensor] = None
    # the property as written, (C, d) in float64, when C and d are a rounded working copy
    exact: Optional[tuple] = None

    def __post_init__(self):
        if self.C.dim() not in (2, 3) or self.d.dim() != self.C.dim() - 1 or self.C.shape[:-1] != self.d.shape:
            raise SpecError(f"spec shapes do not match: C {tuple(self.C.shape)}, d {tuple(self.d.shape)}")
        if self.groups is not None:
            rows = sorted(i for g in self.groups for i in g)
            if not rows or rows[0] < 0 or rows[-1] >= self.num_rows or any(len(g) == 0 for g in self.groups):
                raise SpecError("spec groups must be non-empty lists of valid row indices")
        if self.strict is not None and tuple(self.strict.shape) != (self.num_rows,):
            raise SpecError(f"spec strict flags must have one entry per row, got {tuple(self.strict.shape)}")

    @property
    def num_rows(self) -> int:
        return self.C.shape[-2]

    @property
    def num_outputs(self) -> int:
        return self.C.shape[-1]

    @property
    def group_list(self) -> list[tuple[int, ...]]:
        return [tuple(g) for g in self.groups] if self.groups is not None else [(i,) for i in range(self.num_rows)]

    @property
    def exact_C(self) -> Tensor:
        """C as written, in float64 (equal to C when C was never rounded)."""
        return self.exact[0] if self.exact is not None else self.C.double()

    @property
    def exact_d(self) -> Tensor:
        return self.exact[1] if self.exact is not None else self.d.double()

    @classmethod
    def robustness(cls, labels: Tensor, num_classes: int, dtype=torch.float32) -> "Spec":
        """Margins y_label - y_j for all j != label, one row per j (per sample)."""
        labels = torch.as_tensor(labels).reshape(-1).long()
        B, m = labels.shape[0], num_classes - 1
        C = torch.zeros(B, m, num_classes, dtype=dtype, device=labels.device)
        for b, t in enumerate(labels.tolist()):
            others = [j for j in range(num_classes) if j != t]
            C[b, torch.arange(m), others] = -1.0
            C[b, :, t] = 1.0
        return cls(C, torch.zeros(B, m, dtype=dtype, device=labels.device))

    def _with(self, C, d, exact) -> "Spec":
        return Spec(C, d, self.groups, self.strict, exact)

    def to(self, device=None, dtype=None) -> "Spec":
        """The spec on another device / in another dtype. Values always come from the exact
        (float64) property: C is rounded to nearest, thresholds d upwards (proving C y > d_up
        implies C y > d); the exact copy travels along, so verdicts and re-checks can use it."""
        exact = self.exact
        if exact is None and dtype is not None and dtype != self.C.dtype:
            exact = (self.C.double(), self.d.double())
        if exact is not None:
            exact = (exact[0].to(device=device), exact[1].to(device=device))
        if dtype is None or exact is None:
            return self._with(self.C.to(device=device, dtype=dtype), self.d.to(device=device, dtype=dtype), exact)
        C, d64 = exact[0].to(dtype), exact[1]
        d = d64.to(dtype)
        if dtype != torch.float64:
            up = torch.nextafter(d, torch.full_like(d, float("inf")))
            d = torch.where(d.double() < d64, up, d)
        exact_needed = dtype != torch.float64
        return self._with(C, d, exact if exact_needed else None)

    def select(self, idx) -> "Spec":
        if self.C.dim() == 2:
            return self
        exact = None if self.exact is None else (self.exact[0][idx], self.exact[1][idx])
        return self._with(self.C[idx], self.d[idx], exact)

    def for_sample(self, b: int) -> "Spec":
        """Sample b's spec as one shared by a whole batch (C of shape (m, n))."""
        if self.C.dim() == 2:
            return self
        exact = None if self.exact is None else (self.exact[0][b], self.exact[1][b])
        return self._with(self.C[b], self.d[b], exact)

    def expand(self, batch: int) -> "Spec":
        """Per-sample form (B, m, n)."""
        if self.C.dim() == 3:
            return self
        exact = None if self.exact is None else (self.exact[0].expand(batch, -1, -1), self.exact[1].expand(batch, -1))
        return self._with(self.C.expand(batch, -1, -1), self.d.expand(batch, -1), exact)

    def values(self, y: Tensor) -> Tensor:
        """Row values C y - d for concrete outputs y (B, n) -> (B, m), in the working dtype."""
        y = y.reshape(y.shape[0], -1)
        if self.C.dim() == 2:
            return y @ self.C.T - self.d
        return torch.einsum("bmn,bn->bm", self.C, y) - self.d

    def _reduce(self, rows_ok: Tensor) -> Tensor:
        """rows_ok (B, m) bool -> (B,): every group has an ok row."""
        per_group = [rows_ok[:, list(g)].any(dim=1) for g in self.group_list]
        return torch.stack(per_group, dim=1).all(dim=1)

    def holds_given_lower(self, lower: Tensor, guard: Optional[Tensor] = None) -> Tensor:
        """Sound verdict from lower bounds of the rows: True means proven for that sample.

        A lower bound must clear `guard` (B, m): the floating-point error of the computation
        that produced it, derived from the magnitudes flowing through the network
        (`verikit.rounding.verdict_guard`). It never drops below the old relative guard (about
        100 ulps of float32, relative to 1 + |bound|)."""
        floor = float_guard(lower)
        g = floor if guard is None else torch.maximum(floor, guard.to(device=lower.device, dtype=lower.dtype))
        return self._reduce(lower > g)

    def exact_values(self, y: Tensor) -> Tensor:
        """Row values of the exact property, C y - d in float64, for concrete outputs y."""
        y = y.reshape(y.shape[0], -1).to(torch.float64)
        C, d = self.exact_C.to(y.device), self.exact_d.to(y.device)
        if C.dim() == 2:
            return y @ C.T - d
        return torch.einsum("bmn,bn->bm", C, y) - d

    def violated_by(self, y: Tensor) -> Tensor:
        """Concrete check of the exact property: does output y lie in the unsafe region (some group
        whose rows are all <= 0, or < 0 for strict rows)? Rows whose float64 value is within its
        rounding error of 0 are decided in exact rational arithmetic."""
        vals = self.exact_values(y)
        y64 = y.reshape(y.shape[0], -1).to(torch.float64)
        C, d = self.exact_C.to(y64.device), self.exact_d.to(y64.device)
        mag = (y64.abs() @ C.abs().T if C.dim() == 2 else torch.einsum("bmn,bn->bm", C.abs(), y64.abs())) + d.abs()
        close = vals.abs() <= 4 * (self.num_outputs + 2) * 2.0 ** -53 * mag
        sign = torch.sign(vals)
        for b, i in close.nonzero().tolist():
            sign[b, i] = _exact_sign(C[b, i] if C.dim() == 3 else C[i], y64[b], d[b, i] if d.dim() == 2 else d[i])
        strict = self.strict.to(sign.device) if self.strict is not None else \
            torch.zeros(self.num_rows, dtype=torch.bool, device=sign.device)
        unsafe = torch.where(strict, sign < 0, sign <= 0)
        return ~self._reduce(~unsafe)

    def margin(self, lower: Tensor) -> Tensor:
        """A scalar per sample that is > 0 iff the property is proven: min over groups of max over rows."""
        per_group = [lower[:, list(g)].max(dim=1).values for g in self.group_list]
        return torch.stack(per_group, dim=1).min(dim=1).values


def _exact_sign(c: Tensor, y: Tensor, d: Tensor) -> float:
    """sign(c . y - d) in exact rational arithmetic (every float64 is a rational)."""
    from fractions import Fraction

    total = sum((Fraction(float(a)) * Fraction(float(b)) for a, b in zip(c.tolist(), y.tolist()) if a != 0),
                Fraction(0)) - Fraction(float(d))
    return float((total > 0) - (total < 0))


def float_guard(x: Tensor) -> Tensor:
    """The smallest margin a bound must clear to count as a proof, whatever else is known:
    rounding slack for x's dtype relative to the bound itself."""
    rel = 1e-5 if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10
    return rel * (1.0 + x.detach().abs())


SPEC_NODE = "__spec__"


def fold_spec(graph: Graph, spec: Optional[Spec]) -> Graph:
    """A graph whose output is C y - d.

    When the output node is a Linear used by nothing else, C is multiplied into it (a single
    affine layer W' = C W, b' = C b - d, computed lazily so gradients reach the original W);
    otherwise a Linear node computing C y - d is appended.
    """
    if spec is None:
        return graph
    # the same spec folded into the same graph again (every domain of a chain, every bound of
    # a batch): the same folded graph, so that what is cached on its nodes and ops is reused
    cached = graph.__dict__.get("_folded")
    versions = (spec.C._version, spec.d._version, len(graph.nodes), graph.output)
    if cached is not None and cached[0] is spec and cached[1] is spec.C and cached[2] is spec.d \
            and cached[3] is graph.nodes and cached[4] == versions:
        return cached[5]
    folded = _fold_spec(graph, spec)
    graph.__dict__["_folded"] = (spec, spec.C, spec.d, graph.nodes, versions, folded)
    return folded


def _fold_spec(graph: Graph, spec: Spec) -> Graph:
    n_out = 1
    for s in graph.output_shape:
        n_out *= s
    if spec.num_outputs != n_out:
        raise SpecError(f"spec has {spec.num_outputs} output columns, the model has {n_out} outputs")
    last = graph.node(graph.output) if graph.output != graph.input_name else None
    users = graph.consumers().get(graph.output, [])
    # the folded graph remembers its spec (with the exact property), so that the rounding
    # error of the spec's own working copy can be charged to the verdict (verikit.rounding)
    meta = {**graph.meta, "spec": spec}
    if last is not None and isinstance(last.op, Linear) and last.op.weight.dim() == 2 and not users \
            and len(graph.shapes[last.inputs[0]]) == 1:
        op = FoldedSpecLinear(last.op.weight, last.op.bias, spec.C, spec.d)
        node = Node(SPEC_NODE, op, last.inputs)
        nodes = [n for n in graph.nodes if n is not last]
        return Graph(graph.input_name, graph.input_shape, nodes + [node], SPEC_NODE,
                     {**graph.shapes, SPEC_NODE: (spec.num_rows,)}, graph.source, meta)
    extra = []
    src = graph.output
    if len(graph.output_shape) != 1:
        from .ir import Reshape
        extra.append(Node("__spec_flatten__", Reshape((n_out,)), (src,)))
        src = "__spec_flatten__"
    extra.append(Node(SPEC_NODE, Linear(spec.C, -spec.d), (src,)))
    shapes = {**graph.shapes, "__spec_flatten__": (n_out,), SPEC_NODE: (spec.num_rows,)}
    return Graph(graph.input_name, graph.input_shape, list(graph.nodes) + extra, SPEC_NODE, shapes, graph.source, meta)


class FoldedSpecLinear(Linear):
    """Linear(C W, C b - d), recomputed from the live W and b at every call."""

    op_type = "Linear"

    def __init__(self, weight: Tensor, bias: Optional[Tensor], C: Tensor, d: Tensor):
        self.inner_weight, self.inner_bias, self.C, self.d = weight, bias, C, d

    @property
    def weight(self) -> Tensor:
        return self.C @ self.inner_weight

    @property
    def bias(self) -> Tensor:
        b = -self.d
        if self.inner_bias is not None:
            b = b + (self.C @ self.inner_bias.unsqueeze(-1)).squeeze(-1)
        return b

    def forward(self, x, ctx=None):
        # C (W x + b) - d: cheaper than forming C W, and the same linear map
        z = torch.nn.functional.linear(x, self.inner_weight, self.inner_bias)
        y = z @ self.C.transpose(-1, -2) if self.C.dim() == 2 else torch.einsum("bmn,bn->bm", self.C, z)
        return y - self.d

    def abs_linear(self, r, ctx=None):
        # |C W| r. Per-sample specs usually repeat a few matrices (robustness: one per label):
        # without autograd, bound with each distinct matrix once and pick each sample's rows
        # (the same products; the per-sample path stays for training, which must not change)
        if self.C.dim() == 3 and not (torch.is_grad_enabled() and any(
                t.requires_grad for t in (r, self.C, self.inner_weight))):
            groups = distinct_matrices(self.C)
            if groups is not None:
                uniq, index = groups
                k, m = uniq.shape[:2]
                rows = (uniq @ self.inner_weight).abs().reshape(k * m, -1)  # (k*m, n_in)
                per_matrix = (r @ rows.T).reshape(r.shape[0], k, m)
                return per_matrix.gather(1, index.view(-1, 1, 1).expand(-1, 1, m)).squeeze(1)
        return super().abs_linear(r, ctx)

    def tensors(self):
        yield from (("inner_weight", self.inner_weight), ("C", self.C), ("d", self.d))
        if self.inner_bias is not None:
            yield "inner_bias", self.inner_bias

    def to(self, device=None, dtype=None):
        mv = lambda t: None if t is None else t.to(device=device, dtype=dtype)
        return FoldedSpecLinear(mv(self.inner_weight), mv(self.inner_bias), mv(self.C), mv(self.d))

    def describe(self) -> str:
        return f"Linear(spec-folded, weight={tuple(self.weight.shape)})"


MAX_DISTINCT = 32  # above this many distinct spec matrices, the per-sample product is cheaper


def _row_fingerprints(flat: Tensor) -> Tensor:
    """(B,) int64: a fixed random weighting of each row's bit pattern in 16-bit pieces. Every
    product is below 2**40 and a row sums fewer than 2**22 of them, so nothing overflows and the
    sum is exact in any order."""
    words = flat.contiguous().view(torch.int16).to(torch.int64) + 2 ** 15  # [0, 2**16)
    weights = torch.randint(1, 2 ** 24, (words.shape[1],), generator=torch.Generator().manual_seed(12345))
    return (words * weights.to(words.device)).sum(dim=1)


def distinct_matrices(C: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """(the distinct matrices (k, m, n), each sample's index (B,)) of per-sample matrices C
    (B, m, n), when there are at most MAX_DISTINCT of them and fewer than B; else None.

    Samples are grouped by an integer fingerprint of their bit patterns and the grouping is then
    checked exactly, so a collision (or a NaN) only means None, never a wrong row. The
    fingerprint is integer arithmetic on purpose: a float product (a matrix-vector projection)
    can round identical rows differently in different lanes of a vectorised kernel."""
    B = C.shape[0]
    if B < 2:
        return None
    key = (C.data_ptr(), C._version, C.shape, C.stride(), C.dtype, C.device)
    ref, cached_key, result = _DISTINCT_CACHE.get(id(C), (None, None, None))
    if ref is not None and ref() is C and cached_key == key:  # the same spec bounded again (a chain, bab)
        return result
    result = _distinct_matrices(C)
    if len(_DISTINCT_CACHE) >= 8:
        _DISTINCT_CACHE.clear()
    _DISTINCT_CACHE[id(C)] = (weakref.ref(C), key, result)
    return result


# id(C) -> (a weak reference to C, its identity and version, the result): the matrices of a
# spec are grouped once, not at every bound of it (tensors compare element-wise, so no WeakKeyDictionary)
_DISTINCT_CACHE: dict = {}


def _distinct_matrices(C: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    B = C.shape[0]
    flat = C.reshape(B, -1)
    keys, index = torch.unique(_row_fingerprints(flat), return_inverse=True)
    k = keys.shape[0]
    if k > MAX_DISTINCT or k >= B:
        return None
    first = torch.full((k,), B, dtype=torch.long, device=C.device).scatter_reduce_(
        0, index, torch.arange(B, device=C.device), "amin")
    uniq = flat[first]
    if not torch.equal(uniq[index], flat):
        return None
    return uniq.reshape((k,) + tuple(C.shape[1:])), index
