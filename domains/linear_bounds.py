"""The backward linear-bound engine shared by DeepPoly and CROWN.

A linear bound on node t is a coefficient tensor Lambda of shape (B, m, *shape_t): row i of
sample b asks for min over the input box of  <Lambda[b, i], value_t(x_b)>.  The engine walks
the graph backwards from t (reverse topological order), replacing each node's coefficients by
coefficients on that node's inputs plus a constant:

- affine ops: the transposed linear map is the op's vector-Jacobian product (torch.func.vjp
  at 0, vmapped over the m rows) and the constant is <Lambda, f(0)>. No op needs a hand-written
  rule; Linear and BatchNorm have short fast paths (same maths, fewer kernel launches, and
  BatchNorm must not record batch statistics of a zero input).
- activations: lines from the shared relaxation table (`relaxations.py`); positive
  coefficients take the lower line, negative ones the upper line, so the result stays a
  lower bound.
- MaxPool: the window relaxation (`maxpool_relaxation`), scattered back with scatter_add.

Coefficients meeting at a node (residual Add, Concat, a node used twice) are summed before the
node is processed, so DAGs need nothing special. At the input, the bound is concretised
against the input box. Upper bounds are lower bounds of the negated rows.

Intermediate bounds (`refine_intermediate`) are computed for every node that feeds a
non-linear op, in topological order, in chunks of rows (memory is rows x largest layer), only
for neurons whose relaxation can still change (unstable ReLUs), and intersected with the
bound store.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from verikit import ir
from verikit.bounds import Box, BoundStore
from verikit.errors import VerikitError

from .box import propagate_box
from .conv_windows import Window, accumulate, conv_form, dense_backward, window_backward
from .forward_bounds import ForwardBounds
from .relaxations import LinearRelaxation, MaxPoolRelaxation, maxpool_relaxation, relaxation_for
from .relu_chain import ReluChains
from .row_refinement import RowRefinement
from .softmax_lines import softmax_backward


def _flat_dot(lam: Tensor, t: Tensor) -> Tensor:
    """sum over the node dimensions of lam (B, m, *s) * t (B, *s) -> (B, m), as a batched matmul."""
    B = lam.shape[0]
    t = t.expand((B,) + tuple(lam.shape[2:]))
    return torch.bmm(lam.reshape(B, lam.shape[1], -1), t.reshape(B, -1, 1)).squeeze(-1)


def _centre_and_cover(box: Box) -> tuple[Tensor, Tensor]:
    """A centre c and a radius r with |x - c| <= r for every x of the box, despite rounding."""
    c = box.center
    r = torch.maximum(box.hi - c, c - box.lo)
    return c, torch.nextafter(r, torch.full_like(r, math.inf))


class LinearBoundEngine(RowRefinement):
    """Back-substitution over one graph, input box and bound store (the store must already
    hold bounds for every node, e.g. from `propagate_box`)."""

    # Class switches, off only to compare against the plain rules (tests, benchmarks/bench_engine_ab.py):
    # intermediate rows read by ReLUs only get upper bounds first, lower ones where hi > 0
    # (row_refinement.py), from this batch size on (at batch 1 the second pass costs more than
    # the few rows it skips: 8-16% slower on the nets of bench_vs_lirpa.py)
    upper_first = True
    upper_first_min_batch = 2
    # chains ending at the input minimise over the input box themselves (relu_chain.py)
    fold_input = True

    def __init__(self, graph: ir.Graph, store: BoundStore, ctx: Optional[ir.EvalContext] = None,
                 variant: str = "crown", max_rows_per_chunk: int = 4096, spatial_windows: bool = True,
                 errors: Optional[dict] = None, fast_paths: bool = True, per_sample_rows: bool = False):
        if max_rows_per_chunk < 2:
            raise VerikitError(f"max_rows_per_chunk must be at least 2, got {max_rows_per_chunk}")
        self.graph, self.store, self.ctx, self.variant = graph, store, ctx, variant
        self.differentiable = False  # True: cached affine maps stay in autograd (training domains)
        self.max_rows = int(max_rows_per_chunk)
        self.windows = bool(spatial_windows)
        self.position = {n.name: i for i, n in enumerate(graph.nodes)}
        inp = store[graph.input_name]
        self.batch = inp.lo.shape[0]
        self.device, self.dtype = inp.lo.device, inp.lo.dtype
        self._affine: dict[str, tuple] = {}
        self._relax: dict[str, object] = {}
        self._lower_bias: dict[str, tuple] = {}
        self._convs: dict[str, object] = {}
        # node -> radius (B, *shape) by which the node's value may differ from its op's exact
        # result (float-sound mode): it loosens every bound through that node by <|lam|, radius>
        self.errors = errors or {}
        # live-neuron chains (relu_chain.py), the reshape transpose, the partial interval
        # refresh: same bounds to float rounding; off only to compare against the general rules
        self.fast_paths = bool(fast_paths)
        # each sample's own unstable rows (linear_rows.py): batch-independent bounds, fewer rows
        self.per_sample_rows = bool(per_sample_rows)
        self.chains = ReluChains(self) if self.fast_paths else None
        # forward-mode pre-screen of intermediate neurons (forward_bounds.py): None where it pays,
        # True wherever it can run (tests), False never
        self.forward_prescreen: Optional[bool] = None if self.fast_paths else False
        self.forward: Optional[ForwardBounds] = None
        self.rows_bounded = 0  # statistics, reported by the domains
        self.nodes_refined = 0
        # branch and bound (alpha_beta.py): node names whose incoming coefficients lower_bound
        # keeps in `captured` (dense, (B, m, *shape); the graph input name for the minimiser)
        self.capture: set = set()
        self.captured: dict = {}

    # ------------------------------------------------------------ relaxations
    def relaxation(self, node: ir.Node):
        """The relaxation of a non-linear node from the (final) bounds of its input."""
        if node.name not in self._relax:
            box = self.store[node.inputs[0]]
            if isinstance(node.op, ir.MaxPool2d):
                self._relax[node.name] = maxpool_relaxation(node.op, box.lo, box.hi, self.graph.shapes[node.name][1:])
            else:
                self._relax[node.name] = relaxation_for(node.op, box.lo, box.hi, self.variant)
        return self._relax[node.name]

    def alpha_nodes(self, start: str) -> list[ir.Node]:
        """Activation nodes before `start` whose lower slope is free (unstable ReLU-like)."""
        out = []
        for node in self.graph.nodes[: self.position[start]]:
            if node.op.is_activation:
                rel = self.relaxation(node)
                if rel.alpha_mask is not None and bool(rel.alpha_mask.any()):
                    out.append(node)
        return out

    # ------------------------------------------------------------ backward rules
    def _affine_backward(self, node: ir.Node, lam: Tensor):
        op = node.op
        if isinstance(op, ir.Linear):
            if node.name not in self._affine:  # a folded spec recomputes C W on every access
                # kept outside autograd, whichever pass reaches it first (unless a differentiable
                # domain such as crown-ibp needs d bound / d weights through a folded spec)
                with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
                    self._affine[node.name] = (op.weight, op.bias)
            w, b = self._affine[node.name]
            if w.dim() == 3:  # per-sample weights (a folded per-sample spec)
                grads = torch.einsum("bmo,boi->bmi", lam, w)
                const = torch.einsum("bmo,bo->bm", lam, b.expand(lam.shape[0], -1)) if b is not None else None
            else:
                grads = lam @ w
                const = (lam @ b.unsqueeze(-1)).flatten(2).sum(-1) if b is not None else None
            return (grads,), const
        if isinstance(op, ir.BatchNorm):
            if node.name not in self._affine:
                try:
                    scale, shift = op.scale_shift(lam[:, 0], self.ctx, record=False)
                except RuntimeError as e:
                    raise VerikitError(str(e)) from None
                self._affine[node.name] = (scale.unsqueeze(1), shift)
            scale, shift = self._affine[node.name]
            return (lam * scale,), _flat_dot(lam, shift.expand_as(lam[:, 0]))
        if self.fast_paths and isinstance(op, ir.Reshape):  # the transpose of a reshape is a reshape
            return (lam.reshape(lam.shape[:2] + tuple(self.graph.shapes[node.inputs[0]])),), None
        if self.fast_paths and lam.dim() == 5 and self._conv_form(node) is not None:
            out = dense_backward(self._conv_form(node), lam, self.graph.shapes[node.inputs[0]])
            if out is not None:  # a transposed convolution over all rows at once, no vmap
                return (out[0],), out[1]
        if node.name not in self._affine:
            zeros = [torch.zeros((self.batch,) + tuple(self.graph.shapes[i]), device=self.device, dtype=self.dtype)
                     for i in node.inputs]
            bias, vjp_fn = torch.func.vjp(lambda *xs: op.forward(*xs, ctx=self.ctx), *zeros)
            transpose = torch.func.vmap(vjp_fn, in_dims=1, out_dims=1)
            self._affine[node.name] = (bias, transpose)
        bias, transpose = self._affine[node.name]
        return transpose(lam), _flat_dot(lam, bias)

    def _activation_backward(self, node: ir.Node, lam: Tensor, alpha: Optional[Tensor],
                             split_term: Optional[Tensor] = None):
        rel: LinearRelaxation = self.relaxation(node)
        neg = lam.clamp(max=0)
        pos = lam - neg  # exactly clamp(min=0), one pass cheaper
        if isinstance(alpha, LinearRelaxation):  # per-row lines (B, m, *shape): optimised tangents
            grad = pos * alpha.lower_slope + neg * alpha.upper_slope
            const = (pos * alpha.lower_bias + neg * alpha.upper_bias).flatten(2).sum(-1)
        else:
            lo_s = rel.lower_slope.unsqueeze(1)
            if alpha is not None:
                lo_s = torch.where(rel.alpha_mask.unsqueeze(1), alpha, lo_s)
            grad = pos * lo_s + neg * rel.upper_slope.unsqueeze(1)
            const = _flat_dot(neg, rel.upper_bias)
            if self._has_lower_bias(node):  # zero for ReLU: a product that adds exact zeros
                const = const + _flat_dot(pos, rel.lower_bias)
        if split_term is not None:  # beta-CROWN: -beta * sign on the split pre-activations
            grad = grad + split_term
        return (grad,), const

    def _product_backward(self, node: ir.Node, lam: Tensor):
        """x y = cy x + cx y - cx cy + (x - cx)(y - cy), and |(x - cx)(y - cy)| <= rx ry on the
        inputs' boxes: the same plane bounds from below and above (the mean of McCormick's two
        planes on each side), only the constant -+ rx ry differs."""
        (cx, rx), (cy, ry) = (_centre_and_cover(self.store[i]) for i in node.inputs)
        shapes = [lam.shape[:2] + tuple(self.graph.shapes[i]) for i in node.inputs]
        gx = (lam * cy.unsqueeze(1)).sum_to_size(shapes[0])
        gy = (lam * cx.unsqueeze(1)).sum_to_size(shapes[1])
        out = (lam.shape[0],) + tuple(self.graph.shapes[node.name])
        base = (-cx * cy).expand(out)
        slack = (rx * ry * (1 + 2.0 ** -20)).expand(out)  # the product's rounding, with room
        return (gx, gy), _flat_dot(lam, base) - _flat_dot(lam.abs(), slack)

    def _has_lower_bias(self, node: ir.Node) -> bool:
        rel = self.relaxation(node)
        if self._lower_bias.get(node.name, (None,))[0] is not rel:  # callers may replace relaxations
            self._lower_bias[node.name] = (rel, bool((rel.lower_bias != 0).any()))
        return self._lower_bias[node.name][1]

    def _conv_form(self, node: ir.Node):
        """The op as a convolution (conv_windows.py): Conv2d always, 2x2-style AvgPool2d on the
        fast paths."""
        if node.name not in self._convs:
            conv = None
            if isinstance(node.op, ir.Conv2d) or self.fast_paths:
                conv = conv_form(node.op)
            self._convs[node.name] = conv
        return self._convs[node.name]

    def _maxpool_backward(self, node: ir.Node, lam: Tensor):
        rel: MaxPoolRelaxation = self.relaxation(node)
        B, m, C = lam.shape[:3]
        lam = lam.reshape(B, m, C, -1)  # (B, m, C, L)
        pos, neg = lam.clamp(min=0), lam.clamp(max=0)
        exact = rel.exact.unsqueeze(1)
        coef = pos + torch.where(exact, neg, torch.zeros_like(neg))
        const = torch.where(exact, torch.zeros_like(neg), neg * rel.upper_const.unsqueeze(1)).flatten(2).sum(-1)
        Hp, Wp = rel.padded_hw
        padded = torch.zeros(B, m, C, Hp * Wp, device=lam.device, dtype=lam.dtype)
        padded = padded.scatter_add(3, rel.index.unsqueeze(1).expand(B, m, C, -1), coef)
        grad = torch.nn.functional.pad(padded.reshape(B, m, C, Hp, Wp), tuple(-p for p in rel.pads))
        return (grad,), const

    # ------------------------------------------------------------ windowed rules
    def _window_backward(self, node: ir.Node, win: Window, alphas: Optional[dict]):
        """Rules that keep coefficients in a spatial window, or None when the op needs the
        dense form (everything except Conv2d, AvgPool2d, BatchNorm and element-wise activations)."""
        op = node.op
        B, m = win.lam.shape[:2]
        conv = self._conv_form(node)
        if conv is not None:
            g, const = window_backward(conv, win, self.graph.shapes[node.inputs[0]])
            return (g,), const
        if isinstance(op, ir.BatchNorm):
            (g,), _ = self._affine_backward(node, win.lam)  # per-channel scale: same on any window
            _, shift = self._affine[node.name]
            return (Window(g, win.top, win.left),), win.lam.sum((-2, -1)) @ shift.reshape(-1)
        if op.is_activation and (alphas is None or node.name not in alphas) and node.name not in self.capture:
            rel: LinearRelaxation = self.relaxation(node)
            neg = win.lam.clamp(max=0)
            pos = win.lam - neg  # exactly clamp(min=0), one pass cheaper
            cut = lambda t: win.region(t).unsqueeze(1)
            grad = pos * cut(rel.lower_slope) + neg * cut(rel.upper_slope)
            const = _flat_dot(neg, win.region(rel.upper_bias))
            if self._has_lower_bias(node):
                const = const + _flat_dot(pos, win.region(rel.lower_bias))
            return (Window(grad, win.top, win.left),), const
        return None

    # ------------------------------------------------------------ back-substitution
    def lower_bound(self, start: str, lam, alphas: Optional[dict] = None, splits: Optional[dict] = None,
                    stop: Optional[str] = None) -> Tensor:
        """min over the input box of <lam[b, i], value_start(x)> for every sample b and row i:
        a (B, m) tensor. `lam` is a (B, m, *shape) tensor or a `Window`. `alphas` maps
        activation node -> lower slopes (B, m, *shape) that replace the relaxation's free
        slopes (alpha-CROWN), or -> a LinearRelaxation of per-row lines (B, m, *shape) that
        replaces the node's lines (S-shaped tangent points, `s_shaped.py`). `splits` maps
        activation node -> a term (B, m, *shape) added to the coefficients of its input
        (beta-CROWN's -beta * sign for split ReLUs; see alpha_beta.py): valid on the sub-domain
        where every sign * input >= 0."""
        splits = splits or {}
        graph = self.graph
        first = lam.lam if isinstance(lam, Window) else lam
        const = torch.zeros(first.shape[:2], device=first.device, dtype=first.dtype)
        pending = {start: lam}
        nodes = [] if start == graph.input_name else graph.nodes[: self.position[start] + 1]
        coef_e = None  # coefficients on the forward pre-screen's e (B, m, K), from a `stop` node
        for node in reversed(nodes):
            lam_n = pending.pop(node.name, None)
            if lam_n is None:
                continue
            if node.name == stop:  # the node's forward-mode functions take over (forward_bounds.py)
                c, coef_e = self.forward.contract(stop, lam_n)
                const = const + c
                continue
            if node.name in self.errors:
                err = self.errors[node.name]
                const = const - (_flat_dot(lam_n.lam.abs(), lam_n.region(err)) if isinstance(lam_n, Window)
                                 else _flat_dot(lam_n.abs(), err))
            steps = self._chain_steps(node, lam_n, splits, alphas, stop)
            if steps is not None:  # Linear/ReLU chain on live neurons only (relu_chain.py)
                bottom = steps[-1].inputs[0]
                lam_b, c = self.chains.run(steps, lam_n, alphas, self.errors, self._foldable_input(bottom, stop))
                const = const + c
                if lam_b is not None:  # None: the chain has minimised over the input box itself
                    pending[bottom] = accumulate(pending.get(bottom), lam_b, self.graph.shapes[bottom])
                continue
            out = None
            if isinstance(lam_n, Window):
                out = None if node.name in splits else self._window_backward(node, lam_n, alphas)
                if out is None:
                    lam_n = lam_n.dense(self.graph.shapes[node.name])
            if node.name in self.capture:
                self.captured[node.name] = lam_n
            if out is not None:
                grads, c = out
            elif node.op.is_affine:
                grads, c = self._affine_backward(node, lam_n)
            elif node.op.is_activation:
                grads, c = self._activation_backward(node, lam_n, None if alphas is None else alphas.get(node.name),
                                                     splits.get(node.name))
            elif isinstance(node.op, ir.MaxPool2d):
                grads, c = self._maxpool_backward(node, lam_n)
            elif isinstance(node.op, ir.Mul):
                grads, c = self._product_backward(node, lam_n)
            elif isinstance(node.op, ir.Softmax):  # exp / sum decomposed, lines per piece
                grads, c = softmax_backward(self, node, lam_n)
            else:
                raise VerikitError(f"back-substitution has no rule for {node.op.op_type} (node {node.name})")
            if c is not None:
                const = const + c
            for name, g in zip(node.inputs, grads):
                pending[name] = accumulate(pending.get(name), g, self.graph.shapes[name])
        lam_x = pending.pop(graph.input_name, None)
        if lam_x is not None:
            box = self.store[graph.input_name]
            center, radius = box.center, box.radius
            if graph.input_name in self.capture:
                self.captured[graph.input_name] = lam_x.dense(tuple(center.shape[1:])) if isinstance(lam_x, Window) else lam_x
            if isinstance(lam_x, Window) and coef_e is not None:
                lam_x = lam_x.dense(tuple(center.shape[1:]))
            if isinstance(lam_x, Window):
                center, radius, lam_x = lam_x.region(center), lam_x.region(radius), lam_x.lam
            if coef_e is not None:  # x = c + r e: lam_x's part joins the stop node's coefficients
                B, m = lam_x.shape[:2]
                coef_e = coef_e + lam_x.reshape(B, m, -1) * radius.reshape(B, 1, -1)
                return const + _flat_dot(lam_x, center) - coef_e.abs().sum(-1)
            const = const + _flat_dot(lam_x, center) - _flat_dot(lam_x.abs(), radius)
        if coef_e is not None:
            const = const - coef_e.abs().sum(-1)
        return const

    def _foldable_input(self, bottom: str, stop: Optional[str]):
        """The input box, when a chain ending at `bottom` may minimise over it itself: `bottom` is
        the graph input or its flattening (Reshapes only), each read by the next alone and none
        captured; no forward hand-over, no rounding-error radii (whose own float64 accounting
        follows the general formula), and not where a gradient is taken through the weights
        (training) or the box (input-split search): the fold's products are cached outside
        autograd."""
        if stop is not None or self.errors or not self.fold_input or self.differentiable:
            return None
        name = bottom
        while True:
            if name in self.capture or len(self.chains.users[name]) != 1:
                return None
            if name == self.graph.input_name:
                box = self.store[name]
                return None if box.lo.requires_grad or box.hi.requires_grad else box
            node = self.graph.node(name)
            if type(node.op) is not ir.Reshape:
                return None
            name = node.inputs[0]

    def _chain_steps(self, node: ir.Node, lam, splits: dict, alphas: Optional[dict],
                     stop: Optional[str] = None) -> Optional[list]:
        """The Linear/ReLU chain starting at `node`, when the fast path may take it: not where
        a split term or a captured coefficient needs a node's full coefficients."""
        if self.chains is None or isinstance(lam, Window):
            return None
        steps = self.chains.steps(node)
        if steps is None or any(n.name in splits or n.name in self.capture or n.name == stop for n in steps):
            return None
        if alphas and any(not isinstance(alphas.get(n.name, lam), Tensor) for n in steps):
            return None  # per-row lines (s_shaped.py) take the general rule
        return steps


def output_bounds(engine: LinearBoundEngine, upper: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Back-substituted bounds of every (flattened) output of the engine's graph: (B, m) each."""
    name = engine.graph.output
    n = math.prod(engine.graph.shapes[name])
    rows = torch.arange(n, device=engine.device)
    if upper:
        return engine.bound_rows(name, rows)
    eye = torch.eye(n, device=engine.device, dtype=engine.dtype).expand(engine.batch, n, n)
    lam = eye.reshape((engine.batch, n) + tuple(engine.graph.shapes[name]))
    return engine.lower_bound(name, lam), None


def prescreen_setting(value) -> Optional[bool]:
    """The domains' `forward_prescreen` option: "auto" (where it pays) -> None, "on"/True ->
    True (wherever it can run), "off"/False -> False."""
    table = {"auto": None, "on": True, "off": False, True: True, False: False}
    if isinstance(value, (str, bool)) and value in table:
        return table[value]
    raise VerikitError(f"forward_prescreen must be auto, on or off, got {value!r}")


def prepare(graph: ir.Graph, inputs: Box, store: Optional[BoundStore], ctx, variant: str,
            max_rows_per_chunk: int, spatial_windows: bool = True, errors: Optional[dict] = None,
            fast_paths: bool = True, per_sample_rows: bool = False,
            forward_prescreen: Optional[bool] = None) -> LinearBoundEngine:
    """Interval bounds first (reusing and tightening `store`), then back-substituted bounds for
    every pre-activation node: the state both DeepPoly and CROWN bound the output from.
    `forward_prescreen`: the forward-mode pre-screen (forward_bounds.py) where it pays (None),
    wherever it can run (True), never (False). `errors`: per-node error radii of the float-sound mode (see LinearBoundEngine)."""
    store = propagate_box(graph, inputs, store, ctx, widen=errors)
    engine = LinearBoundEngine(graph, store, ctx, variant, max_rows_per_chunk, spatial_windows, errors, fast_paths,
                               per_sample_rows)
    if fast_paths:
        engine.forward_prescreen = forward_prescreen
    engine.refine_intermediate()
    return engine


def finish(engine: LinearBoundEngine, lower: Tensor, upper: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Intersect output bounds with the store (never looser than what earlier domains found)."""
    name = engine.graph.output
    stored = engine.store[name]
    B = lower.shape[0]
    if upper is None:
        upper = stored.hi.reshape(B, -1)
    box = engine.store.update(name, Box(lower.reshape(stored.lo.shape), upper.reshape(stored.hi.shape)))
    return box.lo.reshape(B, -1), box.hi.reshape(B, -1)
