"""PyTorch data loading over a face pack: dataset, rank-sharded sampler, loader builder.

Why not ``DistributedSampler``: we need the sharding to be a pure function of
``(num_samples, rank, world_size, seed, epoch)`` that the trainer can also resume mid-epoch,
and the augmentation randomness to depend on the sample, not on which worker decoded it, so a
run is reproducible whatever ``workers`` is. That is what :class:`ShardSampler` and the
per-sample flip of :func:`dataio.loading.flip_mask` give.

Batch buffers: a worker decodes a batch straight into a tensor in shared memory, so handing
it to the main process copies nothing. A fresh shared tensor per batch costs its allocation
and a page fault per 4 KiB on first touch (with per-tensor file-descriptor passing for the
labels, a third of the loader's time on a 2-core machine), so each worker keeps a few buffers
and reuses them (:class:`BatchBuffers`). The main process hands a batch out as it is and
marks its buffer free only once nothing in this process references that memory any more (a
weak reference to the storage, checked at every batch), so a batch the consumer keeps is never
overwritten; a worker whose buffers are all still held allocates a fresh one. A batch sent on
to another process must be cloned first (that process's reference is invisible here), or the
loader built with ``reuse_buffers=False``. Labels and keys travel pickled inline.

Epoch propagation: with persistent workers each worker holds its own copy of the dataset, so
a plain attribute set in the main process would never reach them. The epoch (and the count of
skipped records) is therefore kept in shared-memory tensors that forked and spawned workers
see.

Corrupt records (``skip_corrupt``): a record that cannot be read, decoded or labelled raises
:class:`~dataio.pack.PackError` naming the file and key; with ``skip_corrupt`` it is logged,
counted (:attr:`PackLoader.num_skipped`) and replaced by the next readable image of the pack
(position ``i + 1``, ``i + 2``, ...), so batches keep their size and every rank its step
count. The replacement is a repeat of that image in the epoch, which the count makes visible.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from collections.abc import Container, Iterator, Mapping
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, get_worker_info

from dataio.loading import (
    PIXEL_DTYPES,
    batch_layout,
    check_nonneg_int,
    check_pixels,
    check_positive_int,
    flip_mask,
    position_state,
    resolve_position,
    steps_per_epoch,
)
from dataio.pack import FacePack, PackError

logger = logging.getLogger(__name__)


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
        except UnidentifiedImageError as e:
            raise PackError(
                f"{what}: cannot decode image (simplejpeg: {jpeg_error}; PIL: not a known "
                "image format)"
            ) from e
        except (OSError, ValueError) as e:
            raise PackError(
                f"{what}: cannot decode image (simplejpeg: {jpeg_error}; PIL: {e})"
            ) from e


def load_pixels(
    pack: FacePack,
    index: int,
    out: np.ndarray | None = None,
    flip: bool = False,
    record: tuple[bytes, int] | None = None,
) -> tuple[np.ndarray, int]:
    """Image ``index`` of ``pack`` as pixels + its label.

    ``out`` (e.g. a row of a batch) decides the format (see :mod:`dataio.loading`): float32
    ``[3, H, W]`` gets ``(x - 127.5) / 127.5``, uint8 ``[H, W, 3]`` the decoded values;
    without ``out`` a float32 array is returned. Writing into ``out`` fills a batch without
    per-image temporaries; ``flip`` mirrors the image horizontally on the way. Raises
    :class:`PackError` naming the file and key when the record cannot be read, its label is
    wrong, it does not decode, or its size differs from the pack's ``property``. ``record``:
    the image's ``pack.read(index)``, when already read.
    """
    data, label = pack.read(index) if record is None else record
    h, w = pack.image_size
    if out is not None and out.dtype == np.uint8 and _decode_jpeg_into(data, out, flip):
        return out, label
    key = int(pack.image_keys[index])
    img = decode_image(data, f"{pack.rec_path}: key {key}")  # [H, W, 3] uint8
    if img.shape != (h, w, 3):
        raise PackError(
            f"{pack.rec_path}: key {key}: image is {img.shape[0]}x{img.shape[1]} but "
            f"the pack's property says {h}x{w}"
        )
    if out is None:
        out = np.empty((3, h, w), dtype=np.float32)
    hwc = torch.from_numpy(img)  # [H, W, 3] uint8
    if flip:
        hwc = hwc.flip(1)
    target = torch.from_numpy(out)
    if target.dtype == torch.uint8:
        target.copy_(hwc)  # layout changes wait for the device
        return out, label
    # One pass converts to float, centres and moves to CHW; a second scales to [-1, 1]
    # (the operations of dataio.loading.to_model_input, so both formats agree exactly).
    torch.sub(hwc.permute(2, 0, 1), 127.5, out=target)
    target.div_(127.5)
    return out, label


def _decode_jpeg_into(data: bytes, out: np.ndarray, flip: bool) -> bool:
    """Decode a JPEG of ``out``'s size straight into uint8 ``out`` ``[H, W, 3]``, mirrored with
    ``flip``; False (``out`` unspecified) for anything else, left to the general path.

    Why: the uint8 loader's per-image work beyond decoding is mostly copies. Unflipped, the
    decoder writes into the batch row; flipped, it decodes to BGR, whose rows read backwards
    byte by byte are the mirrored RGB rows -- one reversed copy of 1-byte elements, ~2x
    cheaper than flipping 3-byte pixels.
    """
    h, w, _ = out.shape
    if not out.flags.c_contiguous:
        return False
    try:
        if not flip:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out).shape == (h, w, 3)
        bgr = simplejpeg.decode_jpeg(data, colorspace="BGR")
    except ValueError:  # not a JPEG, corrupt, or larger than ``out``
        return False
    if bgr.shape != (h, w, 3):
        return False
    torch.from_numpy(out.reshape(h, w * 3)).copy_(torch.from_numpy(bgr.reshape(h, w * 3)).flip(1))
    return True


def _shared_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor in shared memory (sent from a worker without a copy)."""
    numel = int(np.prod(shape))
    try:
        storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel, device="cpu")
        return torch.empty(0, dtype=dtype).new(storage).view(shape)
    except (AttributeError, RuntimeError):  # private API moved: a copy when sent instead
        return torch.empty(shape, dtype=dtype)


class BatchBuffers:
    """Reusable shared-memory batch tensors of the DataLoader workers (module docstring).

    ``busy`` holds one entry per ``(worker, buffer)``: 0 when free, else the number of the
    loader pass whose batch the worker wrote into it; the main process clears it when that
    batch is no longer referenced, or when its pass was abandoned and the batch discarded. It
    lives in shared memory behind a process-shared lock, whose acquire and release order the
    end of a batch's use before the worker's next write on any CPU. Each worker allocates its
    own buffers on first use. ``per_worker=0`` turns reuse off (a fresh tensor per batch).
    """

    def __init__(self, workers: int, per_worker: int):
        self.per_worker = check_nonneg_int("per_worker", per_worker)
        self.busy = multiprocessing.Array("q", max(1, workers) * max(1, self.per_worker))
        self._fresh = multiprocessing.Value("q", 0)
        self._buffers: dict[int, torch.Tensor] = {}  # in a worker: its buffers by slot

    @property
    def fresh(self) -> int:
        """Batches workers put in a fresh shared tensor because all their buffers were held."""
        return int(self._fresh.value)

    def acquire(
        self, shape: tuple[int, ...], dtype: torch.dtype, pass_id: int
    ) -> tuple[torch.Tensor, int]:
        """An empty ``shape`` tensor for a batch of pass ``pass_id`` and its slot (-1: not a
        reusable buffer -- outside a worker, reuse off, all of this worker's buffers held, or
        a batch shorter than the buffers, which gets its own tensor so that it does not carry
        a whole buffer with it)."""
        info = get_worker_info()
        if info is None:
            return torch.empty(shape, dtype=dtype), -1
        if self.per_worker == 0:
            return _shared_tensor(shape, dtype), -1
        first = info.id * self.per_worker
        with self.busy.get_lock():
            flags = self.busy.get_obj()
            slot = next((i for i in range(first, first + self.per_worker) if not flags[i]), -1)
            if slot < 0:
                with self._fresh.get_lock():
                    self._fresh.value += 1
                return _shared_tensor(shape, dtype), -1
            numel = int(np.prod(shape))
            buf = self._buffers.get(slot)
            if buf is not None and buf.dtype == dtype and buf.numel() > numel:
                return _shared_tensor(shape, dtype), -1  # a short last batch
            flags[slot] = pass_id
        if buf is None or buf.dtype != dtype or buf.numel() != numel:
            buf = self._buffers[slot] = _shared_tensor((numel,), dtype)
        return buf.view(shape), slot

    def release(self, slot: int) -> None:
        """Mark ``slot`` free (main process, once its batch is no longer referenced)."""
        if slot >= 0:
            with self.busy.get_lock():
                self.busy.get_obj()[slot] = 0

    def release_stale(self, pass_id: int, keep: Container[int]) -> None:
        """Free the slots written for passes before ``pass_id``, except those in ``keep``
        (batches handed out): once a new pass has started, the DataLoader has discarded every
        other batch of an earlier one."""
        with self.busy.get_lock():
            flags = self.busy.get_obj()
            for i in range(len(flags)):
                if 0 < flags[i] < pass_id and i not in keep:
                    flags[i] = 0


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
        self.seed = check_nonneg_int("seed", seed)
        self.skip_corrupt = bool(skip_corrupt)
        self.with_keys = bool(with_keys)
        self.max_replacements = check_positive_int("max_replacements", max_replacements)
        # Shared so persistent DataLoader workers observe set_epoch (see module docstring).
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._skipped = torch.zeros(
            check_positive_int("counter_slots", counter_slots), dtype=torch.int64
        ).share_memory_()
        for reason in self.pack.bad_keys.values():
            logger.warning("skipping corrupt record: %s", reason)

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def set_epoch(self, epoch: int) -> None:
        """Select the flip pattern of ``epoch`` (visible to already-running workers)."""
        self._epoch.fill_(check_nonneg_int("epoch", epoch))

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


class _Batches(Dataset[tuple[torch.Tensor, ...]]):
    """A view of a :class:`PackDataset` indexed by a whole batch of indices.

    The loader hands each worker a list of indices (``batch_size=None`` plus a
    ``BatchSampler``), and the worker fills one batch tensor: no per-image tensors and no
    collate copy.
    """

    def __init__(self, dataset: PackDataset, buffers: BatchBuffers):
        self.dataset = dataset
        self.buffers = buffers

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, task: tuple[int, list[int]]) -> tuple[Any, ...]:  # type: ignore[override]
        """``(x, labels, keys, slot)`` for ``task = (pass_id, indices)``: the batch and the
        buffer slot it was written into.

        Labels and keys go as numpy arrays, pickled inline: a tensor from a worker is sent as
        a shared-memory file descriptor over a socket connection of its own, which for a few
        hundred bytes costs more than the bytes.
        """
        pass_id, indices = task
        ds = self.dataset
        out, slot = self.buffers.acquire(ds.batch_shape(len(indices)), ds.dtype, pass_id)
        x, y, k = ds.load_batch(indices, out=out)
        return x, y.numpy(), k.numpy(), slot


class _PassTagged(Sampler[tuple[int, list[int]]]):
    """The loader's batches of indices, each tagged with the number of the pass that asked
    for it (``counter[0]`` when the pass starts), so a worker can mark its buffer with it."""

    def __init__(self, batches: BatchSampler, counter: list[int]):
        self.batches = batches
        self.counter = counter

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        pass_id = self.counter[0]
        for indices in self.batches:
            yield pass_id, indices

    def __len__(self) -> int:
        return len(self.batches)


def _as_is(batch: Any) -> Any:
    """A collate function that changes nothing (the default turns numpy into tensors)."""
    return batch


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
        self.num_samples = check_nonneg_int("num_samples", num_samples)
        self.world_size = check_nonneg_int("world_size", world_size)
        self.rank = check_nonneg_int("rank", rank)
        self.seed = check_nonneg_int("seed", seed)
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
            self.samples_per_rank = -(-self.num_samples // self.world_size)  # ceil
        self.epoch = 0
        self.start_index = 0

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch's permutation; skip this rank's first ``start_index`` samples.

        ``start_index`` resumes an interrupted epoch (samples already consumed on this rank).
        """
        self.epoch = check_nonneg_int("epoch", epoch)
        start = check_nonneg_int("start_index", start_index)
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
    """A DataLoader over one rank's shard that fetches whole batches in its workers.

    It also forwards :meth:`set_epoch` to its sampler and dataset and reports its position
    within the epoch (:meth:`state_dict` / :meth:`load_state_dict`). Build it with
    :func:`build_train_loader`.
    """

    def __init__(
        self,
        dataset: PackDataset,
        sampler: ShardSampler,
        batch_size: int,
        drop_last: bool,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        reuse_buffers: bool = True,
    ):
        # Enough buffers for the batches a worker can have in flight (prefetch_factor), the
        # one just received and the one the consumer still holds while it asks for the next;
        # a consumer that keeps more makes the worker allocate fresh ones instead.
        self._buffers = BatchBuffers(num_workers, prefetch_factor + 2 if reuse_buffers else 0)
        self._handed_out: dict[int, StorageWeakRef] = {}  # slot -> its batch's memory
        self._pass = [0]  # passes started, shared with the sampler below
        super().__init__(
            _Batches(dataset, self._buffers),
            batch_size=None,  # the sampler below yields whole batches of indices
            collate_fn=_as_is,  # keep the numpy labels numpy (see _Batches.__getitem__)
            sampler=_PassTagged(BatchSampler(sampler, batch_size, drop_last), self._pass),
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
        )
        self.pack_dataset = dataset
        self.shard_sampler = sampler
        self.step_batch_size = int(batch_size)
        self.step_drop_last = bool(drop_last)
        self._position: list[int] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start ``epoch`` (shuffle order and flips); skip ``start_batch`` batches to resume."""
        start_batch = check_nonneg_int("start_batch", start_batch)
        if start_batch > self.steps_per_epoch:
            raise ValueError(
                f"start_batch {start_batch} is past the {self.steps_per_epoch} batches of an epoch"
            )
        sampler = self.shard_sampler
        sampler.set_epoch(
            epoch, start_index=min(start_batch * self.step_batch_size, sampler.samples_per_rank)
        )
        self.pack_dataset.set_epoch(epoch)
        self._position = [int(epoch), start_batch]

    @property
    def steps_per_epoch(self) -> int:
        """Batches in a whole epoch (``len()`` counts those left after a resumed start)."""
        n, b = self.shard_sampler.samples_per_rank, self.step_batch_size
        return n // b if self.step_drop_last else -(-n // b)

    def __iter__(self) -> Iterator[Any]:
        # Every pass starts where the sampler starts: the epoch's resumed start batch.
        self._position = None
        position = self._loader_position()
        with_keys = self.pack_dataset.with_keys
        self._pass[0] += 1
        self._release_dropped()
        # Persistent workers: the DataLoader drains an abandoned pass here (discarding its
        # batches), then sends the workers this pass's first tasks.
        batches = super().__iter__()
        self._buffers.release_stale(self._pass[0], self._handed_out)
        for x, labels, keys, slot in batches:
            self._release_dropped()
            y, k = torch.as_tensor(labels), torch.as_tensor(keys)
            if x.is_pinned():  # a pinned copy: the buffer itself is no longer referenced
                self._buffers.release(slot)
                y, k = y.pin_memory(), k.pin_memory()
            elif slot >= 0:  # reusable once nothing here references its memory any more
                self._handed_out[slot] = StorageWeakRef(x.untyped_storage())
            position[1] += 1
            yield (x, y, k) if with_keys else (x, y)
            # Before the DataLoader receives the next batch and at once sends the worker its
            # next task: drop our references and free what the consumer has let go of, so the
            # worker finds a free buffer (prefetch_factor + 2 per worker suffice).
            del x, y, k
            self._release_dropped()

    def _release_dropped(self) -> None:
        """Return to the workers the buffers of batches the consumer no longer references."""
        for slot, ref in list(self._handed_out.items()):
            if ref.expired():
                del self._handed_out[slot]
                self._buffers.release(slot)

    def _loader_position(self) -> list[int]:
        if self._position is None:
            sampler = self.shard_sampler
            self._position = [sampler.epoch, -(-sampler.start_index // self.step_batch_size)]
        return self._position

    @property
    def num_skipped(self) -> int:
        """Corrupt records skipped so far (``skip_corrupt``), in all worker processes."""
        return self.pack_dataset.num_skipped

    def state_dict(self) -> dict[str, Any]:
        """Position within the epoch: ``batch`` = batches of ``epoch`` already yielded."""
        sampler = self.shard_sampler
        epoch, batch = self._loader_position()
        return position_state(
            "torch",
            epoch,
            batch,
            sampler.world_size,
            self.step_batch_size,
            sampler.seed,
            sampler.num_samples,
        )

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> tuple[int, int]:
        """Position the loader after the batches ``state`` says were consumed.

        Returns ``(epoch, start_batch)``; see :func:`dataio.loading.resolve_position` for
        what a state saved by a differently configured loader does.
        """
        expected = self.state_dict()
        del expected["epoch"], expected["batch"]
        epoch, batch = resolve_position(state, expected, self.steps_per_epoch, strict)
        self.set_epoch(epoch, batch)
        return epoch, batch


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
    skip_corrupt: bool = False,
    with_keys: bool = False,
    max_replacements: int = 64,
    pixels: str = "float32",
    reuse_buffers: bool = True,
) -> PackLoader:
    """The training loader of one rank: its shard of the pack, in batches.

    Every rank runs the same number of steps (a rank that stops early would hang the
    others' collectives): with ``drop_last`` each rank takes ``floor(n / world_size)`` images
    of the epoch's permutation and drops its last partial batch, so no image is yielded twice
    in an epoch and fewer than ``world_size * (batch_size + 1)`` are left out (different ones
    each epoch); without it the permutation is padded by wrapping around to
    ``ceil(n / world_size)`` per rank and the last batch is partial. ``workers`` processes
    each build whole batches; ``pin_memory`` helps only when the device is a GPU;
    ``prefetch_factor`` is batches prefetched per worker; ``skip_corrupt``, ``with_keys``,
    ``max_replacements`` and ``pixels``: see :class:`PackDataset`; ``reuse_buffers``: see the
    module docstring. Call ``loader.set_epoch(epoch)`` before each epoch.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    workers = check_nonneg_int("workers", workers)
    dataset = PackDataset(
        pack_dir,
        flip=flip,
        seed=seed,
        skip_corrupt=skip_corrupt,
        with_keys=with_keys,
        max_replacements=max_replacements,
        counter_slots=workers + 1,
        pixels=pixels,
    )
    if len(dataset) < world_size:
        raise ValueError(
            f"{dataset.pack.pack_dir}: {len(dataset)} images cannot be shared by "
            f"world_size={world_size} ranks"
        )
    sampler = ShardSampler(
        len(dataset), rank, world_size, seed=seed, shuffle=True, drop_last=drop_last
    )
    if steps_per_epoch(len(dataset), world_size, batch_size, drop_last) < 1:
        raise ValueError(
            f"{dataset.pack.pack_dir}: {len(dataset)} images give {len(sampler)} per rank for "
            f"world_size={world_size}, fewer than batch_size={batch_size}: no full batch"
        )
    return PackLoader(
        dataset,
        sampler,
        batch_size=batch_size,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        reuse_buffers=reuse_buffers,
    )
