"""Evaluation: verification, ROC / TAR@FAR, IJB templates, identification, plots, ONNX export.

Modules: ``verification`` (insightface protocol on .bin pairs: embeddings, pair distances),
``kfold`` (its k-fold threshold search on the distances), ``roc`` (ROC and TAR@FAR
from scores), ``ijb`` (IJB-B/C 1:1 template protocol), ``identification`` (MegaFace-style
rank-k with distractors), ``embed`` (embedders for torch/ONNX models and image sources),
``plots`` (ROC / angle figures), ``toy_plots`` (2-D toy figure per margin head), ``figures``
(their shared canvas), ``onnx_export`` (export with parity check), ``runner`` (what the
``facetrain eval``/``embed``/``plots`` commands call), ``wandb_offline`` (logged history).
"""

from evaluation.embed import (
    EmbeddingError,
    embed_images,
    embed_to_npy,
    onnx_embedder,
    open_image_source,
    torch_embedder,
)
from evaluation.identification import IdentificationResult, identification_ranks
from evaluation.ijb import IJBMeta, IJBResult, ijb_verification, read_ijb_meta
from evaluation.kfold import VerificationResult, kfold_verification_from_distances, roc_points
from evaluation.onnx_export import ExportResult, OnnxParityError, export_onnx
from evaluation.roc import DEFAULT_FARS, RocCurve, TarAtFar, roc_curve, tar_at_far
from evaluation.verification import (
    cosine_pixel_baseline,
    extract_embeddings,
    kfold_verification,
    l2_normalize,
    pair_distances,
)

__all__ = [
    "DEFAULT_FARS",
    "EmbeddingError",
    "ExportResult",
    "IJBMeta",
    "IJBResult",
    "IdentificationResult",
    "OnnxParityError",
    "RocCurve",
    "TarAtFar",
    "VerificationResult",
    "cosine_pixel_baseline",
    "embed_images",
    "embed_to_npy",
    "export_onnx",
    "extract_embeddings",
    "identification_ranks",
    "ijb_verification",
    "kfold_verification",
    "kfold_verification_from_distances",
    "l2_normalize",
    "onnx_embedder",
    "open_image_source",
    "pair_distances",
    "read_ijb_meta",
    "roc_curve",
    "roc_points",
    "tar_at_far",
    "torch_embedder",
]
