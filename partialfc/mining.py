"""Online pair and triplet mining on the all-gathered batch: which (anchor, positive,
negative) a triplet loss compares, chosen from a distance matrix of the batch (FaceNet's
semi-hard negatives, or per anchor the hardest pair). Used by ``partialfc.aux_losses``.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["Mining", "mine_pairs", "pair_masks"]

Mining = Literal["semi_hard", "batch_hard"]
"""Triplet mining: FaceNet's semi-hard negatives, or per anchor the hardest pair."""


def pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same-identity (excluding the diagonal) and different-identity masks, [N, N]."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(labels.numel(), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def mine_pairs(
    dist: torch.Tensor, labels: torch.Tensor, mining: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_ap, d_an) pairs chosen by ``mining`` from a distance matrix [N, N].

    ``batch_hard``: per anchor with a positive and a negative, its farthest positive and
    closest negative. ``semi_hard`` (FaceNet): per (anchor, positive) pair with a negative,
    the closest negative farther than the positive; if none is farther, the farthest negative.
    Selection is done without gradient; the returned distances carry it.
    """
    pos, neg = pair_masks(labels)
    inf = torch.tensor(float("inf"), dtype=dist.dtype, device=dist.device)
    with torch.no_grad():
        d = dist.detach()
        has_neg = neg.any(dim=1)  # [N]
    if mining == "batch_hard":
        with torch.no_grad():
            ok = pos.any(dim=1) & has_neg
            anchors = torch.nonzero(ok).squeeze(1)  # [A]
            p_idx = torch.where(pos, d, -inf).argmax(dim=1)[anchors]
            n_idx = torch.where(neg, d, inf).argmin(dim=1)[anchors]
        return dist[anchors, p_idx], dist[anchors, n_idx]
    with torch.no_grad():
        a_idx, p_idx = torch.nonzero(pos & has_neg[:, None], as_tuple=True)  # [P] pairs
        d_ap = d[a_idx, p_idx]  # [P]
        d_an = d[a_idx]  # [P, N]
        negs = neg[a_idx]  # [P, N]
        farther = negs & (d_an > d_ap[:, None])
        semi = torch.where(farther, d_an, inf).argmin(dim=1)
        hardest_far = torch.where(negs, d_an, -inf).argmax(dim=1)
        n_idx = torch.where(farther.any(dim=1), semi, hardest_far)
    return dist[a_idx, p_idx], dist[a_idx, n_idx]
