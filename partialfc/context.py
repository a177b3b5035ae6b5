"""What a margin head or auxiliary loss gets to see: the shard it lives on and one step's data.

Heads differ in what they need beyond the cosine of the target: the embeddings' norms before
normalisation (AdaFace, MagFace), the class centres' norms and a bias (softmax, L-Softmax), the
training step (SphereFace's lambda annealing), running state shared by all ranks
(CurricularFace), the normalised centres themselves (DiscFace, the ArcFace paper's Inter-loss).
Rather than special-casing each head in ``PartialFC``, every head receives one
``MarginContext`` holding all of it (expensive parts are computed lazily, on request), plus
``ShardSpec`` once at construction (``bind``) to create per-class parameters on its shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from partialfc.collectives import (
    ProcessGroup,
    all_reduce_inplace,
    all_reduce_value,
    get_world_size,
    replicated_term,
)

__all__ = ["MarginContext", "ShardSpec"]


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """The slice of classes a rank owns; given to heads once, so they can create sharded state.

    A head that keeps per-class tensors (a bias, centre-loss centres) creates ``num_local`` rows
    of them, for the global classes ``[class_start, class_start + num_local)``.
    """

    num_classes: int
    class_start: int
    num_local: int
    embedding_size: int
    rank: int
    world_size: int
    seed: int
    device: torch.device
    group: ProcessGroup | None = None


@dataclasses.dataclass
class MarginContext:
    """One step's inputs to a head, on one rank (see the package docstring for the vocabulary).

    Tensors marked "differentiable" carry autograd history back to the embeddings and/or the
    class centres; heads may use them freely. Everything is in float32 or wider.

    Attributes:
        target: [N] column of each global row's class in this rank's sampled columns, or -1.
        rows: [R] global rows whose class is in this rank's sampled columns (``target >= 0``).
        cols: [R] the corresponding columns (``target[rows]``).
        target_cos: [R] cosine of those rows with their class centre (differentiable).
        labels: [N] global class ids of the gathered batch.
        cos: [N, S] cosine matrix (differentiable), or None on the fused path, where only heads
            whose non-target logits are ``s * cos`` run and never need it.
        feature_norms: [N] norms of the gathered embeddings before normalisation
            (differentiable), or None when unknown (single-process ``head(cos, target)`` calls).
        weight_norms: [S] norms of the sampled class centres (differentiable) or None.
        bias: [S] bias of the sampled classes (differentiable) or None.
        embeddings: [N, D] gathered embeddings before normalisation (differentiable) or None.
        normalized: [N, D] the same, L2-normalised (differentiable) or None.
        step: 0-dim long tensor, the number of training steps taken before this one.
        training: whether stateful heads should update their running statistics.
        group: process group of the shards (None: the default group, or no group at all).
        target_centers_fn, sampled_centers_fn: lazily compute ``target_centers()`` and
            ``sampled_centers()`` (set by PartialFC).
        gather_rows: ``(param, index) -> param[index]`` with the gradient layout PartialFC was
            configured for (row-sparse or dense); heads use it for their own per-class rows.
    """

    target: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    target_cos: torch.Tensor
    labels: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    feature_norms: torch.Tensor | None = None
    weight_norms: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    normalized: torch.Tensor | None = None
    step: torch.Tensor | None = None
    training: bool = True
    group: ProcessGroup | None = None
    target_centers_fn: Callable[[], torch.Tensor] | None = None
    sampled_centers_fn: Callable[[], torch.Tensor] | None = None
    gather_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        """N, the number of rows of the global batch."""
        return int(self.target.shape[0])

    @property
    def world_size(self) -> int:
        return get_world_size(self.group)

    def require(self, name: str, who: str) -> torch.Tensor:
        """The tensor attribute ``name``, or a ValueError naming the head that needs it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"{who} needs {name!r}, which this call did not provide")
        return value

    def global_target_cos(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Target cosine of every global row on every rank, without gradient: ([N], has [N]).

        Collective (one all-reduce SUM of [2, N]): each row's class lives on exactly one rank,
        which contributes its cosine; ``has`` is False for rows whose class is on no rank's
        sampled columns (only possible in single-process calls with ``target == -1``). Cached,
        so heads, auxiliary losses and the angle statistics share one collective per step.
        """
        if "global_target_cos" not in self.cache:
            n = self.num_rows
            buf = self.target_cos.new_zeros(2, n)  # [2, N]
            buf[0, self.rows] = self.target_cos.detach().to(buf.dtype)
            buf[1, self.rows] = 1.0
            all_reduce_inplace(buf, "sum", self.group)
            self.cache["global_target_cos"] = (buf[0], buf[1] > 0)
        return self.cache["global_target_cos"]

    def sharded_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a term computed from this rank's shard only over all ranks (gradient stays local)."""
        return all_reduce_value(value, self.group)

    def replicated(self, value: torch.Tensor) -> torch.Tensor:
        """Mark a term that every rank computes identically from the gathered batch."""
        return replicated_term(value, self.group)

    def target_centers(self) -> torch.Tensor:
        """[R, D] normalised class centres of ``rows``' classes (differentiable)."""
        if self.target_centers_fn is None:
            raise ValueError("this call provides no class centres (single-process head call)")
        if "target_centers" not in self.cache:
            self.cache["target_centers"] = self.target_centers_fn()
        return self.cache["target_centers"]

    def sampled_centers(self) -> torch.Tensor:
        """[S, D] normalised sampled class centres of this rank (differentiable)."""
        if self.sampled_centers_fn is None:
            raise ValueError("this call provides no class centres (single-process head call)")
        if "sampled_centers" not in self.cache:
            self.cache["sampled_centers"] = self.sampled_centers_fn()
        return self.cache["sampled_centers"]

    @staticmethod
    def from_cos(
        cos: torch.Tensor,
        target: torch.Tensor,
        *,
        feature_norms: torch.Tensor | None = None,
        weight_norms: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        step: int | torch.Tensor = 0,
        training: bool = True,
        group: ProcessGroup | None = None,
    ) -> MarginContext:
        """Context for calling a head directly on a cosine matrix (tests, single process)."""
        rows = torch.nonzero(target >= 0).squeeze(1)  # [R]
        cols = target[rows]  # [R]
        if not isinstance(step, torch.Tensor):
            step = torch.tensor(int(step), dtype=torch.long, device=cos.device)
        return MarginContext(
            target=target,
            rows=rows,
            cols=cols,
            target_cos=cos[rows, cols],
            labels=labels,
            cos=cos,
            feature_norms=feature_norms,
            weight_norms=weight_norms,
            bias=bias,
            step=step,
            training=training,
            group=group,
        )
