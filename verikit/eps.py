"""Parse `--eps` values (`0.1`, `8/255`, or a comma list `1/255,2/255,8/255` for a sweep) and
print them. One parser for every command (`certify`, `train`), so they accept the same values."""
from __future__ import annotations

import math
from fractions import Fraction

from .errors import VerikitError


def parse_eps_value(text: str) -> float:
    """One radius: a decimal (`0.1`, `1e-2`) or a fraction (`8/255`). Must be finite and >= 0."""
    t = text.strip()
    if not t:
        raise VerikitError("empty --eps value (use e.g. 0.1 or 8/255)")
    try:
        if "/" in t:
            parts = t.split("/")
            if len(parts) != 2:
                raise ValueError(t)
            num, den = Fraction(parts[0].strip()), Fraction(parts[1].strip())
            if den == 0:
                raise VerikitError(f"bad --eps value {text!r}: division by zero")
            value = float(num / den)
        else:
            value = float(t)
    except (ValueError, ZeroDivisionError):
        raise VerikitError(f"bad --eps value {text!r}: expected a number like 0.1 or a fraction like 8/255") from None
    if not math.isfinite(value):
        raise VerikitError(f"bad --eps value {text!r}: must be finite")
    if value < 0:
        raise VerikitError(f"bad --eps value {text!r}: must be >= 0")
    return value + 0.0  # -0 -> 0


def parse_eps_list(text: str) -> list[float]:
    """`1/255,2/255` -> [0.00392..., 0.00784...]; duplicates removed, order kept."""
    if text is None or not str(text).strip():
        raise VerikitError("empty --eps (use e.g. 0.1, 8/255 or 1/255,2/255)")
    out: list[float] = []
    for part in str(text).split(","):
        v = parse_eps_value(part)
        if v not in out:
            out.append(v)
    return out


def format_eps(eps: float) -> str:
    """A short label: a short decimal as such (`0.2`, not `51/255`), other multiples of 1/255
    as `8/255`, everything else as a decimal."""
    eps = float(eps) + 0.0
    if float(f"{eps:.3g}") == eps:
        return f"{eps:g}"
    num = eps * 255
    if eps > 0 and abs(num - round(num)) < 1e-9:
        return f"{int(round(num))}/255"
    return f"{eps:g}"
