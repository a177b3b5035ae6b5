"""Partial FC: the sharded classifier over millions of identities, and its margin heads.

The class-centre matrix W [C, D] does not fit on one device, so each rank owns a contiguous
slice of its rows and, each step, only the positive centres plus a random sample of negatives
take part in a margin softmax whose normaliser is summed over ranks.

Vocabulary used throughout this package:

- **local**: belonging to this rank: its batch ``[B_r, ...]``, its shard, its sampled columns.
- **global**: over all ranks: the gathered batch ``[N = sum_r B_r, ...]``, class ids in
  ``[0, num_classes)``, the loss (every rank computes the same value).
- **shard**: the rows ``W_r`` of the class-centre matrix owned by rank r, ``[num_local, D]``,
  given by ``class_range(num_classes, r, world_size)``.
- **class_start**: the global class id of the shard's first row; a global label ``y`` is local
  row ``y - class_start`` when ``0 <= y - class_start < num_local``.
- **sampled index**: sorted positions (local rows of the shard) that take part this step,
  ``[S]``: every positive of the global batch plus random negatives. A row's target column is
  the position of its label in the sampled index, or -1 when the label is on another rank.
- **rows / cols**: the ``R`` global rows whose class is among this rank's sampled columns,
  and those columns (``target[rows]``).
- **replicated** term: computed identically on every rank from the gathered batch (batch
  losses); **sharded** term: each rank adds its own classes and the value is all-reduced.

Modules: ``partition`` (the pure shard arithmetic), ``collectives`` (autograd all-gather and
reductions that are identities without a process group), ``context`` (what a head sees),
``margins`` (head interface, combined-margin family), ``head_configs`` (the base of every
head's config, the combined family's configs), ``heads`` (the rest of the zoo),
``aux_losses`` (auxiliary embedding losses), ``registry`` (``build_margin``), ``ops`` (row
gather with a row-sparse gradient, distributed softmax cross-entropy), ``stats`` (angle
statistics), ``optim`` (the shard's row-sparse optimizer), ``partial_fc`` (the ``PartialFC``
module: the plain core). ``fast`` is the fast CPU backend behind the same interface;
``build_partial_fc`` picks the backend (``BACKENDS``).
"""

from typing import Any

import torch

from partialfc.aux_losses import AuxLoss
from partialfc.collectives import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_inplace,
    all_reduce_value,
    all_reduce_with_grad,
    get_rank,
    get_world_size,
    replicated_term,
    sync_grad,
)
from partialfc.context import MarginContext, ShardSpec
from partialfc.margins import CombinedMargin, MarginHead
from partialfc.ops import distributed_cross_entropy, gather_rows
from partialfc.optim import ShardOptimizer, clip_grad_norm_
from partialfc.partial_fc import UPDATE_MODES, PartialFC
from partialfc.partition import class_range
from partialfc.registry import (
    aux_loss_names,
    build_aux_loss,
    build_margin,
    margin_defaults,
    margin_names,
)
from partialfc.sampling import INIT_BLOCK_ROWS, init_class_centers
from partialfc.stats import AngleStats, StepStats

__all__ = [
    "INIT_BLOCK_ROWS",
    "UPDATE_MODES",
    "AngleStats",
    "AuxLoss",
    "CombinedMargin",
    "BACKENDS",
    "MarginContext",
    "MarginHead",
    "PartialFC",
    "ShardOptimizer",
    "ShardSpec",
    "StepStats",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_inplace",
    "all_reduce_value",
    "all_reduce_with_grad",
    "aux_loss_names",
    "build_aux_loss",
    "build_margin",
    "build_partial_fc",
    "class_range",
    "clip_grad_norm_",
    "distributed_cross_entropy",
    "gather_rows",
    "get_rank",
    "get_world_size",
    "init_class_centers",
    "margin_defaults",
    "margin_names",
    "replicated_term",
    "resolve_backend",
    "sync_grad",
]

BACKENDS = ("plain", "cpu_fused")
"""``plain``: the readable core on public torch APIs (every GPU runs it); ``cpu_fused``: the
fast CPU backend (``partialfc.fast``), the same numbers."""


def resolve_backend(
    backend: str, device: torch.device | str, storage_dtype: torch.dtype = torch.float32
) -> str:
    """``"auto"`` -> ``cpu_fused`` on a CPU where the fused kernels build and the class
    centres are float32, else ``plain``; a named backend is returned as it is (``cpu_fused``
    without the kernels runs torch ops)."""
    if backend == "auto":
        from partialfc.fast import cpu_kernels

        on_cpu = torch.device(device).type == "cpu"
        fp32 = storage_dtype == torch.float32
        return "cpu_fused" if on_cpu and fp32 and cpu_kernels.available() else "plain"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "cpu_fused" and torch.device(device).type != "cpu":
        raise ValueError(f"backend cpu_fused runs on the CPU, not {device}; use plain (or auto)")
    if backend == "cpu_fused" and storage_dtype != torch.float32:
        raise ValueError(f"backend cpu_fused keeps float32 class centres, not {storage_dtype}")
    return backend


def build_partial_fc(backend: str, *args: Any, **kwargs: Any) -> PartialFC:
    """A ``PartialFC`` (``backend="plain"``) or ``FusedPartialFC`` (``"cpu_fused"``) built
    with ``PartialFC``'s arguments; resolve ``"auto"`` first (``resolve_backend``)."""
    if backend == "plain":
        return PartialFC(*args, **kwargs)
    if backend == "cpu_fused":
        from partialfc.fast import FusedPartialFC

        return FusedPartialFC(*args, **kwargs)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
