"""ReLU shrinking (an option of the SABR paper's code): during training only, the upper bound
of every *unstable* ReLU (l < 0 < u) is multiplied by a factor < 1 in box propagation.

This is deliberately unsound and therefore never part of a verifier: it is a training-only op
type (`ShrinkReLU`) put into a *copy* of the training graph, with its own box rule added to
the box domain's rule table (ordinary ReLU graphs are unaffected).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from verikit import ir
from verikit.bounds import Box


@dataclass(eq=False)
class ShrinkReLU(ir.ReLU):
    factor: float = 0.8
    op_type: ClassVar[str] = "ShrinkReLU"


def _shrink_rule(op: ShrinkReLU, boxes, ctx) -> Box:
    (b,) = boxes
    unstable = (b.lo < 0) & (b.hi > 0)
    hi = torch.relu(b.hi)
    return Box(torch.relu(b.lo), torch.where(unstable, hi * op.factor, hi))


def with_relu_shrinking(graph: ir.Graph, factor: float) -> ir.Graph:
    """A copy of `graph` whose ReLUs shrink unstable upper bounds by `factor` under box."""
    from verikit.domains.box import BOX_RULES

    BOX_RULES.setdefault(ShrinkReLU, _shrink_rule)
    nodes = [ir.Node(n.name, ShrinkReLU(factor), n.inputs) if type(n.op) is ir.ReLU else n for n in graph.nodes]
    import dataclasses

    return dataclasses.replace(graph, nodes=nodes)
