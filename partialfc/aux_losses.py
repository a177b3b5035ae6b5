"""Auxiliary embedding losses on the all-gathered batch, added to a head with a weight.

Each loss is a module ``loss(ctx) -> 0-dim tensor`` taking the same ``MarginContext`` as the
heads; the value is identical on every rank and the gradient reaches every embedding once:

- batch losses (contrastive, triplet, angular triplet) are computed identically on every rank
  from the gathered batch and marked replicated (``ctx.replicated``);
- centre losses (center loss, Intra-, Inter-loss) add the rows whose class (centre) this rank
  holds and all-reduce the value (``ctx.sharded_sum``), like the softmax itself.

Each loss has one typed config (``*Config``: fields, defaults, bounds and a docstring each) and
is registered with it by ``@register_aux_loss``; a head's config names them under ``aux``:
``{name: arcface, aux: {triplet: {weight: 0.1, margin: 0.2}}}`` (``AuxLosses`` in
``partialfc.head_configs`` is that section's model; ``build_aux_loss`` in ``partialfc.registry``
builds a loss by name), or attach one with ``head.add_aux_loss(name, loss, weight)``; the
``none`` head uses them alone. The triplet losses' mining is ``partialfc.mining``.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from partialfc.collectives import all_reduce_inplace, all_reduce_with_grad
from partialfc.context import MarginContext, ShardSpec
from partialfc.mining import Mining, mine_pairs
from partialfc.specs import DEFAULT_EPS, AuxLossConfig, register_aux_loss

__all__ = [
    "AngularTripletConfig",
    "AngularTripletLoss",
    "AuxLoss",
    "CenterConfig",
    "CenterLoss",
    "ContrastiveConfig",
    "ContrastiveLoss",
    "InterConfig",
    "InterLoss",
    "IntraConfig",
    "IntraLoss",
    "TripletConfig",
    "TripletLoss",
]


class AuxLoss(nn.Module):
    """Base class: ``forward(ctx)`` returns the global value; ``bind`` creates sharded state."""

    needs_classifier: bool = False

    def bind(self, spec: ShardSpec) -> None:
        """Create per-class parameters for the shard (called once by PartialFC)."""

    def apply_update(self) -> None:
        """Apply the rule-based (not gradient) state update recorded by the backward passes
        since the last optimizer step; called once per step, after it. Default: nothing."""

    def discard_update(self) -> None:
        """Drop what ``apply_update`` would apply (the optimizer's zero_grad). Default: nothing."""

    def forward(self, ctx: MarginContext) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _zero_like_graph(x: torch.Tensor) -> torch.Tensor:
    """A 0 that still depends on ``x`` (keeps the backward collectives of every rank aligned)."""
    return x.sum() * 0.0


class ContrastiveConfig(AuxLossConfig):
    """DeepID2's verification loss (Sun et al. 2014) on every pair of the batch."""

    margin: float = Field(1.0, gt=0.0)
    """Distance below which a different-identity pair is penalised (1.0 suits the
    L2-normalised embeddings; the paper uses raw features and tunes it)."""
    normalize: bool = True
    """Use L2-normalised embeddings (false: the raw ones, as in the paper)."""


@register_aux_loss("contrastive", ContrastiveConfig)
class ContrastiveLoss(AuxLoss):
    """DeepID2's verification loss (Sun et al. 2014) over all pairs of the gathered batch.

    ``1/2 |f_i - f_j|^2`` for same-identity pairs, ``1/2 max(0, margin - |f_i - f_j|)^2`` for
    different ones, averaged over the ``N (N - 1) / 2`` pairs, on L2-normalised embeddings
    unless ``normalize`` is off. Replicated (no collective beyond the gather).
    """

    def __init__(self, config: ContrastiveConfig) -> None:
        super().__init__()
        self.margin = config.margin
        self.normalize = config.normalize

    def forward(self, ctx: MarginContext) -> torch.Tensor:
        emb = ctx.require("normalized" if self.normalize else "embeddings", "contrastive")
        labels = ctx.require("labels", "contrastive")
        n = emb.shape[0]
        if n < 2:
            return ctx.replicated(_zero_like_graph(emb))
        sq_norm = (emb * emb).sum(dim=1)  # [N]
        sq = (sq_norm[:, None] + sq_norm[None, :] - 2.0 * emb @ emb.T).clamp(min=0.0)  # [N, N]
        dist = sq.clamp(min=1e-12).sqrt()
        same = labels[:, None] == labels[None, :]
        upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=emb.device), diagonal=1)
        per_pair = torch.where(same, 0.5 * sq, 0.5 * (self.margin - dist).clamp(min=0.0) ** 2)
        value = per_pair[upper].mean()
        return ctx.replicated(value)


class TripletConfig(AuxLossConfig):
    """FaceNet's triplet loss (Schroff et al. 2015) with online mining."""

    margin: float = 0.2
    """Margin between the squared anchor-positive and anchor-negative distances (FaceNet)."""
    mining: Mining = "semi_hard"
    """semi_hard (FaceNet): per (anchor, positive) the closest negative farther than the
    positive; batch_hard: per anchor its farthest positive and closest negative."""


@register_aux_loss("triplet", TripletConfig)
class TripletLoss(AuxLoss):
    """FaceNet's triplet loss (Schroff et al. 2015) with online mining on the gathered batch.

    ``[|f_a - f_p|^2 - |f_a - f_n|^2 + margin]_+`` on L2-normalised embeddings (squared
    distances), averaged over the mined triplets (``mining``, see ``TripletConfig``). 0 when
    the batch has no valid triplet. Replicated.
    """

    def __init__(self, config: TripletConfig) -> None:
        super().__init__()
        self.margin = config.margin
        self.mining = config.mining

    def distances(self, emb: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances [N, N] of normalised embeddings (2 - 2 cos)."""
        cos = emb @ emb.T
        return (2.0 - 2.0 * cos).clamp(min=0.0)

    def forward(self, ctx: MarginContext) -> torch.Tensor:
        emb = ctx.require("normalized", "triplet")
        labels = ctx.require("labels", "triplet")
        d_ap, d_an = mine_pairs(self.distances(emb), labels, self.mining)
        if d_ap.numel() == 0:
            return ctx.replicated(_zero_like_graph(emb))
        value = (d_ap - d_an + self.margin).clamp(min=0.0).mean()
        return ctx.replicated(value)


class AngularTripletConfig(AuxLossConfig):
    """The ArcFace paper's Triplet-loss, in angles."""

    margin: float = 0.35
    """Angular margin in radians (the ArcFace paper's loss comparison)."""
    mining: Mining = "semi_hard"
    """As for ``triplet``: semi_hard or batch_hard."""
    eps: float = Field(DEFAULT_EPS, gt=0.0, lt=0.5)
    """arccos clamp: angles from clamp(cos, -1+eps, 1-eps)."""


@register_aux_loss("angular_triplet", AngularTripletConfig)
class AngularTripletLoss(TripletLoss):
    """The ArcFace paper's Triplet-loss: ``[theta_ap + margin - theta_an]_+`` in angles.

    ``theta = arccos(xhat_a . xhat_b)`` (clamped by ``eps``); same mining options as
    ``TripletLoss``. Replicated.
    """

    def __init__(self, config: AngularTripletConfig) -> None:  # type: ignore[override]
        super().__init__(TripletConfig(margin=config.margin, mining=config.mining))
        self.eps = config.eps

    def distances(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.acos((emb @ emb.T).clamp(-1.0 + self.eps, 1.0 - self.eps))


class CenterConfig(AuxLossConfig):
    """Center loss (Wen et al. 2016): pulls embeddings to their class centre."""

    alpha: float = Field(0.5, gt=0.0, le=1.0)
    """The centres' update rate, in (0, 1] (paper: 0.5)."""


@register_aux_loss("center", CenterConfig)
class CenterLoss(AuxLoss):
    """Center loss (Wen et al. 2016): ``1/(2N) sum_i |x_i - c_{y_i}|^2`` on raw embeddings.

    The centres are constants in the loss (its gradient is ``(x_i - c_{y_i}) / N`` times the
    aux ``weight``, the paper's lambda, paper value 0.003) and move by the paper's own rule,
    not by the classifier's optimizer, once per optimizer step::

        delta c_j = sum_i [y_i = j] (c_j - x_i) / (1 + n_j),    c_j <- c_j - alpha * delta c_j

    over the global (all-gathered) batch, ``n_j`` its rows of class j; a class absent from the
    batch keeps its centre. ``centers`` is a buffer ``[C_r, D]`` (zeros) sharded like the
    classifier (``bind``): each rank updates the rows of its class range from the gathered
    batch, and checkpoints save and re-shard it with the classifier rows.

    When (Algorithm 1 of the paper): the loss and its gradient of step t use ``c^t``; the
    update uses the same step's features ``x^t`` (this forward's embeddings, detached) and
    is applied after the backward, by the optimizer's ``step`` (``apply_update``, wired by
    ``PartialFC.build_optimizer``). The statistics ``n_j``, ``sum x_i`` are recorded when the
    backward reaches the loss, like a gradient (a forward without backward, or embeddings
    that need no gradient, record nothing): with gradient accumulation the micro-batches
    of one step pool (``n_j`` and the sums over all of them, centres of the step's start),
    which is the update of one batch made of all micro-batches; the optimizer's
    ``zero_grad`` drops them (``discard_update``: a skipped step moves no centre).
    Each rank adds the rows whose class it owns; the value is all-reduced.
    """

    def __init__(self, config: CenterConfig) -> None:
        super().__init__()
        self.alpha = config.alpha
        # Recorded since the last step: local classes [U], sums of x [U, D], counts [U].
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"

    def bind(self, spec: ShardSpec) -> None:
        self.class_start = spec.class_start
        self.num_local = spec.num_local
        self.register_buffer(
            "centers", torch.zeros(spec.num_local, spec.embedding_size, device=spec.device)
        )  # [C_r, D]

    def forward(self, ctx: MarginContext) -> torch.Tensor:
        if not hasattr(self, "centers"):
            raise ValueError("CenterLoss needs bind() (PartialFC calls it) before use")
        emb = ctx.require("embeddings", "center")
        labels = ctx.require("labels", "center")
        local = labels - self.class_start
        mine = torch.nonzero((local >= 0) & (local < self.num_local)).squeeze(1)  # [M]
        classes, inverse = torch.unique(local[mine], return_inverse=True)  # [U], [M]
        x = emb[mine]  # [M, D]
        diff = x - self.centers[classes][inverse].to(emb.dtype)  # [M, D], centres constant
        local_sum = 0.5 * (diff * diff).sum()
        if ctx.training and local_sum.requires_grad:
            with torch.no_grad():
                sums = self.centers.new_zeros(classes.numel(), x.shape[1])
                sums.index_add_(0, inverse, x.detach().to(sums.dtype))  # [U, D]
                counts = torch.bincount(inverse, minlength=classes.numel()).to(sums.dtype)
            local_sum.register_hook(lambda grad: self._record(classes, sums, counts))
        return ctx.sharded_sum(local_sum) / max(ctx.num_rows, 1)

    def _record(self, classes: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """Add one backward's per-class statistics to those of this step (merged by class)."""
        if self._pending is not None:
            classes = torch.cat([self._pending[0], classes])
            sums = torch.cat([self._pending[1], sums])
            counts = torch.cat([self._pending[2], counts])
            classes, inverse = torch.unique(classes, return_inverse=True)
            sums = sums.new_zeros(classes.numel(), sums.shape[1]).index_add_(0, inverse, sums)
            counts = counts.new_zeros(classes.numel()).index_add_(0, inverse, counts)
        self._pending = (classes, sums, counts)

    @torch.no_grad()
    def apply_update(self) -> None:
        """Move the centres of the classes recorded since the last step (the paper's rule)."""
        if self._pending is None:
            return
        classes, sums, counts = self._pending
        self._pending = None
        c = self.centers[classes]  # [U, D]
        delta = (counts[:, None] * c - sums) / (1.0 + counts[:, None])
        self.centers.index_copy_(0, classes, c - self.alpha * delta)

    def discard_update(self) -> None:
        self._pending = None


class IntraConfig(AuxLossConfig):
    """The ArcFace paper's Intra-loss: the mean target angle (needs a classifier head)."""

    eps: float = Field(DEFAULT_EPS, gt=0.0, lt=0.5)
    """arccos clamp: angles from clamp(cos, -1+eps, 1-eps)."""


@register_aux_loss("intra", IntraConfig)
class IntraLoss(AuxLoss):
    """The ArcFace paper's Intra-loss: ``(1/pi) mean_i theta_{y_i}`` (pull to the centre).

    Uses the target angle each rank holds for its classes; value all-reduced.
    """

    needs_classifier = True

    def __init__(self, config: IntraConfig) -> None:
        super().__init__()
        self.eps = config.eps

    def forward(self, ctx: MarginContext) -> torch.Tensor:
        theta = torch.acos(ctx.target_cos.clamp(-1.0 + self.eps, 1.0 - self.eps))  # [R]
        return ctx.sharded_sum(theta.sum()) / (math.pi * max(ctx.num_rows, 1))


class InterConfig(AuxLossConfig):
    """The ArcFace paper's Inter-loss: pushes class centres apart (needs a classifier head)."""

    eps: float = Field(DEFAULT_EPS, gt=0.0, lt=0.5)
    """arccos clamp: angles from clamp(cos, -1+eps, 1-eps)."""


@register_aux_loss("inter", InterConfig)
class InterLoss(AuxLoss):
    """The ArcFace paper's Inter-loss: ``-(1/pi) mean_{i, j != y_i} arccos(W_{y_i} . W_j)``.

    Pushes the other class centres away from each sample's centre, over the sampled centres
    of all ranks (the paper's ``n - 1`` other classes become the sampled ones). Collectives:
    the target centres ``[N, D]`` are all-reduced with gradient (each row's centre lives on
    one rank), every rank then adds its sampled columns and the value is all-reduced, with
    the total column count. Costs an extra ``[N, S]`` product and arccos: use on small C.
    """

    needs_classifier = True

    def __init__(self, config: InterConfig) -> None:
        super().__init__()
        self.eps = config.eps

    def forward(self, ctx: MarginContext) -> torch.Tensor:
        w_t = ctx.target_centers()  # [R, D]
        n = ctx.num_rows
        full = w_t.new_zeros(n, w_t.shape[1]).index_put((ctx.rows,), w_t)  # [N, D]
        full = all_reduce_with_grad(full, ctx.group)  # every row's centre on every rank
        w_s = ctx.sampled_centers()  # [S, D]
        ang = torch.acos((full @ w_s.T).clamp(-1.0 + self.eps, 1.0 - self.eps))  # [N, S]
        keep = torch.ones_like(ang, dtype=torch.bool)
        keep[ctx.rows, ctx.cols] = False  # a centre with itself is not a pair
        total = torch.where(keep, ang, torch.zeros_like(ang)).sum()
        with torch.no_grad():
            count = torch.tensor(
                [float(keep.sum())], dtype=torch.float64, device=ang.device
            )  # pairs on this rank
            all_reduce_inplace(count, "sum", ctx.group)
        return -ctx.sharded_sum(total) / (math.pi * count.clamp(min=1.0).to(ang.dtype)[0])
