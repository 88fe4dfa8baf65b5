"""Interval bounds (`Box`) and the `BoundStore` that domains share and refine."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch import Tensor

from .errors import VerikitError


@dataclass
class Box:
    """Element-wise bounds lo <= x <= hi on a batched tensor (B, *shape)."""

    lo: Tensor
    hi: Tensor

    def __post_init__(self):
        if self.lo.shape != self.hi.shape:
            raise ValueError(f"Box bounds differ in shape: {tuple(self.lo.shape)} vs {tuple(self.hi.shape)}")

    @classmethod
    def from_center_radius(cls, center: Tensor, radius: Tensor) -> "Box":
        """A box kept in centre/radius form: the next affine op needs exactly these, and
        lo = c - r, hi = c + r are only formed when something reads them (an affine op that
        follows another never does)."""
        if center.shape != radius.shape:  # broadcasting: form lo/hi now, as they define the shape
            box = cls(center - radius, center + radius)
            box._center, box._radius = center, radius
            return box
        return _CenterRadiusBox(center, radius)

    @classmethod
    def point(cls, x: Tensor) -> "Box":
        return cls(x, x)

    @classmethod
    def linf_ball(cls, x: Tensor, eps: Union[float, Tensor], data_range: Optional[tuple] = (0.0, 1.0)) -> "Box":
        """The L-infinity ball of radius eps around x, intersected with the valid data range.

        `data_range` may hold floats or tensors broadcastable to x (per-channel ranges when the
        data are normalised outside the model); None means unbounded.
        """
        if isinstance(eps, (int, float)) and eps < 0:
            raise VerikitError(f"eps must be >= 0, got {eps}")
        lo, hi = x - eps, x + eps
        if data_range is not None:
            dlo, dhi = data_range
            lo = torch.maximum(lo, torch.as_tensor(dlo, dtype=x.dtype, device=x.device))
            hi = torch.minimum(hi, torch.as_tensor(dhi, dtype=x.dtype, device=x.device))
        return cls(lo, hi)

    @property
    def center(self) -> Tensor:
        c = self.__dict__.get("_center")
        if c is None:  # computed once; halving in place is exact and saves an allocation
            c = self.__dict__["_center"] = torch.add(self.lo, self.hi).div_(2)
        return c

    @property
    def radius(self) -> Tensor:
        r = self.__dict__.get("_radius")
        if r is None:
            r = self.__dict__["_radius"] = torch.sub(self.hi, self.lo).div_(2)
        return r

    @property
    def shape(self):
        return self.lo.shape

    def contains(self, x: Tensor, tol: float = 0.0) -> Tensor:
        """Per-sample: does x lie inside the box (up to an absolute tolerance)?"""
        inside = (x >= self.lo - tol) & (x <= self.hi + tol)
        return inside.reshape(inside.shape[0], -1).all(dim=1)

    def intersect(self, other: "Box") -> "Box":
        return Box(torch.maximum(self.lo, other.lo), torch.minimum(self.hi, other.hi))

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """n uniform points per box, including the corners' extremes: shape (n, B, *shape)."""
        u = torch.rand((n,) + tuple(self.lo.shape), generator=generator, dtype=self.lo.dtype).to(self.lo.device)
        # push a quarter of the samples onto vertices, where ReLU networks attain their extremes
        k = n // 4
        if k:
            u[:k] = (u[:k] > 0.5).to(u.dtype)
        # clamped: lo + 1 * (hi - lo) can round past hi (or below lo), outside the box
        return torch.minimum(torch.maximum(self.lo + u * (self.hi - self.lo), self.lo), self.hi)

    def to(self, device=None, dtype=None) -> "Box":
        return Box(self.lo.to(device=device, dtype=dtype), self.hi.to(device=device, dtype=dtype))

    def detach(self) -> "Box":
        return Box(self.lo.detach(), self.hi.detach())

    def __getitem__(self, idx) -> "Box":
        return Box(self.lo[idx], self.hi[idx])


class _CenterRadiusBox(Box):
    """A `Box` built from centre and radius; lo and hi are computed on first access (and then
    kept), with the same arithmetic as an eager c - r, c + r."""

    def __init__(self, center: Tensor, radius: Tensor):  # no dataclass __init__: lo/hi are lazy
        self._center, self._radius = center, radius

    def __getattr__(self, name):  # only called for attributes not set yet: lo, hi
        if name == "lo":
            value = self._center - self._radius
        elif name == "hi":
            value = self._center + self._radius
        else:
            raise AttributeError(name)
        self.__dict__[name] = value
        return value

    @property
    def shape(self):
        return self._center.shape


class BoundStore:
    """Maps node name -> Box. Updates *intersect* with what is stored, so a later (tighter)
    domain can only tighten bounds, never loosen them."""

    def __init__(self):
        self._boxes: dict[str, Box] = {}
        # True when the boxes contain every float32 execution (float-sound mode), not only the
        # real-arithmetic values: only such a store may be refined by a float-sound domain
        self.float_sound = False

    def update(self, name: str, box: Box) -> Box:
        old = self._boxes.get(name)
        new = box if old is None or old.lo.shape != box.lo.shape else old.intersect(box)
        self._boxes[name] = new
        return new

    def get(self, name: str) -> Optional[Box]:
        return self._boxes.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._boxes

    def __getitem__(self, name: str) -> Box:
        return self._boxes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._boxes)

    def __len__(self) -> int:
        return len(self._boxes)

    def items(self):
        return self._boxes.items()

    def detach(self) -> "BoundStore":
        out = BoundStore()
        out._boxes = {k: v.detach() for k, v in self._boxes.items()}
        out.float_sound = self.float_sound
        return out

    def select(self, idx) -> "BoundStore":
        """The bounds of a subset of the batch (e.g. the samples still undecided)."""
        out = BoundStore()
        out._boxes = {k: v[idx] for k, v in self._boxes.items()}
        out.float_sound = self.float_sound
        return out
