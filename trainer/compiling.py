"""How the backbone's training step runs: ``torch.compile`` (``train.compile``) and the
memory format of its weights and images (``train.channels_last``).

Only the training call is compiled. The module the trainer keeps (``engine.module``) stays
the plain one: its ``state_dict`` keys carry no ``_orig_mod.`` prefix (checkpoints load into
an eager module), the ONNX export rebuilds a plain module from the checkpoint, and
evaluation runs eager (:func:`eager`), so its other batch sizes and ``eval()`` mode compile
nothing.

Shapes: the trainer's loaders drop the last partial batch of an epoch (``drop_last``), so
every training batch has ``train.batch_size`` images and one static graph serves the whole
run (``dynamic=False``: no dynamic-shape graph is traced on a second shape).

The compile cache (inductor's FX graph and AOT autograd caches) lives where the launcher
points ``TORCHINDUCTOR_CACHE_DIR`` (``launcher.env.compile_cache_dir``), so a second start
of the same model loads its kernels instead of compiling them again.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
from torch import nn

CompileSetting = bool | Literal["max-autotune"]


def compile_mode(setting: CompileSetting) -> str | None:
    """``torch.compile``'s mode for a ``train.compile`` value; None: eager."""
    if setting is False:
        return None
    return "max-autotune" if setting == "max-autotune" else "default"


def compiled(model: nn.Module, setting: CompileSetting) -> nn.Module:
    """``model`` compiled by inductor for ``setting`` (``model`` itself when eager).

    The result is a wrapper: ``model`` stays uncompiled and its ``state_dict`` unchanged.
    """
    mode = compile_mode(setting)
    if mode is None:
        return model
    return torch.compile(model, mode=mode, dynamic=False)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def to_memory_format(backbone: nn.Module, channels_last: bool) -> nn.Module:
    """The backbone's 4-D weights in channels-last order (in place: the same Parameter
    objects, so an optimizer built on them stays valid); a no-op for the default."""
    if not channels_last:
        return backbone
    with torch.no_grad():
        for param in backbone.parameters():
            if param.dim() == 4:
                # Strides of a fresh channels-last tensor, also for 1x1 kernels (for which
                # .to(memory_format=...) keeps the old strides, and DDP then warns that the
                # gradients, made channels-last, do not match its bucket views).
                nhwc = torch.empty_like(param, memory_format=torch.channels_last)
                param.data = nhwc.copy_(param)
    return backbone


def eager() -> contextlib.AbstractContextManager:
    """Run a compiled module's original code (evaluation: other shapes, no graph wanted)."""
    return torch.compiler.set_stance("force_eager")
