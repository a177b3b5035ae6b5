"""Partial FC: a class-centre matrix sharded over ranks, with sampled margin softmax.

See the package docstring for the vocabulary (local / global / shard / class_start /
sampled index). One step, for every rank r::

    embeddings [B_r, D], labels [B_r]
      -> all-gather (embeddings with grad)        -> [N, D], [N]      N = sum_r B_r
      -> sampled index of the shard (positives + random negatives)     -> [S]
      -> cos = normalize(emb) @ normalize(W_r[sampled]).T              -> [N, S] (fp32)
      -> logits = margin(cos, target)                                  -> [N, S]
      -> distributed softmax cross-entropy (all-reduce max / sum)      -> loss (same on all ranks)
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from partialfc.collectives import (
    ProcessGroup,
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_inplace,
    get_rank,
    get_world_size,
)
from partialfc.partition import class_range

__all__ = ["INIT_BLOCK_ROWS", "PartialFC", "distributed_cross_entropy", "init_class_centers"]

INIT_BLOCK_ROWS = 1024
"""Rows per independently seeded block of the initial class-centre matrix.

Part of the reproducibility contract: row i of the initial matrix depends only on
``(seed, i // INIT_BLOCK_ROWS, i % INIT_BLOCK_ROWS, embedding_size, init_std)``, so the full
matrix is the same for every world size. Changing it changes every initialisation.
"""


def _mixed_seed(tag: str, *parts: int) -> int:
    """Deterministic 63-bit seed from a tag and integers (stable across runs and machines).

    A hash rather than arithmetic such as ``seed * K + i``, so that different (seed, i) pairs
    cannot collide into the same stream.
    """
    text = ":".join([tag, *(str(int(p)) for p in parts)]).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_class_centers(
    start: int,
    count: int,
    embedding_size: int,
    seed: int = 0,
    std: float = 0.01,
    block_rows: int = INIT_BLOCK_ROWS,
) -> torch.Tensor:
    """Initial rows ``[start, start + count)`` of the class-centre matrix -> [count, D] float32.

    Values are normal(0, std), generated on CPU block by block: block b (rows
    ``[b*block_rows, (b+1)*block_rows)``) comes from its own generator seeded by ``(seed, b)``.
    A rank therefore only generates the blocks overlapping its shard (memory
    O((count + block_rows) * D) instead of O(num_classes * D)) and still gets exactly the rows a
    single process would hold.
    """
    if count < 0 or start < 0:
        raise ValueError(f"start and count must be >= 0, got start={start}, count={count}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    out = torch.empty(count, embedding_size, dtype=torch.float32)  # [count, D]
    if count == 0:
        return out
    stop = start + count
    for block in range(start // block_rows, (stop - 1) // block_rows + 1):
        gen = torch.Generator().manual_seed(_mixed_seed("init", seed, block))
        rows = torch.empty(block_rows, embedding_size, dtype=torch.float32)  # [block_rows, D]
        rows.normal_(0.0, std, generator=gen)
        lo = max(start, block * block_rows)
        hi = min(stop, (block + 1) * block_rows)
        out[lo - start : hi - start] = rows[lo - block * block_rows : hi - block * block_rows]
    return out


class _DistSoftmaxCE(torch.autograd.Function):
    """Softmax cross-entropy whose class dimension is split over ranks.

    Forward, per row i of the global batch (every rank holds all N rows, a slice of columns):
        m_i = max over all ranks' columns (all-reduce MAX, detached: it only stabilises exp)
        Z_i = sum over all ranks of sum_j exp(z_ij - m_i)                  (all-reduce SUM)
        t_i = z_iy - m_i on the one rank holding y, 0 elsewhere            (all-reduce SUM)
        loss = mean_i (log Z_i - t_i)
    Backward on the local columns: (softmax - onehot) / N * grad_loss.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None
    ) -> torch.Tensor:
        n = logits.shape[0]
        with torch.no_grad():
            row_max = logits.max(dim=1).values  # [N]
            all_reduce_inplace(row_max, "max", group)
            probs = (logits - row_max[:, None]).exp_()  # [N, S], exp(z - m)
            sum_exp = probs.sum(dim=1)  # [N]
            all_reduce_inplace(sum_exp, "sum", group)
            rows = torch.nonzero(target >= 0).squeeze(1)  # [R]
            cols = target[rows]  # [R]
            target_logit = logits.new_zeros(n)  # [N]
            target_logit[rows] = logits[rows, cols] - row_max[rows]
            all_reduce_inplace(target_logit, "sum", group)
            loss = (sum_exp.log() - target_logit).mean()
            probs.div_(sum_exp[:, None])  # [N, S] softmax over the global columns
        ctx.save_for_backward(probs, rows, cols)
        ctx.n = n
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        probs, rows, cols = ctx.saved_tensors
        scale = grad_loss / ctx.n
        grad = probs * scale  # [N, S], new tensor: `probs` stays valid for retain_graph
        grad[rows, cols] -= scale
        return grad, None, None


def distributed_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Mean softmax cross-entropy over N rows whose columns are sharded over ``group``.

    ``logits`` [N, S_r] are this rank's columns, ``target`` [N] the column of each row's class
    on this rank or -1 when it lives elsewhere (exactly one rank must hold it). Every rank
    returns the same 0-dim loss. With no process group it equals ``F.cross_entropy``.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [N, S] and target [N]; got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    return _DistSoftmaxCE.apply(logits, target, group)


class PartialFC(nn.Module):
    """Sharded, sampled margin-softmax classifier (one instance per rank; not wrapped by DDP).

    Args:
        margin: head mapping (cos [N, S], target [N]) -> logits [N, S], e.g. ``CombinedMargin``.
        embedding_size: D, width of the embeddings.
        num_classes: C, global number of identities (must be >= world_size).
        sample_rate: fraction of this rank's shard taking part each step, in (0, 1]. All
            positives of the global batch are always kept; random negatives fill up to
            ``round(sample_rate * count)`` rows.
        rank, world_size: position of this process; the shard is
            ``class_range(num_classes, rank, world_size)``. With an initialised process group
            they must match ``group``.
        group: process group for the collectives (None = default group).
        seed: seeds both the weight initialisation (see ``init_class_centers``; identical full
            matrix for every world size) and the negative sampling (a generator seeded by
            ``(seed, rank)``, advanced every step, so runs are reproducible).
        init_std: standard deviation of the normal initialisation of the class centres.
        ddp_scale: multiply the embedding gradient by world_size to undo DDP's averaging (see
            ``all_gather_with_grad``). Set False when backbone gradients are summed.
        compute_dtype: dtype of the cosine matmul. None: the autocast dtype when autocast is
            active for the embeddings' device, else float32. The result is always cast back to
            (at least) float32; margin and softmax run there.
        device: where the shard lives (initial values are generated on CPU, then moved).

    Attributes:
        weight: ``nn.Parameter`` [num_local, D], this rank's shard.
        class_start, num_local: global id of the shard's first class and the shard's size.
        last_sampled_global: LongTensor [S], sorted global class ids used in the last forward.
        sample_generator: the CPU ``torch.Generator`` for negative sampling; checkpoint its
            ``get_state()`` to resume the exact sampling stream.

    Gradient note: the sampled rows are taken by indexing the Parameter, so with
    ``sample_rate < 1`` ``weight.grad`` is dense over the whole shard, with zeros in rows that
    were not sampled. An optimizer with momentum or weight decay therefore still moves the
    unsampled rows; the final update semantics (sparse / masked) are decided by the trainer.
    """

    def __init__(
        self,
        margin: nn.Module,
        embedding_size: int,
        num_classes: int,
        sample_rate: float,
        rank: int,
        world_size: int,
        group: ProcessGroup | None = None,
        seed: int = 0,
        init_std: float = 0.01,
        ddp_scale: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(embedding_size, bool) or not isinstance(embedding_size, int):
            raise ValueError(f"embedding_size must be an int, got {embedding_size!r}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size}")
        start, count = class_range(num_classes, rank, world_size)
        if num_classes < world_size:
            raise ValueError(
                f"num_classes={num_classes} must be >= world_size={world_size}: "
                "every rank needs at least one class centre"
            )
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | float):
            raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not (isinstance(init_std, int | float) and math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be a finite number > 0, got {init_std!r}")
        if compute_dtype is not None and not (
            isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
        ):
            raise ValueError(f"compute_dtype must be a floating torch.dtype, got {compute_dtype}")
        if get_world_size(group) > 1 or world_size > 1:
            self._check_group_matches(group, rank, world_size)

        self.margin = margin
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.seed = seed
        self.ddp_scale = ddp_scale
        self.compute_dtype = compute_dtype
        self.class_start = start
        self.num_local = count
        init = init_class_centers(start, count, embedding_size, seed=seed, std=float(init_std))
        self.weight = nn.Parameter(init.to(device) if device is not None else init)  # [C_r, D]
        self.sample_generator = torch.Generator().manual_seed(_mixed_seed("sample", seed, rank))
        self.last_sampled_global: torch.Tensor | None = None

    @staticmethod
    def _check_group_matches(group: ProcessGroup | None, rank: int, world_size: int) -> None:
        """With a live process group, rank/world_size must be the group's; checked lazily
        (at forward) when the module is built before the group exists."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        g_world, g_rank = get_world_size(group), get_rank(group)
        if (g_rank, g_world) != (rank, world_size):
            raise ValueError(
                f"rank={rank}, world_size={world_size} do not match the process group "
                f"(rank {g_rank} of {g_world})"
            )

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"class_start={self.class_start}, num_local={self.num_local}, "
            f"sample_rate={self.sample_rate}, rank={self.rank}, world_size={self.world_size}"
        )

    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"embeddings must be [B, {self.embedding_size}], got {tuple(embeddings.shape)}"
            )
        if not embeddings.is_floating_point():
            raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must be [B={embeddings.shape[0]}] to match embeddings, "
                f"got {tuple(labels.shape)}"
            )
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.device != embeddings.device:
            raise ValueError(f"labels are on {labels.device} but embeddings on {embeddings.device}")
        if labels.numel() > 0:
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"labels must be in [0, num_classes={self.num_classes}), got {bad}"
                )
        if self.world_size > 1:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    f"PartialFC with world_size={self.world_size} needs an initialised "
                    "process group"
                )
            self._check_group_matches(self.group, self.rank, self.world_size)

    def _sample(
        self, local_labels: torch.Tensor, is_local: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Choose the sampled index [S] (None = the whole shard) and per-row targets [N]."""
        device = self.weight.device
        if self.sample_rate >= 1.0:
            target = torch.where(is_local, local_labels, -1)  # [N]
            return None, target
        positives = torch.unique(local_labels[is_local])  # [P], sorted
        num_pos = int(positives.numel())
        num_sample = min(
            self.num_local, max(int(round(self.sample_rate * self.num_local)), num_pos)
        )
        # Random keys on CPU from the seeded generator (same stream on CPU and GPU runs);
        # positives get a key above every random key, so top-k keeps them all and fills the
        # rest with a uniform sample without replacement of the other rows.
        keys = torch.rand(self.num_local, generator=self.sample_generator).to(device)  # [C_r]
        keys[positives] = 2.0
        index = torch.topk(keys, num_sample, sorted=False).indices.sort().values  # [S]
        position = torch.full((self.num_local,), -1, dtype=torch.long, device=device)  # [C_r]
        position[index] = torch.arange(num_sample, device=device)
        target = torch.where(is_local, position[local_labels.clamp(0, self.num_local - 1)], -1)
        return index, target  # [S], [N]

    def _cosine(self, emb: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """cos [N, S] = normalize(emb) @ normalize(weight).T, returned in >= float32."""
        device_type = emb.device.type
        out_dtype = torch.promote_types(torch.promote_types(emb.dtype, weight.dtype), torch.float32)
        mm_dtype = self.compute_dtype
        if mm_dtype is None:
            autocast_on = torch.is_autocast_enabled(device_type)
            mm_dtype = torch.get_autocast_dtype(device_type) if autocast_on else out_dtype
        # Autocast is switched off here so the dtypes below are exactly the ones chosen.
        with torch.autocast(device_type=device_type, enabled=False):
            norm_emb = F.normalize(emb.to(out_dtype), dim=1)  # [N, D]
            norm_w = F.normalize(weight.to(out_dtype), dim=1)  # [S, D]
            cos = norm_emb.to(mm_dtype) @ norm_w.to(mm_dtype).T  # [N, S]
            return cos.to(out_dtype).clamp(-1.0, 1.0)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss of this step (same value on every rank) and angle statistics.

        Args:
            embeddings: [B_r, D] this rank's embeddings (B_r may differ between ranks).
            labels: [B_r] global class ids in [0, num_classes); never modified.

        Returns:
            ``(loss, stats)``: loss is a 0-dim tensor, the mean over the N global rows. stats
            (no grad, identical on all ranks except ``num_sampled``):
            ``target_angle_mean_deg`` / ``target_angle_std_deg`` (population std) of
            ``arccos(cos_target)`` before the margin, ``hardest_negative_angle_mean_deg`` (per
            row the largest non-target cosine over every rank's sampled columns; NaN when
            there is no negative class at all), and ``num_sampled`` (this rank's S, an int).
            Angle stats are 0-dim tensors so that reading them does not force a device sync.
        """
        self._check_inputs(embeddings, labels)
        emb = all_gather_with_grad(embeddings, self.group, self.ddp_scale)  # [N, D]
        world_labels = all_gather_no_grad(labels.long(), self.group)  # [N]
        local_labels = world_labels - self.class_start  # [N], new tensor
        is_local = (local_labels >= 0) & (local_labels < self.num_local)  # [N]

        index, target = self._sample(local_labels, is_local)  # [S] or None, [N]
        if index is None:
            weight = self.weight  # [C_r, D]
            sampled_global = torch.arange(
                self.class_start, self.class_start + self.num_local, device=self.weight.device
            )
        else:
            weight = self.weight[index]  # [S, D]
            sampled_global = index + self.class_start
        self.last_sampled_global = sampled_global

        cos = self._cosine(emb, weight)  # [N, S]
        logits = self.margin(cos, target)  # [N, S]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        loss = _DistSoftmaxCE.apply(logits, target, self.group)
        stats = self._stats(cos.detach(), target)
        stats["num_sampled"] = int(weight.shape[0])
        return loss, stats

    @torch.no_grad()
    def _stats(self, cos: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
        """Target / hardest-negative angles from cos [N, S] (before the margin), global."""
        n, s = cos.shape
        rows = torch.nonzero(target >= 0).squeeze(1)  # [R]
        cols = target[rows]  # [R]
        target_cos = cos.new_zeros(n)  # [N]
        target_cos[rows] = cos[rows, cols]
        all_reduce_inplace(target_cos, "sum", self.group)  # exactly one rank holds each target

        # Hardest negative: top-2 per row is one pass; if the best column is the target, the
        # runner-up is the hardest negative. -2 marks "no negative on this rank".
        k = min(2, s)
        top_val, top_idx = torch.topk(cos, k, dim=1)  # [N, k]
        neg = top_val[:, 0].clone()  # [N]
        best_is_target = top_idx[:, 0] == target  # [N]; target -1 never matches
        runner_up = top_val[:, 1] if k == 2 else torch.full_like(neg, -2.0)
        neg = torch.where(best_is_target, runner_up, neg)
        all_reduce_inplace(neg, "max", self.group)
        neg = torch.where(neg < -1.5, torch.full_like(neg, math.nan), neg)

        target_deg = torch.rad2deg(torch.acos(target_cos.clamp(-1.0, 1.0)))  # [N]
        neg_deg = torch.rad2deg(torch.acos(neg))  # [N]
        return {
            "target_angle_mean_deg": target_deg.mean(),
            "target_angle_std_deg": target_deg.std(correction=0),
            "hardest_negative_angle_mean_deg": neg_deg.mean(),
        }
