"""Messages for an invalid config: each pydantic error as one line naming the dotted key.

A misspelled key gets the closest known key of its section (``did you mean``) or the list of
known keys; a wrong value gets the validator's message with the value given. Error locations
are walked from the root model, so the tags pydantic adds after a discriminated union (the
head name in ``partialfc.margin.cosface.s``) are dropped from the key shown.
"""

from __future__ import annotations

import typing
from difflib import get_close_matches
from typing import Any

from pydantic import BaseModel, ValidationError

from partialfc.registry import head_entry

__all__ = ["did_you_mean", "format_validation_errors"]


def did_you_mean(word: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices`` to ``word``, or ``""``."""
    close = get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field: its annotation, or the model in ``Model | None``."""
    options = [annotation, *typing.get_args(annotation)]
    models = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
    return models[0] if models else None


def _resolve(
    root: type[BaseModel], loc: tuple[int | str, ...]
) -> tuple[list[str], type[BaseModel] | None]:
    """Walk an error location from ``root`` (the ``Config`` model): the dotted path without
    the tags pydantic puts after a discriminated union (``partialfc.margin.cosface.s`` is
    ``partialfc.margin.s``), and the model of the section holding the last key (None if it
    is not a section)."""
    model: type[BaseModel] | None = root
    holder: type[BaseModel] | None = None
    path: list[str] = []
    i = 0
    while i < len(loc):
        part = str(loc[i])
        path.append(part)
        holder = model
        field = model.model_fields.get(part) if model is not None else None
        i += 1
        if field is None:
            model = None
        elif field.discriminator and i < len(loc):
            entry = head_entry(str(loc[i]))
            model = entry.config if entry is not None else None
            i += 1  # the tag
        else:
            model = _model_of(field.annotation)
    return path, holder


def _section_keys(root: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed where ``loc`` points (its parent section's fields), if that is a
    section of the config."""
    _, holder = _resolve(root, loc)
    return list(holder.model_fields) if holder is not None else []


def _describe(root: type[BaseModel], err: Any) -> str:
    path, _ = _resolve(root, err["loc"])
    key = ".".join(path) or "<root>"
    if err["type"] == "extra_forbidden":
        keys = _section_keys(root, err["loc"])
        hint = did_you_mean(str(err["loc"][-1]), keys)
        return f"{key}: unknown key{hint or '; known keys: ' + ', '.join(keys)}"
    # pydantic prefixes the message of a ValueError raised by a validator
    msg = err["msg"].removeprefix("Value error, ")
    if msg.startswith(key + "."):  # the validator named a deeper key itself
        return msg
    got = err.get("input")
    said = isinstance(got, str) and repr(got) in msg  # the validator named the value
    shown = "" if isinstance(got, dict) or said else f" (got {got!r})"
    return f"{key}: {msg}{shown}"


def format_validation_errors(source: str, exc: ValidationError, root: type[BaseModel]) -> str:
    """The errors of validating ``root`` from ``source``: one line for one error; a line per
    error under a heading for several."""
    problems = [_describe(root, err) for err in exc.errors()]
    if len(problems) == 1:
        return f"{source}: invalid config: {problems[0]}"
    return "\n  ".join([f"{source}: invalid config", *problems])
