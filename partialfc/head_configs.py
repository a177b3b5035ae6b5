"""Head configs: ``HeadConfig``, the base of every head's config (its ``name`` and ``aux``
section, ``AuxLosses``), and the configs of the combined-margin family that ``CombinedMargin``
(``partialfc.margins``) is built from: NormFace, ArcFace, CosFace, the general combined
margin, the arccos SphereFace and ArcFace with inter-class filtering.

Each model holds its head's fields, defaults, bounds and a docstring each (shown by
``facetrain heads``); the head classes register them (``@register_head``, see
``partialfc.specs``). The configs of the other heads sit beside their heads.
"""

from __future__ import annotations

import math
import typing
from typing import Literal

from pydantic import Field, model_validator

# Imported for its @register_aux_loss decorators: AuxLosses has a field per registered loss.
from partialfc import aux_losses  # noqa: F401
from partialfc.specs import DEFAULT_EPS, SpecModel, aux_losses_model

__all__ = [
    "FALLBACKS",
    "ArcFaceConfig",
    "AuxLosses",
    "CombinedConfig",
    "CombinedFormConfig",
    "CosFaceConfig",
    "HeadConfig",
    "InterclassFilteringConfig",
    "NormFaceConfig",
    "SphereFaceArccosConfig",
]

Fallback = Literal["auto", "thmm", "easy", "psi", "none"]
FALLBACKS: tuple[str, ...] = typing.get_args(Fallback)
"""What the target logit does where ``m1 * theta + m2`` passes pi (see ``CombinedFormConfig``)."""


AuxLosses = aux_losses_model()
"""A head's ``aux`` section: one optional field per loss of ``partialfc.aux_losses``."""


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
