"""The training configuration: one dataclass, with the paper's defaults filled in per dataset/ε."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from verikit.errors import VerikitError

# SABR's λ per (dataset, ε) from the paper (Müller et al. 2023, Table 6)
PAPER_LAMBDA = {("mnist", 0.1): 0.4, ("mnist", 0.3): 0.6, ("cifar10", 2 / 255): 0.1, ("cifar10", 8 / 255): 0.7}
DEFAULT_LAMBDA = 0.4
# the paper's MNIST schedule: 70 epochs, 1 warm-up, ε ramp over 20, lr ×0.2 after 50 and 60
PAPER_EPOCHS, PAPER_RAMP, PAPER_MILESTONES = 70, 20, (50, 60)


def scaled_milestones(epochs: int) -> tuple:
    """The paper's milestones (50, 60 of 70) scaled to `epochs`, kept distinct (two decays on
    one epoch would cut the learning rate 25x at once) and dropped if past the last epoch."""
    out: list = []
    for m in PAPER_MILESTONES:
        v = max(1, round(epochs * m / PAPER_EPOCHS), out[-1] + 1 if out else 1)
        if v < epochs:
            out.append(v)
    return tuple(out)


def _at_least(value, low: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise VerikitError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")


def paper_lambda(dataset: str, eps: float) -> float:
    for (d, e), lam in PAPER_LAMBDA.items():
        if d == dataset and abs(e - eps) < 1e-6:
            return lam
    return DEFAULT_LAMBDA


@dataclass
class TrainConfig:
    dataset: str = "mnist"
    model: str = "cnn7"
    method: str = "sabr"  # a registered training method (train/methods.py): sabr, ibp, pgd, standard, mtl-ibp, ...
    domain: str = "box"
    eps: float = 0.1
    sabr_lambda: Optional[float] = None  # sabr only; None: the paper's value for (dataset, eps)
    method_options: dict = field(default_factory=dict)  # the method's options (resolved: all of them)
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
        from .methods import get_method_class

        method_cls = get_method_class(c.method)  # unknown: the list of registered methods
        if c.dataset not in DATASET_SHAPES:
            raise VerikitError(f"unknown dataset {c.dataset!r}; available: {', '.join(DATASET_SHAPES)}")
        if c.model not in ARCHITECTURES:
            raise VerikitError(f"unknown model {c.model!r}; available: {', '.join(ARCHITECTURES)}")
        c.data_range = tuple(float(v) for v in c.data_range)
        if not c.eps >= 0:
            raise VerikitError(f"--eps must be >= 0, got {c.eps}")
        width = c.data_range[1] - c.data_range[0]
        if c.eps > width:
            raise VerikitError(f"--eps {c.eps:g} is wider than the data range [{c.data_range[0]:g}, "
                               f"{c.data_range[1]:g}] (inputs are pixels in [0, 1]; e.g. --eps 0.1 or 8/255)")
        c.method_options = dict(c.method_options or {})
        if c.method == "sabr":  # λ: --sabr-lambda or --method-option lambda=, stored in both places
            if c.sabr_lambda is not None and "lambda" in c.method_options \
                    and float(c.method_options["lambda"]) != float(c.sabr_lambda):
                raise VerikitError("--sabr-lambda and --method-option lambda= disagree; give one of them")
            if c.sabr_lambda is None:
                c.sabr_lambda = c.method_options.get("lambda", paper_lambda(c.dataset, c.eps))
            c.sabr_lambda = float(c.sabr_lambda)
            if not 0.0 <= c.sabr_lambda <= 1.0:
                raise VerikitError(f"--sabr-lambda must lie in [0, 1], got {c.sabr_lambda}")
            c.method_options["lambda"] = c.sabr_lambda
        else:
            fixed = {"ibp": 1.0, "pgd": 0.0}.get(c.method)  # SABR's end points (the metrics' lambda column)
            if c.sabr_lambda is not None and (fixed is None or float(c.sabr_lambda) != fixed):
                raise VerikitError(f"--sabr-lambda applies to --method sabr only, not {c.method}")
            c.sabr_lambda = fixed
        c.method_options = dict(method_cls(dataset=c.dataset, eps=c.eps, **c.method_options).config)
        for name in ("epochs", "batch_size", "eval_samples"):
            _at_least(getattr(c, name), 1, name)
        if c.train_samples is not None:
            _at_least(c.train_samples, 1, "train_samples")
        _at_least(c.warmup_epochs, 0, "warmup_epochs")
        if c.ramp_epochs is not None:
            _at_least(c.ramp_epochs, 0, "ramp_epochs")
        _at_least(c.seed, 0, "seed")
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise VerikitError(f"--lr must be > 0, got {c.lr}")
        for name in ("reg_weight", "l1", "grad_clip"):
            v = getattr(c, name)
            if not (v >= 0 and math.isfinite(v)):
                raise VerikitError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {v}")
        if not 0 < c.relu_shrink <= 1:
            raise VerikitError(f"--relu-shrink must lie in (0, 1], got {c.relu_shrink}")
        if c.relu_shrink < 1 and c.domain != "box" and method_cls.uses_domain:
            raise VerikitError("--relu-shrink works with the box domain only")
        if c.ramp_epochs is None:
            c.ramp_epochs = max(1, round(c.epochs * PAPER_RAMP / PAPER_EPOCHS))
        if c.lr_milestones is None:
            c.lr_milestones = scaled_milestones(c.epochs)
        c.lr_milestones = tuple(int(m) for m in c.lr_milestones)
        if any(m < 1 for m in c.lr_milestones):
            raise VerikitError(f"--lr-milestones must be epochs >= 1, got {','.join(map(str, c.lr_milestones))}")
        c.warmup_epochs = max(0, min(c.warmup_epochs, c.epochs - 1))
        if c.device not in ("auto", "cpu", "cuda"):
            raise VerikitError(f"--device must be auto, cpu or cuda, got {c.device!r}")
        if method_cls.uses_domain:
            from .losses import get_training_domain

            get_training_domain(c.domain)  # unknown or non-differentiable: a clear error now
        return c

    def schedule_warnings(self) -> list:
        """Settings that are legal but rarely what anyone wants (a resolved config)."""
        out = []
        ms = list(self.lr_milestones or ())
        twice = sorted({m for m in ms if ms.count(m) > 1})
        if twice:
            out.append(f"--lr-milestones: epoch {', '.join(map(str, twice))} is given more than once; the learning "
                       f"rate drops by {self.lr_decay}^k there")
        late = [m for m in ms if m >= self.epochs]
        if late:
            out.append(f"--lr-milestones {','.join(map(str, late))} lie at or after the last epoch "
                       f"({self.epochs}) and have no effect")
        if self.method != "standard" and self.eps > 0 and self.epochs - self.warmup_epochs < 4:
            out.append(f"only {self.epochs - self.warmup_epochs} epoch(s) after the warm-up (eps ramp "
                       f"{self.ramp_epochs}): short certified-training runs can collapse to a constant classifier "
                       "(e.g. cnn7 with --epochs 4); the README's smoke-run recipe is a quick run that does not")
        return out

    @property
    def kind(self) -> str:
        """What the run is, in the papers' terms: the method, with SABR's λ = 0 / 1 named pgd / ibp."""
        if self.method != "sabr":
            return self.method
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
