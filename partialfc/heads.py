"""Margin heads beyond the combined formula: unnormalised, annealed, negative-reshaping,
feature-norm adaptive, sub-centre, displacement and stateful heads.

Every head documents its published formula, its defaults (with their source) and, where it
needs information from other shards, the collective it performs itself. All of them are
correct on sampled, sharded columns: a head only ever sees this rank's columns, and the rows
whose class lives on another rank have ``target == -1``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from partialfc.collectives import all_reduce_inplace, sync_grad
from partialfc.context import MarginContext, ShardSpec
from partialfc.margins import DEFAULT_EPS, CombinedMargin, MarginHead, check_number

__all__ = [
    "ADAFACE_DEFAULTS",
    "CIRCLE_DEFAULTS",
    "CURRICULAR_DEFAULTS",
    "DISCFACE_DEFAULTS",
    "LSOFTMAX_DEFAULTS",
    "MAGFACE_DEFAULTS",
    "MV_ARC_DEFAULTS",
    "MV_SOFTMAX_DEFAULTS",
    "NPCFACE_DEFAULTS",
    "SPHEREFACE_DEFAULTS",
    "SUBCENTER_DEFAULTS",
    "AdaFace",
    "CircleLoss",
    "CurricularFace",
    "DiscFace",
    "LargeMarginSoftmax",
    "MVSoftmax",
    "MagFace",
    "NPCFace",
    "NoClassifier",
    "Softmax",
    "SubCenterArcFace",
    "chebyshev_cos",
    "sphere_psi",
]

SPHEREFACE_DEFAULTS = {
    "m": 4,
    "base": 1000.0,
    "gamma": 0.12,
    "power": 1.0,
    "lambda_min": 5.0,
    "s": None,
}
"""SphereFace (Liu et al. 2017) released prototxt: ``type: QUADRUPLE`` (m = 4), ``base: 1000
gamma: 0.12 power: 1 lambda_min: 5``; logits scaled by the feature norm (``s=None``)."""

LSOFTMAX_DEFAULTS = {"m": 4, "base": 1000.0, "gamma": 0.12, "power": 1.0, "lambda_min": 0.0}
"""L-Softmax (Liu et al. 2016): m = 4 (the paper reports m = 2, 3, 4) with the same annealing
schedule as SphereFace, annealed down to the pure margin (``lambda_min = 0``)."""

MV_SOFTMAX_DEFAULTS = {"s": 32.0, "m": 0.35, "t": 0.2, "variant": "adaptive"}
"""MV-AM-Softmax (Wang et al. 2020): s = 32, cosine margin 0.35, t = 0.2, adaptive h."""

MV_ARC_DEFAULTS = {"s": 32.0, "m": 0.5, "t": 0.2, "variant": "adaptive"}
"""MV-Arc-Softmax (Wang et al. 2020): s = 32, angular margin 0.5, t = 0.2, adaptive h."""

CURRICULAR_DEFAULTS = {"s": 64.0, "m": 0.5, "momentum": 0.01}
"""CurricularFace (Huang et al. 2020): s = 64, m = 0.5, t updated with momentum 0.01 from 0."""

NPCFACE_DEFAULTS = {"s": 64.0, "m": 0.5, "m0": 0.4, "m1": 0.2, "t": 1.1, "alpha": 0.2}
"""NPCFace (Zeng et al. 2020) as released in FaceX-Zoo: s = 64, hard-negative margin 0.5,
positive margin m0 + m1 * mean hard-negative cosine with m0 = 0.4, m1 = 0.2, hard negatives
reshaped to t * cos + alpha with t = 1.1, alpha = 0.2."""

CIRCLE_DEFAULTS = {"s": 256.0, "m": 0.25}
"""Circle loss (Sun et al. 2020), face-recognition setting: gamma (here ``s``) = 256, m = 0.25."""

ADAFACE_DEFAULTS = {
    "s": 64.0,
    "m": 0.4,
    "h": 0.333,
    "t_alpha": 0.01,
    "eps": 1e-3,
    "init_mean": 20.0,
    "init_std": 100.0,
}
"""AdaFace (Kim et al. 2022): s = 64, m = 0.4, h = 0.333, norm statistics momentum 0.01,
initial mean 20 / std 100, cosine clamp 1e-3 (the released training recipe)."""

MAGFACE_DEFAULTS = {
    "s": 64.0,
    "l_a": 10.0,
    "u_a": 110.0,
    "l_margin": 0.45,
    "u_margin": 0.8,
    "lambda_g": 35.0,
    "easy_margin": False,
}
"""MagFace (Meng et al. 2021) released recipe: s = 64, norm range [10, 110], margin range
[0.45, 0.8], regulariser weight 35."""

SUBCENTER_DEFAULTS = {"s": 64.0, "m2": 0.5, "k": 3}
"""Sub-center ArcFace (Deng et al. 2020): K = 3 sub-centres, ArcFace s = 64, m = 0.5."""

DISCFACE_DEFAULTS = {"s": 64.0, "m2": 0.5, "m3": 0.0, "lambda_disc": 0.5, "max_norm": 0.05}
"""DiscFace (Kim et al. 2020) on an ArcFace head (s = 64, m = 0.5). The discrepancy weight 0.5
and the 0.05 cap on the displacement's norm follow a public reproduction; the paper tunes
them per setting."""


def _int_value(name: str, value: object, minimum: int) -> int:
    """An integer (also given as an integral float, as YAML configs often do)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be an integer, got {value!r}")
        value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _acos(cos: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.acos(cos.clamp(-1.0 + eps, 1.0 - eps))


# ------------------------------------------------------------------------------- softmax


class Softmax(MarginHead):
    """Plain softmax classifier: ``logit_j = <x, W_j> + b_j``, no normalisation, no margin.

    Computed as ``|x| |W_j| cos_j + b_j`` from the context (the same number; Partial FC always
    computes cosines). The bias is a per-class parameter on the shard, created by ``bind``
    (zeros). No hyperparameters.
    """

    needs_bias = True
    needs_weight_norms = True

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
        k = torch.floor(m * _acos(cos, eps) / math.pi).clamp_(0, m - 1)
    sign = 1.0 - 2.0 * torch.remainder(k, 2.0)
    return sign * chebyshev_cos(cos, m) - 2.0 * k


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
    same on every rank.

    Args:
        m: integer angular margin >= 1.
        base, gamma, power, lambda_min: annealing schedule (see ``SPHEREFACE_DEFAULTS``).
        normalize_weights: True for SphereFace, False for L-Softmax.
        s: constant feature scale, or None for ``|x|``.
    """

    def __init__(
        self,
        m: int = 4,
        base: float = 1000.0,
        gamma: float = 0.12,
        power: float = 1.0,
        lambda_min: float = 5.0,
        normalize_weights: bool = True,
        s: float | None = None,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self.m = _int_value("m", m, 1)
        self.base = check_number("base", base)
        self.gamma = check_number("gamma", gamma)
        self.power = check_number("power", power)
        self.lambda_min = check_number("lambda_min", lambda_min)
        if self.base < 0 or self.gamma < 0 or self.lambda_min < 0:
            raise ValueError("base, gamma and lambda_min must be >= 0")
        self.s = None if s is None else check_number("s", s, positive=True)
        self.eps = check_number("eps", eps, positive=True)
        self.normalize_weights = bool(normalize_weights)
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


# ----------------------------------------------------------------- negative-reshaping heads


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

    def __init__(
        self,
        s: float = 32.0,
        m: float = 0.35,
        t: float = 0.2,
        arc: bool = False,
        variant: str = "adaptive",
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self.s = check_number("s", s, positive=True)
        self.m = check_number("m", m)
        self.t = check_number("t", t)
        self.eps = check_number("eps", eps, positive=True)
        if variant not in ("adaptive", "fixed"):
            raise ValueError(f"variant must be 'adaptive' or 'fixed', got {variant!r}")
        self.arc = bool(arc)
        self.variant = variant

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, t={self.t}, arc={self.arc}, variant={self.variant}"

    def _margin(self, c: torch.Tensor) -> torch.Tensor:
        """The margin function f(m, theta_y): ``cos - m`` or ``cos(theta + m)``."""
        if not self.arc:
            return c - self.m
        return torch.cos(_acos(c, self.eps) + self.m)

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

    def __init__(
        self, s: float = 64.0, m: float = 0.5, momentum: float = 0.01, eps: float = DEFAULT_EPS
    ) -> None:
        super().__init__()
        self.s = check_number("s", s, positive=True)
        self.m = check_number("m", m)
        self.momentum = check_number("momentum", momentum)
        self.eps = check_number("eps", eps, positive=True)
        if not 0 <= self.m < math.pi:
            raise ValueError(f"m must be in [0, pi), got {m}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
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
            threshold = torch.cos(_acos(g_cos.to(cos.dtype), self.eps) + self.m)  # [N]
            hard = cos > threshold[:, None]  # [N, S]
        out = torch.where(hard, cos * (t + cos), cos)
        c_t = ctx.target_cos
        with_margin = torch.cos(_acos(c_t, self.eps) + self.m)
        new_t = torch.where(c_t > self._th, with_margin, c_t - self._mm)  # [R]
        return out.index_put((ctx.rows, ctx.cols), new_t) * self.s


class NPCFace(MarginHead):
    """NPCFace (Zeng et al. 2020): the positive margin grows with the hard negatives.

    Hard negatives of row i: ``I_ij = cos(theta_j) > cos(theta_y + m)``. Their logit becomes
    ``s * (t * cos + alpha)``. The positive margin is ``m_i = m0 + m1 * mean_j(I_ij cos_ij)``
    (0 hard negatives: m0), detached, and the target logit is ``s * cos(theta_y + m_i)`` where
    cos > 0, else ``s * cos`` (the authors' release).

    Collectives: the target cosine of every row (``global_target_cos``) for the mask, then one
    all-reduce SUM of [2, N] for the count and the sum of hard-negative cosines over all ranks.
    """

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.5,
        m0: float = 0.4,
        m1: float = 0.2,
        t: float = 1.1,
        alpha: float = 0.2,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self.s = check_number("s", s, positive=True)
        self.m = check_number("m", m)
        self.m0 = check_number("m0", m0)
        self.m1 = check_number("m1", m1)
        self.t = check_number("t", t)
        self.alpha = check_number("alpha", alpha)
        self.eps = check_number("eps", eps, positive=True)

    def extra_repr(self) -> str:
        return f"s={self.s}, m={self.m}, m0={self.m0}, m1={self.m1}, t={self.t}, alpha={self.alpha}"

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        cos = ctx.require("cos", "npcface")
        g_cos, _ = ctx.global_target_cos()
        with torch.no_grad():
            threshold = torch.cos(_acos(g_cos.to(cos.dtype), self.eps) + self.m)  # [N]
            hard = cos > threshold[:, None]  # [N, S]
            hard[ctx.rows, ctx.cols] = False
            sums = torch.stack([(cos * hard).sum(dim=1), hard.sum(dim=1).to(cos.dtype)])
            all_reduce_inplace(sums, "sum", ctx.group)  # [2, N] over every rank's columns
            margin = self.m0 + self.m1 * sums[0] / sums[1].clamp(min=1.0)  # [N]
        out = torch.where(hard, self.t * cos + self.alpha, cos)
        c_t = ctx.target_cos
        m_t = margin[ctx.rows]
        new_t = torch.where(c_t > 0, torch.cos(_acos(c_t, self.eps) + m_t), c_t)
        return out.index_put((ctx.rows, ctx.cols), new_t) * self.s


class CircleLoss(MarginHead):
    """Circle loss (Sun et al. 2020) in its classification form (one positive per row).

    ``alpha_p = [1 + m - cos_y]_+``, ``alpha_n = [cos_j + m]_+`` (detached),
    ``Delta_p = 1 - m``, ``Delta_n = m``; logits ``s * alpha_p (cos_y - Delta_p)`` and
    ``s * alpha_n (cos_j - Delta_n)``, so the softmax cross-entropy equals the paper's
    ``log(1 + sum_j exp(logit_j) * exp(-logit_y))``. Purely elementwise: no collective.
    """

    def __init__(self, s: float = 256.0, m: float = 0.25) -> None:
        super().__init__()
        self.s = check_number("s", s, positive=True)
        self.m = check_number("m", m)

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


# --------------------------------------------------------------- feature-norm adaptive heads


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

    def __init__(
        self,
        s: float = 64.0,
        m: float = 0.4,
        h: float = 0.333,
        t_alpha: float = 0.01,
        eps: float = 1e-3,
        init_mean: float = 20.0,
        init_std: float = 100.0,
    ) -> None:
        super().__init__()
        self.s = check_number("s", s, positive=True)
        self.m = check_number("m", m)
        self.h = check_number("h", h)
        self.t_alpha = check_number("t_alpha", t_alpha)
        self.eps = check_number("eps", eps, positive=True)
        init_mean = check_number("init_mean", init_mean)
        init_std = check_number("init_std", init_std, positive=True)
        self.register_buffer("batch_mean", torch.tensor(init_mean, dtype=torch.float64))
        self.register_buffer("batch_std", torch.tensor(init_std, dtype=torch.float64))

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
        theta = _acos(cos_t, self.eps)
        theta_m = (theta - self.m * scaler).clamp(self.eps, math.pi - self.eps)
        return (torch.cos(theta_m) - (self.m * scaler + self.m)) * self.s


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

    def __init__(
        self,
        s: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_margin: float = 0.45,
        u_margin: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = False,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        self.s = check_number("s", s, positive=True)
        self.l_a = check_number("l_a", l_a, positive=True)
        self.u_a = check_number("u_a", u_a, positive=True)
        self.l_margin = check_number("l_margin", l_margin)
        self.u_margin = check_number("u_margin", u_margin)
        self.lambda_g = check_number("lambda_g", lambda_g)
        self.eps = check_number("eps", eps, positive=True)
        self.easy_margin = bool(easy_margin)
        if self.u_a <= self.l_a:
            raise ValueError(f"u_a must be > l_a, got l_a={l_a}, u_a={u_a}")
        if not 0 <= self.l_margin <= self.u_margin < math.pi:
            raise ValueError(f"need 0 <= l_margin <= u_margin < pi, got {l_margin}, {u_margin}")

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
        with_margin = torch.cos(_acos(cos_t, self.eps) + m)
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


class SubCenterArcFace(CombinedMargin):
    """Sub-center ArcFace (Deng et al. 2020): K centres per class, the closest one counts.

    The shard holds ``K`` rows per class (row ``class * K + k``); ``PartialFC`` computes the
    cosine to every sub-centre and max-pools them per class before this head applies the
    ArcFace margin (``th/mm`` fallback). Called directly, the head takes the un-pooled
    ``[N, S * K]`` cosines and pools them itself.
    """

    def __init__(
        self, s: float = 64.0, m2: float = 0.5, k: int = 3, eps: float = DEFAULT_EPS
    ) -> None:
        super().__init__(s=s, m1=1.0, m2=m2, m3=0.0, eps=eps)
        self.num_subcenters = _int_value("k", k, 1)

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

    def __init__(
        self,
        s: float = 64.0,
        m2: float = 0.5,
        m3: float = 0.0,
        lambda_disc: float = 0.5,
        max_norm: float = 0.05,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__(s=s, m1=1.0, m2=m2, m3=m3, eps=eps)
        self.lambda_disc = check_number("lambda_disc", lambda_disc)
        self.max_norm = check_number("max_norm", max_norm, positive=True)

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


class NoClassifier(MarginHead):
    """The "none" head: no class centres and no softmax; only its auxiliary losses count."""

    uses_classifier = False

    def logits(self, ctx: MarginContext) -> torch.Tensor:
        raise ValueError("the 'none' head has no logits; it only carries auxiliary losses")

    def forward(self, cos: torch.Tensor, target: torch.Tensor, **kwargs: object) -> torch.Tensor:
        raise ValueError("the 'none' head has no logits; it only carries auxiliary losses")
