"""The images of a face pack as tensors, decoded into whole batches: the torch loader's dataset.

Epoch propagation: with persistent DataLoader workers each worker holds its own copy of the
dataset, so a plain attribute set in the main process would never reach them. The epoch (and
the count of skipped records) is therefore kept in shared-memory tensors that forked and
spawned workers see.

Corrupt records (``skip_corrupt``): see :mod:`dataio.torch_loader`.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from common.checks import check_int
from dataio.decode import load_pixels
from dataio.loader_config import check_pixels
from dataio.loading import PIXEL_DTYPES, batch_layout, flip_mask
from dataio.pack import FacePack, PackError

logger = logging.getLogger(__name__)


class PackDataset(Dataset[tuple[torch.Tensor, ...]]):
    """Images of a face pack as tensors (``pixels``: normalised float32 ``[3, H, W]``, or uint8
    ``[H, W, 3]``; see :mod:`dataio.loading`) with int64 labels.

    ``flip``: horizontal flip of about half the samples, decided by
    :func:`dataio.loading.flip_mask` from ``(seed, epoch, index)`` so the same sample gets
    the same flip in every run whatever the worker count. Call :meth:`set_epoch` (or the
    loader's ``set_epoch``) each epoch. ``with_keys`` adds the record key as a third item.
    ``skip_corrupt`` and ``max_replacements``: see the module docstring (at most that many
    following images are tried before the error is raised anyway). ``counter_slots``: one
    per process that reads (DataLoader workers + the main process), so counting skips never
    races.
    """

    def __init__(
        self,
        pack_dir: str | os.PathLike[str],
        flip: bool = False,
        seed: int = 0,
        skip_corrupt: bool = False,
        with_keys: bool = False,
        max_replacements: int = 64,
        counter_slots: int = 1,
        pixels: str = "float32",
    ):
        self.pixels = check_pixels(pixels)
        self.dtype = PIXEL_DTYPES[self.pixels]
        self.pack = FacePack(pack_dir, skip_corrupt=skip_corrupt)
        self.flip = bool(flip)
        self.seed = check_int("seed", seed)
        self.skip_corrupt = bool(skip_corrupt)
        self.with_keys = bool(with_keys)
        self.max_replacements = check_int("max_replacements", max_replacements, minimum=1)
        # Shared so persistent DataLoader workers observe set_epoch (see module docstring).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._skipped = torch.zeros(
            check_int("counter_slots", counter_slots, minimum=1), dtype=torch.int64
        ).share_memory_()
        for reason in self.pack.bad_keys.values():
            logger.warning("skipping corrupt record: %s", reason)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the flip pattern of ``epoch`` (visible to already-running workers)."""
        self._epoch.fill_(check_int("epoch", epoch))

    @property
    def num_classes(self) -> int:
        return self.pack.num_classes

    @property
    def num_skipped(self) -> int:
        """Records skipped so far: left out at open plus replaced while reading."""
        return len(self.pack.bad_keys) + int(self._skipped.sum().item())

    def __len__(self) -> int:
        return self.pack.num_images

    def flipped(self, index: int, epoch: int | None = None) -> bool:
        """Whether sample ``index`` is flipped in ``epoch`` (default: the current epoch)."""
        if not self.flip:
            return False
        e = self.epoch if epoch is None else epoch
        return bool(flip_mask(self.seed, e, [index])[0])

    def _count_skip(self) -> None:
        info = get_worker_info()
        slot = 0 if info is None else (info.id + 1) % self._skipped.numel()
        self._skipped[slot] += 1

    def _load_into(
        self, index: int, out: np.ndarray, flip: bool, record: tuple[bytes, int] | PackError
    ) -> tuple[int, int]:
        """Write image ``index`` (or its replacement, see the module docstring) into ``out``.

        ``record``: what ``pack.read(index)`` gave (or raised). Returns ``(label, key)`` of
        the image actually written.
        """
        n = len(self)
        source = index
        for attempt in range(self.max_replacements + 1):
            try:
                read = None
                if attempt == 0:  # replacements are read here
                    if isinstance(record, PackError):
                        raise record
                    read = record
                _, label = load_pixels(self.pack, source, out=out, flip=flip, record=read)
                return label, int(self.pack.image_keys[source])
            except PackError as e:
                if not self.skip_corrupt:
                    raise e  # not skipping: the error names the file and key
                self._count_skip()
                logger.warning("skipping corrupt record: %s", e)
                if attempt == self.max_replacements:
                    raise PackError(
                        f"{e} (and the {self.max_replacements} images after image {index} "
                        "are unreadable too)"
                    ) from e
                source = (source + 1) % n
        raise AssertionError("unreachable")  # the loop returns or raises

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        x, y, k = self.load_batch([index])
        return (x[0], y[0], k[0]) if self.with_keys else (x[0], y[0])

    def batch_shape(self, n: int) -> tuple[int, int, int, int]:
        """The shape of a batch of ``n`` images in this dataset's ``pixels`` format."""
        return batch_layout(self.pixels, n, *self.pack.image_size)[0]

    def load_batch(
        self, indices: list[int], out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``indices`` as ``(x, labels int64 [n], keys int64 [n])``, ``x`` float32
        ``[n, 3, H, W]`` or uint8 ``[n, H, W, 3]`` (``pixels``).

        Each image is decoded and written into its row of ``x`` (``out`` when given, of
        :meth:`batch_shape` and this dataset's dtype): a copy (uint8) or two passes (float32)
        over its pixels.
        """
        n = len(indices)
        x = torch.empty(self.batch_shape(n), dtype=self.dtype) if out is None else out
        rows = x.numpy()
        labels = np.empty(n, dtype=np.int64)
        keys = np.empty(n, dtype=np.int64)
        if self.flip:
            flips = flip_mask(self.seed, self.epoch, np.asarray(indices, dtype=np.int64))
        else:
            flips = np.zeros(n, dtype=bool)
        # All records first, then all decodes: 3-5 % faster than interleaving them (the
        # decoder's working set stays in cache).
        records = [self._read(int(i)) for i in indices]
        for j, index in enumerate(indices):
            labels[j], keys[j] = self._load_into(int(index), rows[j], bool(flips[j]), records[j])
        return x, torch.from_numpy(labels), torch.from_numpy(keys)

    def _read(self, index: int) -> tuple[bytes, int] | PackError:
        """``pack.read(index)``, or the PackError it raised (handled when the image's turn
        comes, so a bad record costs no more than it did read in turn)."""
        try:
            return self.pack.read(index)
        except PackError as e:
            return e
