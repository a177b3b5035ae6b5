"""``model.init_from``: start a run from another model's weights (fine-tuning).

The source is a facetrain checkpoint (a ``step-N`` folder, a run folder or its ``latest``
file) or a weights file holding a backbone state_dict -- what arcface_torch users download,
read by :mod:`backbones.weights`. Every rank loads the backbone weights into its plain module
before the engine (DDP or DeepSpeed) wraps it, so any world size and engine start from the
same weights. The optimizers, the schedules, the step count and the data position start
afresh.

The classifier starts fresh: a fine-tuning run usually has other identities. With
``model.init_classifier`` it takes the checkpoint's class centres instead (the same number of
classes as the pack), re-sharded onto this run's world size as a resume does
(:func:`trainer.state.load_class_rows`).

A run that resumes -- ``run.resume`` a checkpoint path, or ``auto`` with a checkpoint in the
run folder -- ignores ``init_from``: its checkpoint already holds what ``init_from`` gave and
everything trained since (and a requeued job does not need the source any more).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backbones import create_backbone
from backbones.weights import check_state_dict, load_weights, read_state_dict
from trainer import checkpoint as ckpt
from trainer import state as train_state
from trainer.config import Config
from trainer.context import DistContext

__all__ = ["InitSource", "apply_init_from", "check_init_from", "resumes", "resolve_source"]


@dataclass(frozen=True)
class InitSource:
    """Where ``model.init_from`` points: the backbone's weights file, and the checkpoint
    folder when it is a facetrain checkpoint (which also holds a classifier)."""

    weights: Path
    step_dir: Path | None


def resolve_source(spec: str | Path) -> InitSource:
    """The weights of a checkpoint (folder or ``latest`` file) or of a state_dict file."""
    path = Path(spec)
    if path.is_dir() or path.name == "latest":
        step_dir = ckpt.resolve_checkpoint(path)
        return InitSource(step_dir / "backbone.pt", step_dir)
    if not path.is_file():
        raise ckpt.CheckpointError(f"{path}: no such checkpoint folder or weights file")
    return InitSource(path, None)


def resumes(config: Config) -> bool:
    """Whether the run continues a checkpoint (which then wins over ``init_from``)."""
    resume = config.run.resume
    if resume == "auto":
        return bool(ckpt.step_dirs(config.run_dir))
    return resume is not None


def _describe(config: Config) -> str:
    mcfg = config.model
    kwargs = f", {mcfg.kwargs}" if mcfg.kwargs else ""
    return f"model.backbone {mcfg.backbone} (embedding_size {mcfg.embedding_size}{kwargs})"


def _backbone_kwargs(config: Config, image_size: tuple[int, int]) -> dict[str, Any]:
    mcfg = config.model
    return {"embedding_size": mcfg.embedding_size, "input_size": list(image_size), **mcfg.kwargs}


def _check_classes(source: InitSource, num_classes: int) -> tuple[Path, int]:
    """The checkpoint and its world size, after checking its classifier has ``num_classes``."""
    if source.step_dir is None:
        raise ckpt.CheckpointError(
            f"{source.weights}: model.init_classifier needs a facetrain checkpoint; a state_dict "
            "file holds no classifier (set model.init_classifier false for fresh class centres)"
        )
    meta = ckpt.read_meta(source.step_dir)
    saved = meta.get("derived", {}).get("num_classes")
    if saved != num_classes:
        raise ckpt.CheckpointError(
            f"{source.step_dir}: model.init_classifier: the checkpoint's classifier has {saved} "
            f"classes, the pack has {num_classes}; new identities need a fresh classifier "
            "(model.init_classifier false)"
        )
    return source.step_dir, int(meta["world_size"])


def check_init_from(config: Config, image_size: tuple[int, int], num_classes: int) -> None:
    """Before any process starts: the source exists and its backbone's keys and shapes fit
    the configured backbone (checked against a shapes-only model on the meta device); with
    ``init_classifier``, it is a checkpoint of ``num_classes`` classes. Raises
    ``CheckpointError`` or ``WeightsError`` naming the file (and the first differing key)."""
    if config.model.init_from is None or resumes(config):
        return
    source = resolve_source(config.model.init_from)
    with torch.device("meta"):
        model = create_backbone(config.model.backbone, **_backbone_kwargs(config, image_size))
    check_state_dict(read_state_dict(source.weights), model, source.weights, _describe(config))
    if config.model.init_classifier:
        _check_classes(source, num_classes)


def apply_init_from(
    config: Config, ctx: DistContext, backbone: nn.Module, partial_fc: Any
) -> str | None:
    """Load ``model.init_from`` into this rank's ``backbone`` (before the engine wraps it)
    and, with ``init_classifier``, this rank's rows of the class centres into ``partial_fc``.
    Rank 0 prints what was taken; returns that line (None without ``init_from``)."""
    spec = config.model.init_from
    if spec is None:
        return None
    if resumes(config):
        line = f"model.init_from {spec} ignored: the run resumes from its checkpoint"
    else:
        source = resolve_source(spec)
        count = load_weights(backbone, source.weights, _describe(config))
        line = f"backbone from {source.weights} ({count} tensors)"
        if config.model.init_classifier:
            step_dir, saved_world = _check_classes(source, partial_fc.num_classes)
            train_state.load_class_rows(
                step_dir,
                saved_world,
                partial_fc,
                partial_fc.class_start,
                partial_fc.num_local,
            )
            line += (
                f"; classifier from the checkpoint ({partial_fc.num_classes} classes, world "
                f"size {saved_world} -> {ctx.world_size})"
            )
        else:
            line += f"; fresh classifier ({partial_fc.num_classes} classes)"
    if ctx.is_main:
        print(f"facetrain: init_from: {line}", flush=True)
    return line
