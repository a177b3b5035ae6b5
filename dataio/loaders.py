"""The training loaders by kind (``data.loader``): ``"torch"`` or ``"dali"``.

Importing this module imports every loader module, so that their ``@register_loader``
decorators (:func:`dataio.loading.register_loader`) run; the loader modules themselves import
only what lies below them.
"""

from __future__ import annotations

import os

import torch

from dataio import dali_loader, torch_loader  # noqa: F401  (imported for registrations)
from dataio.loader_config import DaliAugment, DaliOptions, LoaderConfig, TorchOptions
from dataio.loading import TrainLoader, loader_builder, loader_kinds

__all__ = [
    "DaliAugment",
    "DaliOptions",
    "LoaderConfig",
    "TorchOptions",
    "TrainLoader",
    "build_loader",
    "loader_kinds",
]


def build_loader(
    kind: str,
    pack_dir: str | os.PathLike[str],
    config: LoaderConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device | str = "cpu",
) -> TrainLoader:
    """The training loader of kind ``kind`` for one rank: its shard of the pack, in batches.

    Every kind yields ``(images, labels int64 [B])`` (plus keys with ``config.with_keys``) --
    images float32 ``[B, 3, H, W]`` in [-1, 1], or uint8 ``[B, H, W, 3]`` with
    ``config.pixels="uint8"`` (see :func:`dataio.loading.to_model_input`) -- and has the
    interface of :class:`~dataio.loading.TrainLoader`. ``device``: DALI with ``cuda:N``
    decodes on GPU N and yields tensors there; the torch loader yields CPU tensors (pinned
    for a CUDA device).
    """
    builder = loader_builder(kind)
    return builder(pack_dir, config, rank=rank, world_size=world_size, device=device)
