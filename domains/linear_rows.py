"""Which neurons of a layer to back-substitute, and bounding them per sample.

Only neurons whose relaxation can still change need back-substituted bounds: for a layer read
only by ReLU-like ops, those unstable (lo < 0 < hi) under the current bounds. In a batch the
unstable sets differ between samples. By default the engine bounds the union for every sample
(one shared row list). With `per_sample_rows`, each sample bounds only its own unstable
neurons (padded to the largest count; padding rows are bounded but not written back): fewer
rows, and bounds that do not depend on the batch (equal to bounding each sample alone). It is
not the default because it changes bounds: with the union, a neuron stable in one sample
still gets its back-substituted bound there, which narrows the interval refresh of the layers
after it and usually (CROWN is not monotone in intermediate bounds: not always) tightens the
output.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from verikit import ir
from verikit.errors import VerikitError

# per-sample rows when their padded count is below this share of the union over the batch
PER_SAMPLE_SHARE = 0.8


def per_sample_rows(need: Tensor):
    """(rows (B, k), valid (B, k)) for the neurons `need` (B, n) of each sample, or None when
    the shared union is about as small (the same bounds then, at no extra cost). Each sample's rows come first, in order, then rows it
    does not need as padding (distinct within the sample)."""
    B = need.shape[0]
    if B == 1:
        return None
    union = int(need.any(0).sum())
    most = int(need.sum(1).max())
    if most == 0 or most >= PER_SAMPLE_SHARE * union:
        return None
    rows = torch.argsort((~need).to(torch.int8), dim=1, stable=True)[:, :most]
    return rows, need.gather(1, rows)


def collect_sides(found: dict, lb: Tensor, k: int, sides: tuple) -> None:
    """Append to found[sign] the bounds of a chunk's k rows per side from its lower_bound
    `lb` (B, len(sides) * k): the lower bound itself for +1, minus it (the upper bound) for -1."""
    for sign, part in zip(sides, lb.split(k, 1)):
        found[sign].append(part if sign > 0 else -part)


def bound_rows_per_sample(engine, name: str, rows: Tensor, sides: tuple = (1, -1), stop=None) -> tuple:
    """Lower and upper bounds (B, k) of the flat neurons rows[b] of node `name` in sample b,
    in chunks of at most the engine's `max_rows_per_chunk` rows over the whole batch.
    `sides`, `stop`: as in `bound_rows` (a side not asked for is None)."""
    B, k_all = rows.shape
    per_chunk = max(1, engine.max_rows // (len(sides) * B))
    node = engine.graph.node(name) if name != engine.graph.input_name else None
    shape = tuple(engine.graph.shapes[name])
    n = math.prod(shape)
    found = {s: [] for s in sides}
    form = row_form(engine, node, shape, stop)
    for chunk in rows.split(per_chunk, dim=1):
        k = chunk.shape[1]
        if form is not None:
            lb = linear_rows(engine, form[0], chunk, stop, *form[1:], sides=sides)
        else:
            lam = torch.zeros(B, len(sides) * k, n, device=engine.device, dtype=engine.dtype)
            for j, sign in enumerate(sides):
                lam[:, j * k:(j + 1) * k].scatter_(2, chunk.unsqueeze(-1), float(sign))
            lb = engine.lower_bound(name, lam.reshape((B, len(sides) * k) + shape), stop=stop)
        collect_sides(found, lb, k, sides)
        engine.rows_bounded += len(sides) * k * B
    return tuple(torch.cat(found[s], 1) if s in found else None for s in (1, -1))


def row_form(engine, node, shape: tuple, stop=None):
    """(Linear node, scale, shift) when the one-hot rows of flat `node` can start as weight rows
    of a Linear (`linear_rows`), else None: `node` is a Linear (scale and shift None), or, on the
    fast paths and without rounding-error radii, a BatchNorm reading a Linear, whose neuron i is
    scale_i (W_i x + b_i) + shift_i: its rows are the Linear's weight rows scaled per neuron
    (skips a one-hot product with the whole weight matrix: CNN7's [1014, 512] x [512, 25088])."""
    if node is None or len(shape) != 1:
        return None
    if isinstance(node.op, ir.Linear):
        return node, None, None
    if not (isinstance(node.op, ir.BatchNorm) and engine.fast_paths and not engine.errors):
        return None
    src = node.inputs[0]
    lin = engine.graph.node(src) if src != engine.graph.input_name else None
    if lin is None or not isinstance(lin.op, ir.Linear) or lin.op.weight.dim() != 2 or stop == lin.name:
        return None
    scale, shift = batchnorm_constants(engine, node)
    return lin, scale, shift


def batchnorm_constants(engine, node: ir.Node) -> tuple[Tensor, Tensor]:
    """(scale, shift), flattened, of the BatchNorm `node` in the engine's context: its neuron i is
    scale_i x_i + shift_i (per channel: one entry per channel, or one for all)."""
    try:  # batch statistics must have been recorded by a forward pass
        scale, shift = node.op.scale_shift(engine.store[node.inputs[0]].lo, engine.ctx, record=False)
    except RuntimeError as e:
        raise VerikitError(str(e)) from None
    return scale.reshape(-1), shift.reshape(-1)


def linear_rows(engine, node: ir.Node, rows: Tensor, stop=None, scale=None, shift=None,
                sides: tuple = (1, -1)) -> Tensor:
    """lower_bound for the rows [+e_rows; -e_rows] (the signs `sides`, in order) of a Linear
    node (of scale * Linear + shift where `scale` is given: a BatchNorm after it), skipping the
    one-hot product: the coefficients on its input are just the selected weight rows. `rows`:
    (k,) for every sample, or (B, k) per sample."""
    w, b = node.op.weight, node.op.bias
    B = engine.batch
    if rows.dim() == 1:
        take = lambda t: t[..., rows].expand(B, -1)
        w = w[..., rows, :] if w.dim() == 3 else w[rows].expand(B, -1, -1)
    else:
        take = lambda t: t.expand(B, -1).gather(1, rows)
        w = w.gather(1, rows.unsqueeze(-1).expand(-1, -1, w.shape[-1])) if w.dim() == 3 else w[rows]
    if scale is not None:
        s = take(scale)
        w = w * s.unsqueeze(-1)
        b = shift if b is None else b * scale + shift  # per neuron: scale_i b_i + shift_i
    signed = lambda t: t.contiguous() if sides == (1,) else torch.cat([t if s > 0 else -t for s in sides], 1)
    lb = engine.lower_bound(node.inputs[0], signed(w), stop=stop)
    if b is not None:
        lb = lb + signed(take(b))
    if node.name in engine.errors:  # the Linear's own error radius (skipped by starting at its input)
        e = take(engine.errors[node.name].reshape(B, -1))
        lb = lb - torch.cat([e] * len(sides), 1)
    return lb


def tighten(lo: Tensor, hi: Tensor, rows: Tensor, valid: Tensor, new_lo: Tensor, new_hi: Tensor) -> None:
    """Intersect lo, hi (B, n) in place with the new bounds of rows[b] where valid."""
    old_lo, old_hi = lo.gather(1, rows), hi.gather(1, rows)
    lo.scatter_(1, rows, torch.where(valid, torch.maximum(old_lo, new_lo), old_lo))
    hi.scatter_(1, rows, torch.where(valid, torch.minimum(old_hi, new_hi), old_hi))
