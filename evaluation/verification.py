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

Steps 1 and 2 (and the pixel baseline) are here; steps 3 and 4, the k-fold threshold search on
the pair distances and :class:`~evaluation.kfold.VerificationResult`, are in
:mod:`evaluation.kfold`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from evaluation.kfold import (
    DEFAULT_ACC_THRESHOLDS_STEP,
    DEFAULT_VAL_THRESHOLDS_STEP,
    VerificationResult,
    kfold_verification_from_distances,
)
from evaluation.roc import RocCurve, roc_curve

__all__ = [
    "cosine_pixel_baseline",
    "extract_embeddings",
    "kfold_verification",
    "l2_normalize",
    "pair_distances",
    "pair_roc",
]


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


def pair_roc(embeddings: np.ndarray, issame: np.ndarray) -> RocCurve:
    """ROC of the pairs (rows 2i, 2i+1) of ``embeddings`` [2N, D] scored by their cosine:
    ``1 - d / 2`` for the squared L2 distance ``d`` between the normalised rows."""
    return roc_curve(1.0 - pair_distances(embeddings) / 2.0, issame)


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
