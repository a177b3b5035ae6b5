"""Memory and gradients the fast backend keeps outside autograd's usual flow.

- ``Workspace``: scratch buffers reused across steps (no fresh ``[N, S]`` / ``[S, D]``
  allocation per step), handed out only while no tensor still holds them (it reads torch's
  storage reference count, a private API that this backend alone uses).
- ``DeferredGrad`` / ``shard_handle``: the shard's gradient, computed while the embeddings'
  gradient travels between the ranks and handed to autograd later.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["DeferredGrad", "Workspace", "shard_handle"]


def _storage_users(tensor: torch.Tensor) -> int:
    """Number of tensors (and other owners) sharing ``tensor``'s storage; a large number
    when this torch build cannot tell (then a buffer is never assumed free)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return 1 << 30
    return int(count(tensor.untyped_storage()._cdata))


_FREE_STORAGE_USERS = _storage_users(torch.empty(1))
"""The count ``_storage_users`` reports for a storage referenced by one tensor only."""


class Workspace:
    """Scratch buffers kept across steps, so the big per-step tensors are not re-allocated.

    On CPU every large allocation is a fresh ``mmap`` whose pages fault in one by one (about
    1 ms per MB on the development machine); on GPU the caching allocator hides that, but the
    workspace still keeps peak memory to one ``[N, S]`` buffer and one ``[S, D]`` buffer: the
    gathered rows, which the backward overwrites with the rows' gradient. A separate
    gradient buffer (``"grad"``) is used without sampling (the rows are the shard itself) and
    when the rows were converted to another dtype; under low-precision products the gradient
    is a fresh tensor and the rows stay (their backward still reads them). Without sampling,
    when ``N <= 3D/4`` and a gradient is wanted, the logits are stored transposed at the end
    of the ``"grad"`` buffer instead of in a ``"logits"`` buffer (``_exps_t_times_into``).
    Safety: a tensor saved for backward that is overwritten by the next step's forward (or by
    the backward itself) makes autograd raise ("modified by an inplace operation") instead of
    silently using wrong values; run one backward per forward, before the next forward. A
    buffer that becomes a gradient (``get_unshared``) is reused only when no tensor outside
    the workspace still references it.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.row_cache: tuple[Any, ...] | None = None

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A ``shape`` view of buffer ``name``, grown (re-allocated) when too small."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    def get_unshared(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Like ``get``, for a result that outlives the step (a gradient): when any tensor
        outside the workspace still references the buffer (``weight.grad`` not yet cleared,
        gradient accumulation, a kept reference), that holder keeps it and a new buffer is
        made; otherwise the old one is reused and overwritten."""
        buf = self._buffers.get(name)
        if buf is not None and _storage_users(buf) > _FREE_STORAGE_USERS:
            del self._buffers[name]
        return self.get(name, shape, dtype, device)

    def drop(self, name: str) -> None:
        """Release buffer ``name`` (if any)."""
        self._buffers.pop(name, None)

    def nbytes(self) -> int:
        """Bytes held by the workspace."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (they are re-created on the next step)."""
        self._buffers.clear()
        self.row_cache = None


# ------------------------------------------------------------------------------ normalisation


class DeferredGrad:
    """The shard's gradient, computed after its autograd node, when the caller chooses.

    ``_FusedCosine``'s backward leaves the centres' gradient (a matrix product and a sweep
    over ``[S, D]``) here instead of computing it; the embeddings' all-gather runs it
    (``run``) while the embeddings' gradient travels between the ranks, and the node of
    ``shard_handle`` hands the result to autograd (``take``; it runs it itself if nobody
    did, e.g. with one rank). Without this the exchange would wait for the product.

    The gradient passes from node to node outside autograd's edges, so autograd's stream
    synchronisation does not cover it: the nodes of one step must run on one CUDA stream
    (PartialFC records them all on the current stream). When a backward only asks for the
    embeddings' gradient, the gather's backward still computes the deferred gradient and it
    is kept (here) until the graph is freed.
    """

    def __init__(self) -> None:
        self._fn: Any = None
        self._result: torch.Tensor | None = None

    def defer(self, fn: Any) -> None:
        """Keep ``fn() -> gradient`` for later."""
        self._fn = fn
        self._result = None

    def run(self) -> None:
        """Compute the deferred gradient now (no-op when there is none)."""
        if self._fn is not None:
            fn, self._fn = self._fn, None
            self._result = fn()

    def take(self) -> torch.Tensor | None:
        """The gradient (computed now if still pending); None when nothing was deferred."""
        self.run()
        out, self._result = self._result, None
        return out


class _ShardHandle(torch.autograd.Function):
    """A 0-dim stand-in for the shard in the graph; its backward delivers the shard's
    gradient from a ``DeferredGrad``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, deferred: DeferredGrad) -> torch.Tensor:  # type: ignore[override]
        ctx.deferred = deferred
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _grad: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        return ctx.deferred.take(), None


def shard_handle(weight: torch.Tensor, deferred: DeferredGrad) -> torch.Tensor:
    """A 0-dim tensor standing for ``weight`` in ``fused_cosine`` (with ``deferred``): the
    gradient ``fused_cosine`` computes for ``weight`` reaches it through this handle's node,
    as late as autograd runs that node. Create the handle before the embeddings' all-gather:
    autograd runs later-created nodes first, so the gather's backward (and the exchange it
    overlaps with the deferred product) comes before the handle's."""
    return _ShardHandle.apply(weight, deferred)
