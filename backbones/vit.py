"""Vision Transformers for 112x112 faces, as trained by insightface arcface_torch (``vit_t`` ...).

Face ViTs differ from ImageNet ViTs in three ways that matter for verification accuracy:

* 9x9 patches on a 112x112 crop (12x12 = 144 tokens) instead of 16x16 on 224x224;
* no class token: the embedding head flattens *all* tokens (``[B, 144 * dim]``) and projects them
  with ``Linear -> BN -> Linear -> BN`` (the ``feature`` Sequential), so position-specific
  information is kept as it is by IResNet's flattened 7x7 map;
* optional random token masking during training (``mask_ratio``, insightface uses 0.1): a random
  subset of tokens skips the transformer, and a learnt ``mask_token`` takes their place before
  the head. A cheap regulariser (and 10% fewer tokens through the blocks).

The module tree and parameter names follow insightface's ``backbones/vit.py`` (with
``norm_layer="ln"``): ``patch_embed.proj``, ``pos_embed``, ``blocks.N.{norm1,attn.qkv,
attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``, ``feature.{0,1,2,3}``, ``mask_token``. The MLP
activation is ReLU6 and the qkv projection has no bias, as in insightface. Presets (insightface's
``get_model``): vit_t: dim 256, depth 12; vit_s: 512, 12; vit_b: 512, 24; vit_l: 768, 24; all
8 heads, drop path 0.1, mask ratio 0.1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from backbones.common import as_pair, autocast_active
from backbones.registry import register_backbone

__all__ = ["VisionTransformer", "vit_b", "vit_l", "vit_s", "vit_t"]

HEAD_BN_EPS = 2e-5  # insightface's embedding-head BatchNorm1d eps


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability ``p``.

    Survivors are scaled by ``1 / (1 - p)`` so the expected output is unchanged; identity in
    eval mode.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)  # [B, 1, 1]
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch x patch`` conv: [B, 3, H, W] -> tokens [B, L, dim]."""

    def __init__(self, input_size: tuple[int, int], patch_size: int, dim: int) -> None:
        super().__init__()
        self.grid = (input_size[0] // patch_size, input_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, L, dim]


class Attention(nn.Module):
    """Multi-head self-attention; softmax(QK^T / sqrt(d)) V via ``scaled_dot_product_attention``."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)  # [B,L,3,h,d/h]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, L, d/h]
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # [B, h, L, d/h]
        out = out.transpose(1, 2).reshape(b, n, d)  # [B, L, dim]
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """fc1 -> ReLU6 -> dropout -> fc2 -> dropout."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + DropPath(attn(LN(x))); x + DropPath(mlp(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """Face ViT (insightface layout) with configurable size, input size and embedding size.

    Args:
        embedding_size: output dimension (insightface ``num_classes`` of the ViT).
        dim: token width (insightface ``embed_dim``).
        depth: number of transformer blocks.
        num_heads: attention heads (``dim`` must be divisible by it).
        input_size: input height/width; tokens = (H // patch_size) * (W // patch_size).
        patch_size: side of the square patches (insightface: 9 for 112x112).
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias on the qkv projection (insightface: False).
        drop_rate: dropout after the position embedding, in the MLP and after attention.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block; block i uses
            ``drop_path_rate * i / (depth - 1)`` (linear rule, first block 0).
        mask_ratio: fraction of tokens randomly masked in training mode (0 disables).
        activation_checkpointing: recompute each block in backward (insightface's
            ``using_checkpoint``, on by default for vit_b and vit_l there).
        init_std: std of the truncated-normal init of linears, ``pos_embed`` and ``mask_token``.
        head_fp32: under autocast, run the final LayerNorm and the ``feature`` head in fp32
            (the ``[B, L*dim] -> dim`` reduction is where fp16 loses most precision).
    """

    def __init__(
        self,
        embedding_size: int = 512,
        dim: int = 256,
        depth: int = 12,
        num_heads: int = 8,
        input_size: int | Sequence[int] = 112,
        patch_size: int = 9,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        mask_ratio: float = 0.1,
        activation_checkpointing: bool = False,
        init_std: float = 0.02,
        head_fp32: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("embedding_size", embedding_size), ("dim", dim), ("depth", depth)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value!r}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads must divide dim={dim}, got num_heads={num_heads!r}")
        for name, value in (
            ("drop_rate", drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
            ("mask_ratio", mask_ratio),
        ):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        size = as_pair(input_size, "input_size")
        if patch_size < 1 or patch_size > min(size):
            raise ValueError(f"patch_size must be in [1, min(input_size)], got {patch_size!r}")
        self.input_size = size
        self.embedding_size = int(embedding_size)
        self.dim = int(dim)
        self.mask_ratio = float(mask_ratio)
        self.activation_checkpointing = activation_checkpointing
        self.head_fp32 = head_fp32

        self.patch_embed = PatchEmbed(size, patch_size, dim)
        self.num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, r) for r in rates
        )
        self.norm = nn.LayerNorm(dim)
        self.feature = nn.Sequential(
            nn.Linear(dim * self.num_patches, dim, bias=False),  # [B, dim]
            nn.BatchNorm1d(dim, eps=HEAD_BN_EPS),
            nn.Linear(dim, embedding_size, bias=False),  # [B, D]
            nn.BatchNorm1d(embedding_size, eps=HEAD_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self._init_weights(init_std)

    def _init_weights(self, std: float) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=std, a=-2 * std, b=2 * std)
        nn.init.trunc_normal_(self.mask_token, std=std, a=-2 * std, b=2 * std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _random_keep(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of each sample's tokens.

        Returns the kept tokens [B, K, dim] and ``restore`` [B, L]: the position in
        ``cat(kept, masked)`` of every original token, to undo the shuffle.
        """
        b, length, d = x.shape
        keep = max(1, int(length * (1.0 - self.mask_ratio)))
        order = torch.argsort(torch.rand(b, length, device=x.device), dim=1)  # [B, L]
        restore = torch.argsort(order, dim=1)  # [B, L]
        kept = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, d))  # [B, K, dim]
        return kept, restore

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 3, H, W] normalised pixels -> embeddings [B, embedding_size] (not normalised)."""
        if not torch.jit.is_tracing() and (
            x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != self.input_size
        ):
            raise ValueError(
                f"VisionTransformer expects input of shape [B, 3, {self.input_size[0]}, "
                f"{self.input_size[1]}] (input_size), got {tuple(x.shape)}"
            )
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)  # [B, L, dim]
        masking = self.training and self.mask_ratio > 0
        restore = None
        if masking:
            x, restore = self._random_keep(x)  # [B, K, dim]
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x)
        if self.head_fp32 and autocast_active(x.device.type):
            with torch.autocast(device_type=x.device.type, enabled=False):
                return self._head(x.float(), restore)  # [B, D] fp32
        return self._head(x, restore)  # [B, D]

    def _head(self, x: torch.Tensor, restore: torch.Tensor | None) -> torch.Tensor:
        """Final LayerNorm, mask-token refill (training with masking), flatten, ``feature``."""
        b = x.shape[0]
        x = self.norm(x)  # [B, K, dim]
        if restore is not None:
            fill = self.mask_token.expand(b, self.num_patches - x.shape[1], -1).to(x.dtype)
            x = torch.cat([x, fill], dim=1)  # [B, L, dim], shuffled order
            x = torch.gather(x, 1, restore[:, :, None].expand(-1, -1, x.shape[2]))  # [B, L, dim]
        return self.feature(x.reshape(b, self.num_patches * self.dim))  # [B, D]


_PRESETS: dict[str, dict[str, Any]] = {
    "vit_t": {"dim": 256, "depth": 12, "num_heads": 8},
    "vit_s": {"dim": 512, "depth": 12, "num_heads": 8},
    "vit_b": {"dim": 512, "depth": 24, "num_heads": 8},
    "vit_l": {"dim": 768, "depth": 24, "num_heads": 8},
}


def _vit(preset: str, kwargs: dict[str, Any]) -> VisionTransformer:
    return VisionTransformer(**{**_PRESETS[preset], **kwargs})


@register_backbone("vit_t", "vit_tiny")
def vit_t(**kwargs: Any) -> VisionTransformer:
    """insightface vit_t: dim 256, depth 12, 8 heads. ``kwargs`` go to VisionTransformer."""
    return _vit("vit_t", kwargs)


@register_backbone("vit_s", "vit_small")
def vit_s(**kwargs: Any) -> VisionTransformer:
    """insightface vit_s: dim 512, depth 12, 8 heads. ``kwargs`` go to VisionTransformer."""
    return _vit("vit_s", kwargs)


@register_backbone("vit_b", "vit_base")
def vit_b(**kwargs: Any) -> VisionTransformer:
    """insightface vit_b: dim 512, depth 24, 8 heads. ``kwargs`` go to VisionTransformer."""
    return _vit("vit_b", kwargs)


@register_backbone("vit_l", "vit_large")
def vit_l(**kwargs: Any) -> VisionTransformer:
    """insightface vit_l: dim 768, depth 24, 8 heads. ``kwargs`` go to VisionTransformer."""
    return _vit("vit_l", kwargs)
