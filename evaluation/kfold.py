"""k-fold threshold selection on pair distances: steps 3 and 4 of the verification protocol.

Given the squared L2 distance of each pair (in ``[0, 4]``) and ``issame``, insightface's
``eval/verification.py`` reports:

* accuracy: 10-fold cross-validation with contiguous, unshuffled folds; on each fold the
  threshold from ``arange(0, 4, 0.01)`` with the best accuracy on the *other* folds is applied
  to the held-out fold; the mean (and std) over folds is reported;
* VAL@FAR: per fold, the threshold at which the training folds' FAR reaches ``far_target``
  (linear interpolation on an ``arange(0, 4, 0.001)`` grid) is applied to the held-out fold.

Counting is done with sorted distances and ``searchsorted`` rather than a threshold x pair
boolean matrix, which gives identical counts (``distance < threshold`` in float64) in
``O((N + T) log N)``. Turning embeddings into distances is :mod:`evaluation.verification`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.model_selection import KFold

__all__ = [
    "DEFAULT_ACC_THRESHOLDS_STEP",
    "DEFAULT_VAL_THRESHOLDS_STEP",
    "MAX_SQUARED_DISTANCE",
    "VerificationResult",
    "kfold_verification_from_distances",
    "roc_points",
]

DEFAULT_ACC_THRESHOLDS_STEP = 0.01  # insightface calculate_roc grid
DEFAULT_VAL_THRESHOLDS_STEP = 0.001  # insightface calculate_val grid
MAX_SQUARED_DISTANCE = 4.0  # squared L2 between unit vectors lies in [0, 4]


@dataclass(frozen=True)
class VerificationResult:
    """Outcome of :func:`kfold_verification`.

    ``accuracy_*`` are fractions in [0, 1] (insightface prints them as such). ``best_threshold``
    is the mean over folds of the squared-distance threshold picked on the training folds
    (``fold_thresholds``). ``val_*``/``far_mean`` are VAL (true accept rate) and FAR on the
    held-out folds at the threshold interpolated for ``far_target`` on the training folds
    (``fold_val_thresholds``). A fold with no same (or no different) pair has an undefined VAL
    (or FAR) and is left out of that mean (``nan`` when no fold defines it). ``tpr``/``fpr``
    are the held-out folds' ROC curves averaged over folds at ``thresholds`` (insightface's
    ``calculate_roc``), for plots.
    """

    accuracy_mean: float
    accuracy_std: float
    best_threshold: float
    val_mean: float
    val_std: float
    far_mean: float
    fold_accuracies: tuple[float, ...]
    fold_thresholds: tuple[float, ...] = ()
    fold_val_thresholds: tuple[float, ...] = ()
    num_pairs: int = 0
    far_target: float = 1e-3
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    tpr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    fpr: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def as_dict(self, include_roc: bool = False) -> dict[str, Any]:
        """Plain-Python (JSON/wandb-ready) view; the ROC arrays only when ``include_roc``."""
        out: dict[str, Any] = {
            "accuracy_mean": float(self.accuracy_mean),
            "accuracy_std": float(self.accuracy_std),
            "best_threshold": float(self.best_threshold),
            "val_mean": float(self.val_mean),
            "val_std": float(self.val_std),
            "far_mean": float(self.far_mean),
            "far_target": float(self.far_target),
            "num_pairs": int(self.num_pairs),
            "fold_accuracies": [float(a) for a in self.fold_accuracies],
            "fold_thresholds": [float(t) for t in self.fold_thresholds],
            "fold_val_thresholds": [float(t) for t in self.fold_val_thresholds],
        }
        if include_roc:
            out["thresholds"] = self.thresholds.tolist()
            out["tpr"] = self.tpr.tolist()
            out["fpr"] = self.fpr.tolist()
        return out


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t, how many values are strictly below t (``np.less`` semantics)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def roc_points(
    distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """TPR and FPR [T] when predicting "same" for ``distance < t``, for each threshold t.

    A rate whose denominator is empty (no same or no different pairs) is 0, as in insightface.
    """
    distances = np.asarray(distances, dtype=np.float64)
    issame = np.asarray(issame, dtype=bool)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    same = np.sort(distances[issame])
    diff = np.sort(distances[~issame])
    tp = _count_below(same, thresholds)  # [T]
    fp = _count_below(diff, thresholds)  # [T]
    tpr = tp / len(same) if len(same) else np.zeros(len(thresholds))
    fpr = fp / len(diff) if len(diff) else np.zeros(len(thresholds))
    return tpr.astype(np.float64), fpr.astype(np.float64)


def _accuracies(distances: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy [T] of ``distance < t`` against ``issame`` for each threshold."""
    same = np.sort(distances[issame])
    diff = np.sort(distances[~issame])
    tp = _count_below(same, thresholds)  # [T]
    tn = len(diff) - _count_below(diff, thresholds)  # [T]
    return (tp + tn) / len(distances)


def _kfold_splits(n: int, nfolds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous, unshuffled folds: sklearn's ``KFold(shuffle=False)``, as insightface's LFold.

    The first ``n % nfolds`` folds get one extra item. ``nfolds == 1`` trains and tests on
    everything, as insightface's LFold does (KFold needs two folds at least).
    """
    indices = np.arange(n)
    if nfolds == 1:
        return [(indices, indices)]
    return list(KFold(n_splits=nfolds, shuffle=False).split(indices))


def _threshold_for_far(far: np.ndarray, thresholds: np.ndarray, far_target: float) -> float:
    """Threshold at which the (non-decreasing) FAR curve reaches ``far_target``.

    insightface uses ``scipy.interpolate.interp1d(far, thresholds, kind="slinear")``. FAR has
    plateaus (duplicate x values), which current scipy rejects ("Expect x to not have
    duplicates"); the scipy versions insightface ran with built a degree-1 B-spline through the
    points, i.e. linear interpolation between the *last* threshold whose FAR <= target and the
    next threshold. We compute exactly that (tests check it against that B-spline). If no
    threshold reaches the target, insightface falls back to threshold 0 (accept nothing), and
    so do we. (For ``far_target`` equal to the final FAR plateau that old B-spline returned 0,
    an artefact; we return the last threshold.)
    """
    if far[-1] < far_target:  # far is non-decreasing, so far[-1] is its max
        return 0.0
    k = int(np.searchsorted(far, far_target, side="right")) - 1  # last index with far <= target
    if k < 0:  # far[0] > target: the curve starts above the target; take the first threshold
        return float(thresholds[0])
    if k == len(far) - 1:
        return float(thresholds[-1])
    f0, f1 = far[k], far[k + 1]
    t0, t1 = thresholds[k], thresholds[k + 1]
    return float(t0 + (far_target - f0) * (t1 - t0) / (f1 - f0))


def _val_far(distances: np.ndarray, issame: np.ndarray, threshold: float) -> tuple[float, float]:
    """VAL (true accept rate) and FAR at ``threshold``; nan when a denominator is empty."""
    accept = distances < threshold
    n_same = int(np.sum(issame))
    n_diff = int(np.sum(~issame))
    val = float(np.sum(accept & issame)) / n_same if n_same else float("nan")
    far = float(np.sum(accept & ~issame)) / n_diff if n_diff else float("nan")
    return val, far


def _nan_mean_std(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.std(finite))


def kfold_verification_from_distances(
    distances: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    far_target: float = 1e-3,
    *,
    acc_threshold_step: float = DEFAULT_ACC_THRESHOLDS_STEP,
    val_threshold_step: float = DEFAULT_VAL_THRESHOLDS_STEP,
) -> VerificationResult:
    """k-fold accuracy and VAL@FAR from squared pair distances [N] in [0, 4] and issame [N].

    Threshold grids are ``arange(0, 4, step)``; the defaults are insightface's (0.01 for
    accuracy, 0.001 for VAL). On each fold the training-fold threshold is the first (smallest)
    one reaching the maximum accuracy (``np.argmax``), as in insightface.
    """
    distances = np.asarray(distances, dtype=np.float64)
    issame_arr = np.asarray(issame)
    if distances.ndim != 1 or len(distances) == 0 or not np.all(np.isfinite(distances)):
        raise ValueError(f"distances must be a non-empty finite 1-D array, got {distances.shape}")
    if issame_arr.ndim != 1 or issame_arr.dtype.kind not in "biu":
        raise ValueError(
            f"issame must be a 1-D bool array, got {issame_arr.dtype} {issame_arr.shape}"
        )
    issame_arr = issame_arr.astype(bool)
    n = len(distances)
    if len(issame_arr) != n:
        raise ValueError(
            f"issame has {len(issame_arr)} entries but there are {n} pairs ({2 * n} embedding rows)"
        )
    if not 1 <= nfolds <= n:
        raise ValueError(f"nfolds must be in [1, number of pairs={n}], got {nfolds}")
    if not 0.0 <= far_target <= 1.0:
        raise ValueError(f"far_target must be in [0, 1], got {far_target}")
    for name, step in (
        ("acc_threshold_step", acc_threshold_step),
        ("val_threshold_step", val_threshold_step),
    ):
        if not 0.0 < step <= MAX_SQUARED_DISTANCE:
            raise ValueError(f"{name} must be in (0, 4], got {step}")

    acc_thresholds = np.arange(0, MAX_SQUARED_DISTANCE, acc_threshold_step)  # [T]
    val_thresholds = np.arange(0, MAX_SQUARED_DISTANCE, val_threshold_step)  # [T']
    fold_acc = np.zeros(nfolds)
    fold_thr = np.zeros(nfolds)
    fold_val = np.zeros(nfolds)
    fold_far = np.zeros(nfolds)
    fold_val_thr = np.zeros(nfolds)
    tprs = np.zeros((nfolds, len(acc_thresholds)))
    fprs = np.zeros((nfolds, len(acc_thresholds)))
    for fold, (train, test) in enumerate(_kfold_splits(n, nfolds)):
        d_train, s_train = distances[train], issame_arr[train]
        d_test, s_test = distances[test], issame_arr[test]

        best = int(np.argmax(_accuracies(d_train, s_train, acc_thresholds)))
        fold_thr[fold] = acc_thresholds[best]
        fold_acc[fold] = _accuracies(d_test, s_test, acc_thresholds[best : best + 1])[0]
        tprs[fold], fprs[fold] = roc_points(d_test, s_test, acc_thresholds)

        _, far_train = roc_points(d_train, s_train, val_thresholds)
        if np.any(~s_train):
            val_thr = _threshold_for_far(far_train, val_thresholds, far_target)
        else:  # no impostor pair to calibrate on: FAR is undefined, accept nothing
            val_thr = 0.0
        fold_val_thr[fold] = val_thr
        fold_val[fold], fold_far[fold] = _val_far(d_test, s_test, val_thr)

    val_mean, val_std = _nan_mean_std(fold_val)
    far_mean, _ = _nan_mean_std(fold_far)
    return VerificationResult(
        accuracy_mean=float(np.mean(fold_acc)),
        accuracy_std=float(np.std(fold_acc)),
        best_threshold=float(np.mean(fold_thr)),
        val_mean=val_mean,
        val_std=val_std,
        far_mean=far_mean,
        fold_accuracies=tuple(float(a) for a in fold_acc),
        fold_thresholds=tuple(float(t) for t in fold_thr),
        fold_val_thresholds=tuple(float(t) for t in fold_val_thr),
        num_pairs=n,
        far_target=float(far_target),
        thresholds=acc_thresholds,
        tpr=tprs.mean(axis=0),
        fpr=fprs.mean(axis=0),
    )
