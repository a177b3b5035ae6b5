"""What a Partial FC step reports besides its loss (no gradient): the loss terms, and angle
statistics -- how far each embedding is from its class centre, and from the nearest and the
average other centre, over the global batch."""

from __future__ import annotations

import dataclasses
import math

import torch

from partialfc.collectives import ProcessGroup, all_reduce_inplace

__all__ = [
    "AngleStats",
    "StepStats",
    "angle_stats",
    "cosine_angle_stats",
    "hardest_negative",
    "negative_angle_sums",
]


@dataclasses.dataclass(frozen=True)
class AngleStats:
    """Angles in degrees over the global batch, before the margin; 0-dim tensors (reading
    them is the caller's choice of when to synchronise with the device)."""

    target_angle_mean_deg: torch.Tensor
    """Mean angle between an embedding and its class centre."""
    target_angle_std_deg: torch.Tensor
    """Its population standard deviation."""
    target_angle_p10_deg: torch.Tensor
    """10th percentile (linear interpolation)."""
    target_angle_p50_deg: torch.Tensor
    """Median."""
    target_angle_p90_deg: torch.Tensor
    """90th percentile."""
    hardest_negative_angle_mean_deg: torch.Tensor
    """Mean over rows of the smallest angle to a sampled centre of another class (any rank);
    NaN when there is no other class."""
    negative_angle_mean_deg: torch.Tensor
    """Mean angle to the sampled centres of other classes, estimated on evenly spaced
    columns (``PartialFC.stats_columns`` per rank)."""
    target_angles_deg: torch.Tensor
    """1-D: a strided sample of the target angles (at most ``PartialFC.hist_size``), for a
    histogram."""

    def scalars(self) -> dict[str, torch.Tensor]:
        """The 0-dim statistics by name (the sample of target angles left out)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name != "target_angles_deg"
        }


@dataclasses.dataclass
class StepStats:
    """A step's report: its loss terms, its angle statistics and its sampled columns."""

    losses: dict[str, torch.Tensor]
    """Detached 0-dim terms by name: ``ce`` (the margin softmax), ``regularizer`` and
    ``aux_<name>`` (unweighted) where the head has them."""
    angles: AngleStats | None
    """None for a head without classifier (``none``)."""
    num_sampled: int
    """Sampled columns of this rank's shard (the one figure that differs between ranks)."""
    embedding_norm_mean: torch.Tensor | None = None
    """Mean L2 norm of the global batch's embeddings before normalisation (0-dim)."""


def hardest_negative(cos: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None):
    """Largest non-target cosine per row over every rank's columns [N] (-inf: none).

    ``cos`` [N, S] this rank's sampled columns, ``target`` [N] the target column or -1.
    """
    k = min(2, cos.shape[1])
    top_val, top_idx = torch.topk(cos, k, dim=1)  # [N, k]
    best_is_target = top_idx[:, 0] == target  # target -1 never matches
    runner_up = top_val[:, 1] if k == 2 else torch.full_like(top_val[:, 0], -math.inf)
    neg = torch.where(best_is_target, runner_up, top_val[:, 0])  # [N]
    return all_reduce_inplace(neg.contiguous(), "max", group)


def negative_angle_sums(
    values: torch.Tensor,
    target: torch.Tensor | None,
    scale: float,
    max_columns: int,
    col_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """[sum of angles (deg), count] over at most ``max_columns`` evenly spaced columns of this
    rank's non-target columns (not reduced over ranks).

    ``values`` [N, S] is ``cos`` with ``target`` [N], or ``scale * cos`` with the targets at
    -inf and ``target`` None (the fast backend; times ``col_scale`` [S] when given).
    """
    n, s_cols = values.shape
    stride = max(1, -(-s_cols // max_columns))
    # Columns 0, stride, 2 * stride, ... (<= max_columns): a strided view, no gather.
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


def angle_stats(
    target_cos: torch.Tensor,
    has_target: torch.Tensor,
    hardest_cos: torch.Tensor,
    neg_sums: torch.Tensor,
    hist_size: int,
) -> AngleStats:
    """The step's angle statistics.

    ``target_cos`` [N] each row's target cosine where ``has_target`` [N] (every row, unless
    the head keeps none); ``hardest_cos`` [N] the global hardest negative cosine per row;
    ``neg_sums`` the global [sum, count] of sampled negative angles; at most ``hist_size``
    target angles are kept for a histogram.
    """
    target_deg = torch.rad2deg(torch.acos(target_cos[has_target].clamp(-1.0, 1.0)))  # [N']
    nan = target_deg.new_tensor(math.nan)
    if target_deg.numel() > 0:
        q = torch.quantile(target_deg, target_deg.new_tensor([0.1, 0.5, 0.9]))  # [3] linear
        mean, std = target_deg.mean(), target_deg.std(correction=0)
    else:
        q, mean, std = nan.repeat(3), nan, nan
    hard = torch.where(
        torch.isfinite(hardest_cos),
        torch.rad2deg(torch.acos(hardest_cos.clamp(-1.0, 1.0))),
        torch.full_like(hardest_cos, math.nan),
    )
    stride = max(1, -(-target_deg.numel() // hist_size))
    return AngleStats(
        target_angle_mean_deg=mean,
        target_angle_std_deg=std,
        target_angle_p10_deg=q[0],
        target_angle_p50_deg=q[1],
        target_angle_p90_deg=q[2],
        hardest_negative_angle_mean_deg=hard.mean() if hard.numel() else nan,
        negative_angle_mean_deg=neg_sums[0] / neg_sums[1],  # 0/0 = NaN: no negative
        target_angles_deg=target_deg[::stride].clone(),
    )


@torch.no_grad()
def cosine_angle_stats(
    cos: torch.Tensor,
    target: torch.Tensor,
    global_target_cos: tuple[torch.Tensor, torch.Tensor],
    group: ProcessGroup | None,
    max_columns: int,
    hist_size: int,
) -> AngleStats:
    """The plain core's angle statistics from this rank's cosines ``cos`` [N, S] and target
    columns ``target`` [N] (-1: elsewhere); ``global_target_cos`` is
    ``MarginContext.global_target_cos()``. Collective: two small all-reduces."""
    hardest_cos = hardest_negative(cos, target, group)  # [N]
    neg = all_reduce_inplace(negative_angle_sums(cos, target, 1.0, max_columns), "sum", group)
    return angle_stats(*global_target_cos, hardest_cos, neg, hist_size)
