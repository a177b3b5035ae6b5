"""The argument checks of facetrain's public functions: one helper for "must be an int
(>= k)" and one for "must be a number (> 0, finite)".

Values that arrive through the trainer's typed config are validated there (pydantic); these
checks are for the packages' own public functions and classes, which tests, benchmarks and
tools call directly. Each raises ``ValueError`` naming the argument and the value it got.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_int", "check_number"]

_WHAT = {0: "a non-negative int", 1: "a positive int"}


def check_int(name: str, value: Any, minimum: int | None = 0) -> int:
    """``value`` as an int, or ValueError naming ``name`` when it is not an integer (a bool is
    not one; numpy integers are) or is below ``minimum`` (None: any int)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or (minimum is not None and value < minimum)
    ):
        what = "an int" if minimum is None else _WHAT.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, *, positive: bool = False, finite: bool = True) -> float:
    """``value`` as a float, or ValueError naming ``name`` when it is not a real number (a bool
    is not one; numpy scalars are), is not finite (unless ``finite=False``) or, with
    ``positive``, is not > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if finite and not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)
