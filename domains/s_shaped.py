"""Optimised relaxations of S-shaped activations (Sigmoid, Tanh): free tangent points.

CROWN bounds a Sigmoid/Tanh neuron by fixed tangent lines (`relaxations._s_shaped`). As
alpha-CROWN does for general activations, the tangent point of every lower and upper line
becomes a parameter, one per output row and neuron, optimised together with the ReLU slopes
by `crown.optimise_alpha`. `relaxations.tangent_ranges` gives, per neuron, the interval in
which *every* tangent point yields a valid line, and `relaxations.tangent_lines` clamps into
it, so a bound is sound for any parameter value, whether or not the optimiser converged.
"""
from __future__ import annotations

import torch

from verikit import ir

from .relaxations import tangent_lines, tangent_ranges


class TangentParameters:
    """Free tangent points (lower and upper) for the S-shaped nodes before `start`."""

    def __init__(self, engine, start: str, rows: int):
        self.engine = engine
        self.nodes, self.ranges, self.points = [], {}, {}
        for node in engine.graph.nodes[: engine.position[start]]:
            if not node.op.is_activation:
                continue
            box = engine.store[node.inputs[0]]
            rng = tangent_ranges(node.op, box.lo.detach(), box.hi.detach())
            if rng is None or not bool((rng.lo_mask | rng.up_mask).any()):
                continue
            # positions in [0, 1] along each range (learning rates then mean the same for every
            # neuron); start in the middle, where CROWN's own tangent usually is
            shape = (engine.batch, rows) + tuple(box.lo.shape[1:])
            self.points[node.name] = (torch.full(shape, 0.5, dtype=box.lo.dtype, device=box.lo.device).requires_grad_(True),
                                      torch.full(shape, 0.5, dtype=box.lo.dtype, device=box.lo.device).requires_grad_(True))
            self.ranges[node.name] = rng
            self.nodes.append(node)

    @property
    def params(self) -> list:
        return [t for pair in self.points.values() for t in pair]

    def lines(self) -> dict:
        """node -> per-row LinearRelaxation for `LinearBoundEngine.lower_bound(alphas=...)`."""
        out = {}
        for node in self.nodes:
            box = self.engine.store[node.inputs[0]]
            p_lo, p_up = self.points[node.name]
            rng = self.ranges[node.name]
            t_lo = rng.lo_min.unsqueeze(1) + p_lo * (rng.lo_max - rng.lo_min).unsqueeze(1)
            t_up = rng.up_min.unsqueeze(1) + p_up * (rng.up_max - rng.up_min).unsqueeze(1)
            out[node.name] = tangent_lines(node.op, box.lo.detach(), box.hi.detach(), t_lo, t_up,
                                           self.engine.relaxation(node), rng)
        return out

    def clamp_(self) -> None:
        """Back into [0, 1] after an optimiser step (tangent_lines clamps the points as well)."""
        with torch.no_grad():
            for pair in self.points.values():
                for p in pair:
                    p.clamp_(0.0, 1.0)


def has_s_shaped(graph: ir.Graph) -> bool:
    return any(isinstance(n.op, (ir.Sigmoid, ir.Tanh)) for n in graph.nodes)
