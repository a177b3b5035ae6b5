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

Modules: ``partition`` (the pure shard arithmetic), ``collectives`` (autograd all-gather and
reductions that are identities without a process group), ``margins`` (the combined-margin
heads and their registry), ``partial_fc`` (the ``PartialFC`` module and the distributed
softmax cross-entropy).
"""

from partialfc.collectives import (
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_inplace,
    get_rank,
    get_world_size,
)
from partialfc.margins import CombinedMargin, build_margin, margin_names
from partialfc.partial_fc import (
    INIT_BLOCK_ROWS,
    PartialFC,
    distributed_cross_entropy,
    init_class_centers,
)
from partialfc.partition import class_range

__all__ = [
    "INIT_BLOCK_ROWS",
    "CombinedMargin",
    "PartialFC",
    "all_gather_no_grad",
    "all_gather_with_grad",
    "all_reduce_inplace",
    "build_margin",
    "class_range",
    "distributed_cross_entropy",
    "get_rank",
    "get_world_size",
    "init_class_centers",
    "margin_names",
]
