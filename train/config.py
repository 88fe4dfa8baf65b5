"""The training configuration: one dataclass, with the paper's defaults filled in per dataset/ε."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from verikit.errors import VerikitError

# SABR's λ per (dataset, ε) from the paper (Müller et al. 2023, Table 6)
PAPER_LAMBDA = {("mnist", 0.1): 0.4, ("mnist", 0.3): 0.6, ("cifar10", 2 / 255): 0.1, ("cifar10", 8 / 255): 0.7}
DEFAULT_LAMBDA = 0.4
METHODS = ("sabr", "standard")
# the paper's MNIST schedule: 70 epochs, 1 warm-up, ε ramp over 20, lr ×0.2 after 50 and 60
PAPER_EPOCHS, PAPER_RAMP, PAPER_MILESTONES = 70, 20, (50, 60)


def paper_lambda(dataset: str, eps: float) -> float:
    for (d, e), lam in PAPER_LAMBDA.items():
        if d == dataset and abs(e - eps) < 1e-6:
            return lam
    return DEFAULT_LAMBDA


@dataclass
class TrainConfig:
    dataset: str = "mnist"
    model: str = "cnn7"
    method: str = "sabr"  # "sabr" (λ=1: IBP, λ=0: PGD training) or "standard"
    domain: str = "box"
    eps: float = 0.1
    sabr_lambda: Optional[float] = None  # None: the paper's value for (dataset, eps)
    epochs: int = PAPER_EPOCHS
    batch_size: int = 128
    lr: float = 5e-4
    lr_milestones: Optional[tuple] = None  # None: the paper's, scaled to `epochs`
    lr_decay: float = 0.2
    warmup_epochs: int = 1
    ramp_epochs: Optional[int] = None  # None: the paper's, scaled to `epochs`
    reg_weight: float = 0.5  # × (1 - ε_t/ε) during the ramp
    l1: float = 0.0
    grad_clip: float = 10.0  # max gradient norm; 0 = off
    relu_shrink: float = 1.0  # 0.8 = the paper's ReLU shrinking (box domain only); 1 = off
    seed: int = 0
    device: str = "auto"
    train_samples: Optional[int] = None  # use only the first N training images
    eval_samples: int = 1000  # test images evaluated after each epoch
    init: str = "ibp"  # "ibp" (Shi et al.) or "default" (PyTorch's)
    data_range: tuple = (0.0, 1.0)
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """A copy with every default filled in and every value checked (VerikitError if bad)."""
        from verikit.models.architectures import ARCHITECTURES, DATASET_SHAPES

        c = dataclasses.replace(self)
        if c.method not in METHODS:
            raise VerikitError(f"unknown method {c.method!r}; use one of {', '.join(METHODS)}")
        if c.dataset not in DATASET_SHAPES:
            raise VerikitError(f"unknown dataset {c.dataset!r}; available: {', '.join(DATASET_SHAPES)}")
        if c.model not in ARCHITECTURES:
            raise VerikitError(f"unknown model {c.model!r}; available: {', '.join(ARCHITECTURES)}")
        if not c.eps >= 0:
            raise VerikitError(f"--eps must be >= 0, got {c.eps}")
        if c.sabr_lambda is None:
            c.sabr_lambda = paper_lambda(c.dataset, c.eps)
        if not 0.0 <= c.sabr_lambda <= 1.0:
            raise VerikitError(f"--sabr-lambda must lie in [0, 1], got {c.sabr_lambda}")
        for name in ("epochs", "batch_size"):
            if getattr(c, name) < 1:
                raise VerikitError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(c, name)}")
        if not c.lr > 0:
            raise VerikitError(f"--lr must be > 0, got {c.lr}")
        if not 0 < c.relu_shrink <= 1:
            raise VerikitError(f"--relu-shrink must lie in (0, 1], got {c.relu_shrink}")
        if c.relu_shrink < 1 and c.domain != "box":
            raise VerikitError("--relu-shrink works with the box domain only")
        if c.ramp_epochs is None:
            c.ramp_epochs = max(1, round(c.epochs * PAPER_RAMP / PAPER_EPOCHS))
        if c.lr_milestones is None:
            c.lr_milestones = tuple(max(1, round(c.epochs * m / PAPER_EPOCHS)) for m in PAPER_MILESTONES)
        c.lr_milestones = tuple(int(m) for m in c.lr_milestones)
        c.warmup_epochs = max(0, min(c.warmup_epochs, c.epochs - 1))
        c.data_range = tuple(c.data_range)
        if c.device not in ("auto", "cpu", "cuda"):
            raise VerikitError(f"--device must be auto, cpu or cuda, got {c.device!r}")
        if c.method != "standard":
            from .losses import get_training_domain

            get_training_domain(c.domain)  # unknown or non-differentiable: a clear error now
        return c

    @property
    def kind(self) -> str:
        """What the run is, in the paper's terms: standard, pgd, ibp or sabr."""
        if self.method == "standard":
            return "standard"
        return {0.0: "pgd", 1.0: "ibp"}.get(float(self.sabr_lambda), "sabr")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("lr_milestones", "data_range"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)
