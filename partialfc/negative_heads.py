"""Margin heads that reshape the negatives: MV-Softmax / MV-Arc-Softmax, CurricularFace,
NPCFace and Circle loss (classification form).

A negative is "hard" for a row when its cosine passes the row's margin-adjusted target; the
heads that need every row's target cosine on every rank for that mask all-reduce it once
(``MarginContext.global_target_cos``). Each head's config model sits right above it.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field

from partialfc.collectives import all_reduce_inplace
from partialfc.context import MarginContext
from partialfc.head_configs import HeadConfig
from partialfc.heads import ArccosConfig, clamped_acos
from partialfc.margins import MarginHead
from partialfc.specs import register_head

__all__ = [
    "CircleLoss",
    "CircleLossConfig",
    "CurricularFace",
    "CurricularFaceConfig",
    "MVArcSoftmaxConfig",
    "MVConfig",
    "MVSoftmax",
    "MVSoftmaxConfig",
    "NPCFace",
    "NPCFaceConfig",
]


class MVConfig(ArccosConfig):
    """Options of MV-Softmax (Wang et al. 2020): mis-classified vectors get extra weight."""

    arc: ClassVar[bool]
    """The margin function: cos(theta + m) (MV-Arc) or cos(theta) - m (MV-AM)."""

    s: float = Field(32.0, gt=0.0)
    """Logit scale (the paper: 32)."""
    t: float = 0.2
    """Weight of the mis-classified negatives (the paper: 0.2)."""
    variant: Literal["adaptive", "fixed"] = "adaptive"
    """adaptive: a hard negative's logit is s * ((t+1) cos + t) (h = exp(s t (cos + 1)));
    fixed: s * (cos + t) (h = exp(s t))."""


class MVSoftmaxConfig(MVConfig):
    """MV-AM-Softmax (Wang et al. 2020): cosine margin, mis-classified vectors re-weighted."""

    arc: ClassVar[bool] = False
    name: Literal["mv_softmax"] = "mv_softmax"
    """MV-AM-Softmax."""
    m: float = 0.35
    """Additive cosine margin: target cos(theta) - m (the paper: 0.35)."""


class MVArcSoftmaxConfig(MVConfig):
    """MV-Arc-Softmax (Wang et al. 2020): angular margin, mis-classified vectors re-weighted."""

    arc: ClassVar[bool] = True
    name: Literal["mv_arc_softmax"] = "mv_arc_softmax"
    """MV-Arc-Softmax."""
    m: float = 0.5
    """Additive angular margin: target cos(theta + m) (the paper: 0.5)."""


@register_head(MVSoftmaxConfig)
@register_head(MVArcSoftmaxConfig)
class MVSoftmax(MarginHead):
    """MV-Softmax (Wang et al. 2020): mis-classified vectors get extra weight.

    Target ``f = cos(theta_y) - m`` (MV-AM) or ``cos(theta_y + m)`` (MV-Arc, plain cos where
    cos <= 0, as in the authors' release). A negative j is mis-classified for row i when
    ``cos(theta_j) > f(m, theta_y)`` with the margin function itself, i.e. for MV-Arc
    ``cos(theta_j) > cos(theta_y + m)`` for every row, also where ``cos(theta_y) <= 0``
    and the target logit falls back to plain cos (the paper's I_k and the authors' release,
    SV-X-Softmax ``fc_layers.py``). Its logit becomes ``s * ((t+1) cos + t)``
    (``variant="adaptive"``, the paper's h = exp(s t (cos + 1))) or ``s * (cos + t)``
    (``"fixed"``, h = exp(s t)). Others stay ``s * cos``.

    Collective: the mask needs every row's ``f`` on every rank, so the head all-reduces the
    target cosines once (``MarginContext.global_target_cos``).
    """

    def __init__(self, config: MVConfig) -> None:
        super().__init__()
        self.s = config.s
        self.m = config.m
        self.t = config.t
        self.eps = config.eps
        self.arc = config.arc
        self.variant = config.variant

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, t={self.t}, arc={self.arc}, variant={self.variant}"

    def _margin(self, c: torch.Tensor) -> torch.Tensor:
        """The margin function f(m, theta_y): ``cos - m`` or ``cos(theta + m)``."""
        if not self.arc:
            return c - self.m
        return torch.cos(clamped_acos(c, self.eps) + self.m)

    def _target(self, c: torch.Tensor) -> torch.Tensor:
        """The target cosine: f, except plain cos where cos <= 0 for MV-Arc (release)."""
        if not self.arc:
            return self._margin(c)
        return torch.where(c > 0, self._margin(c), c)

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        cos = ctx.require("cos", "mv_softmax")
        g_cos, _ = ctx.global_target_cos()  # [N]
        with torch.no_grad():
            # The mask uses f itself, not the fallen-back target (see the class docstring).
            hard = cos > self._margin(g_cos.to(cos.dtype))[:, None]  # [N, S]
        if self.variant == "adaptive":
            reshaped = (self.t + 1.0) * cos + self.t
        else:
            reshaped = cos + self.t
        out = torch.where(hard, reshaped, cos)  # [N, S]
        new_t = self._target(ctx.target_cos)  # [R]
        return out.index_put((ctx.rows, ctx.cols), new_t) * self.s


class CurricularFaceConfig(ArccosConfig):
    """CurricularFace (Huang et al. 2020): hard negatives weighted by a running difficulty t."""

    name: Literal["curricularface"] = "curricularface"
    """CurricularFace."""
    s: float = Field(64.0, gt=0.0)
    """Logit scale."""
    m: float = Field(0.5, ge=0.0, lt=math.pi)
    """Additive angular margin (ArcFace's, with its th/mm fallback)."""
    momentum: float = Field(0.01, ge=0.0, le=1.0)
    """Update rate of t (from 0): t = momentum * mean target cosine + (1 - momentum) * t."""


@register_head(CurricularFaceConfig)
class CurricularFace(MarginHead):
    """CurricularFace (Huang et al. 2020): hard negatives weighted by a running difficulty t.

    Target: ArcFace ``cos(theta_y + m)`` with the ``th/mm`` fallback. A negative is hard when
    ``cos(theta_j) > cos(theta_y + m)``; its cosine becomes ``cos * (t + cos)``. ``t`` is a
    buffer updated every training step, before use, as
    ``t = momentum * mean_i(cos theta_{y_i}) + (1 - momentum) * t``.

    Collective: the target cosine of every row is needed on every rank (for the mask and for
    the mean), so the head all-reduces it once (``global_target_cos``); the mean is over the
    whole global batch, so ``t`` is identical on all ranks and for any world size.
    """

    def __init__(self, config: CurricularFaceConfig) -> None:
        super().__init__()
        self.s = config.s
        self.m = config.m
        self.momentum = config.momentum
        self.eps = config.eps
        self._th = math.cos(math.pi - self.m)
        self._mm = math.sin(math.pi - self.m) * self.m
        self.register_buffer("t", torch.zeros((), dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, momentum={self.momentum}"

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        cos = ctx.require("cos", "curricularface")
        g_cos, has = ctx.global_target_cos()  # [N]
        if ctx.training and bool(has.any()):
            with torch.no_grad():
                mean = g_cos[has].double().mean()
                self.t.mul_(1.0 - self.momentum).add_(self.momentum * mean)
        t = self.t.to(cos.dtype)
        with torch.no_grad():
            threshold = torch.cos(clamped_acos(g_cos.to(cos.dtype), self.eps) + self.m)  # [N]
            hard = cos > threshold[:, None]  # [N, S]
        out = torch.where(hard, cos * (t + cos), cos)
        c_t = ctx.target_cos
        with_margin = torch.cos(clamped_acos(c_t, self.eps) + self.m)
        new_t = torch.where(c_t > self._th, with_margin, c_t - self._mm)  # [R]
        return out.index_put((ctx.rows, ctx.cols), new_t) * self.s


class NPCFaceConfig(ArccosConfig):
    """NPCFace (Zeng et al. 2020) as released in FaceX-Zoo: the positive margin grows with the
    hard negatives."""

    name: Literal["npcface"] = "npcface"
    """NPCFace."""
    s: float = Field(64.0, gt=0.0)
    """Logit scale."""
    m: float = 0.5
    """Angular margin defining the hard negatives: cos(theta_j) > cos(theta_y + m)."""
    m0: float = 0.4
    """Positive margin m0 + m1 * mean hard-negative cosine: its constant part."""
    m1: float = 0.2
    """Positive margin: the weight of the mean hard-negative cosine."""
    t: float = 1.1
    """Hard negatives are reshaped to t * cos + alpha."""
    alpha: float = 0.2
    """Hard negatives are reshaped to t * cos + alpha."""


@register_head(NPCFaceConfig)
class NPCFace(MarginHead):
    """NPCFace (Zeng et al. 2020): the positive margin grows with the hard negatives.

    Hard negatives of row i: ``I_ij = cos(theta_j) > cos(theta_y + m)``. Their logit becomes
    ``s * (t * cos + alpha)``. The positive margin is ``m_i = m0 + m1 * mean_j(I_ij cos_ij)``
    (0 hard negatives: m0), detached, and the target logit is ``s * cos(theta_y + m_i)`` where
    cos > 0, else ``s * cos`` (the authors' release).

    Collectives: the target cosine of every row (``global_target_cos``) for the mask, then one
    all-reduce SUM of [2, N] for the count and the sum of hard-negative cosines over all ranks.
    """

    def __init__(self, config: NPCFaceConfig) -> None:
        super().__init__()
        self.s = config.s
        self.m = config.m
        self.m0 = config.m0
        self.m1 = config.m1
        self.t = config.t
        self.alpha = config.alpha
        self.eps = config.eps

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, m0={self.m0}, m1={self.m1}, t={self.t}, alpha={self.alpha}"

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        cos = ctx.require("cos", "npcface")
        g_cos, _ = ctx.global_target_cos()
        with torch.no_grad():
            threshold = torch.cos(clamped_acos(g_cos.to(cos.dtype), self.eps) + self.m)  # [N]
            hard = cos > threshold[:, None]  # [N, S]
            hard[ctx.rows, ctx.cols] = False
            sums = torch.stack([(cos * hard).sum(dim=1), hard.sum(dim=1).to(cos.dtype)])
            all_reduce_inplace(sums, "sum", ctx.group)  # [2, N] over every rank's columns
            margin = self.m0 + self.m1 * sums[0] / sums[1].clamp(min=1.0)  # [N]
        out = torch.where(hard, self.t * cos + self.alpha, cos)
        c_t = ctx.target_cos
        m_t = margin[ctx.rows]
        new_t = torch.where(c_t > 0, torch.cos(clamped_acos(c_t, self.eps) + m_t), c_t)
        return out.index_put((ctx.rows, ctx.cols), new_t) * self.s


class CircleLossConfig(HeadConfig):
    """Circle loss (Sun et al. 2020), face-recognition setting, classification form."""

    name: Literal["circleloss", "circle"] = "circleloss"
    """Circle loss (alias circle)."""
    s: float = Field(256.0, gt=0.0)
    """The paper's gamma: the scale (256 for face recognition)."""
    m: float = 0.25
    """Relaxation margin: optima 1 - m (positive) and m (negatives)."""


@register_head(CircleLossConfig)
class CircleLoss(MarginHead):
    """Circle loss (Sun et al. 2020) in its classification form (one positive per row).

    ``alpha_p = [1 + m - cos_y]_+``, ``alpha_n = [cos_j + m]_+`` (detached),
    ``Delta_p = 1 - m``, ``Delta_n = m``; logits ``s * alpha_p (cos_y - Delta_p)`` and
    ``s * alpha_n (cos_j - Delta_n)``, so the softmax cross-entropy equals the paper's
    ``log(1 + sum_j exp(logit_j) * exp(-logit_y))``. Purely elementwise: no collective.
    """

    def __init__(self, config: CircleLossConfig) -> None:
        super().__init__()
        self.s = config.s
        self.m = config.m

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}"

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        cos = ctx.require("cos", "circleloss")
        alpha_n = (cos.detach() + self.m).clamp(min=0.0)
        out = alpha_n * (cos - self.m)  # [N, S]
        c_t = ctx.target_cos
        alpha_p = (1.0 + self.m - c_t.detach()).clamp(min=0.0)
        new_t = alpha_p * (c_t - (1.0 - self.m))  # [R]
        return out.index_put((ctx.rows, ctx.cols), new_t) * self.s
