"""Parameter counts and FLOPs of registered backbones, without allocating their weights.

Models are built and run on PyTorch's ``meta`` device: tensors have shapes but no storage, so
even ViT-L (256M parameters) is profiled in about a second and no memory. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matrix products, attention), which
counts a multiply-add as 2 FLOPs. Face-recognition papers and the insightface model zoo quote
*multiply-adds* and call them "GFLOPs" (r50: 6.3G, r100: 12.1G); :func:`profile_backbone`
reports both, and the docs table uses the insightface convention so the numbers compare.

The same meta-device run measures what a training step keeps for backward
(:func:`training_footprint`): the bytes of every tensor autograd saves in one forward pass at
a given batch size, which is what the activations of a step cost (the memory planner,
``trainer.memory_plan``, uses it).

``python -m backbones.profile`` prints the Markdown table kept in docs/backbones.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from backbones.common import as_pair
from backbones.registry import create_backbone, list_backbones, resolve_backbone_name

__all__ = [
    "BackboneProfile",
    "TrainingFootprint",
    "count_flops",
    "format_table",
    "profile_backbone",
    "training_footprint",
    "main",
]


@dataclass(frozen=True)
class BackboneProfile:
    """Size and cost of one backbone for one input size (batch 1, eval mode)."""

    name: str
    params: int
    """All parameters, trainable or not."""
    trainable_params: int
    flops: int
    """FLOPs of one forward pass of one image (multiply-add = 2)."""
    embedding_size: int
    input_size: tuple[int, int]

    @property
    def gmacs(self) -> float:
        """Multiply-adds in units of 1e9: the "GFLOPs" of the insightface model zoo."""
        return self.flops / 2e9


def count_flops(model: nn.Module, input_size: int | Sequence[int], device: str = "meta") -> int:
    """FLOPs (multiply-add = 2) of ``model`` on one [1, 3, H, W] input, in eval mode.

    The model's train/eval flags are restored afterwards. ``model`` must live on ``device``.
    """
    h, w = as_pair(input_size, "input_size")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, 3, h, w, device=device))
    finally:
        for module, was_training in modes:
            module.training = was_training
    return int(counter.get_total_flops())


def profile_backbone(
    name: str, input_size: int | Sequence[int] = 112, **kwargs: Any
) -> BackboneProfile:
    """Build ``name`` (with ``kwargs``) on the meta device and count its parameters and FLOPs."""
    size = as_pair(input_size, "input_size")
    with torch.device("meta"):
        model = create_backbone(name, input_size=size, **kwargs)
        flops = count_flops(model, size)
    out_features = getattr(model, "embedding_size", None)
    return BackboneProfile(
        name=resolve_backbone_name(name),
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        flops=flops,
        embedding_size=int(out_features) if out_features is not None else -1,
        input_size=size,
    )


@dataclass(frozen=True)
class TrainingFootprint:
    """A backbone's parameters and what one training forward keeps for backward."""

    params: int
    trainable_params: int
    activation_bytes: int
    """Every distinct tensor autograd saves (inputs of convolutions, normalisations,
    activations...), the parameters themselves not counted."""
    largest_activation_bytes: int
    """The largest of them: about the size of the gradients in flight during backward."""
    activation_sizes: tuple[int, ...]
    """Each saved tensor's bytes, largest first (``activation_bytes`` is their sum)."""


def training_footprint(
    name: str,
    batch: int,
    input_size: int | Sequence[int] = 112,
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
) -> TrainingFootprint:
    """Parameters of ``name`` and the tensors it saves for backward in one training forward
    of ``batch`` images.

    The model runs in train mode on the meta device (shapes only: any batch size costs the
    same, a second or two) under ``torch.autograd.graph.saved_tensors_hooks``, which sees
    every tensor autograd keeps; tensors sharing a storage are counted once and the
    parameters not at all. ``dtype`` is the activations' dtype: float32, or bfloat16 /
    float16 for a run under autocast (the model is cast to it; autocast's weight copies are
    the caller's to count). A real CPU forward saves the same tensors; its resident growth
    is a few % more (temporaries).
    """
    size = as_pair(input_size, "input_size")
    with torch.device("meta"):
        model = create_backbone(name, input_size=size, **kwargs)
    params = list(model.parameters())
    model.to(dtype).train()
    own = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in own:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    images = torch.zeros(batch, 3, *size, device="meta", dtype=dtype)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images)
    sizes = tuple(sorted(saved.values(), reverse=True))
    return TrainingFootprint(
        params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        activation_bytes=sum(sizes),
        largest_activation_bytes=sizes[0] if sizes else 0,
        activation_sizes=sizes,
    )


def format_table(rows: Sequence[BackboneProfile], aliases: dict[str, list[str]]) -> str:
    """Markdown table: name (aliases), parameters (M), GFLOPs (multiply-adds), embedding."""
    lines = [
        "| backbone | aliases | params (M) | GFLOPs (multiply-adds) | embedding | input |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        alias = ", ".join(f"`{a}`" for a in aliases.get(r.name, [])) or "-"
        lines.append(
            f"| `{r.name}` | {alias} | {r.params / 1e6:.2f} | {r.gmacs:.3f} | "
            f"{r.embedding_size} | {r.input_size[0]}x{r.input_size[1]} |"
        )
    return "\n".join(lines)


def _aliases() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    canonical = set(list_backbones())
    for key in list_backbones(include_aliases=True):
        if key not in canonical:
            out.setdefault(resolve_backbone_name(key), []).append(key)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the params/GFLOPs table of every registered backbone (or the named ones)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="backbones (default: every registered one)")
    parser.add_argument("--input-size", type=int, default=112)
    args = parser.parse_args(argv)
    names = args.names or list_backbones()
    rows = [profile_backbone(n, args.input_size) for n in names]
    print(format_table(rows, _aliases()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
