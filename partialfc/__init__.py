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
``margins`` (head interface, combined-margin family), ``heads`` (the rest of the zoo),
``aux_losses`` (auxiliary embedding losses), ``registry`` (``build_margin``), ``fused`` (the
cosine / softmax kernels), ``optim`` (the shard's row-sparse optimizer), ``partial_fc``
(the ``PartialFC`` module).
"""

from partialfc.aux_losses import AuxLoss, aux_loss_names, build_aux_loss
from partialfc.collectives import (
    GatherCapacity,
    all_gather_batch,
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
from partialfc.fused import Workspace, distributed_cross_entropy, gather_rows
from partialfc.margins import CombinedMargin, MarginHead
from partialfc.optim import ShardOptimizer, clip_grad_norm_
from partialfc.partial_fc import (
    INIT_BLOCK_ROWS,
    UPDATE_MODES,
    PartialFC,
    init_class_centers,
)
from partialfc.partition import class_range
from partialfc.registry import build_margin, margin_defaults, margin_names

__all__ = [
    "INIT_BLOCK_ROWS",
    "UPDATE_MODES",
    "AuxLoss",
    "CombinedMargin",
    "GatherCapacity",
    "MarginContext",
    "MarginHead",
    "PartialFC",
    "ShardOptimizer",
    "ShardSpec",
    "Workspace",
    "all_gather_batch",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_inplace",
    "all_reduce_value",
    "all_reduce_with_grad",
    "aux_loss_names",
    "build_aux_loss",
    "build_margin",
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
    "sync_grad",
]
