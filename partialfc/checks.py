"""Argument checks of ``PartialFC``: its construction, each batch, the process group.
Each raises ``ValueError`` naming the argument and the value it got."""

from __future__ import annotations

import torch
import torch.distributed as dist

from common.checks import check_int, check_number
from partialfc.collectives import ProcessGroup, get_rank, get_world_size
from partialfc.margins import MarginHead
from partialfc.rounding import ROUNDINGS, STORAGE_DTYPES

__all__ = ["UPDATE_MODES", "check_arguments", "check_batch", "check_group"]

UPDATE_MODES = ("dense", "sampled")
"""Update semantics of unsampled rows; see ``PartialFC`` and ``partialfc.optim``."""


def check_arguments(
    margin: object,
    embedding_size: object,
    num_classes: int,
    sample_rate: object,
    world_size: int,
    seed: object,
    init_std: object,
    compute_dtype: object,
    update: str,
    stats_columns: object,
    hist_size: object,
    storage_dtype: object = torch.float32,
    rounding: object = "stochastic",
) -> None:
    """``PartialFC``'s constructor arguments (the shard itself is checked by
    ``class_range``)."""
    if not isinstance(margin, MarginHead):
        raise ValueError(
            f"margin must be a MarginHead (see build_margin), got {type(margin).__name__}"
        )
    check_int("embedding_size", embedding_size, minimum=1)
    if num_classes < world_size:
        raise ValueError(
            f"num_classes={num_classes} must be >= world_size={world_size}: "
            "every rank needs at least one class centre"
        )
    if not 0.0 < check_number("sample_rate", sample_rate) <= 1.0:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    check_int("seed", seed, minimum=None)
    check_number("init_std", init_std, positive=True)
    if compute_dtype is not None and not (
        isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
    ):
        raise ValueError(f"compute_dtype must be a floating torch.dtype, got {compute_dtype}")
    if update not in UPDATE_MODES:
        raise ValueError(f"update must be one of {UPDATE_MODES}, got {update!r}")
    check_int("stats_columns", stats_columns, minimum=1)
    check_int("hist_size", hist_size, minimum=1)
    if storage_dtype not in STORAGE_DTYPES.values():
        raise ValueError(
            f"storage_dtype must be one of {tuple(STORAGE_DTYPES.values())}, got {storage_dtype}"
        )
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def check_batch(
    embeddings: torch.Tensor, labels: torch.Tensor, embedding_size: int, num_classes: int
) -> None:
    """A batch: embeddings [B, D] floating point, labels [B] integer class ids on the same
    device, in [0, num_classes)."""
    if embeddings.dim() != 2 or embeddings.shape[1] != embedding_size:
        raise ValueError(f"embeddings must be [B, {embedding_size}], got {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be [B={embeddings.shape[0]}] to match embeddings, "
            f"got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != embeddings.device:
        raise ValueError(f"labels are on {labels.device} but embeddings on {embeddings.device}")
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"labels must be in [0, num_classes={num_classes}), got {bad}")


def check_group(
    group: ProcessGroup | None, rank: int, world_size: int, required: bool = False
) -> None:
    """With a live process group, rank/world_size must be the group's; checked lazily
    (at forward) when the module is built before the group exists. ``required``: a
    world_size > 1 without an initialised process group is an error too."""
    if not (dist.is_available() and dist.is_initialized()):
        if required and world_size > 1:
            raise RuntimeError(
                f"PartialFC with world_size={world_size} needs an initialised process group"
            )
        return
    g_world, g_rank = get_world_size(group), get_rank(group)
    if (g_rank, g_world) != (rank, world_size):
        raise ValueError(
            f"rank={rank}, world_size={world_size} do not match the process group "
            f"(rank {g_rank} of {g_world})"
        )
