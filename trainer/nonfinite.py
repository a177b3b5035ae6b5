"""What the non-finite guard (``trainer.step``) needs beyond the loss: the buffers a skipped
step must give back, and where a model's state stopped being finite.

A forward moves buffers before its loss is known: BatchNorm's running statistics, a margin
head's running statistics (CurricularFace's ``t``, AdaFace's norm mean and std). A step whose
loss is non-finite is skipped, and must leave them as they were, or the next checkpoint holds
NaN running statistics that ``--resume`` loads.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["ForwardBuffers", "first_nonfinite"]

_CHUNK = 1 << 22
"""Elements checked at a time: a classifier shard of millions of rows is checked without a
temporary of its size."""


class ForwardBuffers:
    """The buffers a training forward of ``modules`` may move in place, saved and given back.

    Auxiliary losses' state (center loss's centres, one row per class of the shard) is left
    out: it moves by its rule in the optimizer step only, and a skipped step's ``zero_grad``
    drops the update (``partialfc.margins``).
    """

    def __init__(self, *modules: nn.Module) -> None:
        self.buffers = [
            buf
            for module in modules
            for name, buf in module.named_buffers()
            if "aux_losses" not in name.split(".")
        ]
        self._saved: list[torch.Tensor] = []

    def save(self) -> None:
        """Before a step's first forward."""
        self._saved = [buf.detach().clone() for buf in self.buffers]

    @torch.no_grad()
    def restore(self) -> None:
        """After a forward whose step is skipped: every buffer as :meth:`save` found it."""
        for buf, saved in zip(self.buffers, self._saved, strict=True):
            buf.copy_(saved)


def first_nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in named:
        if not tensor.is_floating_point():
            continue
        for chunk in tensor.detach().reshape(-1).split(_CHUNK):
            if not bool(torch.isfinite(chunk).all()):
                return name
    return None
