"""Name -> builder registry for backbones.

Configs name a backbone by string (``"r50"``, ``"iresnet_nano"``); the trainer turns that
string into a module with :func:`create_backbone`. Builders register themselves with the
:func:`register_backbone` decorator when their module is imported (``backbones/__init__.py``
imports them), so adding an architecture never requires editing a central if/else chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

BackboneBuilder = Callable[..., nn.Module]
_BuilderT = TypeVar("_BuilderT", bound=BackboneBuilder)

# canonical name -> builder; alias -> canonical name. Filled only by the decorator, i.e. as a
# consequence of importing a module that defines backbones.
_BUILDERS: dict[str, BackboneBuilder] = {}
_ALIASES: dict[str, str] = {}


def register_backbone(name: str, *aliases: str) -> Callable[[_BuilderT], _BuilderT]:
    """Register ``fn(**kwargs) -> nn.Module`` under ``name`` and optional short ``aliases``.

    Registering a name or alias twice raises ``ValueError``: silently replacing a builder
    would make which architecture a config gets depend on import order.
    """
    all_names = (name, *aliases)
    for key in all_names:
        if not isinstance(key, str) or not key:
            raise ValueError(f"backbone names must be non-empty strings, got {key!r}")
    if len(set(all_names)) != len(all_names):
        raise ValueError(f"backbone {name!r} lists a name twice in {all_names!r}")

    def decorator(fn: _BuilderT) -> _BuilderT:
        for key in all_names:
            if key in _BUILDERS or key in _ALIASES:
                raise ValueError(f"backbone name {key!r} is already registered")
        _BUILDERS[name] = fn
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return decorator


def resolve_backbone_name(name: str) -> str:
    """Return the canonical registered name for ``name`` (which may be an alias)."""
    if name in _BUILDERS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    known = ", ".join(list_backbones(include_aliases=True))
    raise ValueError(f"unknown backbone {name!r}; known backbones: {known}")


def create_backbone(name: str, **kwargs: object) -> nn.Module:
    """Build the backbone registered as ``name`` (or alias), passing ``kwargs`` to its builder.

    Unknown names raise ``ValueError`` listing every known name, so a typo in a config is
    reported with the alternatives rather than as a ``KeyError``.
    """
    return _BUILDERS[resolve_backbone_name(name)](**kwargs)


def list_backbones(include_aliases: bool = False) -> list[str]:
    """Sorted canonical backbone names (plus aliases when ``include_aliases``)."""
    names = set(_BUILDERS)
    if include_aliases:
        names |= set(_ALIASES)
    return sorted(names)
