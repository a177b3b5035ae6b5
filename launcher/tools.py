"""Evaluation and export of trained models from the command line.

A model is a checkpoint (a ``step-N`` folder or a run folder, whose ``latest`` is used), an
``.onnx`` file, or a weights file holding a backbone state_dict (arcface_torch's
``torch.save(backbone.state_dict(), path)``), whose architecture is named with ``--backbone``
and ``--embedding-size`` (a 112x112 input); :func:`make_embedder` turns any of them into an
:data:`evaluation.embed.Embedder` for the runners of :mod:`evaluation.runner`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from torch import nn

from backbones import create_backbone
from backbones.weights import WeightsError, load_weights
from evaluation.embed import Embedder, onnx_embedder, torch_embedder
from evaluation.onnx_export import ExportResult, export_onnx
from trainer import checkpoint as ckpt

WEIGHTS_INPUT_SIZE = (112, 112)
"""The input (H, W) of a model read from a state_dict file: arcface_torch's face crops."""
DEFAULT_EMBEDDING_SIZE = 512
"""``--embedding-size`` of a state_dict file when not given: arcface_torch's."""


def is_weights_file(model_path: str | Path) -> bool:
    """A state_dict file: a file that is neither ``.onnx`` nor a run's ``latest`` pointer."""
    path = Path(model_path)
    return path.is_file() and path.suffix != ".onnx" and path.name != "latest"


def check_architecture(
    model_path: str | Path, backbone: str | None, embedding_size: int | None = None
) -> None:
    """``--backbone`` is given for a state_dict file, and ``--backbone`` /
    ``--embedding-size`` only for one (a checkpoint names its own network, an ONNX file is
    one)."""
    if is_weights_file(model_path) and backbone is None:
        raise WeightsError(
            f"{model_path}: a weights file (state_dict) does not say which network it holds; "
            "name it with --backbone NAME (and --embedding-size N if not 512)"
        )
    if not is_weights_file(model_path) and (backbone, embedding_size) != (None, None):
        raise WeightsError(
            f"--backbone / --embedding-size are for a state_dict file; {model_path} is a "
            "checkpoint or ONNX model, which fixes its own network"
        )


def load_backbone(
    checkpoint: str | Path, backbone: str | None = None, embedding_size: int | None = None
) -> tuple[nn.Module, tuple[int, int]]:
    """Rebuild the backbone of a checkpoint (step-N folder or run folder) on the CPU, or
    ``backbone`` (``embedding_size``, default 512) from a state_dict file."""
    check_architecture(checkpoint, backbone, embedding_size)
    if backbone is not None:
        size = embedding_size or DEFAULT_EMBEDDING_SIZE
        model = create_backbone(backbone, embedding_size=size, input_size=WEIGHTS_INPUT_SIZE)
        load_weights(model, checkpoint, f"--backbone {backbone} --embedding-size {size}")
        return model.eval(), WEIGHTS_INPUT_SIZE
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
    if Path(model_path).suffix != ".onnx" and not is_weights_file(model_path):
        config = yaml.safe_load(ckpt.read_meta(ckpt.resolve_checkpoint(model_path))["config"])
        saved = {k: v for k, v in config.get("eval", {}).items() if k in keys}  # only these:
        # a checkpoint of another version may hold eval keys this one does not know
    settings = EvalConfig.model_validate(saved)
    return {k: getattr(settings, k) for k in keys}


def describe_model(model_path: str | Path, backbone: str | None = None) -> str:
    """What is evaluated, for figure titles: a checkpoint's backbone, training step and run
    ("r50, step 1200 (run ms1mv3_r50)"), or the file's name (``backbone``'s state_dict or an
    ONNX model, whose training step is not recorded)."""
    path = Path(model_path)
    if path.suffix == ".onnx" or is_weights_file(path):
        kind = f"{backbone} state_dict" if backbone else "ONNX"
        return f"{path.name} ({kind}, training step not recorded)"
    step_dir = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_meta(step_dir)
    return f"{meta['backbone']}, step {meta['step']} (run {step_dir.parent.name})"


def make_embedder(
    model_path: str | Path, backbone: str | None = None, embedding_size: int | None = None
) -> tuple[Embedder, tuple[int, int] | None]:
    """(embedder, input (H, W) or None if the model does not fix it) of a checkpoint, an
    .onnx file or a state_dict file of ``backbone``."""
    path = Path(model_path)
    if path.suffix == ".onnx":
        check_architecture(path, backbone, embedding_size)
        return onnx_embedder(path)
    model, input_size = load_backbone(path, backbone, embedding_size)
    return torch_embedder(model), input_size


def export_checkpoint(
    checkpoint: str,
    out: str,
    opset: int,
    tolerance: float,
    simplify: bool = False,
    fp16: bool = False,
    fp16_tolerance: float = 1e-2,
    backbone: str | None = None,
    embedding_size: int | None = None,
) -> ExportResult:
    """ONNX export of a checkpoint's backbone (or of a state_dict file of ``backbone``),
    checked against PyTorch with onnxruntime."""
    model, input_size = load_backbone(checkpoint, backbone, embedding_size)
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
