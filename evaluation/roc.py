"""ROC curves and TAR@FAR from similarity scores (IJB-style reporting).

Scores are similarities: higher means "more likely the same identity" (cosine similarity of
normalised embeddings, or ``1 - d / 2`` for a squared L2 distance ``d`` between unit vectors).
A pair is accepted at threshold ``t`` when ``score >= t``, the convention of
``sklearn.metrics.roc_curve``; :func:`roc_curve` returns exactly sklearn's
``roc_curve(labels, scores, drop_intermediate=False)`` (tested), computed with one sort.

TAR@FAR (true accept rate at a false accept rate) reads that curve at the FARs IJB-B/C papers
report (1e-6 ... 1e-1). Two readings are offered:

* ``"conservative"`` (default): the best TAR among operating points whose FAR does not exceed
  the target, i.e. a threshold a deployment could actually use, read at the highest threshold
  reaching that TAR (fewest false accepts). When the target is below the resolution
  ``1 / num_negatives`` this is the TAR at zero false accepts.
* ``"insightface"``: the TAR of the operating point whose FAR is *closest* to the target
  (``argmin |fpr - far|``), as insightface's ``eval_ijbc.py`` prints, for comparison with
  published tables. It may report a FAR above the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "DEFAULT_FARS",
    "RocCurve",
    "TarAtFar",
    "format_tar_table",
    "roc_curve",
    "tar_at_far",
]

DEFAULT_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The FARs of the IJB-B/C 1:1 verification tables."""


@dataclass(frozen=True)
class RocCurve:
    """Operating points for thresholds ``thresholds`` (decreasing, the first is +inf)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    num_positives: int
    num_negatives: int

    def auc(self) -> float:
        """Area under the curve (trapezoids over FPR)."""
        return float(np.trapezoid(self.tpr, self.fpr))


@dataclass(frozen=True)
class TarAtFar:
    """One row of a TAR@FAR table."""

    far_target: float
    tar: float
    far: float
    """FAR actually achieved at ``threshold``."""
    threshold: float
    resolvable: bool
    """Whether the negatives are numerous enough to measure this FAR (``far * negatives >= 1``)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "far_target": self.far_target,
            "tar": self.tar,
            "far": self.far,
            "threshold": self.threshold,
            "resolvable": self.resolvable,
        }


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels_arr = np.asarray(labels)
    if labels_arr.ndim != 1 or len(labels_arr) != len(scores):
        raise ValueError(
            f"labels must be 1-D with one entry per score ({len(scores)}), got shape "
            f"{labels_arr.shape}"
        )
    if len(scores) == 0:
        raise ValueError("scores is empty")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN or inf")
    if labels_arr.dtype.kind == "b":
        positive = labels_arr
    elif labels_arr.dtype.kind in "iuf" and np.all(np.isin(labels_arr, (0, 1))):
        positive = labels_arr.astype(bool)
    else:
        raise ValueError("labels must be booleans or 0/1 (1 = same identity)")
    if positive.all() or not positive.any():
        raise ValueError(
            "labels must contain both positive (same) and negative (different) pairs; got "
            f"{int(positive.sum())} positives of {len(positive)}"
        )
    return scores, positive


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> RocCurve:
    """ROC of ``score >= threshold`` against boolean (or 0/1) ``labels`` [N].

    One point per distinct score, plus the all-reject point at threshold +inf; identical to
    ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``.
    """
    scores, positive = _check_scores(scores, labels)
    order = np.argsort(-scores, kind="mergesort")  # descending scores
    s = scores[order]  # [N]
    pos = positive[order]  # [N]
    tp = np.cumsum(pos)  # accepted positives when the threshold is s[i]
    fp = np.cumsum(~pos)
    # A threshold accepts every pair with an equal score, so keep the last index of each run.
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    num_pos, num_neg = int(tp[-1]), int(fp[-1])
    tpr = np.r_[0.0, tp[last] / num_pos]
    fpr = np.r_[0.0, fp[last] / num_neg]
    thresholds = np.r_[np.inf, s[last]]
    return RocCurve(fpr, tpr, thresholds, num_pos, num_neg)


def tar_at_far(
    curve: RocCurve,
    fars: Sequence[float] = DEFAULT_FARS,
    method: Literal["conservative", "insightface"] = "conservative",
) -> list[TarAtFar]:
    """TAR at each target FAR read from ``curve`` (see the module docstring for ``method``)."""
    if method not in ("conservative", "insightface"):
        raise ValueError(f"method must be 'conservative' or 'insightface', got {method!r}")
    rows = []
    for far in fars:
        if not 0.0 <= far <= 1.0:
            raise ValueError(f"fars must be in [0, 1], got {far}")
        if method == "conservative":
            # fpr is non-decreasing: the last point with fpr <= far has the highest tpr; the
            # first point reaching that tpr has the highest threshold (fewest false accepts).
            k = int(np.searchsorted(curve.fpr, far, side="right")) - 1
            i = int(np.searchsorted(curve.tpr, curve.tpr[k], side="left"))
        else:
            i = int(np.argmin(np.abs(curve.fpr - far)))
        rows.append(
            TarAtFar(
                far_target=float(far),
                tar=float(curve.tpr[i]),
                far=float(curve.fpr[i]),
                threshold=float(curve.thresholds[i]),
                resolvable=bool(far * curve.num_negatives >= 1.0),
            )
        )
    return rows


def format_tar_table(tables: dict[str, list[TarAtFar]]) -> str:
    """Plain-text table: one row per set, one column per FAR (TAR in percent)."""
    if not tables:
        return ""
    fars = [r.far_target for r in next(iter(tables.values()))]
    width = max(12, *(len(k) for k in tables))
    header = f"{'TAR@FAR':<{width}}" + "".join(f"{f:>9.0e}" for f in fars)
    lines = [header]
    for name, rows in tables.items():
        cells = "".join(f"{100 * r.tar:>8.2f}{' ' if r.resolvable else '*'}" for r in rows)
        lines.append(f"{name:<{width}}{cells}")
    if any(not r.resolvable for rows in tables.values() for r in rows):
        lines.append("* FAR below 1/number of negative pairs: read at zero false accepts")
    return "\n".join(lines)
