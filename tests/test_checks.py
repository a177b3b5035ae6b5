"""common.checks: the one int / number argument check of every package."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.checks import check_int, check_number


def test_check_int_accepts_integers() -> None:
    assert check_int("n", 3) == 3
    assert type(check_int("n", np.int64(3))) is int
    assert check_int("n", -4, minimum=None) == -4
    assert check_int("n", 7, minimum=7) == 7


@pytest.mark.parametrize(
    ("value", "minimum", "message"),
    [
        (True, 0, "n must be a non-negative int, got True"),
        (2.0, 0, "n must be a non-negative int, got 2.0"),
        ("2", None, "n must be an int, got '2'"),
        (-1, 0, "n must be a non-negative int, got -1"),
        (0, 1, "n must be a positive int, got 0"),
        (2, 3, "n must be an int >= 3, got 2"),
    ],
)
def test_check_int_rejects(value: object, minimum: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_int("n", value, minimum=minimum)


def test_check_number() -> None:
    assert check_number("x", 2) == 2.0 and type(check_number("x", np.float32(0.5))) is float
    assert math.isinf(check_number("x", math.inf, finite=False))
    with pytest.raises(ValueError, match="x must be a number, got False"):
        check_number("x", False)
    with pytest.raises(ValueError, match="x must be a number, got '1'"):
        check_number("x", "1")
    with pytest.raises(ValueError, match="x must be finite, got nan"):
        check_number("x", math.nan)
    with pytest.raises(ValueError, match="x must be > 0, got 0"):
        check_number("x", 0, positive=True)
