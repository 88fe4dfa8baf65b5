"""Schedules: the smoothed ε ramp (Shi et al. 2021: polynomial growth, then linear) and the
learning-rate milestones."""
from __future__ import annotations

from dataclasses import dataclass


def smoothed_ramp(t: float, mid: float = 0.25, power: float = 4.0) -> float:
    """Fraction of the target ε at ramp progress t ∈ [0, 1]: A·t^power up to `mid`, then a line
    to 1 with the same value and slope at `mid` (so the ramp starts gently and has no kink)."""
    if t <= 0:
        return 0.0
    if t >= 1:
        return 1.0
    slope = 1.0 / (1.0 - mid + mid / power)
    if t < mid:
        a = slope * mid / power / mid ** power
        return a * t ** power
    return 1.0 - slope * (1.0 - t)


@dataclass
class EpsSchedule:
    """ε per training step: 0 during `warmup_epochs` (clean training), ramped over `ramp_epochs`,
    then constant at `eps`."""

    eps: float
    warmup_epochs: int
    ramp_epochs: int
    steps_per_epoch: int

    def __call__(self, epoch: int, step: int) -> float:
        """ε at batch `step` of (0-based) `epoch`."""
        if epoch < self.warmup_epochs:
            return 0.0
        if self.ramp_epochs <= 0:
            return self.eps
        done = (epoch - self.warmup_epochs) * self.steps_per_epoch + step + 1
        return self.eps * smoothed_ramp(done / (self.ramp_epochs * self.steps_per_epoch))

    def in_ramp(self, epoch: int) -> bool:
        return self.warmup_epochs <= epoch < self.warmup_epochs + self.ramp_epochs


def lr_at(epoch: int, lr: float, milestones: tuple, factor: float = 0.2) -> float:
    """Learning rate for `epoch`: ×factor at every milestone reached."""
    return lr * factor ** sum(epoch >= m for m in milestones)
