"""Collectives used by Partial FC, safe to call without a process group.

Every function here degrades to an identity (or a no-op) when ``torch.distributed`` is not
available, not initialised, or the group has a single rank. That lets single-process training
and unit tests run the exact same code path as a multi-rank job.

Batch sizes may differ between ranks (the last batch of an epoch, uneven sharding), so the
gathers first exchange the per-rank sizes, pad every rank's tensor to the largest size (the
gloo and NCCL ``all_gather`` need equal shapes) and trim the padding afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_inplace",
    "all_reduce_value",
    "all_reduce_with_grad",
    "get_rank",
    "gather_sizes",
    "get_world_size",
    "replicated_term",
    "sum_own_rows",
    "sync_grad",
]

ProcessGroup = Any  # torch's ProcessGroup type; kept loose so None (the default group) fits.


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size(group: ProcessGroup | None = None) -> int:
    """World size of ``group``, or 1 when there is no initialised process group."""
    if not _dist_ready():
        return 1
    return dist.get_world_size(group)


def get_rank(group: ProcessGroup | None = None) -> int:
    """Rank of this process in ``group``, or 0 when there is no initialised process group."""
    if not _dist_ready():
        return 0
    return dist.get_rank(group)


def all_reduce_inplace(
    tensor: torch.Tensor, op: str = "sum", group: ProcessGroup | None = None
) -> torch.Tensor:
    """All-reduce ``tensor`` in place with ``op`` in {"sum", "max"}; a no-op for one rank.

    Not differentiable: use it on detached tensors only (softmax statistics, metrics).
    Returns ``tensor`` for chaining.
    """
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, op=ops[op], group=group)
    return tensor


def _gather_sizes(tensor: torch.Tensor, group: ProcessGroup | None, world: int) -> list[int]:
    """Dim-0 size of ``tensor`` on every rank of ``group``, in rank order."""
    local = torch.tensor([tensor.shape[0]], dtype=torch.long, device=tensor.device)
    sizes = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


def gather_sizes(tensor: torch.Tensor, group: ProcessGroup | None = None) -> list[int] | None:
    """Dim-0 size of ``tensor`` on every rank (one small collective), or None with one rank.

    Pass the result as ``sizes`` to several gathers of tensors with the same dim-0 size (the
    embeddings and the labels of a batch) to exchange the sizes only once.
    """
    world = get_world_size(group)
    if world == 1:
        return None
    return _gather_sizes(tensor, group, world)


def _gather_padded(
    tensor: torch.Tensor,
    group: ProcessGroup | None,
    world: int,
    sizes: list[int] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Concatenate ``tensor`` [B_r, ...] of all ranks along dim 0 -> ([sum B_r, ...], sizes)."""
    if sizes is None:
        sizes = _gather_sizes(tensor, group, world)
    elif len(sizes) != world or sizes[get_rank(group)] != tensor.shape[0]:
        raise ValueError(
            f"sizes {sizes} do not match this rank's tensor of {tensor.shape[0]} rows "
            f"in a group of {world}"
        )
    max_size = max(sizes)
    tensor = tensor.contiguous()
    if tensor.shape[0] < max_size:
        pad = tensor.new_zeros((max_size - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad], dim=0)  # [max B_r, ...]
    else:
        padded = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    out = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)  # [sum B_r, ...]
    return out, sizes


def sum_own_rows(
    grad: torch.Tensor,
    sizes: list[int],
    group: ProcessGroup | None,
    during: Callable[[], None] | None = None,
) -> torch.Tensor:
    """This rank's rows [B_r, ...] of the sum over ranks of ``grad`` [sum B_r, ...] (the
    backward of a gather): one all-to-all sends each rank the rows it owns from every rank's
    gradient (one message round; a ring all-reduce of the whole [N, D] takes two), then they
    are summed here. ``during`` (optional) runs while the rows travel."""
    grad = grad.contiguous()  # [sum B_r, ...]
    world, size = len(sizes), sizes[get_rank(group)]
    parts = grad.new_empty((world * size, *grad.shape[1:]))
    work = dist.all_to_all_single(
        parts,
        grad,
        output_split_sizes=[size] * world,
        input_split_sizes=list(sizes),
        group=group,
        async_op=True,
    )
    try:
        if during is not None:
            during()
    finally:
        work.wait()
    return parts.view(world, size, *grad.shape[1:]).sum(dim=0)  # [B_r, ...]


class _AllGatherWithGrad(torch.autograd.Function):
    """Autograd wrapper around the variable-size all-gather; see ``all_gather_with_grad``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        tensor: torch.Tensor,
        group: ProcessGroup | None,
        ddp_scale: bool,
        sizes: list[int] | None,
    ) -> torch.Tensor:
        world = get_world_size(group)
        out, ctx.sizes = _gather_padded(tensor, group, world, sizes)
        ctx.group = group
        ctx.scale = float(world) if ddp_scale else 1.0
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        # Each rank's loss only covers its own shard of the classifier, so the gradient wrt the
        # gathered batch is the SUM of every rank's partial gradient.
        local = sum_own_rows(grad_output, ctx.sizes, ctx.group)
        if ctx.scale != 1.0:
            local = local.mul_(ctx.scale)
        return local, None, None, None


def all_gather_with_grad(
    tensor: torch.Tensor,
    group: ProcessGroup | None = None,
    ddp_scale: bool = True,
    sizes: list[int] | None = None,
) -> torch.Tensor:
    """Gather ``tensor`` [B_r, ...] from all ranks into [sum_r B_r, ...], differentiably.

    Rows come in rank order, so rank r's rows start at ``sum(B_0..B_{r-1})``. Ranks may hold
    different ``B_r``.

    Backward sums the incoming gradient over ranks and returns this rank's rows (one
    all-to-all): every rank computes the same global loss ``L`` but only through its own
    classifier shard, so the true ``dL/de_r`` is the sum of all ranks' partial gradients.

    ``ddp_scale=True`` multiplies that gradient by ``world_size``. DDP *averages* backbone
    gradients over ranks, i.e. divides the sum by ``world_size``; the sum over ranks of
    ``world_size * dL/de_r * de_r/dtheta`` divided by ``world_size`` is exactly ``dL/dtheta``,
    the gradient of the global mean loss. Use ``ddp_scale=False`` when the backbone gradients
    are summed instead of averaged (or for testing the raw gradient).

    ``sizes``: every rank's dim-0 size from ``gather_sizes`` (saves one collective).
    Identity (and plain autograd pass-through) with one rank or no process group.
    """
    if get_world_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group, ddp_scale, sizes)


def all_gather_no_grad(
    tensor: torch.Tensor, group: ProcessGroup | None = None, sizes: list[int] | None = None
) -> torch.Tensor:
    """Gather ``tensor`` [B_r, ...] from all ranks into [sum_r B_r, ...] without autograd.

    Meant for labels and other integer / detached data; ranks may hold different ``B_r``.
    ``sizes`` as for ``all_gather_with_grad``.
    Identity with one rank or no process group.
    """
    world = get_world_size(group)
    if world == 1:
        return tensor
    with torch.no_grad():
        out, _ = _gather_padded(tensor.detach(), group, world, sizes)
    return out


class _AllReduceValue(torch.autograd.Function):
    """Forward: all-reduce SUM; backward: identity. See ``all_reduce_value``."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def all_reduce_value(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Sum a *sharded* partial result over ranks; the gradient stays local.

    For a global quantity ``L = sum_r L_r`` where each rank computes ``L_r`` from its own
    shard, every rank needs the value ``L`` but must back-propagate only through its own
    ``L_r`` (the other ranks back-propagate theirs). Forward all-reduces (SUM), backward is the
    identity. Identity with one rank or no process group.
    """
    if get_world_size(group) == 1:
        return tensor
    return _AllReduceValue.apply(tensor, group)


class _AllReduceWithGrad(torch.autograd.Function):
    """Forward and backward: all-reduce SUM. See ``all_reduce_with_grad``."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        out = tensor.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_with_grad(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """``y = sum_r x_r`` on every rank, differentiably.

    Every rank then uses its copy of ``y`` in its own part of a global loss, so the true
    gradient wrt ``x_r`` is the sum over ranks of ``dL_r/dy``: backward all-reduces (SUM) too.
    Identity with one rank or no process group.
    """
    if get_world_size(group) == 1:
        return tensor
    return _AllReduceWithGrad.apply(tensor, group)


class _SyncGrad(torch.autograd.Function):
    """Forward: identity (a copy); backward: all-reduce SUM. See ``sync_grad``."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        return tensor.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sync_grad(tensor: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """Use a *replicated* parameter in sharded computations: its gradient is summed over ranks.

    A parameter held identically by every rank (e.g. DiscFace's displacement vector) but used
    by each rank only with its own shard gets a partial gradient per rank; summing them (every
    rank gets the same sum) keeps the copies identical after each optimizer step. Every rank
    must use the returned tensor in its graph, or the backward collective would hang.
    Identity with one rank or no process group.
    """
    if get_world_size(group) == 1:
        return tensor
    return _SyncGrad.apply(tensor, group)


def replicated_term(value: torch.Tensor, group: ProcessGroup | None = None) -> torch.Tensor:
    """A loss term computed identically on every rank from the gathered batch.

    The embeddings' all-gather sums the gradient over ranks in backward, so a term that every
    rank computes from the same gathered rows would be counted ``world_size`` times. This keeps
    the value and scales the gradient by ``1 / world_size``. Identity with one rank.
    """
    world = get_world_size(group)
    if world == 1:
        return value
    part = value / world
    return part + (value - part).detach()
