"""Margin heads: the base interface and the combined-margin family.

Most heads of the face-recognition literature are one formula on the target column ``y``::

    target logit:    s * (cos(m1 * theta_y + m2) - m3)
    other columns:   s * cos(theta_j)

ArcFace is ``m1=1, m3=0``, CosFace / AM-Softmax ``m1=1, m2=0``, NormFace has no margin, the
arccos form of SphereFace is ``m1=1.35``. Because Partial FC shards and samples the class
centres, a row's target class may live on another rank; such rows carry ``target == -1`` and
only get ``s * cos`` here. Heads that also reshape negatives or keep state live in
``partialfc.heads``, ``partialfc.negative_heads`` and ``partialfc.adaptive_heads``; auxiliary
embedding losses in ``partialfc.aux_losses``; the union of every head's config and
``build_margin`` in ``partialfc.registry``.

Every head has one config model (a ``HeadConfig`` with ``name: Literal[...]``, its fields,
defaults, bounds and a docstring each) and is built from it: ``CombinedMargin(ArcFaceConfig(s=
32))``; ``partialfc.head_configs`` holds the base and the combined family's configs.
``@register_head`` files model and class under the name (see ``partialfc.specs``).

The head interface (``MarginHead``):

- ``logits(ctx) -> [N, S]``: the logits of this rank's sampled columns from a
  ``MarginContext``. Every head implements it (the generic path).
- ``fused_scale`` / ``target_logits(ctx, cos_t) -> [R]``: a head whose non-target logits are
  exactly ``s * cos`` with a constant ``s`` says so by returning ``s`` from ``fused_scale``
  and implements ``target_logits``. The fast CPU backend (``partialfc.fast``) then never
  materialises the logits as a separate autograd tensor: the cosine matrix, the softmax and
  their gradients are computed in one fused kernel, with only the ``[R]`` target logits
  going through autograd.
- ``regularizer(ctx)``: an extra loss term (MagFace's g(a), DiscFace's discrepancy), already
  a global value on every rank.
- ``bind(spec)``: called once by ``PartialFC`` to create per-class parameters on the shard.
- ``apply_updates()`` / ``discard_updates()``: state moved by a rule rather than a gradient
  (center loss's centres), applied once per optimizer step or dropped with its gradients.
- ``aux_losses`` / ``aux_weights``: auxiliary embedding losses added with a weight.
- ``forward(cos, target, ...)``: ``logits`` of a single-process context, for direct use.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.checks import check_number
from partialfc.context import MarginContext, ShardSpec
from partialfc.head_configs import (
    ArcFaceConfig,
    CombinedConfig,
    CombinedFormConfig,
    CosFaceConfig,
    InterclassFilteringConfig,
    NormFaceConfig,
    SphereFaceArccosConfig,
)
from partialfc.specs import register_head

__all__ = [
    "CombinedMargin",
    "MarginHead",
    "monotone_psi",
]


def monotone_psi(phi: torch.Tensor) -> torch.Tensor:
    """SphereFace's monotone extension of ``cos(phi)`` beyond pi: ``(-1)^k cos(phi) - 2k``.

    ``k = floor(phi / pi)`` (no gradient). Equal to ``cos`` on [0, pi], continuous with a
    continuous derivative at every multiple of pi, and strictly decreasing for all phi >= 0, so
    a margin can never reward moving a sample away from its class centre.
    """
    k = torch.floor(phi.detach() / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    return sign * torch.cos(phi) - 2.0 * k


class MarginHead(nn.Module):
    """Base class of all heads; see the module docstring for the interface.

    Class attributes a head may override:
        uses_classifier: False for the "none" head (auxiliary losses only, no class centres).
        num_subcenters: K class-centre rows per class (sub-center ArcFace).
        needs_bias: a per-class bias is created by ``bind`` and given as ``ctx.bias``.
        needs_weight_norms: ``ctx.weight_norms`` must be provided (no weight normalisation).
    """

    uses_classifier: bool = True
    num_subcenters: int = 1
    needs_bias: bool = False
    needs_weight_norms: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.aux_losses = nn.ModuleDict()
        self.aux_weights: dict[str, float] = {}

    @property
    def fused_scale(self) -> float | None:
        """The constant scale ``s`` of the non-target logits ``s * cos``, or None."""
        return None

    def bind(self, spec: ShardSpec) -> None:
        """Create per-class parameters for the shard (called once by PartialFC)."""
        for loss in self.aux_losses.values():
            loss.bind(spec)

    def apply_updates(self) -> None:
        """Apply the rule-based state updates (center loss's centres) recorded since the last
        optimizer step; call once per step, after it (``PartialFC.build_optimizer``'s
        optimizer does, in its ``step``)."""
        for loss in self.aux_losses.values():
            loss.apply_update()

    def discard_updates(self) -> None:
        """Drop the recorded updates (a step not taken); the optimizer's ``zero_grad`` does."""
        for loss in self.aux_losses.values():
            loss.discard_update()

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters that are the same on every rank (not per-class rows); their gradient is
        already summed over ranks. Default: none."""
        return []

    def add_aux_loss(self, name: str, loss: nn.Module, weight: float = 1.0) -> None:
        """Add an auxiliary loss ``weight * loss(ctx)`` to this head's total loss."""
        if name in self.aux_losses:
            raise ValueError(f"auxiliary loss {name!r} is already attached")
        if getattr(loss, "needs_classifier", False) and not self.uses_classifier:
            raise ValueError(f"auxiliary loss {name!r} needs a classifier head, not 'none'")
        self.aux_losses[name] = loss
        self.aux_weights[name] = check_number(f"aux {name} weight", weight)

    def target_logits(self, ctx: MarginContext, cos_t: torch.Tensor) -> torch.Tensor:
        """Scaled target logits [R] from the target cosines ``cos_t`` [R] (fused heads only)."""
        raise NotImplementedError(f"{type(self).__name__} has no fused target logit")

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        """Logits [N, S] of this rank's sampled columns. Default: ``s * cos`` + target logits."""
        scale = self.fused_scale
        if scale is None:
            raise NotImplementedError(f"{type(self).__name__} must implement logits()")
        return self._scaled_logits(ctx, scale)

    def _scaled_logits(self, ctx: MarginContext, scale: float) -> torch.Tensor:
        """``scale * cos`` with the target entries replaced by ``target_logits``."""
        cos = ctx.require("cos", type(self).__name__)
        new_t = self.target_logits(ctx, ctx.target_cos)  # [R]
        # In place on the fresh product (`cos` itself stays intact for the caller).
        return (cos * scale).index_put_((ctx.rows, ctx.cols), new_t.to(cos.dtype))  # [N, S]

    def regularizer(self, ctx: MarginContext) -> torch.Tensor | None:
        """An extra loss term (global value, same on every rank), or None."""
        return None

    def forward(
        self,
        cos: torch.Tensor,
        target: torch.Tensor,
        *,
        feature_norms: torch.Tensor | None = None,
        weight_norms: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        step: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Logits [N, S] from cosines [N, S] and per-row target columns [N], single process.

        ``target[i]`` is the column of row i's class in ``cos``, or -1 when the class is not
        among the columns. Half-precision input is upcast to float32 (float64 stays float64).
        Neither ``cos`` nor ``target`` is modified. Stateful heads update their state when in
        training mode, exactly as inside ``PartialFC``.
        """
        if cos.dim() != 2:
            raise ValueError(f"cos must be 2-D [N, S], got shape {tuple(cos.shape)}")
        if target.dim() != 1 or target.shape[0] != cos.shape[0]:
            raise ValueError(
                f"target must be 1-D with N={cos.shape[0]} entries, got shape {tuple(target.shape)}"
            )
        if target.dtype != torch.long:
            raise ValueError(f"target must be torch.long, got {target.dtype}")
        if cos.dtype in (torch.float16, torch.bfloat16):
            cos = cos.float()
        ctx = MarginContext.from_cos(
            cos,
            target,
            feature_norms=feature_norms,
            weight_norms=weight_norms,
            bias=bias,
            labels=labels,
            step=step,
            training=self.training,
        )
        return self.logits(ctx)


@register_head(NormFaceConfig)
@register_head(ArcFaceConfig)
@register_head(CosFaceConfig)
@register_head(CombinedConfig)
@register_head(SphereFaceArccosConfig)
@register_head(InterclassFilteringConfig)
class CombinedMargin(MarginHead):
    """Combined angular margin ``s * (cos(m1*theta + m2) - m3)`` on the target column.

    Built from any ``CombinedFormConfig`` (its fields are documented there): ArcFace is
    ``m1=1, m3=0``, CosFace ``m1=1, m2=0``, NormFace no margin, the arccos SphereFace
    ``m2=m3=0``; ``combined`` takes all three. Only the target entries are transformed, so the
    arccos work is O(N), not O(N*S); without inter-class filtering the head is fused
    (``fused_scale == s``).
    """

    def __init__(self, config: CombinedFormConfig) -> None:
        super().__init__()
        self.s = config.s
        self.m1, self.m2, self.m3 = config.margins()
        self.eps = config.eps
        self.interclass_filtering_threshold = config.interclass_filtering_threshold
        self.fallback = config.resolved_fallback()
        self._no_angle = self.m1 == 1.0 and self.m2 == 0.0
        self.easy_margin = self.fallback == "easy"
        # insightface's names: th = cos(pi - m2), mm = sin(pi - m2) * m2 = sin(m2) * m2.
        self._th = math.cos(math.pi - self.m2)
        self._mm = math.sin(math.pi - self.m2) * self.m2

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, fallback={self.fallback}, "
            f"eps={self.eps}, interclass_filtering_threshold={self.interclass_filtering_threshold}"
        )

    @property
    def filtering(self) -> bool:
        """Whether inter-class filtering is on (threshold > 0)."""
        return self.interclass_filtering_threshold > 0.0

    @property
    def fused_scale(self) -> float | None:
        return None if self.filtering else self.s

    def target_cos(self, cos_t: torch.Tensor) -> torch.Tensor:
        """Margin-adjusted target cosine ``cos(m1*theta + m2) - m3`` (before scaling) [R]."""
        if self._no_angle:
            return cos_t - self.m3
        theta = torch.acos(cos_t.clamp(-1.0 + self.eps, 1.0 - self.eps))  # [R]
        phi = self.m1 * theta + self.m2  # [R]
        if self.fallback == "psi":
            return monotone_psi(phi) - self.m3
        with_margin = torch.cos(phi)  # [R]
        if self.fallback == "thmm":
            with_margin = torch.where(cos_t > self._th, with_margin, cos_t - self._mm)
        elif self.fallback == "easy":
            with_margin = torch.where(cos_t > 0, with_margin, cos_t)
        return with_margin - self.m3

    def target_logits(self, ctx: MarginContext, cos_t: torch.Tensor) -> torch.Tensor:
        return self.target_cos(cos_t) * self.s

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        if not self.filtering:
            return self._scaled_logits(ctx, self.s)
        cos = ctx.require("cos", type(self).__name__)
        with torch.no_grad():
            dirty = cos > self.interclass_filtering_threshold  # [N, S]
            dirty[ctx.rows, ctx.cols] = False  # the target itself is never filtered
        filtered = cos.masked_fill(dirty, 0.0)  # [N, S]
        new_t = self.target_logits(ctx, ctx.target_cos)  # [R]
        return (filtered * self.s).index_put_((ctx.rows, ctx.cols), new_t.to(cos.dtype))
