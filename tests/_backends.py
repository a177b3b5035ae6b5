"""Partial FC of either backend for tests: the plain core or the fast CPU backend."""

from __future__ import annotations

from typing import Any

from partialfc import PartialFC
from partialfc.fast import FusedPartialFC


def partial_fc(*args: Any, fused: bool = True, low_memory: bool = True, **kwargs: Any) -> PartialFC:
    """``FusedPartialFC`` (``fused``: the fast CPU backend, ``low_memory`` its workspace) or
    the plain ``PartialFC``, with ``PartialFC``'s arguments."""
    if fused:
        return FusedPartialFC(*args, low_memory=low_memory, **kwargs)
    return PartialFC(*args, **kwargs)
