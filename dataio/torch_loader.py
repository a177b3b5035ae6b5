"""PyTorch data loading over a face pack: dataset, batch loader, and the ``"torch"`` builder.

The sharding is a pure function of ``(num_samples, rank, world_size, seed, epoch)`` that the
trainer can resume mid-epoch (:class:`dataio.shard_sampler.ShardSampler`), and the
augmentation randomness depends on the sample, not on which worker decoded it, so a run is
reproducible whatever ``workers`` is (the per-sample flip of :func:`dataio.loading.flip_mask`).

Batch buffers: workers decode into a few reused shared-memory batches
(:class:`dataio.batch_buffers.BatchBuffers`). The main process hands a batch out as it is and
marks its buffer free only once nothing in this process references that memory any more (a
weak reference to the storage, checked at every batch), so a batch the consumer keeps is never
overwritten; a worker whose buffers are all still held allocates a fresh one. A batch sent on
to another process must be cloned first (that process's reference is invisible here), or the
loader built with ``TorchOptions(reuse_buffers=False)``. Labels and keys travel pickled inline.

The dataset (:class:`dataio.pack_dataset.PackDataset`) keeps the epoch in shared memory, so
``set_epoch`` reaches persistent workers.

Corrupt records (``skip_corrupt``): a record that cannot be read, decoded or labelled raises
:class:`~dataio.pack.PackError` naming the file and key; with ``skip_corrupt`` it is logged,
counted (:attr:`PackLoader.num_skipped`) and replaced by the next readable image of the pack
(position ``i + 1``, ``i + 2``, ...), so batches keep their size and every rank its step
count. The replacement is a repeat of that image in the epoch, which the count makes visible.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from common.checks import check_int
from dataio.batch_buffers import BatchBuffers
from dataio.loader_config import LoaderConfig
from dataio.loading import position_state, register_loader, resolve_position, steps_per_epoch
from dataio.pack import PackError
from dataio.pack_dataset import PackDataset
from dataio.shard_sampler import ShardSampler


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
        try:
            x, y, k = ds.load_batch(indices, out=out)
        except PackError as e:
            # Sent as a value, raised by the loader as it is: the DataLoader would raise a
            # new PackError whose message is this worker's whole traceback.
            self.buffers.release(slot)
            return e, None, None, -1
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


def _sigterm_from_trainer_only(_worker_id: int) -> None:
    """A decoding worker ends on SIGTERM from its training process only.

    Slurm (``scancel``, the time limit) sends SIGTERM to every process of a job, and the
    training process then finishes its step and saves a checkpoint, drawing batches
    meanwhile; torch's own handler would end the worker and the training process would fail
    on the lost worker instead. But the training process's own SIGTERM must still end it:
    multiprocessing, at interpreter exit, terminates its live daemonic children and then
    joins them, so a worker that ignored every SIGTERM hung its parent's exit for good (a
    loader still referenced there). A Python handler is not told who sent a signal:
    ``sigwaitinfo`` is, in a thread of the worker's own with SIGTERM blocked everywhere else.
    A worker still ends with the training process (torch's watchdog) and on its shutdown
    message.
    """
    # The process that started this worker (whichever the start method): the one whose
    # terminate() must end it.
    trainer = multiprocessing.parent_process().pid
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])  # inherited by later threads

    def wait() -> None:
        while signal.sigwaitinfo([signal.SIGTERM]).si_pid != trainer:
            pass
        # The training process's terminate(); not the inherited handler (a rank's stop one).
        # Status 0, as torch's own worker handler: torch's SIGCHLD check in the training
        # process raises on a worker that exits non-zero ("exited unexpectedly").
        os._exit(0)

    threading.Thread(target=wait, name="sigterm-from-trainer", daemon=True).start()


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
            worker_init_fn=_sigterm_from_trainer_only,
        )
        self.pack_dataset = dataset
        self.shard_sampler = sampler
        self.step_batch_size = int(batch_size)
        self.step_drop_last = bool(drop_last)
        self._position: list[int] | None = None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start ``epoch`` (shuffle order and flips); skip ``start_batch`` batches to resume."""
        start_batch = check_int("start_batch", start_batch)
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
            if isinstance(x, PackError):
                raise x  # names the file and the record key (see _Batches.__getitem__)
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

    @property
    def num_skipped_at_open(self) -> int:
        """Of :attr:`num_skipped`, the records left out when the pack was opened: every rank
        opens the whole pack, so every rank counts these."""
        return len(self.pack_dataset.pack.bad_keys)

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


@register_loader("torch")
def build_train_loader(
    pack_dir: str | os.PathLike[str],
    config: LoaderConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device | str = "cpu",
) -> PackLoader:
    """The PyTorch training loader of one rank: its shard of the pack, in batches.

    Every rank runs the same number of steps (a rank that stops early would hang the
    others' collectives): with ``drop_last`` each rank takes ``floor(n / world_size)`` images
    of the epoch's permutation and drops its last partial batch, so no image is yielded twice
    in an epoch and fewer than ``world_size * (batch_size + 1)`` are left out (different ones
    each epoch); without it the permutation is padded by wrapping around to
    ``ceil(n / world_size)`` per rank and the last batch is partial. ``config.workers``
    processes each build whole batches. Batches stay on the CPU, in page-locked memory when
    ``device`` is a GPU (they then copy asynchronously). Call ``loader.set_epoch(epoch)``
    before each epoch.
    """
    dataset = PackDataset(
        pack_dir,
        flip=config.flip,
        seed=config.seed,
        skip_corrupt=config.skip_corrupt,
        with_keys=config.with_keys,
        max_replacements=config.torch.max_replacements,
        counter_slots=config.workers + 1,
        pixels=config.pixels,
    )
    if len(dataset) < world_size:
        raise ValueError(
            f"{dataset.pack.pack_dir}: {len(dataset)} images cannot be shared by "
            f"world_size={world_size} ranks"
        )
    batch_size, drop_last = config.batch_size, config.drop_last
    sampler = ShardSampler(
        len(dataset), rank, world_size, seed=config.seed, shuffle=True, drop_last=drop_last
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
        num_workers=config.workers,
        pin_memory=torch.device(device).type == "cuda",
        prefetch_factor=config.prefetch,
        reuse_buffers=config.torch.reuse_buffers,
    )
