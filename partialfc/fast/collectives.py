"""The fast backend's collectives: the batch gather (embeddings and labels in one
collective, no size exchange once the batch size is known, work overlapped with the
gradient's exchange) and an all-gather started now and waited for later.

On a CPU with gloo every collective costs about a millisecond of latency, a noticeable part
of a small step; the plain core (``partialfc.partial_fc``) gathers the embeddings
(``all_gather_with_grad``, which exchanges sizes first) and the labels separately.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from partialfc.collectives import ProcessGroup, _gather_padded, get_world_size, sum_own_rows

__all__ = ["GatherCapacity", "PendingGather", "all_gather_batch", "start_all_gather_stack"]


class PendingGather:
    """An all-gather in flight (``start_all_gather_stack``); ``wait()`` returns its result."""

    def __init__(self, out: torch.Tensor, work: Any | None) -> None:
        self._out = out
        self._work = work

    def wait(self) -> torch.Tensor:
        """``[world, *shape]``, once every rank's part has arrived."""
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._out


def start_all_gather_stack(
    tensor: torch.Tensor, group: ProcessGroup | None = None
) -> PendingGather:
    """Start gathering every rank's ``tensor`` (same shape on every rank) into
    ``[world, *shape]``, no autograd, without waiting: the caller computes something else while
    the ranks' messages travel (on CPU gloo's own thread carries them), then calls
    ``wait()``. ``tensor`` must not change before then."""
    world = get_world_size(group)
    if world == 1:
        return PendingGather(tensor.detach()[None], None)
    src = tensor.detach().contiguous()
    out = src.new_empty((world, *src.shape))
    work = dist.all_gather(list(out.unbind(0)), src, group=group, async_op=True)
    return PendingGather(out, work)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, bytes per row] uint8 view of a contiguous copy (bit-exact packing)."""
    t = tensor.detach().contiguous()
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8)


def _from_bytes(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_as_bytes`` for rows shaped and typed like ``like``."""
    return raw.contiguous().view(like.dtype).reshape(raw.shape[0], *like.shape[1:])


class GatherCapacity:
    """Rows per rank that ``all_gather_batch`` pads to: the largest batch seen so far.

    Every rank of the group updates it from the same gathered sizes, so all agree on it
    without communicating; with it, a gather needs no size exchange of its own (each rank's
    row count travels in a header row). A rank with more rows than the capacity makes every
    rank fall back to exchanging sizes for that call. Give each group its own instance.
    """

    def __init__(self) -> None:
        self.rows: int | None = None


def _gather_with_capacity(
    packed: torch.Tensor, group: ProcessGroup | None, world: int, cap: int
) -> tuple[torch.Tensor, list[int]]:
    """``_gather_padded`` of uint8 rows [B_r, R] (R >= 8) in one collective when every
    ``B_r <= cap``: rows padded to ``cap`` plus a header row holding ``B_r``."""
    rows, width = packed.shape
    frame = packed.new_zeros((cap + 1, width))
    keep = min(rows, cap)
    frame[:keep] = packed[:keep]
    frame[cap, :8] = torch.tensor([rows], dtype=torch.int64).view(torch.uint8)
    parts = [torch.empty_like(frame) for _ in range(world)]
    dist.all_gather(parts, frame, group=group)
    sizes = [int(p[cap, :8].clone().view(torch.int64)) for p in parts]
    if max(sizes) > cap:  # somebody's batch grew: gather again, sizes now known
        return _gather_padded(packed, group, world, sizes)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0), sizes


class _AllGatherBatch(torch.autograd.Function):
    """The embeddings' differentiable all-gather with the labels' bytes appended to each row;
    the backward runs ``overlap`` while the embeddings' gradient travels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        group: ProcessGroup | None,
        ddp_scale: bool,
        capacity: GatherCapacity | None,
        overlap: Callable[[], None] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        world = get_world_size(group)
        head = _as_bytes(embeddings)
        packed = torch.cat([head, _as_bytes(labels)], dim=1)
        if capacity is not None and capacity.rows is not None:
            raw, sizes = _gather_with_capacity(packed, group, world, capacity.rows)
        else:
            raw, sizes = _gather_padded(packed, group, world, None)
        if capacity is not None:
            capacity.rows = max(capacity.rows or 0, *sizes)
        out = _from_bytes(raw[:, : head.shape[1]], embeddings)
        riders = _from_bytes(raw[:, head.shape[1] :], labels)
        ctx.mark_non_differentiable(riders)
        ctx.group, ctx.sizes, ctx.overlap = group, sizes, overlap
        ctx.scale = float(world) if ddp_scale else 1.0
        return out, riders

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, _grad_riders: Any) -> tuple[Any, ...]:
        local = sum_own_rows(grad_output, ctx.sizes, ctx.group, during=ctx.overlap)
        if ctx.scale != 1.0:
            local = local.mul_(ctx.scale)
        return local, None, None, None, None, None


def all_gather_batch(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    group: ProcessGroup | None = None,
    ddp_scale: bool = True,
    capacity: GatherCapacity | None = None,
    overlap: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``all_gather_with_grad(embeddings)`` and ``all_gather_no_grad(labels)`` in one
    collective: the labels' bytes ride along with each embedding row (bit-exact for any
    dtype; ``labels`` must be 1-D with 8-byte elements). With a ``GatherCapacity`` (kept by
    the caller across steps) the size exchange is skipped once the capacity is known.
    ``overlap`` (optional) is called in backward while the embeddings' gradient travels
    between the ranks (it must not need that gradient). Returns ``([sum B_r, D], [sum
    B_r])``; the inputs unchanged with one rank."""
    if get_world_size(group) == 1:
        return embeddings, labels
    if labels.dim() != 1 or labels.element_size() != 8:
        raise ValueError(
            f"labels must be 1-D with 8-byte elements, got {tuple(labels.shape)} {labels.dtype}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels have {labels.shape[0]} rows, embeddings {embeddings.shape[0]}")
    return _AllGatherBatch.apply(embeddings, labels, group, ddp_scale, capacity, overlap)
