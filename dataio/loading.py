"""What the training loaders share: the loader interface, flip decisions, resumable position,
and the registry of loader kinds (``data.loader``: "torch" or "dali"; built by
:func:`dataio.loaders.build_loader`).

Why a shared flip function: a horizontal flip decided by the sample's identity (its position
in the pack), the run's seed and the epoch -- not by a random stream that depends on which
worker or pipeline decoded it -- makes the two loaders agree image for image, makes a run
reproducible whatever the worker count, and makes a resumed epoch flip the same samples as
the uninterrupted one.

Resumable position: both loaders report ``state_dict()`` -> ``{"kind", "epoch", "batch",
"world_size", "batch_size", "seed", "num_images", ...}`` where ``batch`` is the number of
batches of ``epoch`` already yielded; ``load_state_dict(state)`` positions the loader so that
the next iteration yields the next unseen batch. The trainer saves the dict in its checkpoint.

Pixels (``LoaderConfig.pixels``): both loaders yield decoded, flipped batches, either float32
``[B, 3, H, W]`` normalised to ``(x - 127.5) / 127.5`` ("float32") or the decoded uint8 values
as they come out of the JPEG decoder, ``[B, H, W, 3]`` ("uint8"). The trainer takes uint8 and
reorders and normalises with :func:`to_model_input` after the copy to its device. Why: on the
CPU the reordering and float conversion cost about half a JPEG decode per image and the float
batches are 4x larger to pass from worker processes (and, on a GPU machine, to copy to the
device); on the device it is three cheap elementwise kernels, and on a CPU-only run it moves
off the loader's cores into the step, where it is under 2 % of a forward-backward pass. The
torch loader's two formats give identical floats (the same operations, true divisions); DALI's
float32 output is within one float32 ulp of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from common.checks import check_int
from dataio.loader_config import check_pixels

PIXEL_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "uint8": torch.uint8}

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrapping arithmetic, no Python loop)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def flip_mask(seed: int, epoch: int, positions: np.ndarray | list[int]) -> np.ndarray:
    """Whether each image (by its position in the pack) is flipped in ``epoch``: bool ``[n]``.

    A hash of ``(seed, epoch, position)``, so about half the images are flipped, the pattern
    changes from epoch to epoch, and any subset can be decided in any order or process.
    """
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    if pos.size and pos.min() < 0:
        raise ValueError(f"flip_mask: positions must be non-negative, got {int(pos.min())}")
    h = _splitmix64(np.full(pos.shape, int(seed) & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64))
    h = _splitmix64(h ^ np.uint64(int(epoch) & 0xFFFFFFFFFFFFFFFF))
    h = _splitmix64(h ^ pos.astype(np.uint64))
    return (h >> np.uint64(63)).astype(bool)


def batch_layout(pixels: str, n: int, h: int, w: int) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of a batch of ``n`` ``h`` x ``w`` images in pixel format ``pixels``."""
    shape = (n, h, w, 3) if check_pixels(pixels) == "uint8" else (n, 3, h, w)
    return shape, PIXEL_DTYPES[pixels]


def to_model_input(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A loader's image batch as the model's input: float32 ``[B, 3, H, W]`` in [-1, 1] on
    ``device``.

    A uint8 ``[B, H, W, 3]`` batch (``pixels="uint8"``) is copied to ``device`` first (4x
    fewer bytes), then reordered to CHW and normalised there as ``(x - 127.5) / 127.5``,
    exactly as the torch loader's float32 output is computed; a float32 batch is only copied.
    """
    x = images.to(device, non_blocking=True)
    if x.dtype == torch.float32:
        return x
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise TypeError(
            "image batch must be float32 [B, 3, H, W] or uint8 [B, H, W, 3], got "
            f"{x.dtype} {list(x.shape)}"
        )
    b, h, w, _ = x.shape
    out = torch.empty((b, 3, h, w), dtype=torch.float32, device=x.device)
    # Convert while reordering to CHW, then centre and scale in place: the float32 loaders'
    # arithmetic, and on the CPU ~1.7x faster than one out-of-place pass from uint8. The
    # divisor is a tensor on the device: CUDA multiplies by the reciprocal of a Python scalar
    # divisor, which differs from a true division by one ulp in half the pixel values.
    out.copy_(x.permute(0, 3, 1, 2))
    scale = torch.full((), 127.5, dtype=torch.float32, device=out.device)
    return out.sub_(127.5).div_(scale)


def steps_per_epoch(num_images: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    """Batches every rank yields per epoch (the same on all ranks, or collectives would hang).

    Ranks hold ``floor(n / w)`` or ``ceil(n / w)`` images. With ``drop_last`` every rank
    yields ``floor(floor(n / w) / b)`` full batches and leaves the rest of its shard for the
    epoch; without it every rank yields ``ceil(ceil(n / w) / b)`` batches, shorter shards
    padded to ``ceil(n / w)`` images and the last batch partial.
    """
    if drop_last:
        return (num_images // world_size) // batch_size
    per_rank = -(-num_images // world_size)  # ceil(n / w)
    return -(-per_rank // batch_size)  # ceil(per_rank / b)


def position_state(
    kind: str,
    epoch: int,
    batch: int,
    world_size: int,
    batch_size: int,
    seed: int,
    num_images: int,
    **extra: Any,
) -> dict[str, Any]:
    """The resumable position of a loader as a plain dict (ints, strs and lists only)."""
    return {
        "kind": kind,
        "epoch": int(epoch),
        "batch": int(batch),
        "world_size": int(world_size),
        "batch_size": int(batch_size),
        "seed": int(seed),
        "num_images": int(num_images),
        **extra,
    }


def resolve_position(
    state: Mapping[str, Any], expected: Mapping[str, Any], steps: int, strict: bool
) -> tuple[int, int]:
    """Check a saved position against this loader; return ``(epoch, start_batch)`` to resume.

    A position can be continued only by a loader that cuts the epoch the same way: same
    kind, world size, batch size, seed and number of images. A mismatch raises ValueError
    naming the field when ``strict``; otherwise the saved epoch is abandoned and the loader
    starts at the beginning of the next one (no image of the saved epoch is seen twice).
    """
    for field in ("epoch", "batch"):
        if field not in state:
            raise ValueError(f"loader state: missing field '{field}' (got {sorted(state)})")
    epoch = check_int("loader state 'epoch'", state["epoch"])
    batch = check_int("loader state 'batch'", state["batch"])
    mismatched = [
        f"{k}: saved {state.get(k)!r}, this loader {v!r}"
        for k, v in expected.items()
        if k in state and state[k] != v
    ]
    if mismatched:
        if strict:
            raise ValueError(
                "loader state does not match this loader, cannot resume mid-epoch ("
                + "; ".join(mismatched)
                + "); pass strict=False to start the next epoch instead"
            )
        return (epoch + 1, 0) if batch > 0 else (epoch, 0)
    if batch > steps:
        raise ValueError(f"loader state 'batch' {batch} is past the {steps} batches of an epoch")
    return epoch, batch


@runtime_checkable
class TrainLoader(Protocol):
    """What the trainer needs from a training loader (both kinds provide it)."""

    steps_per_epoch: int

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Any]: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> tuple[int, int]: ...

    @property
    def num_skipped(self) -> int: ...

    @property
    def num_skipped_at_open(self) -> int: ...


LoaderBuilder = Callable[..., TrainLoader]
"""``builder(pack_dir, config: LoaderConfig, *, rank, world_size, device) -> TrainLoader``."""

# kind -> builder, filled by the decorator when a loader module is imported (dataio.loaders
# imports them all).
_BUILDERS: dict[str, LoaderBuilder] = {}


def register_loader(kind: str) -> Callable[[LoaderBuilder], LoaderBuilder]:
    """Register a loader builder under ``kind`` (the name ``data.loader`` gives).

    Registering a kind twice raises ValueError: which loader a config gets must not depend
    on import order.
    """

    def decorator(builder: LoaderBuilder) -> LoaderBuilder:
        if kind in _BUILDERS:
            raise ValueError(f"loader kind {kind!r} is already registered")
        _BUILDERS[kind] = builder
        return builder

    return decorator


def loader_kinds() -> list[str]:
    """The registered loader kinds, sorted."""
    return sorted(_BUILDERS)


def loader_builder(kind: str) -> LoaderBuilder:
    """The builder registered as ``kind``; ValueError listing the known kinds otherwise."""
    if kind not in _BUILDERS:
        raise ValueError(
            f"data.loader: unknown loader kind {kind!r}; expected one of {tuple(loader_kinds())}"
        )
    return _BUILDERS[kind]
