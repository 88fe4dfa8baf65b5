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

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from .errors import SpecError
from .ir import Graph, Linear, Node


@dataclass
class Spec:
    C: Tensor  # (m, n) shared by the batch, or (B, m, n) per sample
    d: Tensor  # (m,) or (B, m)
    groups: Optional[tuple] = None  # tuple of tuples of row indices; None: every row its own group

    def __post_init__(self):
        if self.C.dim() not in (2, 3) or self.d.dim() != self.C.dim() - 1 or self.C.shape[:-1] != self.d.shape:
            raise SpecError(f"spec shapes do not match: C {tuple(self.C.shape)}, d {tuple(self.d.shape)}")
        if self.groups is not None:
            rows = sorted(i for g in self.groups for i in g)
            if not rows or rows[0] < 0 or rows[-1] >= self.num_rows or any(len(g) == 0 for g in self.groups):
                raise SpecError("spec groups must be non-empty lists of valid row indices")

    @property
    def num_rows(self) -> int:
        return self.C.shape[-2]

    @property
    def num_outputs(self) -> int:
        return self.C.shape[-1]

    @property
    def group_list(self) -> list[tuple[int, ...]]:
        return [tuple(g) for g in self.groups] if self.groups is not None else [(i,) for i in range(self.num_rows)]

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

    def to(self, device=None, dtype=None) -> "Spec":
        d = self.d.to(device=device, dtype=dtype)
        if dtype is not None and d.dtype != self.d.dtype:
            # round thresholds up, never down: proving C y > d_rounded must imply C y > d
            up = torch.nextafter(d, torch.full_like(d, float("inf")))
            d = torch.where(d.to(self.d.dtype) < self.d.to(d.device), up, d)
        return Spec(self.C.to(device=device, dtype=dtype), d, self.groups)

    def select(self, idx) -> "Spec":
        if self.C.dim() == 2:
            return self
        return Spec(self.C[idx], self.d[idx], self.groups)

    def expand(self, batch: int) -> "Spec":
        """Per-sample form (B, m, n)."""
        if self.C.dim() == 3:
            return self
        return Spec(self.C.expand(batch, -1, -1), self.d.expand(batch, -1), self.groups)

    def values(self, y: Tensor) -> Tensor:
        """Row values C y - d for concrete outputs y (B, n) -> (B, m)."""
        y = y.reshape(y.shape[0], -1)
        if self.C.dim() == 2:
            return y @ self.C.T - self.d
        return torch.einsum("bmn,bn->bm", self.C, y) - self.d

    def _reduce(self, rows_ok: Tensor) -> Tensor:
        """rows_ok (B, m) bool -> (B,): every group has an ok row."""
        per_group = [rows_ok[:, list(g)].any(dim=1) for g in self.group_list]
        return torch.stack(per_group, dim=1).all(dim=1)

    def holds_given_lower(self, lower: Tensor) -> Tensor:
        """Sound verdict from lower bounds of the rows: True means proven for that sample.

        Bounds are computed in floating point without outward rounding, so a lower bound within
        rounding distance of zero is no proof: it must exceed a small guard (about 100 ulps of
        float32, relative to 1 + |bound|)."""
        return self._reduce(lower > float_guard(lower))

    def violated_by(self, y: Tensor) -> Tensor:
        """Concrete check: does output y violate the property (some group with all rows <= 0)?"""
        return ~self._reduce(self.values(y) > 0)

    def margin(self, lower: Tensor) -> Tensor:
        """A scalar per sample that is > 0 iff the property is proven: min over groups of max over rows."""
        per_group = [lower[:, list(g)].max(dim=1).values for g in self.group_list]
        return torch.stack(per_group, dim=1).min(dim=1).values


def float_guard(x: Tensor) -> Tensor:
    """The margin a bound must clear to count as a proof: rounding slack for x's dtype."""
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
    n_out = 1
    for s in graph.output_shape:
        n_out *= s
    if spec.num_outputs != n_out:
        raise SpecError(f"spec has {spec.num_outputs} output columns, the model has {n_out} outputs")
    last = graph.node(graph.output) if graph.output != graph.input_name else None
    users = graph.consumers().get(graph.output, [])
    if last is not None and isinstance(last.op, Linear) and last.op.weight.dim() == 2 and not users \
            and len(graph.shapes[last.inputs[0]]) == 1:
        op = FoldedSpecLinear(last.op.weight, last.op.bias, spec.C, spec.d)
        node = Node(SPEC_NODE, op, last.inputs)
        nodes = [n for n in graph.nodes if n is not last]
        return Graph(graph.input_name, graph.input_shape, nodes + [node], SPEC_NODE,
                     {**graph.shapes, SPEC_NODE: (spec.num_rows,)}, graph.source, graph.meta)
    extra = []
    src = graph.output
    if len(graph.output_shape) != 1:
        from .ir import Reshape
        extra.append(Node("__spec_flatten__", Reshape((n_out,)), (src,)))
        src = "__spec_flatten__"
    extra.append(Node(SPEC_NODE, Linear(spec.C, -spec.d), (src,)))
    return graph.replace_output(extra, SPEC_NODE, {"__spec_flatten__": (n_out,), SPEC_NODE: (spec.num_rows,)})


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


def distinct_matrices(C: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """(the distinct matrices (k, m, n), each sample's index (B,)) of per-sample matrices C
    (B, m, n), when there are at most MAX_DISTINCT of them and fewer than B; else None.

    Samples are grouped by a fingerprint (a fixed random projection) and the grouping is then
    checked exactly, so a fingerprint collision (or a NaN) only means None, never a wrong row."""
    B = C.shape[0]
    if B < 2:
        return None
    flat = C.reshape(B, -1)
    probe = torch.randn(flat.shape[1], generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    keys, index = torch.unique(flat.double() @ probe.to(flat.device), return_inverse=True)
    k = keys.shape[0]
    if k > MAX_DISTINCT or k >= B:
        return None
    first = torch.full((k,), B, dtype=torch.long, device=C.device).scatter_reduce_(
        0, index, torch.arange(B, device=C.device), "amin")
    uniq = flat[first]
    if not torch.equal(uniq[index], flat):
        return None
    return uniq.reshape((k,) + tuple(C.shape[1:])), index
