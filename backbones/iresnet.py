"""IResNet ("improved ResNet") face-embedding backbones, as used by insightface arcface_torch.

The architecture and the parameter names follow insightface's ``backbones/iresnet.py`` so that
published arcface_torch checkpoints load with ``strict=True``::

    conv1 (3x3, stride 1) -> bn1 -> prelu                      # [B, w0, H, W]
    layer1..layer4: IBasicBlock stages, first block stride 2   # [B, w3, H/16, W/16]
    bn2 -> flatten -> dropout -> fc -> features (BatchNorm1d)  # [B, embedding_size]

An IBasicBlock is the pre-activation-style residual block of the ArcFace paper:
``bn1 -> conv1 3x3 -> bn2 -> prelu -> conv2 3x3 (stride s) -> bn3`` plus an identity (or
``downsample`` = conv1x1 stride s + BN when the shape changes). Unlike torchvision's ResNet the
stem keeps full resolution (face crops are only 112x112) and every stage halves it.

Differences from insightface, all behaviour-preserving for the default arguments:

* ``input_size`` is configurable; the ``fc`` input size follows it instead of being 7*7.
* widths are configurable (``widths``/``width_mult``) so a CPU demo model can be tiny.
* activation checkpointing is a constructor argument instead of a module-level global.
* ``zero_init_residual`` zeroes each block's *last* BN (``bn3``) so that every block starts as
  the identity (Goyal et al., 2017); insightface zeroes ``bn2``, which silences the branch too
  but also blocks the gradient of ``conv1``/``bn1`` in the first steps.
* the fp32 head (``fc`` + ``features`` run outside autocast) is kept, but keyed on whether
  autocast is active rather than on an ``fp16`` flag, so the trainer owns mixed precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from backbones.common import autocast_active
from backbones.registry import register_backbone

__all__ = [
    "IBasicBlock",
    "IResNet",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
    "iresnet_nano",
]

DEFAULT_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)
NANO_WIDTHS: tuple[int, int, int, int] = (16, 24, 48, 96)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BN always follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution used by the downsample shortcut, no bias (a BN follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _downsampled(size: int) -> int:
    """Output length of a stride-2 conv with kernel 3/padding 1 (or kernel 1/padding 0)."""
    return (size - 1) // 2 + 1


class IBasicBlock(nn.Module):
    """``bn1 -> conv1 -> bn2 -> prelu -> conv2(stride) -> bn3`` plus shortcut.

    The stride sits on ``conv2`` (as in insightface), so ``conv1`` runs at the input resolution.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=bn_eps, momentum=bn_momentum)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=bn_eps, momentum=bn_momentum)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=bn_eps, momentum=bn_momentum)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, inplanes, H, W] -> [B, planes, H/stride, W/stride]."""
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """The insightface IResNet with configurable depth, widths, input size and embedding size.

    Args:
        layers: number of IBasicBlocks in each of the 4 stages, e.g. ``(3, 4, 14, 3)`` for r50.
        embedding_size: output dimension (``fc`` out features; insightface ``num_features``).
        dropout: dropout probability on the flattened feature map before ``fc`` (insightface
            uses 0 for most recipes and 0.4 for some small datasets).
        input_size: input height/width (int for square) the ``fc`` layer is sized for. Each
            stage halves the resolution (rounding up), so 112 -> 7x7 and 128 -> 8x8.
        widths: channels of the four stages; ``widths[0]`` is also the stem's width.
        width_mult: multiplier applied to ``widths`` (rounded, at least 1 channel).
        zero_init_residual: zero every block's ``bn3`` weight so blocks start as identities.
        activation_checkpointing: recompute each block in backward instead of storing its
            activations (``torch.utils.checkpoint``); only active in training mode with grad on.
        bn_eps: BatchNorm epsilon (insightface: 1e-5).
        bn_momentum: BatchNorm running-stat momentum (insightface: PyTorch default 0.1).
        conv_init_std: std of the normal init of every conv weight (insightface: 0.1).
        head_fp32: when autocast is active, run ``fc`` and ``features`` in fp32 as insightface
            does; the huge ``fc`` reduction is where fp16 loses most precision.
        stem_stride: stride of the stem conv (insightface: 1). 2 quarters the cost of the
            first stage, which dominates small models; the CPU demo model uses it.
    """

    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int | Sequence[int] = 112,
        widths: Sequence[int] = DEFAULT_WIDTHS,
        width_mult: float = 1.0,
        zero_init_residual: bool = False,
        activation_checkpointing: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
        conv_init_std: float = 0.1,
        head_fp32: bool = True,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {layers!r}")
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be 4 positive channel counts, got {tuple(widths)!r}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult!r}")
        if embedding_size < 1:
            raise ValueError(f"embedding_size must be >= 1, got {embedding_size!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"input_size must be a positive int or (H, W), got {input_size!r}")
        height, width = size

        stage_widths = tuple(max(1, round(w * width_mult)) for w in widths)
        self.layers_cfg = layers
        self.widths = stage_widths
        self.input_size: tuple[int, int] = (int(height), int(width))
        self.embedding_size = int(embedding_size)
        self.activation_checkpointing = activation_checkpointing
        self.head_fp32 = head_fp32

        bn = {"eps": bn_eps, "momentum": bn_momentum}
        self.conv1 = nn.Conv2d(
            3, stage_widths[0], kernel_size=3, stride=stem_stride, padding=1, bias=False
        )
        self.bn1 = nn.BatchNorm2d(stage_widths[0], **bn)
        self.prelu = nn.PReLU(stage_widths[0])
        inplanes = stage_widths[0]
        stages = []
        for planes, blocks in zip(stage_widths, layers, strict=True):
            stages.append(self._make_layer(inplanes, planes, blocks, bn_eps, bn_momentum))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        out_h, out_w = height, width
        for _ in range(4 + (stem_stride == 2)):
            out_h, out_w = _downsampled(out_h), _downsampled(out_w)
        self.feature_map_size: tuple[int, int] = (out_h, out_w)
        self.bn2 = nn.BatchNorm2d(stage_widths[3], **bn)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(stage_widths[3] * out_h * out_w, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, **bn)
        self._init_weights(conv_init_std, zero_init_residual)

    @staticmethod
    def _make_layer(
        inplanes: int, planes: int, blocks: int, bn_eps: float, bn_momentum: float
    ) -> nn.Sequential:
        """One stage: a stride-2 block with a conv1x1+BN shortcut, then ``blocks - 1`` blocks."""
        # Every stage halves the resolution, so the first block always needs a projection.
        downsample = nn.Sequential(
            _conv1x1(inplanes, planes, stride=2),
            nn.BatchNorm2d(planes, eps=bn_eps, momentum=bn_momentum),
        )
        stage = [IBasicBlock(inplanes, planes, 2, downsample, bn_eps, bn_momentum)]
        stage += [
            IBasicBlock(planes, planes, 1, None, bn_eps, bn_momentum) for _ in range(blocks - 1)
        ]
        return nn.Sequential(*stage)

    def _init_weights(self, conv_init_std: float, zero_init_residual: bool) -> None:
        """insightface init: N(0, std) convs, BN = identity, frozen unit ``features`` scale."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, conv_init_std)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The embedding BN keeps a fixed unit scale (insightface): only its shift is learnt, so
        # the embedding norm is not a free parameter of the last layer.
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad = False
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            for block in stage:
                x = checkpoint(block, x, use_reentrant=False)
            return x
        return stage(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] float (normalised to about [-1, 1]) -> embeddings [B, embedding_size].

        The embeddings are not L2-normalised: the margin heads and evaluation normalise, and
        some heads (AdaFace, MagFace) need the norm.
        """
        # Skipped under the legacy ONNX tracer, where shapes are traced values, not ints.
        if not torch.jit.is_tracing() and (
            x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != self.input_size
        ):
            raise ValueError(
                f"IResNet expects input of shape [B, 3, {self.input_size[0]}, "
                f"{self.input_size[1]}] (input_size), got {tuple(x.shape)}"
            )
        x = self.prelu(self.bn1(self.conv1(x)))  # [B, w0, H, W]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._run_stage(stage, x)  # [B, w3, H/16, W/16] after layer4
        x = self.bn2(x)
        x = torch.flatten(x, 1)  # [B, w3 * h * w]
        x = self.dropout(x)
        if self.head_fp32 and autocast_active(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self.features(self.fc(x.float()))  # [B, D] fp32
        return self.features(self.fc(x))  # [B, D]


def _iresnet(layers: tuple[int, int, int, int], kwargs: dict[str, Any]) -> IResNet:
    if "layers" in kwargs:
        raise ValueError("a named iresnet fixes 'layers'; build IResNet directly to change it")
    return IResNet(layers=layers, **kwargs)


@register_backbone("iresnet18", "r18")
def iresnet18(**kwargs: Any) -> IResNet:
    """IResNet-18: blocks (2, 2, 2, 2). ``kwargs`` go to :class:`IResNet`."""
    return _iresnet((2, 2, 2, 2), kwargs)


@register_backbone("iresnet34", "r34")
def iresnet34(**kwargs: Any) -> IResNet:
    """IResNet-34: blocks (3, 4, 6, 3). ``kwargs`` go to :class:`IResNet`."""
    return _iresnet((3, 4, 6, 3), kwargs)


@register_backbone("iresnet50", "r50")
def iresnet50(**kwargs: Any) -> IResNet:
    """IResNet-50: blocks (3, 4, 14, 3). ``kwargs`` go to :class:`IResNet`."""
    return _iresnet((3, 4, 14, 3), kwargs)


@register_backbone("iresnet100", "r100")
def iresnet100(**kwargs: Any) -> IResNet:
    """IResNet-100: blocks (3, 13, 30, 3). ``kwargs`` go to :class:`IResNet`."""
    return _iresnet((3, 13, 30, 3), kwargs)


@register_backbone("iresnet200", "r200")
def iresnet200(**kwargs: Any) -> IResNet:
    """IResNet-200: blocks (6, 26, 60, 6). ``kwargs`` go to :class:`IResNet`."""
    return _iresnet((6, 26, 60, 6), kwargs)


@register_backbone("iresnet_nano")
def iresnet_nano(**kwargs: Any) -> IResNet:
    """CPU-demo IResNet: one block per stage, widths (16, 24, 48, 96), a stride-2 stem and a
    128-d embedding (about 8 ms per image forward+backward on one CPU thread).

    Same block structure and parameter naming as the full models, so every code path
    (checkpoints, ONNX export, evaluation) is exercised by the demo. ``kwargs`` go to
    :class:`IResNet` and may override the defaults.
    """
    kwargs.setdefault("widths", NANO_WIDTHS)
    kwargs.setdefault("stem_stride", 2)
    kwargs.setdefault("embedding_size", 128)
    return _iresnet((1, 1, 1, 1), kwargs)
