"""Names -> margin heads and auxiliary losses: the union of every registered head's config,
and how configs build heads (``build_margin``) and auxiliary losses (``build_aux_loss``).

Importing this module imports every module that defines heads, so each ``@register_head`` has
run; ``MarginConfig`` is then the discriminated union (on ``name``) of the registered config
models -- the type of the run config's ``partialfc.margin``::

    partialfc:
      margin: {name: cosface, s: 64, m3: 0.35, aux: {center: {weight: 0.003, alpha: 0.5}}}

``build_margin(config)`` builds the head of a validated config and attaches its auxiliary
losses; ``build_margin("cosface", s=64, m3=0.35)`` validates name and fields through the same
model first (the defaults live in the models only). ``reference_markdown()`` is the README's
table of heads and auxiliary losses (``python docs/update_readme.py`` writes it there).
"""

from __future__ import annotations

import textwrap
import typing
from difflib import get_close_matches
from typing import Annotated, Any

from pydantic import Field, TypeAdapter, ValidationError

# Imported for their @register_head decorators (and the heads they define).
from partialfc import adaptive_heads, heads, negative_heads  # noqa: F401
from partialfc.aux_losses import AuxLoss
from partialfc.head_configs import ArcFaceConfig, HeadConfig
from partialfc.margins import MarginHead
from partialfc.specs import (
    AuxLossConfig,
    aux_loss_entry,
    describe_errors,
    head_entry,
    registered_aux_losses,
    registered_heads,
)

__all__ = [
    "ALIASES",
    "MarginConfig",
    "aux_loss_names",
    "aux_losses_markdown",
    "build_aux_loss",
    "build_margin",
    "default_margin",
    "describe_head",
    "head_fields",
    "heads_markdown",
    "margin_config",
    "margin_defaults",
    "margin_names",
    "reference_markdown",
    "unknown_head_message",
]

MarginConfig = Annotated[
    typing.Union[tuple(entry.config for entry in registered_heads())],  # noqa: UP007
    Field(discriminator="name"),
]
"""Any registered head's config, told apart by its ``name``."""

ALIASES: dict[str, str] = {
    alias: entry.name for entry in registered_heads() for alias in entry.aliases
}
"""Alias -> head name (``am_softmax`` -> ``cosface``), from the models' ``name`` literals."""

_ADAPTER: TypeAdapter[Any] = TypeAdapter(MarginConfig)


def default_margin() -> HeadConfig:
    """The default head of a run config: ArcFace with its published defaults."""
    return ArcFaceConfig()


def margin_names() -> list[str]:
    """Every registered head name and alias, sorted."""
    return sorted(name for entry in registered_heads() for name in (entry.name, *entry.aliases))


def unknown_head_message(name: object) -> str:
    """``unknown margin head 'arcfce' (did you mean 'arcface'?); known: ...``."""
    names = margin_names()
    close = get_close_matches(str(name), names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown margin head {name!r}{hint}; known: {', '.join(names)}"


def head_fields(config: type[HeadConfig]) -> dict[str, Any]:
    """A head model's fields -> default (``"required"`` when it has none), without name and
    aux: ``s`` first, then the head's own fields, then the ones its family shares (eps, ...)."""
    order: list[str] = ["s"] if "s" in config.model_fields else []
    for klass in config.__mro__:  # most derived first
        for key in getattr(klass, "__annotations__", {}):
            if key in config.model_fields and key not in order and key not in ("name", "aux"):
                order.append(key)
    out: dict[str, Any] = {}
    for key in order:
        field = config.model_fields[key]
        out[key] = "required" if field.is_required() else field.default
    return out


def margin_defaults(name: str) -> dict[str, Any]:
    """The defaults of head ``name`` (or an alias) from its model; required fields left out."""
    entry = head_entry(name)
    if entry is None:
        raise ValueError(unknown_head_message(name))
    return {k: v for k, v in head_fields(entry.config).items() if v != "required"}


def margin_config(name: str, **fields: Any) -> HeadConfig:
    """Validate ``{name, **fields}`` through the head's model (its defaults fill the rest).

    Raises:
        ValueError: unknown name (did-you-mean and the known names), or a bad, missing or
            unknown field, named (``margin 'arcface': m2: Input should be less than 3.14...``).
    """
    if head_entry(name) is None:
        raise ValueError(unknown_head_message(name))
    try:
        return _ADAPTER.validate_python({"name": name, **fields})
    except ValidationError as exc:
        # The union puts the tag first in each location; the head is named in front instead.
        raise ValueError(f"margin {name!r}: {describe_errors(exc, skip=1)}") from None


def build_margin(config: HeadConfig | str, **fields: Any) -> MarginHead:
    """The head of a validated config, with its auxiliary losses attached; or, given a name,
    the head of ``margin_config(name, **fields)``.

    Raises:
        ValueError: as ``margin_config``; a config that is not a registered head's.
    """
    if isinstance(config, str):
        config = margin_config(config, **fields)
    elif fields:
        raise ValueError("build_margin: give a config or a name with fields, not both")
    entry = head_entry(config.name)
    if entry is None or type(config) is not entry.config:
        raise ValueError(f"{type(config).__name__} is not a registered head config")
    head = entry.head(config)
    for aux_name, aux in config.aux_configs().items():
        head.add_aux_loss(aux_name, build_aux_loss(aux), aux.weight)
    return head


def aux_loss_names() -> list[str]:
    """Names of the registered auxiliary losses (the keys of ``aux``), sorted."""
    return [entry.name for entry in registered_aux_losses()]


def build_aux_loss(config: AuxLossConfig | str, **kwargs: Any) -> AuxLoss:
    """Build an auxiliary loss from its config, or from a name and the config's fields
    (validated by the model; its defaults apply). ``weight`` is the caller's business
    (``MarginHead.add_aux_loss``).

    Raises:
        ValueError: unknown name (the known ones listed), or a bad field (named).
    """
    if isinstance(config, str):
        entry = aux_loss_entry(config)
        if entry is None:
            raise ValueError(f"unknown auxiliary loss {config!r}; known: {aux_loss_names()}")
        try:
            config = entry.config.model_validate(kwargs)
        except ValidationError as exc:
            raise ValueError(f"auxiliary loss {entry.name!r}: {describe_errors(exc)}") from None
    elif kwargs:
        raise ValueError("build_aux_loss: give a config or a name with fields, not both")
    for entry in registered_aux_losses():
        if type(config) is entry.config:
            return entry.loss(config)
    raise ValueError(f"{type(config).__name__} is not a registered auxiliary loss config")


def _text(doc: str | None) -> str:
    """A docstring on one line."""
    return " ".join((doc or "").split())


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds(config: type[HeadConfig], key: str) -> str:
    """``> 0, < 3.14159`` from a field's Field(gt=..., lt=...) constraints."""
    out = []
    for meta in config.model_fields[key].metadata:
        for attr, sign in _BOUNDS.items():
            if getattr(meta, attr, None) is not None:
                out.append(f"{sign} {getattr(meta, attr):g}")
    return ", ".join(out)


def _value(value: Any) -> str:
    """A default as YAML writes it (true, null, auto); a required field as ``required``."""
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else str(value)


def heads_markdown() -> str:
    """The README's table of heads: name (aliases), what it is, its fields with defaults."""
    rows = ["| head | what | fields (default) |", "| --- | --- | --- |"]
    for entry in registered_heads():
        names = f"`{entry.name}`" + "".join(f" / `{a}`" for a in entry.aliases)
        fields = ", ".join(f"{k}={_value(v)}" for k, v in head_fields(entry.config).items())
        rows.append(f"| {names} | {_text(entry.config.__doc__)} | {fields or '-'} |")
    return "\n".join(rows)


def aux_losses_markdown() -> str:
    """The README's table of auxiliary losses: name, what it is, its fields with defaults."""
    rows = ["| aux loss | what | fields (default) |", "| --- | --- | --- |"]
    for entry in registered_aux_losses():
        fields = ", ".join(f"{k}={_value(f.default)}" for k, f in entry.config.model_fields.items())
        rows.append(f"| `{entry.name}` | {_text(entry.config.__doc__)} | {fields} |")
    return "\n".join(rows)


def reference_markdown() -> str:
    """Both tables, as the README carries them between its ``heads`` markers."""
    return f"{heads_markdown()}\n\n{aux_losses_markdown()}"


def describe_head(name: str) -> str:
    """A head's fields, each with its default, bounds and docstring (``facetrain heads NAME``)."""
    entry = head_entry(name)
    if entry is None:
        raise ValueError(unknown_head_message(name))
    lines = [f"{entry.name}: {_text(entry.config.__doc__)}"]
    if entry.aliases:
        lines.append(f"  aliases: {', '.join(entry.aliases)}")
    for key, default in head_fields(entry.config).items():
        bounds = _bounds(entry.config, key)
        lines.append(f"  {key} = {_value(default)}{'  (' + bounds + ')' if bounds else ''}")
        doc = _text(entry.config.model_fields[key].description)
        lines.append(textwrap.fill(doc, 96, initial_indent=" " * 6, subsequent_indent=" " * 6))
    lines.append(f"  aux = {{}}  auxiliary losses by name: {', '.join(aux_loss_names())}")
    return "\n".join(lines)
