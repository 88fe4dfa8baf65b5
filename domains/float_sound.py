"""The float-sound mode: proofs that also hold for the network as executed in float32.

In the normal mode a domain bounds the network in real arithmetic (on its float32 weights). In
the float-sound mode (domain option `sound=True`, `verikit certify --sound`) the abstraction
also contains every value a float32 runtime can compute:

- the graph, the input box and the spec are copied to float64 (exactly: every float32 is a
  float64), and the spec is the property as written (its float64 coefficients);
- every node's interval is widened by its float32 execution error, bounded from the
  magnitudes of its (already widened) inputs: gamma_n (|W| |x| + |b|) for a reduction of n
  terms with u = 2^-24, the ulp error of an activation (`verikit.rounding`);
- verikit's own float64 arithmetic is covered too: interval ends are moved outward by a
  bound on the float64 rounding of the box pass, and the back-substitution engine is given a
  per-node radius (float32 execution error + a generous bound on its own float64 rounding)
  that it subtracts as <|lam_n|, radius_n> whenever a linear bound passes node n.

What the runtime is assumed to do (the model behind the error bounds): each ONNX node is
evaluated in float32 with round-to-nearest; sums and dot products in any order, with or
without FMA, blocked or not; convolutions as sums of products (im2col/GEMM or direct, not
Winograd or FFT); BatchNorm in any algebraic form of (x - mean) / sqrt(var + eps) * scale + B,
also folded into the preceding convolution; sigmoid/tanh accurate to 16 units of 2^-24 of
their magnitude plus 2^-24 absolute. Inputs are float32 values inside the (float32) box.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from verikit import ir
from verikit.bounds import Box, BoundStore
from verikit.rounding import U32, U64, local_error, magnitude, propagate_errors
from verikit.spec import Spec, fold_spec

from .box import propagate_box

_REL = 1.0 + 2.0 ** -50  # covers the float64 rounding of the radii themselves
_PYTHON_FLOATS = {ir.Pad: ("value",), ir.LeakyReLU: ("alpha",), ir.BatchNorm: ("eps",)}


def float64_copy(graph: ir.Graph) -> ir.Graph:
    """The same graph with every tensor in float64 (exact: a float32 is a float64). Constants
    held as Python floats (a Pad value, a LeakyReLU slope, BatchNorm's epsilon) are the float32
    numbers the runtime uses, not the float64 ones they were written as."""
    if graph.dtype == torch.float64:
        return graph
    g64 = graph.to(dtype=torch.float64)
    for node in g64.nodes:
        for name in _PYTHON_FLOATS.get(type(node.op), ()):
            setattr(node.op, name, float(np.float32(getattr(node.op, name))))
    return g64


def sound_setup(graph: ir.Graph, inputs: Box, spec: Optional[Spec], store: Optional[BoundStore], ctx):
    """(folded float64 graph, float64 inputs, widened bound store, per-node error radii) for
    the float-sound mode. The store holds intervals that contain every float32 execution; the
    radii are what `LinearBoundEngine(errors=...)` and `propagate_box(widen=...)` need."""
    g64 = float64_copy(graph)
    folded = fold_spec(g64, None if spec is None else spec.to(dtype=torch.float64))
    x64 = inputs.to(dtype=torch.float64)
    # bounds left by a domain of the normal mode bound real arithmetic only: not reusable here
    start = store if store is not None and getattr(store, "float_sound", False) else BoundStore()
    start.float_sound = True
    execution: dict = {}

    def widen(node, ins, out):
        r32 = local_error(folded, node, ins, U32, executed=True)
        r64 = local_error(folded, node, ins, U64, executed=False)  # verikit's float64 box pass
        r = 8 * U64 * magnitude(out)  # the outward move itself is rounded
        if r64 is not None:
            r = r + 2 * r64 * _REL
        if r32 is not None:
            execution[node.name] = r32
            r = r + r32 * _REL
        return r

    with torch.no_grad():
        store = propagate_box(folded, x64, start, ctx, widen=widen)
        # verikit's own float64 back-substitution: a generous multiple of the float64 error
        # bound of the whole evaluation up to each node (about 1e-13 relative)
        own = propagate_errors(folded, lambda name: store[name], U64, executed=False)
        factor = 4 * (len(folded.nodes) + 1)
        errors = {}
        for node in folded.nodes:
            r = 8 * U64 * magnitude(store[node.name])
            if own[node.name] is not None:
                r = r + factor * own[node.name]
            if node.name in execution:
                r = r + execution[node.name] * _REL
            errors[node.name] = r
    return folded, x64, store, errors
