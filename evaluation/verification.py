"""Pair-verification protocol of LFW-style sets (LFW, CFP-FP, AgeDB-30, ...), insightface style.

A verification set is ``2N`` aligned face images forming ``N`` pairs (rows ``2i`` and ``2i+1``)
and ``N`` booleans ``issame``. The protocol, as insightface's ``eval/verification.py``:

1. embed every image and its horizontal flip, sum the two, L2-normalise
   (:func:`extract_embeddings`);
2. pair distance = squared L2 distance of the normalised embeddings, in ``[0, 4]``; a pair is
   predicted "same" when ``distance < threshold``;
3. 10-fold cross-validation with contiguous, unshuffled folds: on each fold the threshold from
   ``arange(0, 4, 0.01)`` with the best accuracy on the *other* folds is applied to the held-out
   fold; the reported accuracy is the mean (and std) over folds (:func:`kfold_verification`);
4. VAL@FAR: per fold, the threshold at which the training folds' FAR reaches ``far_target``
   (linear interpolation on an ``arange(0, 4, 0.001)`` grid) is applied to the held-out fold.

Counting is done with sorted distances and ``searchsorted`` rather than a threshold x pair
boolean matrix, which gives identical counts (``distance < threshold`` in float64) in
``O((N + T) log N)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import KFold
from torch import nn

__all__ = [
    "VerificationResult",
    "cosine_pixel_baseline",
    "extract_embeddings",
    "kfold_verification",
    "kfold_verification_from_distances",
    "l2_normalize",
    "pair_distances",
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


# ----------------------------------------------------------------------------- embeddings


def _iter_batches(
    images: Iterable[np.ndarray] | np.ndarray, batch_size: int
) -> Iterator[np.ndarray]:
    """Yield uint8 arrays [b, H, W, 3] with b <= batch_size, regrouping the caller's chunks."""
    chunks: Iterable[np.ndarray] = [images] if isinstance(images, np.ndarray) else images
    pending: list[np.ndarray] = []
    pending_rows = 0
    shape: tuple[int, ...] | None = None
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, np.ndarray) or chunk.dtype != np.uint8 or chunk.ndim != 4:
            raise ValueError(
                f"images[{index}]: expected a uint8 array [n, H, W, 3], got "
                f"{type(chunk).__name__} {getattr(chunk, 'dtype', '')} "
                f"{getattr(chunk, 'shape', '')}"
            )
        if chunk.shape[3] != 3:
            raise ValueError(f"images[{index}]: expected RGB [n, H, W, 3], got {chunk.shape}")
        if shape is None:
            shape = chunk.shape[1:]
        elif chunk.shape[1:] != shape:
            raise ValueError(
                f"images[{index}]: image shape {chunk.shape[1:]} differs from earlier {shape}"
            )
        start = 0
        while start < len(chunk):
            take = min(batch_size - pending_rows, len(chunk) - start)
            pending.append(chunk[start : start + take])
            pending_rows += take
            start += take
            if pending_rows == batch_size:
                yield np.concatenate(pending) if len(pending) > 1 else pending[0]
                pending, pending_rows = [], 0
    if pending_rows:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


def _check_device(model: nn.Module, device: torch.device) -> None:
    for param in model.parameters():
        same_type = param.device.type == device.type
        same_index = device.index is None or param.device.index == device.index
        if not (same_type and same_index):
            raise ValueError(
                f"model parameters live on {param.device} but device={device}; move the model "
                "to the evaluation device before calling extract_embeddings"
            )
        return


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation in float64; all-zero rows stay zero (like sklearn)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # [N, 1]
    return x / np.maximum(norms, eps)


def extract_embeddings(
    model: nn.Module,
    images: Iterable[np.ndarray] | np.ndarray,
    batch_size: int,
    device: torch.device,
    flip: bool = True,
) -> np.ndarray:
    """Embed uint8 RGB images [n, H, W, 3] (one array or an iterable of chunks) -> [N, D].

    Pixels are mapped to ``(x - 127.5) / 127.5`` and laid out as [B, 3, H, W]. With ``flip``
    the embedding of the horizontally flipped image is added to the plain one (insightface's
    "Accuracy-Flip" numbers), which removes the model's left/right bias. Rows are then
    L2-normalised. The model runs in eval mode under ``no_grad``; each submodule's train/eval
    flag is restored afterwards, so this can be called in the middle of training. The model
    must already be on ``device``.

    This is :func:`evaluation.embed.embed_images` of the module, the computation ``facetrain
    eval`` runs on a checkpoint: the same batches give bit-identical embeddings.

    Returns float32 [N, D] with unit-norm rows (zero rows if the model outputs zeros).
    """
    from evaluation.embed import embed_images, torch_embedder  # it imports this module

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    _check_device(model, device)
    modes = [(m, m.training) for m in model.modules()]
    try:
        batches = _iter_batches(images, batch_size)
        return embed_images(torch_embedder(model, device), batches, flip=flip)
    finally:
        for module, was_training in modes:
            module.training = was_training


# ----------------------------------------------------------------------------- metrics


def pair_distances(embeddings: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Squared L2 distance of each pair (rows 2i, 2i+1) of ``embeddings`` [2N, D] -> [N]."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] % 2 != 0 or emb.shape[0] == 0:
        raise ValueError(f"embeddings must be [2N, D] with N >= 1, got shape {emb.shape}")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or inf")
    emb = l2_normalize(emb) if normalize else emb.astype(np.float64)
    diff = emb[0::2] - emb[1::2]  # [N, D]
    return np.sum(np.square(diff), axis=1)  # [N]


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


def kfold_verification(
    embeddings: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    far_target: float = 1e-3,
    *,
    normalize: bool = True,
    acc_threshold_step: float = DEFAULT_ACC_THRESHOLDS_STEP,
    val_threshold_step: float = DEFAULT_VAL_THRESHOLDS_STEP,
) -> VerificationResult:
    """k-fold verification accuracy and VAL@FAR of pair embeddings [2N, D] against issame [N].

    Pairs are rows (2i, 2i+1). Rows are L2-normalised first (a no-op for the output of
    :func:`extract_embeddings`; pass ``normalize=False`` to use them exactly as given, as
    insightface's ``evaluate`` does). See :func:`kfold_verification_from_distances`.
    """
    return kfold_verification_from_distances(
        pair_distances(embeddings, normalize=normalize),
        issame,
        nfolds=nfolds,
        far_target=far_target,
        acc_threshold_step=acc_threshold_step,
        val_threshold_step=val_threshold_step,
    )


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


def cosine_pixel_baseline(
    images: np.ndarray,
    issame: np.ndarray,
    nfolds: int = 10,
    far_target: float = 1e-3,
    pixel_chunk_pairs: int = 256,
) -> VerificationResult:
    """Verification with raw pixels as the embedding: the floor a trained model must beat.

    Pixels are mapped to ``(x - 127.5) / 127.5``, flattened and L2-normalised, so the pair
    distance is ``2 - 2 * cosine`` of the centred images. ``pixel_chunk_pairs`` pairs are
    converted to float at a time to bound memory.
    """
    if pixel_chunk_pairs < 1:
        raise ValueError(f"pixel_chunk_pairs must be >= 1, got {pixel_chunk_pairs}")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(
            f"images must be a uint8 array [2N, H, W, 3], got {images.dtype} {images.shape}"
        )
    if len(images) == 0 or len(images) % 2:
        raise ValueError(f"images must hold an even, non-zero number of rows, got {len(images)}")
    # Chunked so that a 12k-image set never materialises as one float64 [2N, H*W*3] matrix.
    distances = np.empty(len(images) // 2)  # [N]
    for start in range(0, len(distances), pixel_chunk_pairs):
        chunk = images[2 * start : 2 * (start + pixel_chunk_pairs)]
        flat = (chunk.reshape(len(chunk), -1).astype(np.float64) - 127.5) / 127.5  # [2n, HW3]
        distances[start : start + len(chunk) // 2] = pair_distances(flat)
    return kfold_verification_from_distances(
        distances, issame, nfolds=nfolds, far_target=far_target
    )
