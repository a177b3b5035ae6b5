"""Reusable shared-memory batch tensors of the torch loader's DataLoader workers.

A worker decodes a batch straight into a tensor in shared memory, so handing it to the main
process copies nothing. A fresh shared tensor per batch costs its allocation and a page fault
per 4 KiB on first touch (with per-tensor file-descriptor passing for the labels, a third of
the loader's time on a 2-core machine), so each worker keeps a few buffers and reuses them.
The main process (:class:`dataio.torch_loader.PackLoader`) marks a buffer free only once
nothing in that process references the batch's memory any more.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Container

import numpy as np
import torch
from torch.utils.data import get_worker_info

from common.checks import check_int


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
        self.per_worker = check_int("per_worker", per_worker)
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
