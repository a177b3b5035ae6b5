"""Optimizers and learning-rate schedules, built from the config.

The backbone and the Partial FC shard get separate optimizers: the shard is not replicated
(each rank owns different rows), so it must not go through DDP's gradient averaging, and its
learning rate / weight decay may differ from the backbone's. The shard's row-sparse optimizer
comes from ``PartialFC.build_optimizer``; this module builds the backbone's.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from trainer.config import OptimizerConfig, ScheduleConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig
) -> torch.optim.Optimizer:
    """The backbone's SGD (momentum, optionally Nesterov) or AdamW over ``params``."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def lr_factor(
    step: int,
    total_steps: int,
    cfg: ScheduleConfig,
    warmup_steps: int | None = None,
    milestone_steps: list[int] | None = None,
) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based).

    Linear warmup from 0 over ``warmup_steps`` (default: the config's; the first step already
    gets a non-zero rate), then polynomial / linear / cosine decay to 0 at ``total_steps``,
    ``cfg.gamma`` per milestone passed (kind "step"; ``milestone_steps`` in optimizer steps,
    default: the config's milestones read as steps), or constant.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = min(cfg.warmup_steps if warmup_steps is None else warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "step":
        milestones = cfg.milestone_steps(1) if milestone_steps is None else milestone_steps
        return cfg.gamma ** sum(step >= m for m in milestones)
    decay_steps = max(total_steps - warmup, 1)
    progress = min(max(step - warmup, 0) / decay_steps, 1.0)
    if cfg.kind == "polynomial":
        return (1.0 - progress) ** cfg.power
    if cfg.kind == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    cfg: ScheduleConfig,
    warmup_steps: int | None = None,
    milestone_steps: list[int] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR that applies :func:`lr_factor`; call ``.step()`` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps, cfg, warmup_steps, milestone_steps),
    )
