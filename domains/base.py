"""The abstract `Domain` interface and the domain registry.

A domain turns an input box into sound bounds on the rows of a spec (C y - d), and leaves the
bounds of every intermediate node it computed in a shared `BoundStore` for the next domain.

Register an in-process domain with the `@register_domain` decorator; other packages ship
domains through the `verikit.domains` entry-point group (the entry point names a Domain
subclass). Both kinds are listed by `available_domains()` and by `verikit domains`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

from verikit.bounds import Box, BoundStore
from verikit.errors import UnknownDomainError, VerikitError
from verikit.ir import EvalContext, Graph
from verikit.spec import Spec

# verdicts a complete domain may return per sample
VERIFIED, FALSIFIED, UNKNOWN = "verified", "falsified", "unknown"


@dataclass
class DomainResult:
    """Bounds of the spec rows s = C y - d for each sample: lower/upper of shape (B, m).

    Complete domains also fill `status` (per sample: verified / falsified / unknown) and, for
    falsified samples, `counterexamples` (an input tensor of the sample's shape).
    """

    lower: Tensor
    upper: Optional[Tensor]
    store: BoundStore
    status: Optional[list] = None
    counterexamples: Optional[list] = None
    info: dict = field(default_factory=dict)
    # (B, m): a lower bound must exceed it to count as a proof (verikit.domains.guard); domains
    # give either the tensor or a function computing it on demand (verdicts only, not training)
    guard: Optional[Tensor] = None
    guard_fn: Optional[Callable[[], Tensor]] = None

    def verified(self, spec: Optional[Spec]) -> Tensor:
        """Per sample: is the property proven? (Uses `status` when the domain gave one.) Lower
        bounds must clear the rounding guard (`verikit.domains.guard`)."""
        if self.status is not None:
            return torch.tensor([s == VERIFIED for s in self.status], dtype=torch.bool)
        if spec is None:
            raise VerikitError("no spec given: bounds only, nothing to verify")
        if self.guard is None and self.guard_fn is not None:
            self.guard = self.guard_fn()
        return spec.holds_given_lower(self.lower.detach(), self.guard).cpu()

    def ensure_guard(self, graph: Graph, spec: Spec, inputs: Box, complete: bool = True) -> None:
        """For results without a guard (plug-in domains): the interval guard from a box pass. An
        incomplete domain's "verified" statuses must be backed by lower bounds above it."""
        if self.guard is None and self.guard_fn is None and (self.status is None or not complete):
            from verikit.spec import fold_spec

            from .guard import interval_guard

            self.guard = interval_guard(fold_spec(graph, spec), None, inputs)
        if self.status is not None and not complete:
            guard = self.guard if self.guard is not None else self.guard_fn()
            backed = spec.holds_given_lower(self.lower.detach(), guard).cpu()
            self.status = [UNKNOWN if v == VERIFIED and not bool(backed[k]) else v for k, v in enumerate(self.status)]


def check_domain_result(cls: type, result, spec: Optional[Spec], batch: int) -> "DomainResult":
    """What a domain (plug-ins included) returned, checked before the chain trusts it.

    Wrong types or shapes are a VerikitError naming the domain and what was expected, instead
    of an IndexError deep inside the chain. A "verified" status from an incomplete domain that
    its own lower bound does not back is downgraded to "unknown" (with a warning): only a
    complete domain may prove what its bounds cannot show (e.g. a MILP over a disjunction).
    """
    import warnings

    name = getattr(cls, "name", "?")
    if not isinstance(result, DomainResult):
        raise VerikitError(f"it returned {type(result).__name__}, not a DomainResult (domain {name!r})")
    rows = spec.C.shape[-2] if spec is not None else None
    want = f"({batch}, {rows})" if rows is not None else f"({batch}, outputs)"
    for what, t in (("lower", result.lower), ("upper", result.upper)):
        if t is None and what == "upper":
            continue
        if not isinstance(t, Tensor):
            raise VerikitError(f"its result.{what} must be a tensor of shape {want}, got {type(t).__name__} "
                               f"(domain {name!r})")
        if t.dim() != 2 or t.shape[0] != batch or (rows is not None and t.shape[1] != rows):
            raise VerikitError(f"its result.{what} has shape {tuple(t.shape)}, expected {want}: one row per "
                               f"sample, one column per spec row (domain {name!r})")
    for what, seq in (("status", result.status), ("counterexamples", result.counterexamples)):
        if seq is not None and (not isinstance(seq, (list, tuple)) or len(seq) != batch):
            raise VerikitError(f"its result.{what} must be a list with one entry per sample ({batch}) (domain {name!r})")
    if result.status is not None:
        bad = sorted({str(v) for v in result.status} - {VERIFIED, FALSIFIED, UNKNOWN})
        if bad:
            raise VerikitError(f"its result.status holds {', '.join(bad)}; use verified, falsified or unknown "
                               f"(domain {name!r})")
        if not getattr(cls, "complete", False) and spec is not None:
            backed = spec.holds_given_lower(result.lower.detach()).cpu()
            claims = [k for k, v in enumerate(result.status) if v == VERIFIED and not bool(backed[k])]
            if claims:
                warnings.warn(f"domain {name!r} (not complete) said verified for {len(claims)} sample(s) its lower "
                              "bound does not prove; treated as unknown", RuntimeWarning, stacklevel=2)
                result.status = [UNKNOWN if k in claims else v for k, v in enumerate(result.status)]
    return result


class Domain(ABC):
    """Base class of all bound domains.

    Subclasses set the class attributes and implement `bound`. Options are passed as keyword
    arguments to the constructor (e.g. `get_domain("crown", alpha_steps=20)`); accept the
    ones you know, and let the base reject the rest so typos do not pass silently.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    complete: ClassVar[bool] = False  # can it decide every property (given time)?
    differentiable: ClassVar[bool] = False  # are its bounds differentiable w.r.t. parameters?
    # does it support the float-sound mode (option `sound`): proofs that also hold for the
    # network as executed in float32 (see verikit.domains.float_sound)?
    float_sound: ClassVar[bool] = False
    options: ClassVar[dict] = {}  # option name -> default

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise VerikitError(f"domain {self.name!r} has no option(s) {', '.join(unknown)} (known: {known})")
        self.config = {**self.options, **options}

    @abstractmethod
    def bound(self, graph: Graph, inputs: Box, spec: Optional[Spec] = None,
              store: Optional[BoundStore] = None, ctx: Optional[EvalContext] = None) -> DomainResult:
        """Sound bounds on the spec rows (or on the raw outputs when spec is None) for every
        input in `inputs` (batched). Intermediate bounds already in `store` may be used and
        must only be tightened."""

    def __repr__(self) -> str:
        return f"<domain {self.name}>"


_REGISTRY: dict[str, type[Domain]] = {}
_ENTRY_POINTS_LOADED = False
_BUILTINS = ("box", "deeppoly", "crown", "crown_ibp", "milp", "bab")


def register_domain(cls: type[Domain]) -> type[Domain]:
    """Class decorator: make a Domain subclass available by its `name` to the API and CLI."""
    if not (isinstance(cls, type) and issubclass(cls, Domain)):
        raise TypeError("register_domain expects a Domain subclass")
    if not cls.name or not cls.name.replace("-", "").replace("_", "").isalnum() or cls.name != cls.name.lower():
        raise ValueError(f"domain name {cls.name!r} must be a non-empty lowercase word")
    if not cls.description:
        raise ValueError(f"domain {cls.name!r} needs a one-line description")
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"a domain named {cls.name!r} is already registered ({existing.__module__}.{existing.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def unregister_domain(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtins_and_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    import importlib

    for mod in _BUILTINS:
        try:
            importlib.import_module(f"verikit.domains.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"verikit.domains.{mod}":
                raise
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    import os
    from importlib.metadata import entry_points

    # VERIKIT_PLUGINS=mod1,mod2: modules imported for their @register_domain side effect, so a
    # domain defined in a plain script/module is usable from the CLI without packaging it
    for mod in filter(None, (m.strip() for m in os.environ.get("VERIKIT_PLUGINS", "").split(","))):
        try:
            importlib.import_module(mod)
        except Exception as e:  # a syntax error or a crash in the plug-in is bad input too, not a traceback
            what = str(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"
            raise VerikitError(f"cannot import plug-in module {mod!r} from VERIKIT_PLUGINS: {what}") from None

    for ep in entry_points(group="verikit.domains"):
        try:
            cls = ep.load()
        except Exception as e:  # a broken third-party package must not break verikit
            import warnings

            warnings.warn(f"could not load domain entry point {ep.name!r} ({ep.value}): {e}")
            continue
        if isinstance(cls, type) and issubclass(cls, Domain):
            register_domain(cls)


def available_domains() -> dict[str, type[Domain]]:
    """All registered domains by name (built-in, decorated, and from entry points)."""
    _load_builtins_and_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_domain_class(name: str) -> type[Domain]:
    domains = available_domains()
    if name not in domains:
        raise UnknownDomainError(f"unknown domain {name!r}; available: {', '.join(domains)}")
    return domains[name]


def get_domain(name: str, **options) -> Domain:
    """An instance of the domain called `name`, configured with `options`."""
    return get_domain_class(name)(**options)


def parse_domain_list(text: str) -> list[str]:
    """'box,crown,milp' -> ['box', 'crown', 'milp'], checking every name (all unknown ones reported)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UnknownDomainError(f"no domain given; available: {', '.join(available_domains())}")
    domains = available_domains()
    bad = [n for n in names if n not in domains]
    if bad:
        raise UnknownDomainError(f"unknown domain(s) {', '.join(bad)}; available: {', '.join(domains)}")
    return names
