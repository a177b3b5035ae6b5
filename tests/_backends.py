"""Partial FC of either backend for tests: the plain core or the fast CPU backend."""

from __future__ import annotations

from typing import Any

from partialfc import PartialFC
from partialfc.fast import FusedPartialFC

BACKENDS = ("plain", "cpu_fused")
"""The two Partial FC backends, as ``partialfc.backend`` names them: a test of behaviour both
must share is parametrized over this (``@pytest.fixture(params=BACKENDS)``)."""


def partial_fc(*args: Any, fused: bool = True, low_memory: bool = True, **kwargs: Any) -> PartialFC:
    """``FusedPartialFC`` (``fused``: the fast CPU backend, ``low_memory`` its workspace) or
    the plain ``PartialFC``, with ``PartialFC``'s arguments."""
    if fused:
        return FusedPartialFC(*args, low_memory=low_memory, **kwargs)
    return PartialFC(*args, **kwargs)


def build(backend: str, *args: Any, low_memory: bool = True, **kwargs: Any) -> PartialFC:
    """Partial FC of the named backend (one of ``BACKENDS``), with ``PartialFC``'s arguments;
    ``low_memory`` only concerns ``cpu_fused``. The backend has no default, so a test names
    the one it runs: the fixture's parameter, or ``"cpu_fused"`` for a test of that backend's
    internals (workspace buffers, kernels)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return partial_fc(*args, fused=backend == "cpu_fused", low_memory=low_memory, **kwargs)
