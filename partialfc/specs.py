"""Typed configs of margin heads and auxiliary losses, and the decorators that register them.

A head is one class with one pydantic model: the model holds its hyperparameters -- fields,
defaults, bounds and a docstring each, written once -- and the class is built from it
(``ArcFace``-style heads take ``config`` as their only argument). The model's ``name`` is a
``Literal``; its first value is the head's name, further values are aliases (``cosface`` and
``am_softmax``). ``@register_head(ArcFaceConfig)`` on the class files model and class under
those names; ``partialfc.registry`` turns the registered models into the discriminated union
of the config's ``partialfc.margin``.

Auxiliary losses register the same way (``@register_aux_loss("center", CenterConfig)``); a
head's ``aux`` section has one optional entry per registered loss (``aux_losses_model``).

This module holds no torch code and imports nothing of the package: every head module
imports it, never the other way round.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    create_model,
    model_serializer,
)

from common.config_model import StrictModel

__all__ = [
    "DEFAULT_EPS",
    "AuxLossConfig",
    "AuxLossEntry",
    "HeadEntry",
    "SpecModel",
    "aux_loss_entry",
    "aux_losses_model",
    "describe_errors",
    "head_entry",
    "literal_names",
    "register_aux_loss",
    "register_head",
    "registered_aux_losses",
    "registered_heads",
]

DEFAULT_EPS = 1e-7
"""Clamp for ``arccos``: theta is computed from ``clamp(cos, -1+eps, 1-eps)``.

At |cos| = 1 the derivative of ``arccos`` is infinite; clamping keeps every gradient finite
(about ``1/sqrt(2*eps)`` at the clamp edge) at the cost of a target-logit error of at most
about ``s * sqrt(2*eps) * sin(m2)`` for cosines within ``eps`` of +-1. ``1e-7`` is close to the
float32 spacing below 1 (6e-8), so the clamp only bites where float32 cannot resolve the angle
anyway.
"""

_T = TypeVar("_T")


class SpecModel(StrictModel):
    """Base of every head and aux-loss config: unknown keys fail, NaN/inf fail
    (:class:`common.config_model.StrictModel`), each attribute docstring becomes the field's
    description (shown by ``facetrain heads``)."""

    model_config = ConfigDict(**StrictModel.model_config, use_attribute_docstrings=True)


class AuxLossConfig(SpecModel):
    """Base of an auxiliary loss's config: the weight it is added with."""

    weight: float = 1.0
    """The loss is added to the head's loss times this weight (center loss: the paper's
    lambda, 0.003)."""


@dataclass(frozen=True)
class HeadEntry:
    """A registered head: its name (the first ``Literal`` value), aliases, model and class."""

    name: str
    aliases: tuple[str, ...]
    config: type[SpecModel]
    head: type


@dataclass(frozen=True)
class AuxLossEntry:
    """A registered auxiliary loss: its name (the key under ``aux``), model and class."""

    name: str
    config: type[AuxLossConfig]
    loss: type


# Filled only by the decorators, i.e. as a consequence of importing a module that defines
# heads or losses (``partialfc.registry`` imports all of them).
_HEADS: dict[str, HeadEntry] = {}  # every name and alias -> entry
_AUX: dict[str, AuxLossEntry] = {}


def literal_names(config: type[BaseModel]) -> tuple[str, ...]:
    """The values of a model's ``name: Literal[...]`` field (head name first, then aliases)."""
    field = config.model_fields.get("name")
    values = typing.get_args(field.annotation) if field is not None else ()
    if not values or typing.get_origin(field.annotation) is not typing.Literal:
        raise ValueError(f"{config.__name__} needs a field name: Literal['<head name>', ...]")
    if not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{config.__name__}.name: the Literal values must be non-empty strings")
    return tuple(values)


def register_head(config: type[SpecModel]) -> Callable[[_T], _T]:
    """Register the decorated head class with ``config``, under the names of its ``name``
    field. The class is built as ``head(config_instance)``. One class may carry several
    decorators (one per config: ``CombinedMargin`` is ArcFace, CosFace, ...). Registering a
    name twice raises ``ValueError``: which head a config gets must not depend on import
    order."""
    names = literal_names(config)

    def decorator(head: _T) -> _T:
        for key in names:
            if key in _HEADS:
                raise ValueError(f"head name {key!r} is already registered")
        entry = HeadEntry(names[0], names[1:], config, head)  # type: ignore[arg-type]
        for key in names:
            _HEADS[key] = entry
        return head

    return decorator


def register_aux_loss(name: str, config: type[AuxLossConfig]) -> Callable[[_T], _T]:
    """Register the decorated auxiliary loss class under ``name`` with its ``config``; the
    class is built as ``loss(config_instance)``."""
    if not name or not name.isidentifier():
        raise ValueError(f"aux loss names must be identifiers, got {name!r}")

    def decorator(loss: _T) -> _T:
        if name in _AUX:
            raise ValueError(f"aux loss name {name!r} is already registered")
        _AUX[name] = AuxLossEntry(name, config, loss)  # type: ignore[arg-type]
        return loss

    return decorator


def registered_heads() -> list[HeadEntry]:
    """Every registered head once (aliases folded into their entry), sorted by name."""
    unique = {entry.name: entry for entry in _HEADS.values()}
    return [unique[name] for name in sorted(unique)]


def head_entry(name: str) -> HeadEntry | None:
    """The entry registered under ``name`` (a head name or an alias), or None."""
    return _HEADS.get(name)


def registered_aux_losses() -> list[AuxLossEntry]:
    """Every registered auxiliary loss, sorted by name."""
    return [_AUX[name] for name in sorted(_AUX)]


def aux_loss_entry(name: str) -> AuxLossEntry | None:
    """The auxiliary loss registered under ``name``, or None."""
    return _AUX.get(name)


class _AuxSection(SpecModel):
    """Base of the ``aux`` section's model: a dump lists the attached losses only."""

    @model_serializer(mode="wrap")
    def _attached_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


def aux_losses_model() -> type[SpecModel]:
    """The model of a head's ``aux`` section: one optional field per registered loss,
    ``{center: {weight: 0.003, alpha: 0.5}}``; a loss left out (or null) is not attached.
    Derived from the registered losses when called (``aux_losses`` calls it once, after its
    own registrations)."""
    fields: dict[str, Any] = {
        entry.name: (
            entry.config | None,
            Field(None, description=(entry.config.__doc__ or "").strip()),
        )
        for entry in registered_aux_losses()
    }
    return create_model(
        "AuxLosses",
        __base__=_AuxSection,
        __doc__="Auxiliary losses added to the head, by name; each with its weight.",
        **fields,
    )


def describe_errors(exc: ValidationError, skip: int = 0) -> str:
    """A model's validation errors as ``key: message`` parts joined by ``; `` (the first
    ``skip`` parts of each location left out: a union's tag)."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"][skip:]) or "<config>"
        parts.append(f"{key}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)
