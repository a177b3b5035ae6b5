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
32))``. ``@register_head`` files model and class under the name (see ``partialfc.specs``).

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
import typing
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from common.checks import check_number
from partialfc.aux_losses import AuxLosses
from partialfc.context import MarginContext, ShardSpec
from partialfc.specs import DEFAULT_EPS, SpecModel, register_head

__all__ = [
    "DEFAULT_EPS",
    "FALLBACKS",
    "ArcFaceConfig",
    "CombinedConfig",
    "CombinedFormConfig",
    "CombinedMargin",
    "CosFaceConfig",
    "HeadConfig",
    "InterclassFilteringConfig",
    "MarginHead",
    "NormFaceConfig",
    "SphereFaceArccosConfig",
    "monotone_psi",
]

Fallback = Literal["auto", "thmm", "easy", "psi", "none"]
FALLBACKS: tuple[str, ...] = typing.get_args(Fallback)
"""What the target logit does where ``m1 * theta + m2`` passes pi (see ``CombinedFormConfig``)."""


def monotone_psi(phi: torch.Tensor) -> torch.Tensor:
    """SphereFace's monotone extension of ``cos(phi)`` beyond pi: ``(-1)^k cos(phi) - 2k``.

    ``k = floor(phi / pi)`` (no gradient). Equal to ``cos`` on [0, pi], continuous with a
    continuous derivative at every multiple of pi, and strictly decreasing for all phi >= 0, so
    a margin can never reward moving a sample away from its class centre.
    """
    k = torch.floor(phi.detach() / math.pi)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)  # (-1)^k
    return sign * torch.cos(phi) - 2.0 * k


class HeadConfig(SpecModel):
    """Base of every head's config: its ``name`` (a ``Literal`` in each head's model, the
    discriminator of ``partialfc.margin``) and the auxiliary losses added to it."""

    name: str
    """The head's registered name (or an alias)."""
    aux: AuxLosses = Field(default_factory=AuxLosses)  # type: ignore[valid-type]
    """Auxiliary embedding losses added to the head, each with its weight and fields, e.g.
    {center: {weight: 0.003, alpha: 0.5}, triplet: {weight: 0.1}} (partialfc.aux_losses)."""

    def aux_configs(self) -> dict[str, SpecModel]:
        """The attached auxiliary losses: name -> config (the ones set, in field order)."""
        return {k: v for k, v in self.aux if v is not None}


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
        # Out-of-place index_put keeps `cos` intact for autograd and for the caller.
        return (cos * scale).index_put((ctx.rows, ctx.cols), new_t.to(cos.dtype))  # [N, S]

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


class CombinedFormConfig(HeadConfig):
    """Options of every head of the combined formula ``s * (cos(m1*theta + m2) - m3)``."""

    s: float = Field(64.0, gt=0.0)
    """Logit scale: normalised cosines live in [-1, 1]; the scale sharpens the softmax."""
    eps: float = Field(DEFAULT_EPS, gt=0.0, lt=0.5)
    """arccos clamp: theta from clamp(cos, -1+eps, 1-eps) (see partialfc.specs.DEFAULT_EPS)."""
    fallback: Fallback = "auto"
    """Where m1*theta + m2 passes pi, cos(m1*theta + m2) stops decreasing in theta (the margin
    would reward moving away from the centre). thmm (ArcFace, insightface's rule, m1 = 1):
    cos(theta + m2) where cos > cos(pi - m2), else cos - m2 sin(m2); easy (ArcFace form only):
    the margin only where cos > 0; psi: SphereFace's monotone continuation (-1)^k cos(phi) - 2k,
    any m1, m2; none: the raw formula; auto: thmm for the ArcFace form (m1 = 1, m2 > 0,
    m3 = 0), psi for other forms with an angle."""
    interclass_filtering_threshold: float = Field(0.0, ge=-1.0, lt=1.0)
    """insightface's noisy-label filter: when > 0, every non-target cosine above it is set to
    0 before scaling (a negative that close is likely the same identity); <= 0 = off."""

    def margins(self) -> tuple[float, float, float]:
        """``(m1, m2, m3)`` of the formula."""
        raise NotImplementedError(type(self).__name__)

    def easy(self) -> bool:
        """Whether ``easy_margin`` asks for the ``easy`` fallback (heads that offer it)."""
        return False

    def resolved_fallback(self) -> str:
        """The fallback ``auto`` / ``easy_margin`` stand for; ValueError if it cannot apply."""
        m1, m2, m3 = self.margins()
        no_angle = m1 == 1.0 and m2 == 0.0
        arcface_form = m1 == 1.0 and m3 == 0.0 and m2 > 0.0
        fallback: str = self.fallback
        if self.easy():
            if fallback not in ("auto", "easy"):
                raise ValueError(f"easy_margin=True contradicts fallback={fallback!r}")
            fallback = "easy"
        if fallback == "auto":
            fallback = "thmm" if arcface_form else ("psi" if not no_angle else "none")
        if fallback in ("thmm", "easy") and m1 != 1.0:
            raise ValueError(
                f"fallback {fallback!r} (easy_margin) only applies to m1 == 1, got m1={m1}"
            )
        if fallback == "easy" and not arcface_form:
            raise ValueError(
                "easy_margin only applies to the ArcFace form (m1=1, m2>0, m3=0), "
                f"got m1={m1}, m2={m2}, m3={m3}"
            )
        return fallback

    @model_validator(mode="after")
    def _fallback_applies(self) -> CombinedFormConfig:
        self.resolved_fallback()
        return self


class NormFaceConfig(CombinedFormConfig):
    """NormFace: normalised softmax, no margin (the paper learns or tunes s)."""

    name: Literal["normface"] = "normface"
    """NormFace."""

    def margins(self) -> tuple[float, float, float]:
        return 1.0, 0.0, 0.0


class ArcFaceConfig(CombinedFormConfig):
    """ArcFace (Deng et al. 2019): additive angular margin, insightface's defaults."""

    name: Literal["arcface"] = "arcface"
    """ArcFace."""
    m2: float = Field(0.5, ge=0.0, lt=math.pi)
    """Additive angular margin in radians: target cos(theta + m2)."""
    easy_margin: bool = False
    """Shorthand for fallback=easy: the margin only where cos > 0."""

    def margins(self) -> tuple[float, float, float]:
        return 1.0, self.m2, 0.0

    def easy(self) -> bool:
        return self.easy_margin


class CosFaceConfig(CombinedFormConfig):
    """CosFace / AM-Softmax (Wang et al. 2018): additive cosine margin, as insightface uses it."""

    name: Literal["cosface", "am_softmax"] = "cosface"
    """CosFace (alias am_softmax)."""
    m3: float = 0.4
    """Additive cosine margin: target cos(theta) - m3."""

    def margins(self) -> tuple[float, float, float]:
        return 1.0, 0.0, self.m3


class CombinedConfig(CombinedFormConfig):
    """The combined margin (insightface): every margin given, there is no standard one."""

    name: Literal["combined"] = "combined"
    """The general combined margin."""
    s: float = Field(gt=0.0)
    """Logit scale (required)."""
    m1: float = Field(gt=0.0)
    """Multiplicative angular margin (SphereFace-style; 1 = none; required)."""
    m2: float = Field(ge=0.0, lt=math.pi)
    """Additive angular margin in radians (ArcFace; 0 = none; required)."""
    m3: float
    """Additive cosine margin (CosFace; 0 = none; required)."""
    easy_margin: bool = False
    """Shorthand for fallback=easy (ArcFace form only)."""

    def margins(self) -> tuple[float, float, float]:
        return self.m1, self.m2, self.m3

    def easy(self) -> bool:
        return self.easy_margin


class SphereFaceArccosConfig(CombinedFormConfig):
    """The arccos form of SphereFace in insightface's combined margin: cos(m1 * theta)."""

    name: Literal["sphereface_arccos"] = "sphereface_arccos"
    """SphereFace, arccos form."""
    m1: float = Field(1.35, gt=0.0)
    """Multiplicative angular margin: target cos(m1 * theta) (psi fallback past pi)."""

    def margins(self) -> tuple[float, float, float]:
        return self.m1, 0.0, 0.0


class InterclassFilteringConfig(ArcFaceConfig):
    """ArcFace with insightface's inter-class filtering of noisy labels."""

    name: Literal["interclass_filtering"] = "interclass_filtering"  # type: ignore[assignment]
    """ArcFace with inter-class filtering."""
    interclass_filtering_threshold: float = Field(ge=-1.0, lt=1.0)
    """Required (insightface ships 0 = off; there is no published value): non-target cosines
    above it are set to 0 before scaling; <= 0 = off."""


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
        return (filtered * self.s).index_put((ctx.rows, ctx.cols), new_t.to(cos.dtype))
