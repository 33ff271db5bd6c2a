"""Argument validation shared by labkit's techniques (optimizers first).

Every message names the owner (optimizer, function), the argument, the allowed range and the value given:
`ValueError("AdamW: betas[1] must be in [0, 1), got 1.0")`.
"""

from __future__ import annotations

import math
import numbers


def number(owner: str, name: str, value, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a float, checked to lie in the interval [low, high] (ends open as asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
    bad = math.isnan(value)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and (value >= high if high_open else value > high)
    if bad:
        raise ValueError(f"{owner}: {name} must be in {interval}, got {value!r}")
    return value


def integer(owner: str, name: str, value, *, low: int = 0) -> int:
    """`value` as an int >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{owner}: {name} must be an int >= {low}, got {value}")
    return int(value)


def choice(owner: str, name: str, value, options: tuple) -> object:
    """`value`, checked to be one of `options`."""
    if value not in options:
        raise ValueError(f"{owner}: {name} must be one of {options}, got {value!r}")
    return value


def betas(owner: str, value, n: int = 2) -> tuple[float, ...]:
    """A tuple of n coefficients in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != n:
        raise ValueError(f"{owner}: betas must be a tuple of {n} numbers in [0, 1), got {value!r}")
    return tuple(number(owner, f"betas[{i}]", b, low=0.0, high=1.0, high_open=True) for i, b in enumerate(value))
