"""What a training loader is asked to do: one typed config shared by every loader kind.

A loader is built from a :class:`LoaderConfig` (the same on every rank) plus the facts of the
rank that runs it (rank, world size, device); see :func:`dataio.loaders.build_loader`. Options
only one kind of loader has are grouped in :class:`TorchOptions` and :class:`DaliOptions`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

from common.checks import check_int

PixelFormat = Literal["float32", "uint8"]

PIXEL_FORMATS: tuple[str, ...] = ("float32", "uint8")
"""What a loader yields: ``float32`` normalised pixels, or ``uint8`` pixels for
:func:`dataio.loading.to_model_input` to normalise on the training device."""


def check_pixels(value: object) -> str:
    """``value`` if it names a pixel format of :data:`PIXEL_FORMATS`, else ValueError."""
    if value not in PIXEL_FORMATS:
        raise ValueError(f"pixels must be one of {PIXEL_FORMATS}, got {value!r}")
    return str(value)


@dataclasses.dataclass(frozen=True)
class DaliAugment:
    """Optional colour augmentation in the DALI pipeline (factors drawn per sample).

    Each factor is drawn uniformly from ``[1 - x, 1 + x]``; 0 disables that jitter.
    """

    brightness: float = 0.2
    """Multiplicative brightness jitter."""
    contrast: float = 0.2
    """Contrast jitter around mid-grey."""
    saturation: float = 0.2
    """Saturation jitter (HSV)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"DaliAugment.{f.name} must be in [0, 1), got {v!r}")


@dataclasses.dataclass(frozen=True)
class TorchOptions:
    """Options of the PyTorch loader (:mod:`dataio.torch_loader`) alone."""

    max_replacements: int = 64
    """With ``skip_corrupt``: how many following images are tried in place of a corrupt one
    before the error is raised anyway."""
    reuse_buffers: bool = True
    """Workers decode into a few reused shared-memory batches (see :mod:`dataio.torch_loader`);
    False gives every batch fresh memory (for a consumer that passes batches to another
    process without cloning them)."""

    def __post_init__(self) -> None:
        check_int("max_replacements", self.max_replacements, minimum=1)


@dataclasses.dataclass(frozen=True)
class DaliOptions:
    """Options of the DALI loader (:mod:`dataio.dali_loader`) alone."""

    augment: DaliAugment | None = None
    """Colour jitter in the pipeline; None: none."""
    initial_fill: int = 32768
    """DALI's shuffle buffer in records (arcface_torch uses 32768; capped at the shard size)."""
    cache_dir: str | os.PathLike[str] | None = None
    """Where the image-only index goes (the trainer: ``RUN/cache`` or ``data.cache_dir``); None:
    ``~/.cache/facetrain`` (see :func:`dataio.dali_index.resolve_cache_dir`), never the pack's."""

    def __post_init__(self) -> None:
        check_int("initial_fill", self.initial_fill, minimum=1)


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How a training loader cuts and decodes the pack: the same on every rank."""

    batch_size: int
    """Images per batch on each rank."""
    seed: int = 0
    """Seed of the epoch's shuffle order and of the flips."""
    workers: int = 0
    """torch: decoding worker processes (0 decodes in the calling process); DALI: CPU threads
    (at least 1)."""
    flip: bool = True
    """Horizontal flip of about half the images, a new pattern each epoch."""
    drop_last: bool = True
    """Each rank takes ``floor(n / world_size)`` images of the epoch and drops its last partial
    batch; False pads the shards by repeating images and yields a partial last batch."""
    skip_corrupt: bool = False
    """Skip (log and count) records that cannot be read, decoded or labelled, instead of
    raising an error naming the file and key."""
    pixels: PixelFormat = "float32"
    """``"float32"`` ``[B, 3, H, W]`` in [-1, 1], or ``"uint8"`` ``[B, H, W, 3]`` as decoded,
    normalised on the device by :func:`dataio.loading.to_model_input`."""
    with_keys: bool = False
    """Yield each image's record key as a third item ``int64 [B]``."""
    prefetch: int = 2
    """Batches prepared ahead (torch: per worker; DALI: the pipeline's queue depth)."""
    torch: TorchOptions = TorchOptions()
    """Options of the PyTorch loader."""
    dali: DaliOptions = DaliOptions()
    """Options of the DALI loader."""

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("seed", self.seed)
        check_int("workers", self.workers)
        check_int("prefetch", self.prefetch, minimum=1)
        check_pixels(self.pixels)
