"""Small helpers shared by the backbone modules."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def as_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``112`` or ``(112, 96)`` -> ``(H, W)``; anything else is a ValueError naming ``name``."""
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be a positive int or (H, W), got {value!r}")
    return int(size[0]), int(size[1])


def autocast_active(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for devices without autocast (meta).

    The meta device (used to count parameters and FLOPs without allocating) has no autocast
    state, and ``torch.is_autocast_enabled("meta")`` raises.
    """
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
