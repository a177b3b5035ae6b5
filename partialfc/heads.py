"""Margin heads beyond the combined formula that keep no running state: the plain softmax,
SphereFace / L-Softmax (integer margin, annealed), and the ``none`` head (auxiliary losses
only). Heads that reshape negatives are in ``partialfc.negative_heads``, feature-norm adaptive,
sub-centre and displacement heads in ``partialfc.adaptive_heads``.

Every head documents its published formula and, where it needs information from other shards,
the collective it performs itself; its config model (defaults with their source, bounds, a
docstring per field) sits right above it. All of them are correct on sampled, sharded
columns: a head only ever sees this rank's columns, and the rows whose class lives on another
rank have ``target == -1``.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from partialfc.context import MarginContext, ShardSpec
from partialfc.head_configs import HeadConfig
from partialfc.margins import MarginHead
from partialfc.specs import DEFAULT_EPS, aux_loss_entry, register_head

__all__ = [
    "AnnealedMarginConfig",
    "ArccosConfig",
    "LSoftmaxConfig",
    "LargeMarginSoftmax",
    "NoClassifier",
    "NoClassifierConfig",
    "Softmax",
    "SoftmaxConfig",
    "SphereFaceConfig",
    "chebyshev_cos",
    "clamped_acos",
    "sphere_psi",
]


class ArccosConfig(HeadConfig):
    """Base of the configs of heads that take an angle from a cosine."""

    eps: float = Field(DEFAULT_EPS, gt=0.0, lt=0.5)
    """arccos clamp: theta from clamp(cos, -1+eps, 1-eps) (see partialfc.specs.DEFAULT_EPS)."""


def clamped_acos(cos: torch.Tensor, eps: float) -> torch.Tensor:
    """``arccos(clamp(cos, -1 + eps, 1 - eps))``: finite gradients at cos = +-1."""
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))


# ------------------------------------------------------------------------------- softmax


class SoftmaxConfig(HeadConfig):
    """Plain softmax classifier: weights and a bias, no normalisation, no margin."""

    name: Literal["softmax"] = "softmax"
    """Plain softmax."""


@register_head(SoftmaxConfig)
class Softmax(MarginHead):
    """Plain softmax classifier: ``logit_j = <x, W_j> + b_j``, no normalisation, no margin.

    Computed as ``|x| |W_j| cos_j + b_j`` from the context (the same number; Partial FC always
    computes cosines). The bias is a per-class parameter on the shard, created by ``bind``
    (zeros). No hyperparameters.
    """

    needs_bias = True
    needs_weight_norms = True

    def __init__(self, config: SoftmaxConfig) -> None:
        super().__init__()

    def bind(self, spec: ShardSpec) -> None:
        super().bind(spec)
        self.bias = nn.Parameter(torch.zeros(spec.num_local, device=spec.device))  # [C_r]

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        cos = ctx.require("cos", "softmax")
        x_norm = ctx.require("feature_norms", "softmax")  # [N]
        w_norm = ctx.require("weight_norms", "softmax")  # [S]
        out = cos * x_norm[:, None] * w_norm[None, :]  # [N, S]
        if ctx.bias is not None:
            out = out + ctx.bias[None, :]
        return out


# --------------------------------------------------------------- SphereFace and L-Softmax


def chebyshev_cos(cos: torch.Tensor, m: int) -> torch.Tensor:
    """``cos(m * theta)`` as the Chebyshev polynomial ``T_m(cos theta)``, for integer m >= 1.

    A polynomial in cos: exact, and smooth at theta = 0 and pi where ``cos(m * acos(c))``
    would go through the infinite derivative of arccos.
    """
    prev, cur = torch.ones_like(cos), cos
    for _ in range(m - 1):
        prev, cur = cur, 2.0 * cos * cur - prev
    return cur


def sphere_psi(cos: torch.Tensor, m: int, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """A-Softmax's ``psi(theta) = (-1)^k cos(m theta) - 2k`` for theta in [k pi/m, (k+1) pi/m].

    ``k`` (no gradient) comes from a clamped arccos; ``cos(m theta)`` from ``chebyshev_cos``,
    so the gradient never passes through arccos. Monotone decreasing in theta on [0, pi].
    """
    with torch.no_grad():
        k = torch.floor(m * clamped_acos(cos, eps) / math.pi).clamp_(0, m - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * chebyshev_cos(cos, m) - 2.0 * k


class AnnealedMarginConfig(ArccosConfig):
    """Options of SphereFace and L-Softmax: an integer margin with an annealed weight."""

    normalize_weights: ClassVar[bool]
    """SphereFace normalises the class centres, L-Softmax does not."""

    m: int = Field(4, ge=1)
    """Integer angular margin: psi(theta) from cos(m * theta) (the released QUADRUPLE, m = 4)."""
    base: float = Field(1000.0, ge=0.0)
    """Annealing: lambda = max(lambda_min, base * (1 + gamma * step)^(-power))."""
    gamma: float = Field(0.12, ge=0.0)
    """Annealing rate (see base)."""
    power: float = 1.0
    """Annealing exponent (see base)."""
    lambda_min: float = Field(0.0, ge=0.0)
    """Floor of the annealing weight lambda (0: anneal down to the pure margin)."""
    s: float | None = Field(None, gt=0.0)
    """Constant feature scale replacing the feature norm |x|; null keeps the published
    feature-norm scaling."""


class SphereFaceConfig(AnnealedMarginConfig):
    """SphereFace / A-Softmax (Liu et al. 2017), the released prototxt (base 1000, gamma 0.12,
    power 1, lambda_min 5); normalised class centres."""

    normalize_weights: ClassVar[bool] = True
    name: Literal["sphereface", "a_softmax"] = "sphereface"
    """SphereFace (alias a_softmax)."""
    lambda_min: float = Field(5.0, ge=0.0)
    """Floor of the annealing weight lambda (the released prototxt: 5)."""


class LSoftmaxConfig(AnnealedMarginConfig):
    """L-Softmax (Liu et al. 2016): SphereFace's schedule annealed down to the pure margin,
    class centres not normalised."""

    normalize_weights: ClassVar[bool] = False
    name: Literal["lsoftmax"] = "lsoftmax"
    """L-Softmax."""


@register_head(SphereFaceConfig)
@register_head(LSoftmaxConfig)
class LargeMarginSoftmax(MarginHead):
    """L-Softmax (Liu et al. 2016) and SphereFace / A-Softmax (Liu et al. 2017).

    Logits, with ``psi`` from ``sphere_psi`` and the annealing weight
    ``lambda = max(lambda_min, base * (1 + gamma * step)^(-power))``::

        non-target:  |x| |W_j| cos(theta_j)
        target:      |x| |W_y| (lambda * cos(theta_y) + psi(theta_y)) / (1 + lambda)

    SphereFace normalises the class centres (``|W| = 1``, ``normalize_weights=True``);
    L-Softmax does not. ``s`` replaces the feature norm ``|x|`` by a constant when given
    (the normalised-feature variant); None keeps the published feature-norm scaling. The
    step is ``PartialFC``'s step counter (checkpointed in its state_dict), so lambda is the
    same on every rank. Built from ``SphereFaceConfig`` or ``LSoftmaxConfig``.
    """

    def __init__(self, config: AnnealedMarginConfig) -> None:
        super().__init__()
        self.m = config.m
        self.base = config.base
        self.gamma = config.gamma
        self.power = config.power
        self.lambda_min = config.lambda_min
        self.s = config.s
        self.eps = config.eps
        self.normalize_weights = config.normalize_weights
        self.needs_weight_norms = not self.normalize_weights

    def extra_repr(self) -> str:
        return (
            f"m={self.m}, base={self.base}, gamma={self.gamma}, power={self.power}, "
            f"lambda_min={self.lambda_min}, normalize_weights={self.normalize_weights}, s={self.s}"
        )

    def annealing_lambda(self, step: torch.Tensor | int) -> torch.Tensor:
        """``max(lambda_min, base * (1 + gamma * step)^(-power))`` as a 0-dim float64 tensor."""
        step_t = torch.as_tensor(step, dtype=torch.float64)
        value = self.base * (1.0 + self.gamma * step_t) ** (-self.power)
        return torch.clamp(value, min=self.lambda_min)

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        name = "sphereface" if self.normalize_weights else "lsoftmax"
        cos = ctx.require("cos", name)  # [N, S]
        n, s_cols = cos.shape
        if self.s is None:
            row = ctx.require("feature_norms", name)  # [N]
        else:
            row = cos.new_full((n,), self.s)
        if self.normalize_weights:
            col = cos.new_ones(s_cols)
        else:
            col = ctx.require("weight_norms", name)  # [S]
        base_logits = cos * row[:, None] * col[None, :]  # [N, S]
        step = ctx.step if ctx.step is not None else 0
        lam = self.annealing_lambda(step).to(device=cos.device, dtype=cos.dtype)
        c_t = ctx.target_cos  # [R]
        psi = sphere_psi(c_t, self.m, self.eps)
        new_t = row[ctx.rows] * col[ctx.cols] * (lam * c_t + psi) / (1.0 + lam)  # [R]
        return base_logits.index_put((ctx.rows, ctx.cols), new_t)


# ------------------------------------------------------------------------------ no classifier


class NoClassifierConfig(HeadConfig):
    """No classifier: only the auxiliary losses in aux count (at least one)."""

    name: Literal["none"] = "none"
    """No classifier."""

    @model_validator(mode="after")
    def _has_aux_losses(self) -> NoClassifierConfig:
        attached = self.aux_configs()
        if not attached:
            raise ValueError("the 'none' head needs at least one auxiliary loss in aux")
        for aux_name in attached:
            entry = aux_loss_entry(aux_name)
            if entry is not None and getattr(entry.loss, "needs_classifier", False):
                raise ValueError(f"auxiliary loss {aux_name!r} needs a classifier head, not 'none'")
        return self


@register_head(NoClassifierConfig)
class NoClassifier(MarginHead):
    """The "none" head: no class centres and no softmax; only its auxiliary losses count."""

    uses_classifier = False

    def __init__(self, config: NoClassifierConfig) -> None:
        super().__init__()

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        raise ValueError("the 'none' head has no logits; it only carries auxiliary losses")

    def forward(self, cos: torch.Tensor, target: torch.Tensor, **kwargs: object) -> torch.Tensor:
        raise ValueError("the 'none' head has no logits; it only carries auxiliary losses")
