"""MobileFaceNet (Chen et al., 2018), insightface arcface_torch's ``mbf`` and ``mbf_large``.

A small, phone-sized face embedder: a stride-2 stem, depth-wise separable inverted bottlenecks
(1x1 expand -> 3x3 depth-wise -> 1x1 linear projection) and, instead of global average pooling,
a *global depth-wise convolution* (GDC) whose kernel covers the whole final feature map, so each
spatial position keeps its own learnt weight (the centre of a face matters more than a corner)::

    layers[0]  ConvBlock 3x3 s2                        # [B, 64*scale, H/2, W/2]
    layers[1]  grouped ConvBlock 3x3 (or Residual)     # [B, 64*scale, H/2, W/2]
    layers[2]  DepthWise s2, layers[3] Residual        # [B, 64*scale, H/4, W/4]
    layers[4]  DepthWise s2, layers[5] Residual        # [B, 128*scale, H/8, W/8]
    layers[6]  DepthWise s2, layers[7] Residual        # [B, 128*scale, H/16, W/16]
    conv_sep   ConvBlock 1x1                           # [B, 512, H/16, W/16]
    features   GDC: depth-wise HxW conv + BN -> flatten -> Linear (no bias) -> BatchNorm1d

The module tree and parameter names follow insightface's ``backbones/mobilefacenet.py`` (every
block keeps its sub-layers in a ``layers`` Sequential), so its ``mbf`` checkpoints load with
``strict=True``. The expansion widths (``groups`` of each DepthWise: 128, 128, 256, 512 and 256
for the residual stages) are insightface's constants and do not follow ``scale``; the second
stem layer is a 3x3 conv with 64 groups when ``blocks[0] == 1`` and a Residual stage otherwise,
also as in insightface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from backbones.common import as_pair, autocast_active
from backbones.registry import register_backbone
from common.checks import check_int

__all__ = [
    "MobileFaceNet",
    "mobilefacenet",
    "mobilefacenet_large",
]

MBF_BLOCKS: tuple[int, int, int, int] = (1, 4, 6, 2)
MBF_LARGE_BLOCKS: tuple[int, int, int, int] = (2, 8, 12, 4)
GDC_CHANNELS = 512  # conv_sep output / GDC width, fixed in insightface


class ConvBlock(nn.Module):
    """conv (no bias) -> BN -> PReLU; ``layers`` = [conv, bn, prelu] (insightface names).
    Without ``activation`` the PReLU is left out."""

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: int | tuple[int, int] = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bn: dict[str, float] | None = None,
        activation: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c, **(bn or {})),
        ]
        if activation:
            layers.append(nn.PReLU(out_c))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(ConvBlock):
    """conv (no bias) -> BN, no activation: the linear bottleneck projection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, activation=False, **kwargs)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``groups`` -> 3x3 depth-wise (stride) -> 1x1 linear.

    With ``residual`` the input is added back (only valid for stride 1 and ``in_c == out_c``).
    """

    def __init__(
        self,
        in_c: int,
        out_c: int,
        residual: bool,
        stride: int,
        groups: int,
        bn: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if residual and (stride != 1 or in_c != out_c):
            raise ValueError(f"a residual DepthWise needs stride 1 and in_c == out_c, got {in_c}")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups, 1, 1, 0, bn=bn),  # [B, g, H, W]
            ConvBlock(groups, groups, 3, stride, 1, groups=groups, bn=bn),  # [B, g, H/s, W/s]
            LinearBlock(groups, out_c, 1, 1, 0, bn=bn),  # [B, out_c, H/s, W/s]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` residual DepthWise blocks at constant width and resolution."""

    def __init__(
        self, c: int, num_block: int, groups: int, bn: dict[str, float] | None = None
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *[DepthWise(c, c, True, 1, groups, bn=bn) for _ in range(num_block)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depth-wise conv over the whole map -> flatten -> Linear (no bias) -> BN1d."""

    def __init__(
        self, channels: int, fmap: tuple[int, int], embedding_size: int, bn: dict[str, float]
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, fmap, 1, 0, groups=channels, bn=bn),  # [B, C, 1, 1]
            nn.Flatten(1),  # [B, C]
            nn.Linear(channels, embedding_size, bias=False),  # [B, D]
            nn.BatchNorm1d(embedding_size, **bn),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """insightface MobileFaceNet with configurable embedding size, input size and width.

    Args:
        embedding_size: output dimension (insightface ``num_features``).
        blocks: residual blocks in the four stages; ``(1, 4, 6, 2)`` is ``mbf``,
            ``(2, 8, 12, 4)`` with ``scale=4`` is ``mbf_large``.
        scale: width multiplier of the 64/128-channel trunk (insightface: 2; large: 4).
        input_size: input height/width; the GDC kernel is the final feature map (7x7 at 112).
        activation_checkpointing: recompute each entry of ``layers`` in backward instead of
            storing its activations (training mode with grad on only).
        bn_eps: BatchNorm epsilon (insightface: PyTorch default 1e-5).
        bn_momentum: BatchNorm running-stat momentum (insightface: PyTorch default 0.1).
        head_fp32: under autocast, run ``conv_sep`` and the GDC head in fp32 (insightface does).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        blocks: Sequence[int] = MBF_BLOCKS,
        scale: int = 2,
        input_size: int | Sequence[int] = 112,
        activation_checkpointing: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        head_fp32: bool = True,
    ) -> None:
        super().__init__()
        blocks = tuple(int(b) for b in blocks)
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be 4 positive block counts, got {blocks!r}")
        scale = check_int("scale", scale, minimum=1)
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size!r}")
        height, width = as_pair(input_size, "input_size")
        fmap = (height, width)
        for _ in range(4):  # stem and three DepthWise stages, each stride 2 (kernel 3, pad 1)
            fmap = ((fmap[0] - 1) // 2 + 1, (fmap[1] - 1) // 2 + 1)
        self.input_size: tuple[int, int] = (height, width)
        self.feature_map_size: tuple[int, int] = fmap
        self.embedding_size = int(embedding_size)
        self.blocks_cfg = blocks
        self.scale = scale
        self.activation_checkpointing = activation_checkpointing
        self.head_fp32 = head_fp32

        bn = {"eps": bn_eps, "momentum": bn_momentum}
        c64, c128 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c64, 3, 2, 1, bn=bn)])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c64, c64, 3, 1, 1, groups=64, bn=bn))
        else:
            self.layers.append(Residual(c64, blocks[0], groups=128, bn=bn))
        self.layers.extend(
            [
                DepthWise(c64, c64, False, 2, groups=128, bn=bn),
                Residual(c64, blocks[1], groups=128, bn=bn),
                DepthWise(c64, c128, False, 2, groups=256, bn=bn),
                Residual(c128, blocks[2], groups=256, bn=bn),
                DepthWise(c128, c128, False, 2, groups=512, bn=bn),
                Residual(c128, blocks[3], groups=256, bn=bn),
            ]
        )
        self.conv_sep = ConvBlock(c128, GDC_CHANNELS, 1, 1, 0, bn=bn)
        self.features = GDC(GDC_CHANNELS, fmap, embedding_size, bn)
        self._init_weights()

    def _init_weights(self) -> None:
        """insightface init: Kaiming-normal (fan_out) convs and linears, BN = identity."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] normalised pixels -> embeddings [B, embedding_size] (not normalised)."""
        if not torch.jit.is_tracing() and (
            x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != self.input_size
        ):
            raise ValueError(
                f"MobileFaceNet expects input of shape [B, 3, {self.input_size[0]}, "
                f"{self.input_size[1]}] (input_size), got {tuple(x.shape)}"
            )
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        # [B, 128*scale, H/16, W/16]
        if self.head_fp32 and autocast_active(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.features(self.conv_sep(x.float()))  # [B, D] fp32
        return self.features(self.conv_sep(x))  # [B, D]


def _mbf(blocks: tuple[int, int, int, int], scale: int, kwargs: dict[str, Any]) -> MobileFaceNet:
    kwargs.setdefault("blocks", blocks)
    kwargs.setdefault("scale", scale)
    return MobileFaceNet(**kwargs)


@register_backbone("mobilefacenet", "mbf")
def mobilefacenet(**kwargs: Any) -> MobileFaceNet:
    """insightface ``mbf``: blocks (1, 4, 6, 2), scale 2. ``kwargs`` go to MobileFaceNet."""
    return _mbf(MBF_BLOCKS, 2, kwargs)


@register_backbone("mobilefacenet_large", "mbf_large")
def mobilefacenet_large(**kwargs: Any) -> MobileFaceNet:
    """insightface ``mbf_large``: blocks (2, 8, 12, 4), scale 4. ``kwargs`` go to MobileFaceNet."""
    return _mbf(MBF_LARGE_BLOCKS, 4, kwargs)
