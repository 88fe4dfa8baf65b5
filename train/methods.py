"""The training-method registry: a certified-training method is a small class with a name, a
one-line description, the paper it comes from, its options (defaults and the paper's values)
and the loss it computes from one batch.

Shaped like the domain registry (verikit.domains.base): register an in-process method with
the `@register_method` decorator; other packages ship methods through the `verikit.methods`
entry-point group; `VERIKIT_PLUGINS=mod1,mod2` imports modules for their decorators, so a
method in a plain script works from the CLI (`verikit train --method NAME`). All are listed
by `available_methods()` and by `verikit methods`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from verikit.bounds import Box, BoundStore
from verikit.errors import VerikitError


class UnknownMethodError(VerikitError):
    """A training-method name is not registered."""


@dataclass(frozen=True)
class MethodOption:
    """One option of a method: its default, what it does, and the paper's value(s) with the source."""

    default: Any
    help: str
    paper: str = ""

    def parse(self, method: str, name: str, value: Any) -> Any:
        """`value` (a string from the command line, or a Python value) as the default's type."""
        kind = type(self.default)
        try:
            if kind is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    return value.lower() in ("true", "1", "yes")
                return bool(value)
            if kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return int(value)
            if kind is float:
                v = float(value)
                if not math.isfinite(v):
                    raise ValueError
                return v
            return str(value)
        except (TypeError, ValueError):
            raise VerikitError(f"method {method!r}: option {name} must be a {kind.__name__}, got {value!r}") from None


@dataclass
class StepInputs:
    """What a method's loss sees of one training step."""

    trainer: Any  # the verikit.train.loop.Trainer (model, graphs, domain, helpers)
    x: Tensor
    y: Tensor
    eps: float  # this step's ε (the schedule's value)
    target_eps: float  # the run's final ε: eps / target_eps is the ramp's progress
    epoch: int
    generator: Optional[torch.Generator] = None
    shard: Optional[tuple] = None  # data parallel: (global batch size, this rank's slice), else None

    @property
    def progress(self) -> float:
        """How far the ε ramp is, in [0, 1] (1 once ε has reached its target)."""
        return 1.0 if self.target_eps <= 0 else min(1.0, self.eps / self.target_eps)


@dataclass
class StepLoss:
    """A method's loss for one batch. `lower` (B, classes): lower bounds of y_label - y_j on the
    region the method certifies (for the train-certified fraction), `store` and `region`: the
    domain's intermediate bounds and input box (for the warm-up regulariser); None if none."""

    loss: Tensor
    lower: Optional[Tensor] = None
    store: Optional[BoundStore] = None
    region: Optional[Box] = None


class TrainingMethod(ABC):
    """Base class of training methods. Options are keyword arguments of the constructor; the
    base fills defaults (`paper_defaults` for the run's dataset and ε, else `options`) and
    rejects unknown names, so typos do not pass silently."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # citation of the method's paper
    options: ClassVar[dict] = {}  # option name -> MethodOption
    uses_domain: ClassVar[bool] = True  # does it propagate bounds with the run's --domain?

    def __init__(self, dataset: str = "mnist", eps: float = 0.1, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise VerikitError(f"method {self.name!r} has no option(s) {', '.join(unknown)} (known: {known})")
        values = {k: o.default for k, o in self.options.items()}
        values.update(self.paper_defaults(dataset, eps))
        values.update({k: self.options[k].parse(self.name, k, v) for k, v in options.items()})
        self.config = values
        self.check()

    @classmethod
    def paper_defaults(cls, dataset: str, eps: float) -> dict:
        """Option values the paper used for this dataset and ε (override where they differ)."""
        return {}

    def check(self) -> None:
        """Raise VerikitError for option values out of range (override)."""

    def check_fraction(self, *names: str) -> None:
        for n in names:
            if not 0.0 <= self.config[n] <= 1.0:
                raise VerikitError(f"method {self.name!r}: option {n} must lie in [0, 1], got {self.config[n]}")

    def setup(self, trainer) -> None:
        """Called once by the Trainer after its model, graph and domain exist, before any step:
        raise VerikitError for a run this method cannot train (override), so a bad combination
        fails at start-up with exit 2, not an epoch later."""

    @abstractmethod
    def loss(self, step: StepInputs) -> StepLoss:
        """The training loss of one batch (ε > 0; the loop trains plainly while ε = 0)."""

    def __repr__(self) -> str:
        return f"<training method {self.name}>"


_REGISTRY: dict[str, type[TrainingMethod]] = {}
_LOADED = False
_BUILTINS = ("method_sabr", "method_expressive", "method_crown_ibp", "method_taps")


def register_method(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    """Class decorator: make a TrainingMethod subclass available by its `name` to the API and CLI."""
    if not (isinstance(cls, type) and issubclass(cls, TrainingMethod)):
        raise TypeError("register_method expects a TrainingMethod subclass")
    if not cls.name or not cls.name.replace("-", "").replace("_", "").isalnum() or cls.name != cls.name.lower():
        raise ValueError(f"method name {cls.name!r} must be a non-empty lowercase word")
    if not cls.description:
        raise ValueError(f"method {cls.name!r} needs a one-line description")
    bad = [k for k, o in cls.options.items() if not isinstance(o, MethodOption)]
    if bad:
        raise ValueError(f"method {cls.name!r}: options {', '.join(bad)} must be MethodOption(default, help, paper)")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"a method named {cls.name!r} is already registered ({existing.__module__}.{existing.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load() -> None:
    global _LOADED
    import importlib

    for mod in _BUILTINS:
        importlib.import_module(f"verikit.train.{mod}")
    if _LOADED:
        return
    _LOADED = True
    from verikit.domains import available_domains

    available_domains()  # imports the VERIKIT_PLUGINS modules (one place reports their errors)
    from importlib.metadata import entry_points

    for ep in entry_points(group="verikit.methods"):
        try:
            cls = ep.load()
        except Exception as e:  # a broken third-party package must not break verikit
            import warnings

            warnings.warn(f"could not load training-method entry point {ep.name!r} ({ep.value}): {e}")
            continue
        if isinstance(cls, type) and issubclass(cls, TrainingMethod):
            register_method(cls)


def available_methods() -> dict[str, type[TrainingMethod]]:
    """All registered training methods by name (built-in, decorated, and from entry points)."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def get_method_class(name: str) -> type[TrainingMethod]:
    methods = available_methods()
    if name not in methods:
        raise UnknownMethodError(f"unknown training method {name!r}; available: {', '.join(methods)}")
    return methods[name]


def get_method(name: str, dataset: str = "mnist", eps: float = 0.1, **options) -> TrainingMethod:
    """An instance of the method called `name` for a run on `dataset` at `eps`, with `options`."""
    return get_method_class(name)(dataset=dataset, eps=eps, **options)


def parse_method_options(items) -> dict:
    """['alpha=0.5', 'beta_end=0'] -> {'alpha': '0.5', 'beta_end': '0'} (typed later by the method)."""
    out = {}
    for item in items or ():
        name, sep, value = str(item).partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not name:
            raise VerikitError(f"--method-option must be NAME=VALUE, got {item!r}")
        out[name] = value.strip()
    return out
