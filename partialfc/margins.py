"""Margin heads that turn the (sampled, sharded) cosine matrix into logits.

All heads here are instances of one formula on the target column ``y`` of each row::

    target logit:    s * (cos(m1 * theta_y + m2) - m3)
    other columns:   s * cos(theta_j)

ArcFace is ``m1=1, m3=0``, CosFace / AM-Softmax ``m1=1, m2=0``, NormFace has no margin at all.
Because Partial FC shards and samples the class centres, a row's target class may live on
another rank; such rows carry ``target == -1`` and only get ``s * cos`` here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "ARCFACE_DEFAULTS",
    "COSFACE_DEFAULTS",
    "DEFAULT_EPS",
    "NORMFACE_DEFAULTS",
    "CombinedMargin",
    "build_margin",
    "margin_names",
]

DEFAULT_EPS = 1e-7
"""Clamp for ``arccos``: theta is computed from ``clamp(cos, -1+eps, 1-eps)``.

At |cos| = 1 the derivative of ``arccos`` is infinite; clamping keeps every gradient finite
(about ``1/sqrt(2*eps)`` at the clamp edge) at the cost of a target-logit error of at most
about ``s * sqrt(2*eps) * sin(m2)`` for cosines within ``eps`` of +-1. ``1e-7`` is close to the
float32 spacing below 1 (6e-8), so the clamp only bites where float32 cannot resolve the angle
anyway.
"""

ARCFACE_DEFAULTS: dict[str, Any] = {"s": 64.0, "m2": 0.5, "easy_margin": False}
"""ArcFace paper (Deng et al. 2019) / insightface defaults: scale 64, additive angle 0.5 rad."""

COSFACE_DEFAULTS: dict[str, Any] = {"s": 64.0, "m3": 0.4}
"""CosFace (Wang et al. 2018) as used by insightface: scale 64, additive cosine margin 0.4."""

NORMFACE_DEFAULTS: dict[str, Any] = {"s": 64.0}
"""NormFace without margin; scale 64 to match the other heads (the paper learns/tunes s)."""


class CombinedMargin(nn.Module):
    """Combined angular margin ``s * (cos(m1*theta + m2) - m3)`` on the target column.

    Args:
        s: logit scale (> 0). Normalised cosines live in [-1, 1]; the scale sharpens the softmax.
        m1: multiplicative angular margin (SphereFace-style, > 0; 1 = none).
        m2: additive angular margin in radians (ArcFace, in [0, pi); 0 = none).
        m3: additive cosine margin (CosFace; 0 = none).
        easy_margin: ArcFace only (m1 == 1, m3 == 0, m2 > 0): apply the margin only where
            cos > 0 instead of using the ``th/mm`` fallback.
        eps: arccos clamp, see ``DEFAULT_EPS``.

    Paths, chosen once at construction:

    - ``m1 == 1 and m2 == 0`` (CosFace, NormFace): ``cos - m3``, no arccos at all, exact.
    - ``m1 == 1 and m3 == 0 and m2 > 0`` (ArcFace): ``cos(theta + m2)`` where
      ``cos > cos(pi - m2)``, else ``cos - m2 * sin(m2)`` (insightface's ``th/mm`` rule). Beyond
      theta = pi - m2 the function ``cos(theta + m2)`` stops decreasing in theta, so the margin
      would reward moving away from the centre; the fallback keeps it monotone.
    - otherwise: ``cos(m1 * theta + m2) - m3`` with no fallback.

    Only the target entries are transformed, so the arccos work is O(N), not O(N*S).
    """

    def __init__(
        self,
        s: float,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        easy_margin: bool = False,
        eps: float = DEFAULT_EPS,
    ) -> None:
        super().__init__()
        for name, value in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        if s <= 0:
            raise ValueError(f"s must be > 0, got {s}")
        if m1 <= 0:
            raise ValueError(f"m1 must be > 0, got {m1}")
        if not 0 <= m2 < math.pi:
            raise ValueError(f"m2 must be in [0, pi), got {m2}")
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps}")
        self.s = float(s)
        self.m1 = float(m1)
        self.m2 = float(m2)
        self.m3 = float(m3)
        self.eps = float(eps)
        self.easy_margin = bool(easy_margin)
        self._no_angle = self.m1 == 1.0 and self.m2 == 0.0
        self._arcface = self.m1 == 1.0 and self.m3 == 0.0 and self.m2 > 0.0
        if self.easy_margin and not self._arcface:
            raise ValueError(
                "easy_margin only applies to the ArcFace form (m1=1, m2>0, m3=0), "
                f"got m1={m1}, m2={m2}, m3={m3}"
            )
        # insightface's names: th = cos(pi - m2), mm = sin(pi - m2) * m2 = sin(m2) * m2.
        self._th = math.cos(math.pi - self.m2)
        self._mm = math.sin(math.pi - self.m2) * self.m2

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"easy_margin={self.easy_margin}, eps={self.eps}"
        )

    def target_cos(self, cos_t: torch.Tensor) -> torch.Tensor:
        """Margin-adjusted target cosine ``cos(m1*theta + m2) - m3`` (before scaling) [R]."""
        if self._no_angle:
            return cos_t - self.m3
        theta = torch.acos(cos_t.clamp(-1.0 + self.eps, 1.0 - self.eps))  # [R]
        with_margin = torch.cos(self.m1 * theta + self.m2) - self.m3  # [R]
        if not self._arcface:
            return with_margin
        if self.easy_margin:
            return torch.where(cos_t > 0, with_margin, cos_t)
        return torch.where(cos_t > self._th, with_margin, cos_t - self._mm)

    def forward(self, cos: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return logits [N, S] from cosines [N, S] and per-row target columns [N].

        ``target[i]`` is the column of row i's class in ``cos``, or -1 when that class is not in
        this rank's sampled shard. Half-precision input is upcast to float32 (float64 stays
        float64). Neither ``cos`` nor ``target`` is modified.
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
        rows = torch.nonzero(target >= 0).squeeze(1)  # [R]
        cols = target[rows]  # [R]
        new_t = self.target_cos(cos[rows, cols])  # [R]
        # Out-of-place index_put keeps `cos` intact for autograd and for the caller.
        adjusted = cos.index_put((rows, cols), new_t)  # [N, S]
        return adjusted * self.s  # [N, S]


def _arcface(**kw: Any) -> CombinedMargin:
    args = {**ARCFACE_DEFAULTS, **kw}
    return CombinedMargin(s=args.pop("s"), m1=1.0, m3=0.0, **args)


def _cosface(**kw: Any) -> CombinedMargin:
    args = {**COSFACE_DEFAULTS, **kw}
    return CombinedMargin(s=args.pop("s"), m1=1.0, m2=0.0, **args)


def _combined(**kw: Any) -> CombinedMargin:
    missing = [k for k in ("s", "m1", "m2", "m3") if k not in kw]
    if missing:
        raise ValueError(f"margin 'combined' needs s, m1, m2 and m3; missing {missing}")
    return CombinedMargin(**kw)


def _normface(**kw: Any) -> CombinedMargin:
    args = {**NORMFACE_DEFAULTS, **kw}
    return CombinedMargin(s=args.pop("s"), m1=1.0, m2=0.0, m3=0.0, **args)


# name -> (builder, accepted keyword arguments)
_MARGINS: dict[str, tuple[Callable[..., nn.Module], frozenset[str]]] = {
    "arcface": (_arcface, frozenset({"s", "m2", "easy_margin", "eps"})),
    "cosface": (_cosface, frozenset({"s", "m3", "eps"})),
    "combined": (_combined, frozenset({"s", "m1", "m2", "m3", "eps"})),
    "normface": (_normface, frozenset({"s", "eps"})),
}


def margin_names() -> list[str]:
    """Names accepted by ``build_margin``, sorted."""
    return sorted(_MARGINS)


def build_margin(name: str, **kwargs: Any) -> nn.Module:
    """Build a margin head by name; keyword arguments override the documented defaults.

    - ``"arcface"``: s=64, m2=0.5, easy_margin=False (``ARCFACE_DEFAULTS``)
    - ``"cosface"``: s=64, m3=0.4 (``COSFACE_DEFAULTS``)
    - ``"combined"``: s, m1, m2, m3 all required (no defaults: there is no standard combo)
    - ``"normface"``: s=64, no margin (``NORMFACE_DEFAULTS``)

    Every head also accepts ``eps`` (default ``DEFAULT_EPS``).

    Raises:
        ValueError: unknown name (the message lists the known names), an argument the head
            does not take, or a missing required argument.
    """
    if name not in _MARGINS:
        raise ValueError(f"unknown margin {name!r}; known margins: {margin_names()}")
    builder, accepted = _MARGINS[name]
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"margin {name!r} does not take {unknown}; it accepts {sorted(accepted)}")
    return builder(**kwargs)
