"""``FusedPartialFC``: the plain core's interface and numbers, computed faster on a CPU.

For heads whose non-target logits are ``s * cos`` (``MarginHead.fused_scale``: ArcFace,
CosFace, NormFace, the combined margins, AdaFace, MagFace, DiscFace) a step takes the fused
path of ``partialfc.fast.fused``: no ``[N, S]`` tensor in autograd, buffers reused across
steps (``Workspace``), memory-bound sweeps as C++ kernels (``partialfc.fast.cpu_kernels``),
the labels riding in the embeddings' all-gather and the matrix products overlapping the
collectives. Every other head runs the plain core. Tests bind both to the plain core: equal
loss and gradients for every head, W = 1..4, with and without sampling.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F

from partialfc.fast import cpu_kernels
from partialfc.fast.buffers import DeferredGrad, Workspace, shard_handle
from partialfc.fast.collectives import GatherCapacity, all_gather_batch
from partialfc.fast.fused import fused_cosine
from partialfc.fast.rows import normalize_rows
from partialfc.fast.softmax import fused_softmax_ce
from partialfc.margins import MarginHead
from partialfc.ops import NORM_EPS, gather_rows
from partialfc.partial_fc import PartialFC
from partialfc.stats import StepStats, angle_stats, negative_angle_sums

__all__ = ["FusedPartialFC"]


def _sgd_rows(weight: torch.Tensor, momentum: torch.Tensor | None, index: torch.Tensor, *args):
    """The row-sparse SGD update as one kernel sweep; False where the kernel does not apply."""
    kern = cpu_kernels.usable(weight, args[0], momentum)
    if kern is None or not index.is_contiguous():
        return False
    kern.sgd_rows_(weight, momentum, index, *args)
    return True


class FusedPartialFC(PartialFC):
    """``PartialFC`` on the fast CPU backend (``partialfc.backend: cpu_fused``).

    Args: those of ``PartialFC``, and
        low_memory: keep the big per-step buffers in a ``Workspace`` reused across steps: a
            forward may overwrite what the previous forward's backward needs (autograd then
            raises), so run each backward before the next forward. False allocates fresh
            tensors each step (gradcheck, several forwards before a backward).

    Attributes: those of ``PartialFC``, and ``workspace`` (None when ``low_memory=False``).
    """

    def __init__(self, *args: Any, low_memory: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.storage_dtype != torch.float32:
            raise ValueError(
                f"the cpu_fused backend keeps float32 class centres; storage_dtype "
                f"{self.storage_dtype} runs on the plain backend"
            )
        self.low_memory = bool(low_memory)
        self.workspace: Workspace | None = Workspace() if self.low_memory else None
        # Largest per-rank batch so far, the same on every rank: lets the batch's all-gather
        # skip its size exchange.
        self._gather_capacity = GatherCapacity()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, low_memory={self.low_memory}"

    def fuses(self, head: MarginHead) -> bool:
        """Whether a step with ``head`` takes the fused path (else the plain core's)."""
        return (
            head.uses_classifier
            and head.fused_scale is not None
            and self.num_subcenters == 1
            and not head.needs_bias
        )

    def _optimizer_hooks(self) -> dict[str, Any]:
        return {"row_cache": self._cached_rows, "sgd_rows": _sgd_rows}

    def _cached_rows(self, param: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """The forward's gathered ``weight[index]`` if ``param`` is the shard and unchanged
        (tensor version counters tell: this backend owns the buffers it hands out)."""
        cache = self.workspace.row_cache if self.workspace is not None else None
        if cache is None:
            return None
        weight, cached_index, rows, weight_version, rows_version = cache
        if param is not weight or param is not self.weight:
            return None
        if weight._version != weight_version or rows._version != rows_version:
            return None
        if cached_index.shape != index.shape or not torch.equal(cached_index, index):
            return None
        return rows

    def _normalize(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize_rows(emb)  # one fused backward instead of autograd's few passes

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, StepStats]:
        """As ``PartialFC.forward``."""
        head: MarginHead = self.margin  # type: ignore[assignment]
        if not self.fuses(head):
            return super().forward(embeddings, labels)
        self._check_inputs(embeddings, labels)
        deferred = handle = None
        if self.weight.requires_grad and torch.is_grad_enabled():
            # The shard's gradient is computed while the embeddings' gradient is exchanged
            # (the handle must exist before the gather; see shard_handle).
            deferred = DeferredGrad()
            handle = shard_handle(self.weight, deferred)
        # [N, D], [N]: the labels travel in the embeddings' collective.
        emb_all, world_labels = all_gather_batch(
            embeddings,
            labels.long(),
            self.group,
            self.ddp_scale,
            self._gather_capacity,
            overlap=None if deferred is None else deferred.run,
        )
        loss = functools.partial(self._fused_loss, shard=(handle, deferred))
        return self._loss(emb_all, world_labels, loss)

    def _fused_loss(
        self,
        head: MarginHead,
        emb: torch.Tensor,
        norms: torch.Tensor,
        x_hat: torch.Tensor,
        world_labels: torch.Tensor,
        mm_dtype: torch.dtype,
        shard: tuple[torch.Tensor | None, DeferredGrad | None],
    ) -> tuple[torch.Tensor, StepStats]:
        index, ctx = self._sample_step(world_labels, emb, norms, x_hat)
        rows, cols, n = ctx.rows, ctx.cols, ctx.num_rows
        scale = head.fused_scale
        assert scale is not None
        sparse = self.update == "sampled"
        handle, deferred = shard
        z, col_scale, c_t, link = fused_cosine(
            x_hat,
            self.weight,
            index,
            rows,
            cols,
            scale,
            mm_dtype,
            sparse,
            self.workspace,
            handle,
            deferred,
        )  # [N, S] (times col_scale [S]: scale * cos), [R]
        ctx.target_cos = c_t
        target_rows = cols if index is None else index[cols]  # [R] local shard rows

        def target_centers() -> torch.Tensor:
            w = gather_rows(self.weight, target_rows, sparse=sparse, unique=False)
            return F.normalize(w.to(x_hat.dtype), dim=1, eps=NORM_EPS)

        def sampled_centers() -> torch.Tensor:
            w = self.weight if index is None else self._gather(self.weight, index)
            return F.normalize(w.to(x_hat.dtype), dim=1, eps=NORM_EPS)

        ctx.target_centers_fn = target_centers
        ctx.sampled_centers_fn = sampled_centers
        with torch.no_grad():
            # Statistics that need a global sum ride along with the softmax's collective: the
            # target cosine of every row (and whether a rank holds it), and the sampled
            # negative-angle sums.
            extra = z.new_zeros(2 * n + 2)
            extra[rows] = c_t.detach().to(extra.dtype)
            extra[n + rows] = 1.0
            extra[2 * n :] = negative_angle_sums(
                z.detach(), None, scale, self.stats_columns, col_scale
            )
        f = head.target_logits(ctx, c_t)  # [R]
        loss_ce, hardest, extra = fused_softmax_ce(z, f, rows, self.group, link, extra, col_scale)
        ctx.cache["global_target_cos"] = (extra[:n], extra[n : 2 * n] > 0)
        stats = StepStats({"ce": loss_ce.detach()}, None, int(self.last_sampled_global.numel()))
        total = self._add_extra_terms(head, ctx, loss_ce, stats)
        with torch.no_grad():
            target_cos, has = ctx.global_target_cos()
            hardest_cos = hardest / scale  # [N]
            stats.angles = angle_stats(target_cos, has, hardest_cos, extra[2 * n :], self.hist_size)
        return total, stats
