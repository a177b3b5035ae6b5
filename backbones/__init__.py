"""Face-embedding backbones, built by name through a registry.

Importing this package imports every backbone module so that their ``@register_backbone``
decorators run; nothing else happens at import time.

Every builder takes ``embedding_size``, ``input_size`` (int or (H, W)) and
``activation_checkpointing`` keyword arguments, maps [B, 3, H, W] normalised pixels to
[B, embedding_size] un-normalised embeddings, and documents its other options.
"""

from backbones import iresnet, mobilefacenet, vit  # noqa: F401  (imported for registrations)
from backbones.iresnet import IBasicBlock, IResNet
from backbones.mobilefacenet import MobileFaceNet
from backbones.registry import (
    create_backbone,
    list_backbones,
    register_backbone,
    resolve_backbone_name,
)
from backbones.vit import VisionTransformer

__all__ = [
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "VisionTransformer",
    "create_backbone",
    "list_backbones",
    "register_backbone",
    "resolve_backbone_name",
]
