"""Evaluation: LFW-style k-fold verification and ONNX export with a parity check."""

from evaluation.onnx_export import ExportResult, OnnxParityError, export_onnx
from evaluation.verification import (
    VerificationResult,
    cosine_pixel_baseline,
    extract_embeddings,
    kfold_verification,
    kfold_verification_from_distances,
    l2_normalize,
    pair_distances,
    roc_points,
)

__all__ = [
    "ExportResult",
    "OnnxParityError",
    "VerificationResult",
    "cosine_pixel_baseline",
    "export_onnx",
    "extract_embeddings",
    "kfold_verification",
    "kfold_verification_from_distances",
    "l2_normalize",
    "pair_distances",
    "roc_points",
]
