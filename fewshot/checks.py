"""Argument checks shared by modules that read numbers from users and from files."""

from __future__ import annotations

import numbers


def check_int(value, what: str, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool) in [low, high], else ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{what} must be an integer >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{what} must be at most {high}, got {value!r}")
    return int(value)
