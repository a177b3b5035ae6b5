"""PyTorch data loading over a face pack: dataset, rank-sharded sampler, loader builder.

Why not ``DistributedSampler``: we need the sharding to be a pure function of
``(num_samples, rank, world_size, seed, epoch)`` that the trainer can also resume mid-epoch,
and the augmentation randomness to depend on the sample, not on which worker decoded it, so a
run is reproducible whatever ``workers`` is. That is what :class:`ShardSampler` and the
per-sample RNG of :class:`PackDataset` give.

Epoch propagation: with persistent workers each worker holds its own copy of the dataset, so
a plain attribute set in the main process would never reach them. The epoch is therefore kept
in a shared-memory tensor that forked and spawned workers see.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler

from dataio.pack import FacePack, PackError


def _check_nonneg_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def decode_image(data: bytes, what: str) -> np.ndarray:
    """Encoded image -> uint8 ``[H, W, 3]`` RGB; simplejpeg, then PIL if that fails.

    ``what`` names the source (file and key) in the error if neither decoder can read it.
    """
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError as jpeg_error:
        try:
            with Image.open(io.BytesIO(data)) as img:
                return np.array(img.convert("RGB"))  # a writable copy for torch
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise PackError(
                f"{what}: cannot decode image (simplejpeg: {jpeg_error}; PIL: {e})"
            ) from e


class PackDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Images of a face pack as normalised float tensors with int64 labels.

    ``flip``: random horizontal flip with probability 0.5, decided by an RNG seeded with
    ``(seed, epoch, index)`` so the same sample gets the same flip in every run whatever the
    worker count. Call :meth:`set_epoch` (or the loader's ``set_epoch``) each epoch.
    """

    def __init__(self, pack_dir: str | os.PathLike[str], flip: bool = False, seed: int = 0):
        self.pack = FacePack(pack_dir)
        self.flip = bool(flip)
        self.seed = _check_nonneg_int("seed", seed)
        # Shared so persistent DataLoader workers observe set_epoch (see module docstring).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the flip pattern of ``epoch`` (visible to already-running workers)."""
        self._epoch.fill_(_check_nonneg_int("epoch", epoch))

    @property
    def num_classes(self) -> int:
        return self.pack.num_classes

    def __len__(self) -> int:
        return self.pack.num_images

    def flipped(self, index: int, epoch: int | None = None) -> bool:
        """Whether sample ``index`` is flipped in ``epoch`` (default: the current epoch)."""
        if not self.flip:
            return False
        e = self.epoch if epoch is None else epoch
        return bool(np.random.default_rng([self.seed, e, int(index)]).random() < 0.5)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        data, label = self.pack.read(index)
        key = int(self.pack.image_keys[index])
        img = decode_image(data, f"{self.pack.rec_path}: key {key}")  # [H, W, 3] uint8
        h, w = self.pack.image_size
        if img.shape != (h, w, 3):
            raise PackError(
                f"{self.pack.rec_path}: key {key}: image is {img.shape[0]}x{img.shape[1]} but "
                f"the pack's property says {h}x{w}"
            )
        if self.flipped(index):
            img = img[:, ::-1]
        # Normalise in HWC (contiguous, cheap), then one copy into CHW layout.
        x = img.astype(np.float32)  # [H, W, 3]
        x -= 127.5
        x /= 127.5  # in [-1, 1]
        chw = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # [3, H, W]
        return chw, torch.tensor(label, dtype=torch.int64)


class ShardSampler(Sampler[int]):
    """This rank's share of a seeded per-epoch permutation of ``range(num_samples)``.

    Every rank computes the same permutation (seeded by ``(seed, epoch)``), pads it by wrapping
    around to a multiple of ``world_size`` (or truncates it with ``drop_last``), and takes
    positions ``rank::world_size``. So all ranks get the same number of samples and, without
    padding, every index exactly once across ranks.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ):
        self.num_samples = _check_nonneg_int("num_samples", num_samples)
        self.world_size = _check_nonneg_int("world_size", world_size)
        self.rank = _check_nonneg_int("rank", rank)
        self.seed = _check_nonneg_int("seed", seed)
        if self.num_samples == 0:
            raise ValueError("num_samples must be positive")
        if self.world_size == 0:
            raise ValueError("world_size must be positive")
        if self.rank >= self.world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        if self.drop_last and self.num_samples < self.world_size:
            raise ValueError(
                f"drop_last with num_samples={num_samples} < world_size={world_size} leaves "
                "ranks without samples"
            )
        if self.drop_last:
            self.samples_per_rank = self.num_samples // self.world_size
        else:
            self.samples_per_rank = math.ceil(self.num_samples / self.world_size)
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's permutation; skip this rank's first ``start_index`` samples.

        ``start_index`` resumes an interrupted epoch (samples already consumed on this rank).
        """
        self.epoch = _check_nonneg_int("epoch", epoch)
        start = _check_nonneg_int("start_index", start_index)
        if start > self.samples_per_rank:
            raise ValueError(
                f"start_index {start} past this rank's {self.samples_per_rank} samples per epoch"
            )
        self.start_index = start

    def global_order(self) -> np.ndarray:
        """The epoch's padded/truncated order, int64 ``[samples_per_rank * world_size]``."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        total = self.samples_per_rank * self.world_size
        return np.resize(order.astype(np.int64), total)  # wraps around when padding

    def rank_indices(self) -> np.ndarray:
        """This rank's indices for the epoch, int64 ``[samples_per_rank]`` (before skipping)."""
        return self.global_order()[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices()[self.start_index :].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank - self.start_index


class PackLoader(DataLoader):
    """A DataLoader that also forwards :meth:`set_epoch` to its sampler and dataset."""

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start ``epoch`` (shuffle order and flips); skip ``start_batch`` batches to resume."""
        sampler = self.sampler
        dataset = self.dataset
        if not isinstance(sampler, ShardSampler) or not isinstance(dataset, PackDataset):
            raise TypeError("PackLoader needs a ShardSampler and a PackDataset")
        sampler.set_epoch(
            epoch,
            start_index=_check_nonneg_int("start_batch", start_batch) * int(self.batch_size or 1),
        )
        dataset.set_epoch(epoch)


def build_train_loader(
    pack_dir: str | os.PathLike[str],
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    workers: int,
    flip: bool = True,
    drop_last: bool = True,
    pin_memory: bool = False,
    prefetch_factor: int = 2,
) -> PackLoader:
    """The training loader of one rank: its shard of the pack, in batches.

    The sampler pads by wrapping so every rank has the same number of samples, and
    ``drop_last`` drops the last partial batch, so every rank runs the same number of steps
    (a rank that stops early would hang the others' collectives). ``pin_memory`` helps only
    when the device is a GPU; ``prefetch_factor`` is batches prefetched per worker.
    Call ``loader.set_epoch(epoch)`` before each epoch.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    workers = _check_nonneg_int("workers", workers)
    dataset = PackDataset(pack_dir, flip=flip, seed=seed)
    sampler = ShardSampler(len(dataset), rank, world_size, seed=seed, shuffle=True)
    if drop_last and len(sampler) < batch_size:
        raise ValueError(
            f"{dataset.pack.pack_dir}: {len(dataset)} images give {len(sampler)} per rank for "
            f"world_size={world_size}, fewer than batch_size={batch_size}: no full batch"
        )
    return PackLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
    )
