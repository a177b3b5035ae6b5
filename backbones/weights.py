"""Backbone weights from a file, checked key by key against the model they go into.

The backbones keep insightface's parameter names, so the weights arcface_torch users download
(``torch.save(backbone.state_dict(), path)``) load into them with ``strict=True`` (see
tests/test_backbones*.py). This module reads such a file in the forms it comes in -- a plain
state_dict (a facetrain checkpoint's ``backbone.pt`` is one), arcface_torch's resume file
``checkpoint_gpu_{rank}.pt`` (its ``state_dict_backbone``), keys with the ``module.`` prefix
of a DDP-wrapped model -- and, where the file does not fit, says so in one line naming the
file, the first key that differs and both shapes (:class:`WeightsError`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["WeightsError", "check_state_dict", "load_weights", "read_state_dict"]

_WRAPPED = "state_dict_backbone"  # arcface_torch's checkpoint_gpu_{rank}.pt
_DDP_PREFIX = "module."


class WeightsError(ValueError):
    """A weights file cannot be read or does not fit the model; the message names the file,
    and for a misfit the first differing key with both shapes."""


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The backbone state_dict held by ``path`` (on the CPU; tensors and containers only)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or holding arbitrary objects
        raise WeightsError(f"{path}: cannot read a torch.save'd state_dict: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get(_WRAPPED), dict):
        obj = obj[_WRAPPED]
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    ):
        raise WeightsError(
            f"{path}: not a backbone state_dict (a mapping of parameter names to tensors, "
            "as torch.save(backbone.state_dict(), path) writes)"
        )
    if all(k.startswith(_DDP_PREFIX) for k in obj):
        obj = {k[len(_DDP_PREFIX) :]: v for k, v in obj.items()}
    return dict(obj)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _first_difference(model: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str:
    """The first of the model's keys (in its order) that the file lacks or shapes otherwise,
    else the first key of the file the model does not have; "" when they agree."""
    for key, tensor in model.items():
        if key not in found:
            return f"key {key} {_shape(tensor)} of the model is not in the file"
        if _shape(found[key]) != _shape(tensor):
            return f"key {key} is {_shape(found[key])} in the file, {_shape(tensor)} in the model"
    for key, tensor in found.items():
        if key not in model:
            return f"key {key} {_shape(tensor)} of the file is not in the model"
    return ""


def check_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, path: str | os.PathLike[str], what: str
) -> None:
    """WeightsError unless ``state`` has exactly ``model``'s keys and shapes. ``model`` may
    live on the meta device (shapes only); ``what`` names it, e.g. "iresnet50 (embedding
    512)"."""
    problem = _first_difference(model.state_dict(), state)
    if problem:
        raise WeightsError(f"{path}: does not fit {what}: {problem}")


def load_weights(model: nn.Module, path: str | os.PathLike[str], what: str) -> int:
    """Read ``path``, check it against ``model`` and load it (strictly); the tensor count."""
    state = read_state_dict(path)
    check_state_dict(state, model, path, what)
    model.load_state_dict(state, strict=True)
    return len(state)
