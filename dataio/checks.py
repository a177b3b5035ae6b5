"""The integer argument check of dataio: one helper for every "must be an int >= k".

Values that arrive through the trainer's typed config are validated there (pydantic); this
check is for dataio's own public functions, which tests, benchmarks and tools call directly.
"""

from __future__ import annotations

import numbers
from typing import Any

_WHAT = {0: "a non-negative int", 1: "a positive int"}


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an int, or ValueError naming ``name`` when it is not an integer (a bool is
    not one; numpy integers are) or is below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = _WHAT.get(minimum, f"an int >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)
