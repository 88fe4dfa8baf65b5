"""A user-defined bound domain in ~30 lines: Box with input splitting.

Splits the input box into `pieces` slabs along its widest input dimension, runs the built-in
Box propagation on each slab, and keeps, per spec row, the worst bound over the slabs. Sound
(the slabs cover the box) and never looser than plain Box.

    python examples/split_box_domain.py                         # use it from Python
    PYTHONPATH=examples VERIKIT_PLUGINS=split_box_domain verikit domains   # ...and the CLI
    PYTHONPATH=examples VERIKIT_PLUGINS=split_box_domain verikit certify mnist-sabr-0.1 --eps 0.1 \
        --domains splitbox,crown --domain-option splitbox.pieces=8           # with an option

The contract (README, "Adding your own domain"): `inputs` is a Box of shape (B, *input_shape);
return a DomainResult whose `lower` (and `upper`, or None) has shape (B, rows of the spec), or
(B, outputs) when `spec` is None; options arrive in `self.config`; `store` (the previous
domains' bounds, or None) is used and handed on; `ctx` is passed through to propagation.
"""
import torch

from verikit.bounds import Box
from verikit.domains import Domain, DomainResult, get_domain, register_domain


@register_domain
class SplitBox(Domain):
    name = "splitbox"
    description = "box propagation on input slabs along the widest dimension (example plug-in)"
    complete = False
    differentiable = True
    options = {"pieces": 4}

    def bound(self, graph, inputs, spec=None, store=None, ctx=None):
        box = get_domain("box")
        flat_lo, flat_hi = inputs.lo.flatten(1), inputs.hi.flatten(1)
        dim = (flat_hi - flat_lo).argmax(dim=1)  # widest input dimension per sample
        rows = torch.arange(flat_lo.shape[0])
        lower = upper = None
        k = self.config["pieces"]
        for i in range(k):
            lo, hi = flat_lo.clone(), flat_hi.clone()
            width = flat_hi[rows, dim] - flat_lo[rows, dim]
            lo[rows, dim] = flat_lo[rows, dim] + width * i / k
            hi[rows, dim] = flat_lo[rows, dim] + width * (i + 1) / k
            piece = box.bound(graph, Box(lo.view_as(inputs.lo), hi.view_as(inputs.hi)), spec, None, ctx)
            lower = piece.lower if lower is None else torch.minimum(lower, piece.lower)
            upper = piece.upper if upper is None else torch.maximum(upper, piece.upper)
        whole = box.bound(graph, inputs, spec, store, ctx)  # fills the store with sound whole-box bounds
        return DomainResult(torch.maximum(lower, whole.lower), torch.minimum(upper, whole.upper), whole.store)


if __name__ == "__main__":
    import verikit

    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    graph = verikit.from_torch(net, (2,))
    x = torch.rand(4, 2)
    spec = verikit.Spec.robustness(net(x).argmax(1), 3)
    ball = verikit.Box.linf_ball(x, 0.05)
    for name in ("box", "splitbox"):
        res = verikit.get_domain(name).bound(graph, ball, spec)
        print(f"{name:9s} worst-margin lower bounds: {spec.margin(res.lower).tolist()}")
