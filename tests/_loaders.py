"""Test helpers: a training loader from plain keywords (LoaderConfig fields and rank facts)."""

from __future__ import annotations

import os
from typing import Any

import torch

from dataio.loader_config import DaliAugment, DaliOptions, LoaderConfig, TorchOptions
from dataio.loaders import build_loader
from dataio.loading import TrainLoader


def make_loader(
    kind: str,
    pack: str | os.PathLike[str],
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    augment: DaliAugment | None = None,
    reuse_buffers: bool = True,
    **config: Any,
) -> TrainLoader:
    """``build_loader(kind, pack, LoaderConfig(**config), ...)``; ``cache_dir`` and ``augment``
    go to the DALI options, ``reuse_buffers`` to the torch options."""
    loader_config = LoaderConfig(
        **config,
        torch=TorchOptions(reuse_buffers=reuse_buffers),
        dali=DaliOptions(cache_dir=cache_dir, augment=augment),
    )
    return build_loader(kind, pack, loader_config, rank=rank, world_size=world_size, device=device)


def torch_loader(pack: str | os.PathLike[str], *args: Any, **kwargs: Any) -> TrainLoader:
    """:func:`make_loader` of kind ``"torch"``."""
    return make_loader("torch", pack, *args, **kwargs)


def dali_loader(pack: str | os.PathLike[str], *args: Any, **kwargs: Any) -> TrainLoader:
    """:func:`make_loader` of kind ``"dali"``."""
    return make_loader("dali", pack, *args, **kwargs)
