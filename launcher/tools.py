"""Evaluation and export of trained models from the command line.

A model is either a checkpoint (a ``step-N`` folder or a run folder, whose ``latest`` is
used) or an ``.onnx`` file; :func:`make_embedder` turns either into an
:data:`evaluation.embed.Embedder` for the runners of :mod:`evaluation.runner`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

from backbones import create_backbone
from evaluation.embed import Embedder, onnx_embedder, torch_embedder
from evaluation.onnx_export import ExportResult, export_onnx
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


def eval_settings(model_path: str | Path) -> dict[str, int]:
    """``batch_size`` and ``nfolds`` of a checkpoint's ``eval`` config (the in-training
    evaluation's; the same batches give the same embeddings), the defaults for ONNX."""
    from trainer.config import EvalConfig

    keys = ("batch_size", "nfolds")
    saved: dict = {}
    if Path(model_path).suffix != ".onnx":
        config = yaml.safe_load(ckpt.read_meta(ckpt.resolve_checkpoint(model_path))["config"])
        saved = {k: v for k, v in config.get("eval", {}).items() if k in keys}  # only these:
        # a checkpoint of another version may hold eval keys this one does not know
    settings = EvalConfig.model_validate(saved)
    return {k: getattr(settings, k) for k in keys}


def make_embedder(model_path: str | Path) -> tuple[Embedder, tuple[int, int] | None]:
    """(embedder, input (H, W) or None if the model does not fix it) of a checkpoint or .onnx."""
    path = Path(model_path)
    if path.suffix == ".onnx":
        return onnx_embedder(path)
    model, input_size = load_backbone(path)
    return torch_embedder(model), input_size


def export_checkpoint(
    checkpoint: str,
    out: str,
    opset: int,
    tolerance: float,
    simplify: bool = False,
    fp16: bool = False,
    fp16_tolerance: float = 1e-2,
) -> ExportResult:
    """ONNX export of a checkpoint's backbone, checked against PyTorch with onnxruntime."""
    model, input_size = load_backbone(checkpoint)
    return export_onnx(
        model,
        out,
        input_size=input_size,
        opset=opset,
        tolerance=tolerance,
        simplify=simplify,
        fp16=fp16,
        fp16_tolerance=fp16_tolerance,
    )
