"""ROC curves and TAR@FAR from similarity scores (IJB-style reporting).

Scores are similarities: higher means "more likely the same identity" (cosine similarity of
normalised embeddings, or ``1 - d / 2`` for a squared L2 distance ``d`` between unit vectors).
A pair is accepted at threshold ``t`` when ``score >= t``, the convention of
``sklearn.metrics.roc_curve``; :func:`roc_curve` is sklearn's ``roc_curve(labels, scores,
drop_intermediate=False)`` with the count of each class.

TAR@FAR (true accept rate at a false accept rate) reads that curve at the FARs IJB-B/C papers
report (1e-6 ... 1e-1). Two readings are offered; every row, its JSON and the eval tables name
the one used (``method``):

* ``"conservative"`` (default): the best TAR among operating points whose FAR does not exceed
  the target, i.e. a threshold a deployment could actually use, read at the highest threshold
  reaching that TAR (fewest false accepts). When the target is below the resolution
  ``1 / num_negatives`` this is the TAR at zero false accepts.
* ``"insightface"``: the figure insightface's IJB script (``eval_ijbc.py`` / ``ijb_11.py``)
  prints, for comparison with published tables. That script takes
  ``sklearn.metrics.roc_curve`` with its default ``drop_intermediate=True`` (points between
  two collinear, equally spaced neighbours are dropped), flips the arrays and takes
  ``argmin |fpr - far|``. On the flipped arrays argmin returns the point that comes *last* in
  sklearn's order among those equally near: the highest TAR of the FPR plateau nearest the
  target (of two FPRs equally near, the higher). :func:`roc_curve` keeps that dropped curve
  from sklearn beside the full one. The reported FAR may exceed the target, and the dropping
  can hide an FPR nearer the target than the ones kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sklearn import metrics

__all__ = [
    "DEFAULT_FARS",
    "READINGS",
    "RocCurve",
    "TarAtFar",
    "format_tar_table",
    "roc_curve",
    "tar_at_far",
    "tar_reading_notes",
]

DEFAULT_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The FARs of the IJB-B/C 1:1 verification tables."""

READINGS: dict[str, str] = {
    "conservative": "conservative reading: the best TAR at a FAR not above the target, at the "
    "highest threshold reaching it",
    "insightface": "insightface reading (eval_ijbc.py): the highest TAR at the FAR nearest the "
    "target, on sklearn's ROC with intermediate points dropped; the FAR may exceed the target",
}
"""One-line description of each ``method`` of :func:`tar_at_far`, printed under eval tables."""

_UNRESOLVABLE = {
    "conservative": "read at zero false accepts",
    "insightface": "read at the nearest FAR on the curve, which may be above it",
}


@dataclass(frozen=True)
class RocCurve:
    """Operating points for thresholds ``thresholds`` (decreasing, the first is +inf)."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    num_positives: int
    num_negatives: int
    dropped: tuple[np.ndarray, np.ndarray, np.ndarray]
    """``(fpr, tpr, thresholds)`` of sklearn's curve with ``drop_intermediate=True``: what
    insightface's IJB script reads (``method="insightface"`` of :func:`tar_at_far`)."""

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
    method: str
    """The reading, ``"conservative"`` or ``"insightface"`` (see the module docstring)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "far_target": self.far_target,
            "tar": self.tar,
            "far": self.far,
            "threshold": self.threshold,
            "resolvable": self.resolvable,
            "method": self.method,
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

    One point per distinct score, plus the all-reject point at threshold +inf:
    ``sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)``, and in
    ``dropped`` the same with ``drop_intermediate=True``.
    """
    scores, positive = _check_scores(scores, labels)
    fpr, tpr, thresholds = metrics.roc_curve(positive, scores, drop_intermediate=False)
    dropped = metrics.roc_curve(positive, scores, drop_intermediate=True)
    num_pos = int(np.count_nonzero(positive))
    return RocCurve(fpr, tpr, thresholds, num_pos, len(positive) - num_pos, dropped)


def tar_at_far(
    curve: RocCurve,
    fars: Sequence[float] = DEFAULT_FARS,
    method: Literal["conservative", "insightface"] = "conservative",
) -> list[TarAtFar]:
    """TAR at each target FAR read from ``curve`` (see the module docstring for ``method``)."""
    if method not in READINGS:
        raise ValueError(f"method must be 'conservative' or 'insightface', got {method!r}")
    rows = []
    for far in fars:
        if not 0.0 <= far <= 1.0:
            raise ValueError(f"fars must be in [0, 1], got {far}")
        if method == "conservative":
            fpr, tpr, thresholds = curve.fpr, curve.tpr, curve.thresholds
            # fpr is non-decreasing: the last point with fpr <= far has the highest tpr; the
            # first point reaching that tpr has the highest threshold (fewest false accepts).
            k = int(np.searchsorted(fpr, far, side="right")) - 1
            i = int(np.searchsorted(tpr, tpr[k], side="left"))
        else:
            fpr, tpr, thresholds = curve.dropped
            # The last point nearest the target (insightface's argmin on the flipped curve):
            # the highest TPR of that FPR plateau.
            distance = np.abs(fpr - far)
            i = int(np.flatnonzero(distance == distance.min())[-1])
        rows.append(
            TarAtFar(
                far_target=float(far),
                tar=float(tpr[i]),
                far=float(fpr[i]),
                threshold=float(thresholds[i]),
                resolvable=bool(far * curve.num_negatives >= 1.0),
                method=method,
            )
        )
    return rows


def tar_reading_notes(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """Lines to print under a TAR@FAR table of ``rows`` (``TarAtFar.as_dict()`` dicts): the
    reading used, and what an unresolvable FAR (marked ``*``) was read at."""
    row_list = list(rows)
    methods = list(dict.fromkeys(r["method"] for r in row_list))
    lines = [f"TAR@FAR, {READINGS[m]}" for m in methods]
    for m in methods:
        if any(not r["resolvable"] for r in row_list if r["method"] == m):
            lines.append(f"* FAR below 1 / number of negative pairs: {_UNRESOLVABLE[m]}")
    return lines


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
    lines += tar_reading_notes(r.as_dict() for rows in tables.values() for r in rows)
    return "\n".join(lines)
