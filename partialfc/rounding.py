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
    if rounding == "nearest" or dtype == value.dtype:
        return value.to(dtype)
    if dtype == torch.bfloat16 and value.dtype == torch.float32:
        return _stochastic_bf16(value, generator)
    near = value.to(dtype)
    near32 = near.to(value.dtype)
    # The neighbour on the other side of `value` (nearest rounding picked one of the two).
    toward = torch.where(near32 < value, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(near, toward)
    gap = other.to(value.dtype) - near32  # signed width of the interval [near, other]
    frac = (value - near32) / gap  # in [0, 1/2]: how far toward `other` the value lies
    draw = torch.rand(value.shape, generator=generator, device=value.device)
    take_other = (draw < frac) & torch.isfinite(gap)
    return torch.where(take_other, other, near)


def _stochastic_bf16(value: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Stochastic rounding of float32 to bfloat16 on the bits: bfloat16 is float32's upper
    16 bits, so adding a uniform 16-bit integer to the bits and dropping the lower 16 bits
    rounds the magnitude up with probability (distance to the lower neighbour) / (gap) --
    the same distribution as the general path, in four passes instead of a dozen."""
    noise = torch.randint(
        0, 1 << 16, value.shape, dtype=torch.int32, generator=generator, device=value.device
    )
    bits = value.contiguous().view(torch.int32).add(noise).bitwise_and_(-(1 << 16))
    out = bits.view(torch.float32).to(torch.bfloat16)  # exact: the lower 16 bits are zero
    # A NaN's bits may carry into the sign; keep NaN (inf cannot carry: its low bits are 0).
    return torch.where(torch.isnan(value), value.to(torch.bfloat16), out)
