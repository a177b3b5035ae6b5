"""Writing float32 results into narrower storage (the class centres in bf16 / fp16).

``partialfc.storage_dtype`` keeps the class centres and their optimizer state in a 16-bit
type; every update is computed in float32 on the rows it touches and written back here,
rounded either to the nearest representable value or stochastically. Stochastic rounding
picks the upper or lower neighbour with probabilities proportional to closeness, so the
stored value is right *on average*: an update smaller than half a unit in the last place,
which nearest rounding drops every time (a centre with |w| ~ 1 in bf16 ignores any step below
~0.004), still moves the centre in expectation.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["ROUNDINGS", "STORAGE_DTYPES", "Rounding", "round_into", "storage_dtype"]

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic")

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Config names of the storage dtypes."""


def storage_dtype(name: str) -> torch.dtype:
    """The torch dtype of a storage name (``fp32``, ``bf16``, ``fp16``)."""
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {tuple(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def round_into(
    value: torch.Tensor,
    dtype: torch.dtype,
    rounding: Rounding,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``value`` (float32) as ``dtype``: rounded to nearest, or stochastically.

    Stochastic: with ``lo <= value <= hi`` the two neighbours in ``dtype``, the result is
    ``hi`` with probability ``(value - lo) / (hi - lo)``, else ``lo`` (exact values stay);
    uniform draws come from ``generator`` (on ``value``'s device). Values beyond the dtype's
    range become +-inf either way, as a plain cast does.
    """
    near = value.to(dtype)
    if rounding == "nearest" or dtype == value.dtype:
        return near
    near32 = near.to(value.dtype)
    # The neighbour on the other side of `value` (nearest rounding picked one of the two).
    toward = torch.where(near32 < value, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(near, toward)
    gap = other.to(value.dtype) - near32  # signed width of the interval [near, other]
    frac = (value - near32) / gap  # in [0, 1/2]: how far toward `other` the value lies
    draw = torch.rand(value.shape, generator=generator, device=value.device)
    take_other = (draw < frac) & torch.isfinite(gap)
    return torch.where(take_other, other, near)
