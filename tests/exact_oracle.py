"""Exact oracle for small ReLU networks: enumerate activation patterns, one LP per pattern.

For a network that is a chain of affine ops and ReLUs, fixing every ReLU's phase makes the
network affine on a polyhedron; minimising c·y over each (input box ∩ phase polyhedron) with
scipy's LP solver and taking the smallest value gives the exact minimum. Only for tiny nets
(2^k patterns for k ReLUs; stable ReLUs are not enumerated).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linprog

from verikit import ir
from verikit.bounds import Box
from verikit.domains.box import propagate_box


def affine_layers(graph: ir.Graph):
    """The network as [(W, b) or 'relu'] with dense float64 matrices (affine ops composed)."""
    n_in = int(np.prod(graph.input_shape))
    layers, W, b = [], np.eye(n_in), np.zeros(n_in)
    shape = graph.input_shape
    prev = graph.input_name
    for node in graph.nodes:
        assert node.inputs == (prev,), "oracle handles chains only"
        if isinstance(node.op, ir.ReLU):
            layers.append((W, b))
            layers.append("relu")
            W, b = np.eye(W.shape[0]), np.zeros(W.shape[0])
        else:
            assert node.op.is_affine, f"oracle cannot handle {node.op.op_type}"
            with torch.no_grad():
                x = torch.zeros((1,) + tuple(shape), dtype=torch.float64)
                op = node.op.to(dtype=torch.float64)
                f0 = op.forward(x).reshape(-1).numpy()
                eye = torch.eye(int(np.prod(shape)), dtype=torch.float64).reshape((-1,) + tuple(shape))
                J = (op.forward(eye).reshape(eye.shape[0], -1).numpy() - f0).T  # (out, in)
            W, b = J @ W, J @ b + f0
            shape = graph.shapes[node.name]
        prev = node.name
    layers.append((W, b))
    return layers


def exact_min(graph: ir.Graph, lo: np.ndarray, hi: np.ndarray, c: np.ndarray, max_unstable: int = 24) -> float:
    """min over x in [lo, hi] of c · f(x) (f flattened), exactly."""
    with torch.no_grad():
        return _exact_min(graph.to(dtype=torch.float64), lo, hi, c, max_unstable)


def _exact_min(graph, lo, hi, c, max_unstable):
    layers = affine_layers(graph)
    box = propagate_box(graph, Box(torch.tensor(lo[None], dtype=torch.float64).reshape((1,) + tuple(graph.input_shape)),
                                   torch.tensor(hi[None], dtype=torch.float64).reshape((1,) + tuple(graph.input_shape))))
    relu_nodes = [n.name for n in graph.nodes if isinstance(n.op, ir.ReLU)]
    pre = [box[graph.node(r).inputs[0]] for r in relu_nodes]
    phases = []
    for p in pre:
        l, u = p.lo.reshape(-1).numpy(), p.hi.reshape(-1).numpy()
        phases.append([(1,) if li >= 0 else (0,) if ui <= 0 else (0, 1) for li, ui in zip(l, u)])
    unstable = sum(len(ph) == 2 for layer in phases for ph in layer)
    assert unstable <= max_unstable, f"{unstable} unstable ReLUs: too many to enumerate"
    bounds = list(zip(lo, hi))
    relu_layers = [k for k, layer in enumerate(layers) if layer == "relu"]

    def feasible(A_ub, b_ub):
        if not A_ub:
            return True
        res = linprog(np.zeros(len(lo)), A_ub=np.array(A_ub), b_ub=np.array(b_ub), bounds=bounds, method="highs")
        return res.status == 0

    best = [np.inf]

    def descend(li, W, b, A_ub, b_ub, relu_idx):
        """Apply layers from index li on; W, b map the input to the current value."""
        while li < len(layers) and layers[li] != "relu":
            Wl, bl = layers[li]
            W, b = Wl @ W, Wl @ b + bl
            li += 1
        if li == len(layers):
            res = linprog(c @ W, A_ub=np.array(A_ub) if A_ub else None, b_ub=np.array(b_ub) if b_ub else None,
                          bounds=bounds, method="highs")
            if res.status == 0:
                best[0] = min(best[0], res.fun + c @ b)
            return
        choose(li, W, b, A_ub, b_ub, relu_idx, 0, np.zeros(W.shape[0]))

    def choose(li, W, b, A_ub, b_ub, relu_idx, j, act):
        """Fix the phase of neuron j of this ReLU layer (branching on unstable ones, pruning infeasible)."""
        if j == W.shape[0]:
            descend(li + 1, W * act[:, None], b * act, A_ub, b_ub, relu_idx + 1)
            return
        for phase in phases[relu_idx][j]:
            sign = 1.0 if phase else -1.0  # active: z >= 0  <=>  -z <= 0
            A2, b2 = A_ub + [-sign * W[j]], b_ub + [sign * b[j]]
            if len(phases[relu_idx][j]) == 2 and not feasible(A2, b2):
                continue
            act2 = act.copy()
            act2[j] = phase
            choose(li, W, b, A2, b2, relu_idx, j + 1, act2)

    descend(0, np.eye(len(lo)), np.zeros(len(lo)), [], [], 0)
    return float(best[0])
