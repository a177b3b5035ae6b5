"""Partial FC: a class-centre matrix sharded over ranks, with sampled margin softmax.

See the package docstring for the vocabulary (local / global / shard / class_start /
sampled index). One step, for every rank r::

    embeddings [B_r, D], labels [B_r]
      -> all-gather (embeddings with grad)        -> [N, D], [N]      N = sum_r B_r
      -> sampled index of the shard (positives + random negatives)     -> [S]
      -> cos = normalize(emb) @ normalize(W_r[sampled]).T              -> [N, S]
      -> margin head -> logits (fused path: only the [R] target logits) -> [N, S]
      -> distributed softmax cross-entropy (all-reduce max / sum)      -> loss (same on all ranks)
      -> + head regulariser + weighted auxiliary losses
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
    GatherCapacity,
    ProcessGroup,
    all_gather_batch,
    all_reduce_inplace,
    get_rank,
    get_world_size,
)
from partialfc.context import MarginContext, ShardSpec
from partialfc.fused import (
    NORM_EPS,
    DeferredGrad,
    Workspace,
    _DistSoftmaxCE,
    distributed_cross_entropy,
    fused_cosine,
    fused_softmax_ce,
    gather_rows,
    normalize_rows,
    shard_handle,
)
from partialfc.margins import MarginHead
from partialfc.optim import DEFAULT_CHUNK_ELEMENTS, ShardOptimizer, clip_grad_norm_
from partialfc.partition import class_range

__all__ = [
    "INIT_BLOCK_ROWS",
    "UPDATE_MODES",
    "PartialFC",
    "distributed_cross_entropy",
    "init_class_centers",
]

UPDATE_MODES = ("dense", "sampled")
"""Update semantics of unsampled rows; see ``PartialFC`` and ``partialfc.optim``."""


def _mixed_seed(tag: str, *parts: int) -> int:
    """Deterministic 63-bit seed from a tag and integers (stable across runs and machines).

    A hash rather than arithmetic such as ``seed * K + i``, so that different (seed, i) pairs
    cannot collide into the same stream.
    """
    text = ":".join([tag, *(str(int(p)) for p in parts)]).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


INIT_BLOCK_ROWS = 1024
"""Rows per independently seeded block of the initial class-centre matrix.

Part of the reproducibility contract: row i of the initial matrix depends only on
``(seed, i // INIT_BLOCK_ROWS, i % INIT_BLOCK_ROWS, embedding_size, init_std)``, so the full
matrix is the same for every world size. Changing it changes every initialisation.
"""


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


def _largest_sorted(keys: torch.Tensor, k: int, num_above_one: int) -> torch.Tensor:
    """Ascending indices of the ``k`` largest ``keys`` [n]: ``num_above_one`` keys above 1
    (the positives), the rest uniform in [0, 1) (one draw each).

    The same set as ``topk(keys, k).indices.sort()`` at a fraction of its cost: the top k
    are all among the keys above a threshold that about ``k`` plus a few standard deviations
    of the uniform keys exceed (fallback to the full top-k in the rare case too few do), and
    a mask over those candidates, which ``nonzero`` returns in order, replaces the sort.
    """
    n = keys.numel()
    if k >= n:
        return torch.arange(n, device=keys.device)
    need, pool = k - num_above_one, n - num_above_one
    threshold = 1.0 - (need + 4.0 * math.sqrt(max(need, 0)) + 16.0) / max(pool, 1)
    if threshold > 0.0:
        candidates = torch.nonzero(keys > threshold).squeeze(1)  # ascending
        if candidates.numel() >= k:
            picked = torch.topk(keys[candidates], k, sorted=False).indices
            keep = torch.zeros(candidates.numel(), dtype=torch.bool, device=keys.device)
            keep[picked] = True
            return candidates[keep]
    return torch.topk(keys, k, sorted=False).indices.sort().values


class PartialFC(nn.Module):
    """Sharded, sampled margin-softmax classifier (one instance per rank; not wrapped by DDP).

    Args:
        margin: a ``MarginHead`` (``build_margin(name, **kwargs)``); bound to this shard here,
            so do not share one stateful head between two PartialFC modules.
        embedding_size: D, width of the embeddings.
        num_classes: C, global number of identities (must be >= world_size).
        sample_rate: fraction of this rank's shard taking part each step, in (0, 1]. All
            positives of the global batch are always kept; random negatives fill up to
            ``round(sample_rate * count)`` rows.
        rank, world_size: position of this process; the shard is
            ``class_range(num_classes, rank, world_size)``.
        group: process group (None: the default group when initialised).
        seed: initialisation and sampling seed. The initial matrix is identical for every
            world size (see ``init_class_centers``); sampling uses a per-rank CPU generator.
        init_std: standard deviation of the normal initial class centres.
        ddp_scale: multiply the embeddings' gradient by world_size (see
            ``all_gather_with_grad``); set False when backbone gradients are summed.
        compute_dtype: dtype of the cosine matmul. None: the autocast dtype when autocast is
            active for the embeddings' device, else float32 (float64 inputs stay float64).
            Margins and the softmax always run in float32 or wider.
        device: where the shard lives (initial values are generated on CPU, then moved).
        update: ``"dense"`` or ``"sampled"``: what happens to rows that were not sampled.
            ``"dense"``: ``weight.grad`` is dense with zero rows, so momentum and weight decay
            of an ordinary ``torch.optim`` optimizer keep moving every row every step.
            ``"sampled"``: ``weight.grad`` (and every per-class head parameter's) is row-sparse
            and the optimizer from ``build_optimizer`` updates only the sampled rows; an
            unsampled row is frozen for that step (weights and optimizer state). **Chosen
            default for sample_rate < 1: "sampled"** (measured in BENCHMARKS.md, "Partial
            FC": the dense update costs a full pass over the shard's weights, gradient and
            optimizer state every step, several times the sampled matrix products at
            sample_rate 0.1, and keeps shrinking/moving rows whose gradient was not even
            computed). The constructor default stays "dense" only because it works with any
            optimizer; at sample_rate = 1 the two are the same update.
        fused: use the fused kernel for heads that allow it (``MarginHead.fused_scale``);
            False forces the generic autograd path (same numbers; for tests and new heads).
        low_memory: keep the big per-step buffers in a ``Workspace`` reused across steps: a
            forward may overwrite what the previous forward's backward needs (autograd then
            raises), so run each backward before the next forward. False allocates fresh
            tensors each step (gradcheck, several forwards before a backward).
        stats_columns: columns per rank used to estimate the mean negative angle.
        hist_size: at most this many target angles in ``stats["target_angles_deg"]``.

    Attributes:
        weight: ``nn.Parameter`` [num_local * K, D], this rank's shard (K sub-centres per
            class, row ``class * K + k``; K = 1 for all but sub-center ArcFace).
        class_start, num_local: global id of the shard's first class and the shard's size.
        num_steps: buffer, training steps so far (SphereFace's annealing reads it): counted
            by every training forward, unless ``count_steps`` is False and the caller counts
            optimizer steps itself (gradient accumulation, skipped steps).
        last_sampled_global: LongTensor [S], sorted global class ids used in the last forward.
        sample_generator: the CPU ``torch.Generator`` for negative sampling; checkpoint its
            ``get_state()`` to resume the exact sampling stream.
        workspace: the ``Workspace`` (None when ``low_memory=False``).
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
        update: str = "dense",
        fused: bool = True,
        low_memory: bool = True,
        stats_columns: int = 64,
        hist_size: int = 1024,
    ) -> None:
        super().__init__()
        if not isinstance(margin, MarginHead):
            raise ValueError(
                f"margin must be a MarginHead (see build_margin), got {type(margin).__name__}"
            )
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
        if update not in UPDATE_MODES:
            raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")
        for name, value in (("stats_columns", stats_columns), ("hist_size", hist_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if get_world_size(group) > 1 or world_size > 1:
            self._check_group_matches(group, rank, world_size)

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
        self.update = update
        self.fused = bool(fused)
        self.low_memory = bool(low_memory)
        self.stats_columns = stats_columns
        self.hist_size = hist_size
        self.num_subcenters = int(margin.num_subcenters)
        k = self.num_subcenters
        if margin.uses_classifier:
            init = init_class_centers(
                start * k, count * k, embedding_size, seed=seed, std=float(init_std)
            )
        else:
            init = torch.empty(0, embedding_size)
        self.weight = nn.Parameter(init.to(device) if device is not None else init)  # [C_r*K, D]
        spec = ShardSpec(
            num_classes=num_classes,
            class_start=start,
            num_local=count,
            embedding_size=embedding_size,
            rank=rank,
            world_size=world_size,
            seed=seed,
            device=self.weight.device,
            group=group,
        )
        margin.bind(spec)
        self.margin = margin
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long, device=device))
        self.count_steps = True
        """Count ``num_steps`` in every training forward; the trainer sets False and counts
        optimizer steps (one per accumulation cycle, none for a skipped step)."""
        self.sample_generator = torch.Generator().manual_seed(_mixed_seed("sample", seed, rank))
        self.last_sampled_global: torch.Tensor | None = None
        self.workspace: Workspace | None = Workspace() if self.low_memory else None
        # Largest per-rank batch so far, the same on every rank: lets the batch's all-gather
        # skip its size exchange.
        self._gather_capacity = GatherCapacity()

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
            f"sample_rate={self.sample_rate}, rank={self.rank}, world_size={self.world_size}, "
            f"update={self.update}, fused={self.fused}, low_memory={self.low_memory}"
        )

    # ------------------------------------------------------------------------- optimizer
    def build_optimizer(
        self,
        name: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> ShardOptimizer:
        """The classifier's optimizer (SGD momentum or AdamW) over ``self.parameters()``.

        Required with ``update="sampled"`` (row-sparse gradients); with ``"dense"`` it gives
        the same updates as ``torch.optim.SGD`` / ``AdamW`` without their shard-sized
        temporaries. It reuses the rows this module gathered in its forward when they are
        still current (one gather fewer per step). Its ``step`` also applies the head's
        rule-based state updates (center loss's centres) and its ``zero_grad`` drops them;
        with another optimizer, call ``self.margin.apply_updates()`` after each step.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        return ShardOptimizer(
            params,
            name=name,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            chunk_elements=chunk_elements,
            row_cache=self._cached_rows,
            after_step=self.margin.apply_updates,
            after_zero_grad=self.margin.discard_updates,
        )

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the whole classifier's gradient (every shard, replicated head parameters once)
        to ``max_norm``; collective over ``group``. Returns the norm before clipping."""
        return clip_grad_norm_(
            self.parameters(), max_norm, self.group, self.margin.replicated_parameters()
        )

    def _cached_rows(self, param: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        """The forward's gathered ``weight[index]`` if ``param`` is the shard and unchanged."""
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

    # ------------------------------------------------------------------------- forward
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
        # At least one row: a rank with no positives and a budget that rounds to 0 would
        # otherwise have no columns at all (an empty softmax part and an empty gradient).
        num_sample = min(
            self.num_local, max(int(round(self.sample_rate * self.num_local)), num_pos, 1)
        )
        # Random keys on CPU from the seeded generator (same stream on CPU and GPU runs);
        # positives get a key above every random key, so top-k keeps them all and fills the
        # rest with a uniform sample without replacement of the other rows.
        keys = torch.rand(self.num_local, generator=self.sample_generator).to(device)  # [C_r]
        keys[positives] = 2.0
        index = _largest_sorted(keys, num_sample, num_pos)  # [S]
        # A local label is always sampled; its column is its rank in the sorted index.
        column = torch.searchsorted(index, local_labels.clamp(0, self.num_local - 1))
        target = torch.where(is_local, column, -1)
        return index, target  # [S], [N]

    def _mm_dtype(self, device_type: str, out_dtype: torch.dtype) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return out_dtype

    def _gather(self, param: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``param[index]`` (sorted, unique index) with this module's gradient layout."""
        return gather_rows(param, index, sparse=self.update == "sampled", unique=True)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss of this step (same value on every rank) and angle statistics.

        Args:
            embeddings: [B_r, D] this rank's embeddings (B_r may differ between ranks and
                between steps).
            labels: [B_r] global class ids in [0, num_classes); never modified.

        Returns:
            ``(loss, stats)``: loss is a 0-dim tensor, the mean over the N global rows of the
            softmax cross-entropy plus the head's regulariser and weighted auxiliary losses.
            stats (no grad, identical on all ranks except ``num_sampled``; 0-dim tensors so
            that reading them does not force a device sync), over the global batch and
            before the margin:

            - ``target_angle_mean_deg``, ``target_angle_std_deg`` (population std),
              ``target_angle_p10_deg``, ``target_angle_p50_deg``, ``target_angle_p90_deg``;
            - ``target_angles_deg``: [<= hist_size] target angles (a strided subsample), ready
              for a histogram;
            - ``hardest_negative_angle_mean_deg``: per row the smallest angle to a non-target
              sampled centre of any rank (from the softmax's own row maximum on the fused
              path); NaN when there is no negative class at all;
            - ``negative_angle_mean_deg``: mean angle to the sampled non-target centres,
              estimated on at most ``stats_columns`` evenly spaced sampled columns per rank
              (exact when every rank samples no more);
            - ``loss_ce`` and, when present, ``loss_regularizer`` and ``loss_aux_<name>``;
            - ``num_sampled``: this rank's S, an int.
        """
        self._check_inputs(embeddings, labels)
        head: MarginHead = self.margin  # type: ignore[assignment]
        deferred = handle = None
        if self._uses_fused(head) and self.weight.requires_grad and torch.is_grad_enabled():
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
        device_type = emb_all.device.type
        out_dtype = torch.promote_types(
            torch.promote_types(emb_all.dtype, self.weight.dtype), torch.float32
        )
        mm_dtype = self._mm_dtype(device_type, out_dtype)
        # Autocast is switched off so that the dtypes below are exactly the ones chosen.
        with torch.autocast(device_type=device_type, enabled=False):
            emb = emb_all.to(out_dtype)  # [N, D]
            x_hat, norms = normalize_rows(emb)  # [N, D], [N]: both differentiable
            if head.uses_classifier:
                loss, stats = self._classifier_loss(
                    head, emb, norms, x_hat, world_labels, mm_dtype, (handle, deferred)
                )
            else:
                loss, stats = self._aux_only_loss(head, emb, norms, x_hat, world_labels)
        if self.training and self.count_steps:
            with torch.no_grad():
                self.num_steps.add_(1)
        return loss, stats

    def _uses_fused(self, head: MarginHead) -> bool:
        """Whether the step takes the fused path (see ``partialfc.fused``) for ``head``."""
        return (
            self.fused
            and head.uses_classifier
            and head.fused_scale is not None
            and self.num_subcenters == 1
            and not head.needs_bias
        )

    def _context(self, **kw: Any) -> MarginContext:
        return MarginContext(
            step=self.num_steps.detach().clone(),
            training=self.training,
            group=self.group,
            gather_rows=self._gather,
            **kw,
        )

    def _aux_only_loss(
        self,
        head: MarginHead,
        emb: torch.Tensor,
        norms: torch.Tensor,
        x_hat: torch.Tensor,
        world_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        empty = torch.zeros(0, dtype=torch.long, device=emb.device)
        ctx = self._context(
            target=torch.full_like(world_labels, -1),
            rows=empty,
            cols=empty,
            target_cos=emb.new_zeros(0),
            labels=world_labels,
            feature_norms=norms,
            embeddings=emb,
            normalized=x_hat,
        )
        total = emb.new_zeros(())
        stats: dict[str, Any] = {"num_sampled": 0}
        total = self._add_extra_terms(head, ctx, total, stats)
        self.last_sampled_global = empty
        return total, stats

    def _classifier_loss(
        self,
        head: MarginHead,
        emb: torch.Tensor,
        norms: torch.Tensor,
        x_hat: torch.Tensor,
        world_labels: torch.Tensor,
        mm_dtype: torch.dtype,
        shard: tuple[torch.Tensor | None, DeferredGrad | None],
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        local_labels = world_labels - self.class_start  # [N], new tensor
        is_local = (local_labels >= 0) & (local_labels < self.num_local)  # [N]
        index, target = self._sample(local_labels, is_local)  # [S] or None, [N]
        device = self.weight.device
        if index is None:
            self.last_sampled_global = torch.arange(
                self.class_start, self.class_start + self.num_local, device=device
            )
        else:
            self.last_sampled_global = index + self.class_start
        rows = torch.nonzero(target >= 0).squeeze(1)  # [R]
        cols = target[rows]  # [R]
        k = self.num_subcenters
        ctx = self._context(
            target=target,
            rows=rows,
            cols=cols,
            target_cos=emb.new_zeros(0),
            labels=world_labels,
            feature_norms=norms,
            embeddings=emb,
            normalized=x_hat,
        )
        scale = head.fused_scale
        fused = self._uses_fused(head)
        sparse = self.update == "sampled"
        if fused:
            assert scale is not None
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
            n = target.shape[0]
            with torch.no_grad():
                # Statistics that need a global sum ride along with the softmax's all-reduce:
                # the target cosine of every row (and whether a rank holds it), and the
                # sampled negative-angle sums.
                extra = z.new_zeros(2 * n + 2)
                extra[rows] = c_t.detach().to(extra.dtype)
                extra[n + rows] = 1.0
                extra[2 * n :] = self._negative_angle_sums(z.detach(), None, scale, col_scale)
            f = head.target_logits(ctx, c_t)  # [R]
            loss_ce, hardest, extra = fused_softmax_ce(
                z, f, rows, self.group, link, extra, col_scale
            )
            ctx.cache["global_target_cos"] = (extra[:n], extra[n : 2 * n] > 0)
            neg_sample = extra[2 * n :]
            hardest_cos = hardest / scale  # [N]
        else:
            if index is None:
                w = self.weight  # [C_r*K, D]
            else:
                row_index = index
                if k > 1:
                    row_index = (index[:, None] * k + torch.arange(k, device=device)).reshape(-1)
                w = self._gather(self.weight, row_index)  # [S*K, D]
            w = w.to(x_hat.dtype)
            w_norm = torch.linalg.vector_norm(w, dim=1)  # [S*K]
            w_hat = w / w_norm.clamp_min(NORM_EPS)[:, None]
            cos = (x_hat.to(mm_dtype) @ w_hat.to(mm_dtype).T).to(x_hat.dtype)  # [N, S*K]
            if k > 1:
                cos = head.pool(cos)  # type: ignore[attr-defined]  # [N, S]
                ctx.target_centers_fn = None
            else:
                ctx.weight_norms = w_norm
                ctx.target_centers_fn = lambda: w_hat[cols]
                ctx.sampled_centers_fn = lambda: w_hat
            ctx.cos = cos
            ctx.target_cos = cos[rows, cols]
            if head.needs_bias:
                bias = head.bias  # type: ignore[attr-defined]
                ctx.bias = bias if index is None else self._gather(bias, index)
            logits = head.logits(ctx)  # [N, S]
            if logits.dtype in (torch.float16, torch.bfloat16):
                logits = logits.float()
            loss_ce = _DistSoftmaxCE.apply(logits, target, self.group)
            with torch.no_grad():
                hardest_cos = self._hardest_negative(cos.detach(), target)
                neg_sample = self._negative_angle_sums(cos.detach(), target, 1.0)
        stats: dict[str, Any] = {"loss_ce": loss_ce.detach()}
        total = self._add_extra_terms(head, ctx, loss_ce, stats)
        with torch.no_grad():
            if not fused:
                all_reduce_inplace(neg_sample, "sum", self.group)
            stats.update(self._angle_stats(ctx, hardest_cos, neg_sample))
        stats["num_sampled"] = int(self.last_sampled_global.numel())
        return total, stats

    def _add_extra_terms(
        self, head: MarginHead, ctx: MarginContext, total: torch.Tensor, stats: dict[str, Any]
    ) -> torch.Tensor:
        reg = head.regularizer(ctx)
        if reg is not None:
            stats["loss_regularizer"] = reg.detach()
            total = total + reg
        for name, loss_fn in head.aux_losses.items():
            value = loss_fn(ctx)
            stats[f"loss_aux_{name}"] = value.detach()
            total = total + head.aux_weights[name] * value
        return total

    def _hardest_negative(self, cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Largest non-target cosine per row over every rank's columns [N] (-inf: none)."""
        k = min(2, cos.shape[1])
        top_val, top_idx = torch.topk(cos, k, dim=1)  # [N, k]
        best_is_target = top_idx[:, 0] == target  # target -1 never matches
        runner_up = top_val[:, 1] if k == 2 else torch.full_like(top_val[:, 0], -math.inf)
        neg = torch.where(best_is_target, runner_up, top_val[:, 0])
        return all_reduce_inplace(neg.contiguous(), "max", self.group)

    def _negative_angle_sums(
        self,
        values: torch.Tensor,
        target: torch.Tensor | None,
        scale: float,
        col_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[sum of angles (deg), count] over a strided subset of this rank's non-target columns.

        ``values`` is ``scale * cos`` with targets at -inf (fused; times ``col_scale`` when
        given) or ``cos`` with ``target``.
        """
        n, s_cols = values.shape
        stride = max(1, -(-s_cols // self.stats_columns))
        # Columns 0, stride, 2 * stride, ... (<= stats_columns): a strided view, no gather.
        sub = values[:, ::stride] / scale  # [N, k]
        if col_scale is not None:
            sub = sub * col_scale[::stride].to(sub.dtype)
        keep = torch.isfinite(sub)
        if target is not None:
            picked = torch.arange(0, s_cols, stride, device=values.device)  # [k]
            keep &= target[:, None] != picked[None, :]
        deg = torch.rad2deg(torch.acos(sub.clamp(-1.0, 1.0)))
        return torch.stack(
            [torch.where(keep, deg, torch.zeros_like(deg)).sum(), keep.sum().to(deg.dtype)]
        )

    def _angle_stats(
        self, ctx: MarginContext, hardest_cos: torch.Tensor, neg_sums: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Angle statistics from the global target cosines, the global hardest negative
        cosine per row [N] and the global [sum, count] of sampled negative angles."""
        g_cos, has = ctx.global_target_cos()  # [N]
        target_deg = torch.rad2deg(torch.acos(g_cos[has].clamp(-1.0, 1.0)))  # [N']
        nan = target_deg.new_tensor(math.nan)
        if target_deg.numel() > 0:
            q = torch.quantile(
                target_deg, target_deg.new_tensor([0.1, 0.5, 0.9])
            )  # [3] linear interpolation
            mean, std = target_deg.mean(), target_deg.std(correction=0)
        else:
            q, mean, std = nan.repeat(3), nan, nan
        hard = torch.where(
            torch.isfinite(hardest_cos),
            torch.rad2deg(torch.acos(hardest_cos.clamp(-1.0, 1.0))),
            torch.full_like(hardest_cos, math.nan),
        )
        stride = max(1, -(-target_deg.numel() // self.hist_size))
        return {
            "target_angle_mean_deg": mean,
            "target_angle_std_deg": std,
            "target_angle_p10_deg": q[0],
            "target_angle_p50_deg": q[1],
            "target_angle_p90_deg": q[2],
            "target_angles_deg": target_deg[::stride].clone(),
            "hardest_negative_angle_mean_deg": hard.mean() if hard.numel() else nan,
            "negative_angle_mean_deg": neg_sums[0] / neg_sums[1],  # 0/0 = NaN: no negative
        }
