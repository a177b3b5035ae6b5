"""Margin heads that adapt to the feature norm (AdaFace, MagFace), keep several centres per
class (sub-center ArcFace) or learn a displacement (DiscFace).

Each head's config model (defaults with their source, bounds, a docstring per field) sits
right above it; where a head needs information from other shards, it says which collective
it performs.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from partialfc.collectives import sync_grad
from partialfc.context import MarginContext, ShardSpec
from partialfc.head_configs import ArcFaceConfig, CombinedConfig
from partialfc.heads import ArccosConfig, clamped_acos
from partialfc.margins import CombinedMargin, MarginHead
from partialfc.specs import register_head

__all__ = [
    "AdaFace",
    "AdaFaceConfig",
    "DiscFace",
    "DiscFaceConfig",
    "MagFace",
    "MagFaceConfig",
    "SubCenterArcFace",
    "SubCenterArcFaceConfig",
]


class AdaFaceConfig(ArccosConfig):
    """AdaFace (Kim et al. 2022), the released training recipe: the margin adapts to image
    quality through the feature norm."""

    name: Literal["adaface"] = "adaface"
    """AdaFace."""
    s: float = Field(64.0, gt=0.0)
    """Logit scale."""
    m: float = 0.4
    """Margin: angular -m * zhat and additive m * zhat + m, zhat the normalised feature norm."""
    h: float = 0.333
    """Concentration of zhat = clip(h * (|x| - mean) / (std + eps), -1, 1)."""
    t_alpha: float = Field(0.01, ge=0.0, le=1.0)
    """Update rate of the running feature-norm mean and std."""
    eps: float = Field(1e-3, gt=0.0, lt=0.5)
    """arccos and angle clamp, and the std's epsilon (the release: 1e-3)."""
    init_mean: float = 20.0
    """Initial running mean of the feature norms."""
    init_std: float = Field(100.0, gt=0.0)
    """Initial running std of the feature norms."""


@register_head(AdaFaceConfig)
class AdaFace(MarginHead):
    """AdaFace (Kim et al. 2022): the margin adapts to image quality through the feature norm.

    With ``z_i = clip(|x_i|, 0.001, 100)`` (detached) and running batch statistics
    ``mu, sigma`` (buffers, EMA with momentum ``t_alpha``, updated before use in training),
    ``zhat = clip(h * (z - mu) / (sigma + eps), -1, 1)``, ``g_angle = -m * zhat``,
    ``g_add = m * zhat + m``; target ``s * (cos(clip(theta_y + g_angle, eps, pi - eps)) -
    g_add)``, negatives ``s * cos``. The std is the unbiased one (not updated for N < 2).

    The norms are those of the all-gathered batch, which every rank holds: the statistics are
    global and identical on every rank without any extra collective. Fused.
    """

    def __init__(self, config: AdaFaceConfig) -> None:
        super().__init__()
        self.s = config.s
        self.m = config.m
        self.h = config.h
        self.t_alpha = config.t_alpha
        self.eps = config.eps
        self.register_buffer("batch_mean", torch.tensor(config.init_mean, dtype=torch.float64))
        self.register_buffer("batch_std", torch.tensor(config.init_std, dtype=torch.float64))

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, h={self.h}, t_alpha={self.t_alpha}, eps={self.eps}"

    @property
    def fused_scale(self) -> float | None:
        return self.s

    def target_logits(self, ctx: MarginContext, cos_t: torch.Tensor) -> torch.Tensor:
        norms = ctx.require("feature_norms", "adaface").detach().clamp(0.001, 100.0)  # [N]
        if ctx.training and norms.numel() > 0:
            with torch.no_grad():
                a = self.t_alpha
                self.batch_mean.mul_(1.0 - a).add_(a * norms.double().mean())
                if norms.numel() > 1:
                    self.batch_std.mul_(1.0 - a).add_(a * norms.double().std())
        mean = self.batch_mean.to(cos_t.dtype)
        std = self.batch_std.to(cos_t.dtype)
        scaler = ((norms[ctx.rows].to(cos_t.dtype) - mean) / (std + self.eps) * self.h).clamp(
            -1.0, 1.0
        )  # [R]
        theta = clamped_acos(cos_t, self.eps)
        theta_m = (theta - self.m * scaler).clamp(self.eps, math.pi - self.eps)
        return (torch.cos(theta_m) - (self.m * scaler + self.m)) * self.s


class MagFaceConfig(ArccosConfig):
    """MagFace (Meng et al. 2021), released recipe: a margin growing with the feature
    magnitude, plus the regulariser g(a)."""

    name: Literal["magface"] = "magface"
    """MagFace."""
    s: float = Field(64.0, gt=0.0)
    """Logit scale."""
    l_a: float = Field(10.0, gt=0.0)
    """Lower bound of the feature magnitude a (a = clamp(|x|, l_a, u_a))."""
    u_a: float = Field(110.0, gt=0.0)
    """Upper bound of the feature magnitude (> l_a)."""
    l_margin: float = Field(0.45, ge=0.0, lt=math.pi)
    """Angular margin at a = l_a."""
    u_margin: float = Field(0.8, ge=0.0, lt=math.pi)
    """Angular margin at a = u_a (>= l_margin)."""
    lambda_g: float = 35.0
    """Weight of the regulariser g(a) = 1/a + a / u_a^2."""
    easy_margin: bool = False
    """The margin only where cos > 0 (else the th/mm fallback)."""

    @model_validator(mode="after")
    def _ranges(self) -> MagFaceConfig:
        if self.u_a <= self.l_a:
            raise ValueError(f"u_a must be > l_a, got l_a={self.l_a}, u_a={self.u_a}")
        if self.l_margin > self.u_margin:
            raise ValueError(f"l_margin must be <= u_margin, got {self.l_margin}, {self.u_margin}")
        return self


@register_head(MagFaceConfig)
class MagFace(MarginHead):
    """MagFace (Meng et al. 2021): a margin growing with the feature magnitude, plus g(a).

    ``a = clamp(|x|, l_a, u_a)``, ``m(a) = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m``;
    target ``s * cos(theta_y + m(a))`` with the per-row ``th/mm`` fallback (``cos -
    m(a) sin(m(a))`` where ``theta + m(a) > pi``; ``easy_margin``: plain cos where cos <= 0);
    negatives ``s * cos``. Regulariser ``lambda_g * mean_i(1/a_i + a_i / u_a^2)`` over the
    global batch. Gradients flow through ``a`` into the embeddings (both through the margin
    and the regulariser), as in the released code.

    The regulariser is computed identically on every rank from the gathered norms and marked
    as replicated, so the embeddings get its gradient once. Fused.
    """

    def __init__(self, config: MagFaceConfig) -> None:
        super().__init__()
        self.s = config.s
        self.l_a = config.l_a
        self.u_a = config.u_a
        self.l_margin = config.l_margin
        self.u_margin = config.u_margin
        self.lambda_g = config.lambda_g
        self.eps = config.eps
        self.easy_margin = config.easy_margin

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, l_a={self.l_a}, u_a={self.u_a}, l_margin={self.l_margin}, "
            f"u_margin={self.u_margin}, lambda_g={self.lambda_g}, easy_margin={self.easy_margin}"
        )

    @property
    def fused_scale(self) -> float | None:
        return self.s

    def margin_of(self, norms: torch.Tensor) -> torch.Tensor:
        """m(a) for feature norms [K] (differentiable inside [l_a, u_a])."""
        a = norms.clamp(self.l_a, self.u_a)
        slope = (self.u_margin - self.l_margin) / (self.u_a - self.l_a)
        return slope * (a - self.l_a) + self.l_margin

    def target_logits(self, ctx: MarginContext, cos_t: torch.Tensor) -> torch.Tensor:
        norms = ctx.require("feature_norms", "magface")[ctx.rows].to(cos_t.dtype)  # [R]
        m = self.margin_of(norms)
        with_margin = torch.cos(clamped_acos(cos_t, self.eps) + m)
        if self.easy_margin:
            out = torch.where(cos_t > 0, with_margin, cos_t)
        else:
            th = torch.cos(math.pi - m)
            mm = torch.sin(math.pi - m) * m
            out = torch.where(cos_t > th, with_margin, cos_t - mm)
        return out * self.s

    def regularizer(self, ctx: MarginContext) -> torch.Tensor:
        a = ctx.require("feature_norms", "magface").clamp(self.l_a, self.u_a)  # [N]
        g = 1.0 / a + a / (self.u_a**2)
        return ctx.replicated(self.lambda_g * g.mean())


# ------------------------------------------------------------- sub-centres and displacement


class SubCenterArcFaceConfig(ArccosConfig):
    """Sub-center ArcFace (Deng et al. 2020): K centres per class, the closest one counts."""

    name: Literal["subcenter_arcface"] = "subcenter_arcface"
    """Sub-center ArcFace."""
    s: float = Field(64.0, gt=0.0)
    """Logit scale (ArcFace's)."""
    m2: float = Field(0.5, ge=0.0, lt=math.pi)
    """Additive angular margin in radians (ArcFace's, th/mm fallback)."""
    k: int = Field(3, ge=1)
    """Sub-centres per class."""


@register_head(SubCenterArcFaceConfig)
class SubCenterArcFace(CombinedMargin):
    """Sub-center ArcFace (Deng et al. 2020): K centres per class, the closest one counts.

    The shard holds ``K`` rows per class (row ``class * K + k``); ``PartialFC`` computes the
    cosine to every sub-centre and max-pools them per class before this head applies the
    ArcFace margin (``th/mm`` fallback). Called directly, the head takes the un-pooled
    ``[N, S * K]`` cosines and pools them itself.
    """

    def __init__(self, config: SubCenterArcFaceConfig) -> None:  # type: ignore[override]
        super().__init__(ArcFaceConfig(s=config.s, m2=config.m2, eps=config.eps))
        self.num_subcenters = config.k

    @property
    def fused_scale(self) -> float | None:
        return None  # the max-pooling over sub-centres happens on the generic path

    def pool(self, cos: torch.Tensor) -> torch.Tensor:
        """[N, S * K] sub-centre cosines -> [N, S] per-class maximum."""
        n = cos.shape[0]
        return cos.view(n, -1, self.num_subcenters).amax(dim=2)

    def forward(self, cos: torch.Tensor, target: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Logits [N, S] from sub-centre cosines [N, S * K]."""
        if cos.dim() != 2 or cos.shape[1] % self.num_subcenters:
            raise ValueError(
                f"cos must be [N, S * K] with K={self.num_subcenters}, got {tuple(cos.shape)}"
            )
        return super().forward(self.pool(cos), target, **kwargs)  # type: ignore[arg-type]


def _safe_norm(v: torch.Tensor) -> torch.Tensor:
    """Row norms [R] with a zero (not NaN) gradient at exactly zero."""
    return (v * v).sum(dim=1).clamp(min=1e-30).sqrt()


class DiscFaceConfig(ArccosConfig):
    """DiscFace (Kim et al. 2020) on an ArcFace head: minimum discrepancy learning. The
    discrepancy weight and the displacement cap follow a public reproduction; the paper tunes
    them per setting."""

    name: Literal["discface"] = "discface"
    """DiscFace."""
    s: float = Field(64.0, gt=0.0)
    """Logit scale."""
    m2: float = Field(0.5, ge=0.0, lt=math.pi)
    """Additive angular margin in radians."""
    m3: float = 0.0
    """Additive cosine margin."""
    lambda_disc: float = 0.5
    """Weight of the discrepancy term mean_i |eps_i - xi'|."""
    max_norm: float = Field(0.05, gt=0.0)
    """Cap on the norm of the shared displacement xi."""


@register_head(DiscFaceConfig)
class DiscFace(CombinedMargin):
    """DiscFace (Kim et al. 2020): minimum discrepancy learning with a learnable displacement.

    Logits are the combined margin (default ArcFace, s=64, m2=0.5; fused). On top, the
    "process displacement" ``eps_i = xhat_i - what_{y_i}`` (normalised embedding minus
    normalised class centre) is pulled towards one learnable displacement ``xi`` shared by all
    classes: ``lambda_disc * mean_i |eps_i - xi'|``, where ``xi' = xi / max(1, |xi| /
    max_norm)`` keeps the shared displacement small. ``xi`` is a [1, D] parameter created by
    ``bind`` (zeros), replicated on every rank.

    Collectives: each rank adds the rows whose class centre it holds and the sum is
    all-reduced (value only); ``xi``'s gradient is summed over ranks in backward
    (``sync_grad``) so every rank's copy stays identical.
    """

    def __init__(self, config: DiscFaceConfig) -> None:  # type: ignore[override]
        margins = CombinedConfig(s=config.s, m1=1.0, m2=config.m2, m3=config.m3, eps=config.eps)
        super().__init__(margins)
        self.lambda_disc = config.lambda_disc
        self.max_norm = config.max_norm

    def bind(self, spec: ShardSpec) -> None:
        super().bind(spec)
        # [1, D]: a leading 1 keeps checkpoint code from mistaking it for per-class rows.
        self.displacement = nn.Parameter(torch.zeros(1, spec.embedding_size, device=spec.device))

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [self.displacement] if hasattr(self, "displacement") else []

    def regularizer(self, ctx: MarginContext) -> torch.Tensor:
        if not hasattr(self, "displacement"):
            raise ValueError("DiscFace needs bind() (PartialFC calls it) before use")
        xi = sync_grad(self.displacement, ctx.group)[0]  # [D]
        xi = xi / (torch.linalg.vector_norm(xi) / self.max_norm).clamp(min=1.0)
        x_t = ctx.require("normalized", "discface")[ctx.rows]  # [R, D]
        w_t = ctx.target_centers()  # [R, D]
        dist = _safe_norm(x_t - w_t.to(x_t.dtype) - xi.to(x_t.dtype)[None, :])  # [R]
        return self.lambda_disc * ctx.sharded_sum(dist.sum()) / max(ctx.num_rows, 1)
