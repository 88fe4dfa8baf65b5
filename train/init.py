"""IBP initialisation (Shi et al. 2021): keeps the width of interval bounds roughly constant
through the layers at initialisation, so bounds do not explode before training starts."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


@torch.no_grad()
def ibp_init(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Weights ~ N(0, (sqrt(2*pi) / fan_in)^2), biases 0, for every Linear and Conv2d that is
    not a frozen (normalisation) layer."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not getattr(m, "verikit_frozen", False):
            fan_in = m.weight[0].numel()
            std = math.sqrt(2 * math.pi) / fan_in
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
            if m.bias is not None:
                m.bias.zero_()
