"""Face-embedding backbones, built by name through a registry.

Importing this package imports every backbone module so that their ``@register_backbone``
decorators run; nothing else happens at import time.
"""

from backbones import iresnet  # noqa: F401  (imported for its registrations)
from backbones.iresnet import IBasicBlock, IResNet
from backbones.registry import (
    create_backbone,
    list_backbones,
    register_backbone,
    resolve_backbone_name,
)

__all__ = [
    "IBasicBlock",
    "IResNet",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "resolve_backbone_name",
]
