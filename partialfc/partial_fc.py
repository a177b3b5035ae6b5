"""Partial FC's plain core: a class-centre matrix sharded over ranks, with sampled margin
softmax, on public torch APIs and plain autograd. This is the path every GPU runs; the fast
CPU backend (``partialfc.fast``) computes the same numbers, bound to it by tests.

See the package docstring for the vocabulary (local / global / shard / class_start /
sampled index). One step, for every rank r (``PartialFC.forward``)::

    embeddings [B_r, D], labels [B_r]
      -> all-gather (embeddings with grad, labels)                     -> [N, D], [N]
      -> sampled index of the shard (positives + random negatives)     -> [S]
      -> cos = normalize(emb) @ normalize(W_r[sampled]).T              -> [N, S]
         (normalized_cosine: the rows' norms scale the product, no normalised copy)
      -> margin head -> logits                                         -> [N, S]
      -> distributed softmax cross-entropy (all-reduce max / sum)      -> loss (same on all ranks)
      -> + head regulariser + weighted auxiliary losses
    backward: W_r's gradient has the sampled rows only (update="sampled": row-sparse, the
    optimizer of ``build_optimizer`` moves those rows and nothing else)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from partialfc.checks import UPDATE_MODES, check_arguments, check_batch, check_group
from partialfc.collectives import (
    ProcessGroup,
    all_gather_no_grad,
    all_gather_with_grad,
    gather_sizes,
    get_world_size,
)
from partialfc.context import MarginContext, ShardSpec
from partialfc.margins import MarginHead
from partialfc.ops import NORM_EPS, distributed_cross_entropy, gather_rows, normalized_cosine
from partialfc.optim import ShardOptimizer, clip_grad_norm_
from partialfc.partition import class_range
from partialfc.rounding import Rounding
from partialfc.sampling import init_class_centers, mixed_seed, sample_columns
from partialfc.stats import StepStats, cosine_angle_stats

__all__ = ["UPDATE_MODES", "PartialFC"]


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
            ``"dense"``: ``weight.grad`` is dense with zero rows, so an ordinary
            ``torch.optim`` optimizer's momentum and weight decay move every row every step.
            ``"sampled"``: ``weight.grad`` (and every per-class head parameter's) is
            row-sparse and ``build_optimizer``'s optimizer moves only the sampled rows
            (weights and state). The trainer's default for sample_rate < 1 (measured in
            BENCHMARKS.md: the dense update costs a pass over the shard and its state every
            step); "dense" is the constructor's default only because any optimizer takes it.
            At sample_rate 1 the two are the same update.
        storage_dtype: dtype of the shard and its optimizer state: float32, or bfloat16 /
            float16 to hold twice the classes in the same memory. The step computes on the
            sampled rows in float32 (their gradient arrives rounded to the storage dtype) and
            ``build_optimizer``'s optimizer writes them back rounded (``rounding``).
        rounding: ``"stochastic"`` or ``"nearest"`` (``partialfc.rounding``), for 16-bit
            storage.
        stats_columns: columns per rank used to estimate the mean negative angle.
        hist_size: at most this many target angles in ``stats.angles.target_angles_deg``.

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
        stats_columns: int = 64,
        hist_size: int = 1024,
        storage_dtype: torch.dtype = torch.float32,
        rounding: Rounding = "stochastic",
    ) -> None:
        super().__init__()
        start, count = class_range(num_classes, rank, world_size)
        check_arguments(
            margin, embedding_size, num_classes, sample_rate, world_size, seed, init_std,
            compute_dtype, update, stats_columns, hist_size, storage_dtype, rounding,
        )  # fmt: skip
        if get_world_size(group) > 1 or world_size > 1:
            check_group(group, rank, world_size)

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
        self.stats_columns = stats_columns
        self.hist_size = hist_size
        self.storage_dtype = storage_dtype
        self.rounding = rounding
        self.num_subcenters = int(margin.num_subcenters)
        k = self.num_subcenters
        if margin.uses_classifier:
            init = init_class_centers(
                start * k, count * k, embedding_size, seed=seed, std=float(init_std),
                dtype=storage_dtype,
            )  # fmt: skip
        else:
            init = torch.empty(0, embedding_size)
        init = init.to(device=device, dtype=storage_dtype)  # drawn in float32, rounded to nearest
        self.weight = nn.Parameter(init)  # [C_r*K, D]
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
        self.sample_generator = torch.Generator().manual_seed(mixed_seed("sample", seed, rank))
        self.last_sampled_global: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"class_start={self.class_start}, num_local={self.num_local}, "
            f"sample_rate={self.sample_rate}, rank={self.rank}, world_size={self.world_size}, "
            f"update={self.update}, storage_dtype={self.storage_dtype}"
        )

    # ------------------------------------------------------------------------- optimizer
    def build_optimizer(self, name: str = "sgd", **hyper: Any) -> ShardOptimizer:
        """The classifier's optimizer (SGD momentum or AdamW) over ``self.parameters()``;
        ``hyper``: ``ShardOptimizer``'s lr, momentum, weight_decay, betas, eps, chunk_elements.

        Required with ``update="sampled"`` (row-sparse gradients); with ``"dense"`` it gives
        the same updates as ``torch.optim.SGD`` / ``AdamW`` without their shard-sized
        temporaries. Its ``step`` also applies the head's rule-based state updates (center
        loss's centres) and its ``zero_grad`` drops them; with another optimizer, call
        ``self.margin.apply_updates()`` after each step.
        """
        return ShardOptimizer(
            [p for p in self.parameters() if p.requires_grad],
            name=name,
            **{"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, **hyper},
            after_step=self.margin.apply_updates,
            after_zero_grad=self.margin.discard_updates,
            rounding=self.rounding,
            rounding_seed=mixed_seed("round", self.seed, self.rank),
            **self._optimizer_hooks(),
        )

    def _optimizer_hooks(self) -> dict[str, Any]:
        """Extra ``ShardOptimizer`` arguments of a backend (none on the plain core)."""
        return {}

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip the whole classifier's gradient (every shard, replicated head parameters once)
        to ``max_norm``; collective over ``group``. Returns the norm before clipping."""
        return clip_grad_norm_(
            self.parameters(), max_norm, self.group, self.margin.replicated_parameters()
        )

    # ------------------------------------------------------------------------- forward
    def _check_inputs(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        check_batch(embeddings, labels, self.embedding_size, self.num_classes)
        if self.world_size > 1:
            check_group(self.group, self.rank, self.world_size, required=True)

    def _sample(
        self, local_labels: torch.Tensor, is_local: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Choose the sampled index [S] (None = the whole shard) and per-row targets [N]."""
        return sample_columns(
            local_labels, is_local, self.num_local, self.sample_rate, self.sample_generator
        )

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
    ) -> tuple[torch.Tensor, StepStats]:
        """Loss of this step (same value on every rank) and angle statistics.

        Args:
            embeddings: [B_r, D] this rank's embeddings (B_r may differ between ranks and
                between steps).
            labels: [B_r] global class ids in [0, num_classes); never modified.

        Returns:
            ``(loss, stats)``: loss is a 0-dim tensor, the mean over the N global rows of the
            softmax cross-entropy plus the head's regulariser and weighted auxiliary losses,
            the same on every rank; stats a ``StepStats`` (loss terms, angle statistics over
            the global batch before the margin, this rank's sampled columns).
        """
        self._check_inputs(embeddings, labels)
        sizes = gather_sizes(embeddings, self.group)  # one size exchange for both gathers
        emb_all = all_gather_with_grad(embeddings, self.group, self.ddp_scale, sizes)  # [N, D]
        world_labels = all_gather_no_grad(labels.long(), self.group, sizes)  # [N]
        return self._loss(emb_all, world_labels, self._classifier_loss)

    def _loss(self, emb_all: torch.Tensor, world_labels: torch.Tensor, classifier_loss: Any):
        """The step's loss and statistics from the gathered batch, in the chosen dtypes.

        ``classifier_loss(head, emb, norms, x_hat, world_labels, mm_dtype)`` computes the
        margin softmax (the plain one, or a backend's)."""
        head: MarginHead = self.margin  # type: ignore[assignment]
        device_type = emb_all.device.type
        out_dtype = torch.promote_types(
            torch.promote_types(emb_all.dtype, self.weight.dtype), torch.float32
        )
        mm_dtype = self._mm_dtype(device_type, out_dtype)
        # Autocast is switched off so that the dtypes below are exactly the ones chosen.
        with torch.autocast(device_type=device_type, enabled=False):
            emb = emb_all.to(out_dtype)  # [N, D]
            x_hat, norms = self._normalize(emb)  # [N, D], [N]
            if head.uses_classifier:
                loss, stats = classifier_loss(head, emb, norms, x_hat, world_labels, mm_dtype)
            else:
                loss, stats = self._aux_only_loss(head, emb, norms, x_hat, world_labels)
            stats.embedding_norm_mean = norms.detach().mean()
        if self.training and self.count_steps:
            with torch.no_grad():
                self.num_steps.add_(1)
        return loss, stats

    def _normalize(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unit rows of ``emb`` [N, D] and their norms [N], both differentiable."""
        return F.normalize(emb, dim=1, eps=NORM_EPS), torch.linalg.vector_norm(emb, dim=1)

    def _context(
        self,
        target: torch.Tensor,
        world_labels: torch.Tensor,
        emb: torch.Tensor,
        norms: torch.Tensor,
        x_hat: torch.Tensor,
    ) -> MarginContext:
        """The head's context for per-row target columns ``target`` [N] (-1: none here)."""
        rows = torch.nonzero(target >= 0).squeeze(1)  # [R]
        return MarginContext(
            target=target,
            rows=rows,
            cols=target[rows],  # [R]
            target_cos=emb.new_zeros(0),
            labels=world_labels,
            feature_norms=norms,
            embeddings=emb,
            normalized=x_hat,
            step=self.num_steps.detach().clone(),
            training=self.training,
            group=self.group,
            gather_rows=self._gather,
        )

    def _aux_only_loss(
        self,
        head: MarginHead,
        emb: torch.Tensor,
        norms: torch.Tensor,
        x_hat: torch.Tensor,
        world_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, StepStats]:
        ctx = self._context(torch.full_like(world_labels, -1), world_labels, emb, norms, x_hat)
        stats = StepStats(losses={}, angles=None, num_sampled=0)
        total = self._add_extra_terms(head, ctx, emb.new_zeros(()), stats)
        self.last_sampled_global = ctx.rows  # empty
        return total, stats

    def _sample_step(
        self,
        world_labels: torch.Tensor,
        emb: torch.Tensor,
        norms: torch.Tensor,
        x_hat: torch.Tensor,
    ) -> tuple[torch.Tensor | None, MarginContext]:
        """This step's sampled index [S] (None: the whole shard) and the head's context with
        the targets: ``target`` [N] (column or -1), ``rows`` [R] and their ``cols`` [R]."""
        local_labels = world_labels - self.class_start  # [N], new tensor
        is_local = (local_labels >= 0) & (local_labels < self.num_local)  # [N]
        index, target = self._sample(local_labels, is_local)  # [S] or None, [N]
        start = self.class_start
        self.last_sampled_global = (
            torch.arange(start, start + self.num_local, device=self.weight.device)
            if index is None
            else index + start
        )
        return index, self._context(target, world_labels, emb, norms, x_hat)

    def _classifier_loss(
        self,
        head: MarginHead,
        emb: torch.Tensor,
        norms: torch.Tensor,
        x_hat: torch.Tensor,
        world_labels: torch.Tensor,
        mm_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, StepStats]:
        index, ctx = self._sample_step(world_labels, emb, norms, x_hat)
        k = self.num_subcenters
        row_index = index
        if index is not None and k > 1:  # the K sub-centre rows of each sampled class
            row_index = (index[:, None] * k + torch.arange(k, device=index.device)).reshape(-1)
        # [S*K, D] in the storage dtype: normalized_cosine widens 16-bit rows itself.
        w = self.weight if index is None else self._gather(self.weight, row_index)
        wide = x_hat.dtype
        if k > 1:
            cos, _ = normalized_cosine(x_hat, w, ctx.rows[:0], ctx.cols[:0], mm_dtype)
            cos = head.pool(cos)  # type: ignore[attr-defined]  # [N, S]
            ctx.target_cos = cos[ctx.rows, ctx.cols]  # [R], pooled over the sub-centres
        else:  # the targets' cosines exact in the output dtype (the margin needs them)
            cos, ctx.target_cos = normalized_cosine(x_hat, w, ctx.rows, ctx.cols, mm_dtype)
            if head.needs_weight_norms:
                ctx.weight_norms = torch.linalg.vector_norm(w, dim=1, dtype=wide)  # [S]
            # The functions must not refer to ctx: a cycle (ctx -> function -> ctx) would keep
            # this step's rows and cosines alive until Python's cyclic GC ran, steps later.
            cols = ctx.cols
            ctx.target_centers_fn = lambda: F.normalize(w[cols].to(wide), dim=1, eps=NORM_EPS)
            ctx.sampled_centers_fn = lambda: F.normalize(w.to(wide), dim=1, eps=NORM_EPS)
        ctx.cos = cos  # [N, S]
        if head.needs_bias:
            bias = head.bias  # type: ignore[attr-defined]
            ctx.bias = bias if index is None else self._gather(bias, index)
        logits = head.logits(ctx)  # [N, S]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the softmax runs in float32 or wider
        loss_ce = distributed_cross_entropy(logits, ctx.target, self.group)
        stats = StepStats({"ce": loss_ce.detach()}, None, int(self.last_sampled_global.numel()))
        total = self._add_extra_terms(head, ctx, loss_ce, stats)
        stats.angles = cosine_angle_stats(
            cos.detach(), ctx.target, ctx.global_target_cos(), self.group,
            self.stats_columns, self.hist_size,
        )  # fmt: skip
        return total, stats

    def _add_extra_terms(
        self, head: MarginHead, ctx: MarginContext, total: torch.Tensor, stats: StepStats
    ) -> torch.Tensor:
        reg = head.regularizer(ctx)
        if reg is not None:
            stats.losses["regularizer"] = reg.detach()
            total = total + reg
        for name, loss_fn in head.aux_losses.items():
            value = loss_fn(ctx)
            stats.losses[f"aux_{name}"] = value.detach()
            total = total + head.aux_weights[name] * value
        return total
