"""Floating point operations of one call: the matrix products and convolutions torch runs,
counted with the formulas of torch.utils.flop_counter (the op-by-op count of FlopCounterMode,
without its module hooks, which refuse `torch.autograd.grad` as PGD attacks use it)."""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def gflop(fn, *args, **kwargs) -> float:
    """GFLOP of the matrix products and convolutions of fn(*args, **kwargs) (its result dropped)."""
    with _Counter() as counter:
        fn(*args, **kwargs)
    return counter.flops / 1e9
