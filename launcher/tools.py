"""Evaluation and export of trained models from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backbones import create_backbone
from dataio.verification_bin import load_bin
from evaluation.onnx_export import ExportResult, export_onnx
from evaluation.verification import kfold_verification, l2_normalize
from trainer import checkpoint as ckpt


def load_backbone(checkpoint: str | Path) -> tuple[nn.Module, tuple[int, int]]:
    """Rebuild the backbone of a checkpoint (step-N folder or run folder) on the CPU."""
    step_dir = ckpt.resolve_checkpoint(checkpoint)
    meta = ckpt.read_meta(step_dir)
    kwargs = dict(meta["backbone_kwargs"])
    model = create_backbone(meta["backbone"], **kwargs)
    model.load_state_dict(ckpt.load_torch(step_dir / "backbone.pt"), strict=True)
    model.eval()
    return model, tuple(kwargs["input_size"])


def _onnx_embedder(path: Path) -> Any:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def embed(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x.astype(np.float32)})[0]

    return embed


def _torch_embedder(model: nn.Module) -> Any:
    @torch.no_grad()
    def embed(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).float().numpy()

    return embed


def evaluate_model(
    model_path: str, bins: list[str], batch_size: int, nfolds: int
) -> dict[str, dict[str, Any]]:
    """k-fold verification of a checkpoint or an ONNX file on insightface .bin sets."""
    path = Path(model_path)
    embed = (
        _onnx_embedder(path) if path.suffix == ".onnx" else _torch_embedder(load_backbone(path)[0])
    )
    results = {}
    for bin_path in bins:
        vs = load_bin(bin_path)
        chunks = []
        for batch in vs.batches(batch_size):
            x = (batch.astype(np.float32).transpose(0, 3, 1, 2) - 127.5) / 127.5  # [B,3,H,W]
            chunks.append(embed(x) + embed(np.ascontiguousarray(x[..., ::-1])))  # image + flip
        emb = l2_normalize(np.concatenate(chunks))
        res = kfold_verification(emb, np.asarray(vs.issame), nfolds=nfolds)
        results[Path(bin_path).stem] = res.as_dict()
    return results


def export_checkpoint(checkpoint: str, out: str, opset: int, tolerance: float) -> ExportResult:
    model, input_size = load_backbone(checkpoint)
    return export_onnx(model, out, input_size=input_size, opset=opset, tolerance=tolerance)
