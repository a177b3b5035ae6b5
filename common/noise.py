"""Known third-party noise: log records and warnings that tell a facetrain user nothing.

Each entry names one logger (or one warning category) and the start of one message, so only
that message is dropped while :func:`quiet` is active; everything else the same library says
still reaches the console. :data:`EXPORT_NOISE` is what an ONNX export prints on every run.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LogNoise:
    """Records of ``logger`` whose message starts with ``prefix``."""

    logger: str
    prefix: str


@dataclass(frozen=True)
class WarningNoise:
    """Warnings of ``category`` (or a subclass) whose message starts with ``prefix``."""

    category: type[Warning]
    prefix: str


EXPORT_NOISE: tuple[LogNoise | WarningNoise, ...] = (
    # torch's exporter registers torchvision's detection ops when it can; facetrain has none.
    LogNoise("torch.onnx._internal.exporter._registration", "torchvision is not installed"),
    # An opset below 18 is converted with onnx's C API; the opset written is read back and
    # reported by the export (ExportResult.opset).
    LogNoise(
        "onnxscript.version_converter",
        "The model version conversion is not supported by the onnxscript version converter "
        "and fallback is enabled",
    ),
    # torch.export copies its own pytree specs (torch 2.13): a deprecation inside torch.
    WarningNoise(FutureWarning, "`isinstance(treespec, LeafSpec)` is deprecated"),
)


class _DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def quiet(noise: Sequence[LogNoise | WarningNoise]) -> Iterator[None]:
    """Drop exactly the listed records and warnings inside the ``with`` block.

    Warning filters are scoped with :func:`warnings.catch_warnings` (so the caller's filters
    are restored); log filters are added to the named loggers and removed afterwards.
    """
    prefixes: dict[str, list[str]] = {}
    for item in noise:
        if isinstance(item, LogNoise):
            prefixes.setdefault(item.logger, []).append(item.prefix)
    added = [(logging.getLogger(name), _DropPrefixes(tuple(p))) for name, p in prefixes.items()]
    with warnings.catch_warnings():
        for item in noise:
            if isinstance(item, WarningNoise):
                warnings.filterwarnings("ignore", re.escape(item.prefix), item.category)
        for logger, drop in added:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger, drop in added:
                logger.removeFilter(drop)
