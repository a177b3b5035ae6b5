"""The classifier's section of a run config (``partialfc:``), owned by the component it
configures: typed, with its defaults and bounds written once and a docstring per field."""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from partialfc.registry import (
    MarginConfig,
    default_margin,
    head_entry,
    margin_defaults,
    unknown_head_message,
)
from partialfc.specs import SpecModel

__all__ = ["PartialFCConfig"]


def _flow(value: dict[str, Any]) -> str:
    """A mapping in YAML flow style on one line: ``{name: cosface, s: 64, m3: 0.35}``."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=2**16).strip()


class PartialFCConfig(SpecModel):
    """The ``partialfc`` section of a run's config: the classifier, its head and its storage."""

    margin: MarginConfig = Field(default_factory=default_margin)  # type: ignore[valid-type]
    """The margin head: its name and its fields, e.g. {name: cosface, s: 64, m3: 0.35}, with
    auxiliary losses under aux: {name: arcface, aux: {center: {weight: 0.003}}}. Every head,
    its fields and defaults: README (Margin heads) or ``facetrain heads``; default ArcFace
    (s 64, m2 0.5)."""
    update: Literal["sampled", "dense"] = "sampled"
    """What happens to class centres not sampled in a step: "sampled" freezes them (only the
    sampled rows and their optimizer state move; the cheap choice, see BENCHMARKS.md),
    "dense" lets momentum and weight decay move every row every step."""
    sample_rate: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of each shard's class centres used per step (positives always kept)."""
    init_std: float = Field(0.01, gt=0.0)
    """Standard deviation of the normal init of the class centres."""
    lr: float | None = Field(None, gt=0.0)
    """Classifier learning rate; defaults to optimizer.lr."""
    weight_decay: float | None = Field(None, ge=0.0)
    """Classifier weight decay; defaults to optimizer.weight_decay."""
    clip_grad_norm: float | None = Field(None, gt=0.0)
    """Clip the classifier's gradient norm (over all shards together); null: no clipping."""
    backend: Literal["auto", "plain", "cpu_fused"] = "auto"
    """How the classifier's step is computed (the same numbers either way, bound by tests):
    "plain", the readable core on public torch APIs (what a GPU runs); "cpu_fused", the
    fast CPU backend (fused C++ kernels built with g++ on first use, reused buffers,
    collectives overlapped with the products; torch ops if the build fails); "auto":
    cpu_fused on a CPU where the kernels build, plain otherwise."""
    storage_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """dtype of the class centres and their optimizer state: "bf16" / "fp16" hold twice the
    identities in the same memory (each step computes on the sampled rows in float32 and
    writes them back rounded, see rounding); 16-bit storage runs on the plain backend.
    bf16 keeps float32's range; fp16 has 3 more bits but underflows below ~6e-8 (AdamW's
    second moments can). Checkpoints keep the stored dtype; resuming into another dtype
    casts (rounded to nearest)."""
    rounding: Literal["stochastic", "nearest"] = "stochastic"
    """How float32 results are written into 16-bit centres and state: "stochastic" (unbiased:
    an update smaller than the storage's resolution still moves a centre on average) or
    "nearest". Ignored with storage_dtype fp32."""

    @model_validator(mode="before")
    @classmethod
    def _no_old_form(cls, data: Any) -> Any:
        """``margin: cosface`` + ``margin_kwargs: {...}`` (the form before the typed heads)
        fails with the new form built from its values."""
        if not isinstance(data, dict):
            return data
        margin = data.get("margin")
        if "margin_kwargs" in data or isinstance(margin, str):
            kwargs = data.get("margin_kwargs") or {}
            name = margin if isinstance(margin, str) else "arcface"
            if head_entry(name) is None:
                raise ValueError(f"partialfc.margin: {unknown_head_message(name)}")
            new = {"name": name, **(kwargs if isinstance(kwargs, dict) else {})}
            raise ValueError(
                f"partialfc.margin: use the form {_flow(new)} (the head's name and fields in "
                "one mapping; margin_kwargs is gone)"
            )
        return data

    @field_validator("margin", mode="before")
    @classmethod
    def _known_head(cls, value: Any) -> Any:
        """An unknown or missing head name fails with the known ones (did-you-mean)."""
        if isinstance(value, dict):
            name = value.get("name")
            if name is None:
                defaults = margin_defaults("arcface")
                example = _flow({"name": "arcface", "s": defaults["s"], "m2": defaults["m2"]})
                raise ValueError(f"needs a name, e.g. {example}")
            if not isinstance(name, str) or head_entry(name) is None:
                raise ValueError(unknown_head_message(name))
        return value
