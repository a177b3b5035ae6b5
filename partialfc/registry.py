"""Names -> margin heads, with their documented defaults; how configs build heads.

``build_margin(name, **kwargs)`` is what the trainer calls with ``partialfc.margin`` and
``partialfc.margin_kwargs``. Every head also accepts ``aux``: a mapping ``{aux name: {"weight":
w, **aux kwargs}}`` of auxiliary embedding losses added to it (see ``partialfc.aux_losses``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from partialfc.aux_losses import build_aux_loss
from partialfc.heads import (
    ADAFACE_DEFAULTS,
    CIRCLE_DEFAULTS,
    CURRICULAR_DEFAULTS,
    DISCFACE_DEFAULTS,
    LSOFTMAX_DEFAULTS,
    MAGFACE_DEFAULTS,
    MV_ARC_DEFAULTS,
    MV_SOFTMAX_DEFAULTS,
    NPCFACE_DEFAULTS,
    SPHEREFACE_DEFAULTS,
    SUBCENTER_DEFAULTS,
    AdaFace,
    CircleLoss,
    CurricularFace,
    DiscFace,
    LargeMarginSoftmax,
    MagFace,
    MVSoftmax,
    NoClassifier,
    NPCFace,
    Softmax,
    SubCenterArcFace,
)
from partialfc.margins import (
    ARCFACE_DEFAULTS,
    COSFACE_DEFAULTS,
    NORMFACE_DEFAULTS,
    SPHEREFACE_ARCCOS_DEFAULTS,
    CombinedMargin,
    MarginHead,
)

__all__ = ["build_margin", "margin_defaults", "margin_names"]

_COMBINED_KEYS = frozenset({"eps", "fallback", "interclass_filtering_threshold"})


def _combined(**kw: Any) -> CombinedMargin:
    missing = [k for k in ("s", "m1", "m2", "m3") if k not in kw]
    if missing:
        raise ValueError(f"margin 'combined' needs s, m1, m2 and m3; missing {missing}")
    return CombinedMargin(**kw)


def _filtering(**kw: Any) -> CombinedMargin:
    if "interclass_filtering_threshold" not in kw:
        raise ValueError(
            "margin 'interclass_filtering' needs interclass_filtering_threshold (insightface "
            "ships 0 = off; there is no published default)"
        )
    return CombinedMargin(**{"m1": 1.0, "m3": 0.0, **ARCFACE_DEFAULTS, **kw})


# name -> (builder, defaults shown to users, accepted keyword arguments)
_MARGINS: dict[str, tuple[Callable[..., MarginHead], dict[str, Any], frozenset[str]]] = {
    "softmax": (lambda **kw: Softmax(**kw), {}, frozenset()),
    "normface": (
        lambda **kw: CombinedMargin(**{**NORMFACE_DEFAULTS, **kw, "m1": 1.0, "m2": 0.0, "m3": 0.0}),
        NORMFACE_DEFAULTS,
        frozenset({"s"}) | _COMBINED_KEYS,
    ),
    "arcface": (
        lambda **kw: CombinedMargin(**{**ARCFACE_DEFAULTS, **kw, "m1": 1.0, "m3": 0.0}),
        ARCFACE_DEFAULTS,
        frozenset({"s", "m2", "easy_margin"}) | _COMBINED_KEYS,
    ),
    "cosface": (
        lambda **kw: CombinedMargin(**{**COSFACE_DEFAULTS, **kw, "m1": 1.0, "m2": 0.0}),
        COSFACE_DEFAULTS,
        frozenset({"s", "m3"}) | _COMBINED_KEYS,
    ),
    "combined": (_combined, {}, frozenset({"s", "m1", "m2", "m3", "easy_margin"}) | _COMBINED_KEYS),
    "sphereface_arccos": (
        lambda **kw: CombinedMargin(**{**SPHEREFACE_ARCCOS_DEFAULTS, **kw, "m2": 0.0, "m3": 0.0}),
        SPHEREFACE_ARCCOS_DEFAULTS,
        frozenset({"s", "m1"}) | _COMBINED_KEYS,
    ),
    "interclass_filtering": (
        _filtering,
        {**ARCFACE_DEFAULTS, "interclass_filtering_threshold": "required"},
        frozenset({"s", "m2", "easy_margin"}) | _COMBINED_KEYS,
    ),
    "sphereface": (
        lambda **kw: LargeMarginSoftmax(**{**SPHEREFACE_DEFAULTS, **kw}, normalize_weights=True),
        SPHEREFACE_DEFAULTS,
        frozenset({"m", "base", "gamma", "power", "lambda_min", "s", "eps"}),
    ),
    "lsoftmax": (
        lambda **kw: LargeMarginSoftmax(**{**LSOFTMAX_DEFAULTS, **kw}, normalize_weights=False),
        LSOFTMAX_DEFAULTS,
        frozenset({"m", "base", "gamma", "power", "lambda_min", "s", "eps"}),
    ),
    "mv_softmax": (
        lambda **kw: MVSoftmax(**{**MV_SOFTMAX_DEFAULTS, **kw}, arc=False),
        MV_SOFTMAX_DEFAULTS,
        frozenset({"s", "m", "t", "variant", "eps"}),
    ),
    "mv_arc_softmax": (
        lambda **kw: MVSoftmax(**{**MV_ARC_DEFAULTS, **kw}, arc=True),
        MV_ARC_DEFAULTS,
        frozenset({"s", "m", "t", "variant", "eps"}),
    ),
    "curricularface": (
        lambda **kw: CurricularFace(**{**CURRICULAR_DEFAULTS, **kw}),
        CURRICULAR_DEFAULTS,
        frozenset({"s", "m", "momentum", "eps"}),
    ),
    "npcface": (
        lambda **kw: NPCFace(**{**NPCFACE_DEFAULTS, **kw}),
        NPCFACE_DEFAULTS,
        frozenset({"s", "m", "m0", "m1", "t", "alpha", "eps"}),
    ),
    "circleloss": (
        lambda **kw: CircleLoss(**{**CIRCLE_DEFAULTS, **kw}),
        CIRCLE_DEFAULTS,
        frozenset({"s", "m"}),
    ),
    "adaface": (
        lambda **kw: AdaFace(**{**ADAFACE_DEFAULTS, **kw}),
        ADAFACE_DEFAULTS,
        frozenset({"s", "m", "h", "t_alpha", "eps", "init_mean", "init_std"}),
    ),
    "magface": (
        lambda **kw: MagFace(**{**MAGFACE_DEFAULTS, **kw}),
        MAGFACE_DEFAULTS,
        frozenset({"s", "l_a", "u_a", "l_margin", "u_margin", "lambda_g", "easy_margin", "eps"}),
    ),
    "subcenter_arcface": (
        lambda **kw: SubCenterArcFace(**{**SUBCENTER_DEFAULTS, **kw}),
        SUBCENTER_DEFAULTS,
        frozenset({"s", "m2", "k", "eps"}),
    ),
    "discface": (
        lambda **kw: DiscFace(**{**DISCFACE_DEFAULTS, **kw}),
        DISCFACE_DEFAULTS,
        frozenset({"s", "m2", "m3", "lambda_disc", "max_norm", "eps"}),
    ),
    "none": (lambda **kw: NoClassifier(**kw), {}, frozenset()),
}

ALIASES = {"am_softmax": "cosface", "a_softmax": "sphereface", "circle": "circleloss"}


def margin_names() -> list[str]:
    """Names accepted by ``build_margin`` (aliases included), sorted."""
    return sorted([*_MARGINS, *ALIASES])


def margin_defaults(name: str) -> dict[str, Any]:
    """The documented defaults of head ``name`` (a copy)."""
    key = ALIASES.get(name, name)
    if key not in _MARGINS:
        raise ValueError(f"unknown margin {name!r}; known margins: {margin_names()}")
    return dict(_MARGINS[key][1])


def build_margin(name: str, **kwargs: Any) -> MarginHead:
    """Build a margin head by name; keyword arguments override the documented defaults.

    - ``"softmax"``: no arguments (weights and bias, no normalisation)
    - ``"normface"``: s=64
    - ``"arcface"``: s=64, m2=0.5, easy_margin=False (``th/mm`` fallback)
    - ``"cosface"`` (``"am_softmax"``): s=64, m3=0.4
    - ``"combined"``: s, m1, m2, m3 all required (no standard combination)
    - ``"sphereface_arccos"``: s=64, m1=1.35
    - ``"sphereface"`` (``"a_softmax"``): m=4, base=1000, gamma=0.12, power=1, lambda_min=5
    - ``"lsoftmax"``: m=4, base=1000, gamma=0.12, power=1, lambda_min=0
    - ``"mv_softmax"`` / ``"mv_arc_softmax"``: s=32, m=0.35 / 0.5, t=0.2, variant="adaptive"
    - ``"curricularface"``: s=64, m=0.5, momentum=0.01
    - ``"npcface"``: s=64, m=0.5, m0=0.4, m1=0.2, t=1.1, alpha=0.2
    - ``"circleloss"`` (``"circle"``): s(gamma)=256, m=0.25
    - ``"adaface"``: s=64, m=0.4, h=0.333, t_alpha=0.01, eps=1e-3, init_mean=20, init_std=100
    - ``"magface"``: s=64, l_a=10, u_a=110, l_margin=0.45, u_margin=0.8, lambda_g=35
    - ``"subcenter_arcface"``: s=64, m2=0.5, k=3
    - ``"discface"``: s=64, m2=0.5, m3=0, lambda_disc=0.5, max_norm=0.05
    - ``"interclass_filtering"``: ArcFace + interclass_filtering_threshold (required)
    - ``"none"``: no classifier; only the ``aux`` losses

    The combined-margin heads also take ``eps``, ``fallback`` and
    ``interclass_filtering_threshold``. Every head takes ``aux`` (see the module docstring).

    Raises:
        ValueError: unknown name (the message lists the known names), an argument the head
            does not take, a missing required argument, or a bad value (named).
    """
    key = ALIASES.get(name, name)
    if key not in _MARGINS:
        raise ValueError(f"unknown margin {name!r}; known margins: {margin_names()}")
    builder, _, accepted = _MARGINS[key]
    aux = kwargs.pop("aux", None)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"margin {name!r} does not take {unknown}; it accepts {sorted(accepted | {'aux'})}"
        )
    head = builder(**kwargs)
    if key == "none" and not aux:
        raise ValueError("margin 'none' needs at least one auxiliary loss in 'aux'")
    if aux:
        if not isinstance(aux, dict):
            raise ValueError(f"aux must be a mapping {{name: {{weight, ...}}}}, got {aux!r}")
        for aux_name, spec in aux.items():
            spec = dict(spec or {})
            weight = spec.pop("weight", 1.0)
            try:
                loss = build_aux_loss(aux_name, **spec)
            except ValueError as exc:
                raise ValueError(f"aux.{aux_name}: {exc}") from exc
            head.add_aux_loss(aux_name, loss, weight)
    return head
