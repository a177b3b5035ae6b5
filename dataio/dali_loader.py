"""NVIDIA DALI training loader over insightface packs (GPU decoding on CUDA, CPU otherwise).

The pipeline (:mod:`dataio.dali_pipeline`): DALI's mxnet reader, sharded by rank and world
size and shuffled with a seed derived from the run's seed, then decoding ("mixed" on CUDA,
"cpu" otherwise), optional colour jitter, flips and normalisation. Insightface packs are read
without re-packing, through an index of their image records only (:mod:`dataio.dali_index`).
The rank's shard, the pipelines ("parts") of an epoch and the mapping from what DALI returns
back to pack records are :mod:`dataio.dali_plan`.

Why each pipeline reads one epoch. A pipeline is built per ``(epoch, rank)`` with a reader
seed derived from ``(seed, epoch, shard)``, so ``set_epoch(e)`` is a pure function of its
arguments and an epoch can be resumed without replaying the earlier ones. Shards rotate with
the epoch (shard ``(rank + epoch) % world_size``), as DALI's own ``stick_to_shard=False``
does. DALI's shuffle is a buffer of ``initial_fill`` records drawn at random, so batches mix
records from a window of the (identity-sorted) file, as in arcface_torch; within an epoch
DALI returns each record of the shard exactly once.

What the reader returns is checked: every sample's source (``fn.get_property(...,
"source_info")``: file and byte offset) is mapped back to its record key, and its label is
compared with the pack's label for that key (a mismatch is never passed on silently).

Flips: ``fn.random.coin_flip`` drives the ``mirror`` of ``crop_mirror_normalize`` (or of
``fn.flip`` for uint8 output), seeded like
the reader, so an epoch's flips are reproducible. They are not the torch loader's per-image
rule (:func:`dataio.loading.flip_mask`): applying that rule needs the record's key, which is
only known after the batch is out of the pipeline, and flipping float batches afterwards
cost a third of the loader's throughput on a 2-core machine.

Resuming mid-epoch (``set_epoch(e, start_batch=b)`` or :meth:`DaliLoader.load_state_dict`):
a reader-only pipeline (no decoding) with the epoch's exact reader settings replays the
first ``b`` batches to learn which records were consumed; the epoch then continues from a
pipeline over the records not yet seen, so no record of the epoch is repeated or lost. The
remaining records come in a different (still seeded) order than in the uninterrupted run.

Corrupt records: a record that DALI cannot read or decode, or whose label is wrong, raises
:class:`~dataio.pack.PackError` naming the file and key (found from the error message, a
head check of the shard, or by decoding the records of the failing batches; see
:mod:`dataio.dali_faults`). With ``skip_corrupt`` it is logged, counted
(:attr:`DaliLoader.num_skipped`) and left out: the epoch goes on from a pipeline over the
records not yet seen. If a rank runs short of records for its fixed number of batches, the
reader repeats some (``num_padded``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from common.checks import check_int
from dataio.dali_faults import blame_records, check_batch
from dataio.dali_pipeline import Part, build_pipeline, dali_reason, import_dali
from dataio.dali_plan import EpochPlan
from dataio.loader_config import LoaderConfig
from dataio.loading import (
    batch_layout,
    position_state,
    register_loader,
    resolve_position,
    steps_per_epoch,
)
from dataio.pack import FacePack, PackError

logger = logging.getLogger(__name__)


class DaliLoader:
    """One rank's DALI training loader; same interface as :class:`dataio.torch_loader.PackLoader`.

    Iterating yields ``(images, labels int64 [B])`` (plus ``keys int64 [B]`` with
    ``with_keys``) on ``device``, images float32 ``[B, 3, H, W]`` or uint8 ``[B, H, W, 3]``
    (``pixels``), for ``steps_per_epoch`` batches. See the module docstring for sharding,
    shuffling, resuming and corrupt records. Build it with :func:`build_dali_loader`.
    """

    def __init__(
        self,
        pack_dir: str | os.PathLike[str],
        config: LoaderConfig,
        *,
        rank: int,
        world_size: int,
        device: torch.device | str = "cpu",
    ):
        self.config = config
        self.world_size = check_int("world_size", world_size, minimum=1)
        self.rank = check_int("rank", rank)
        if self.rank >= self.world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device!r}")
        # The config's values this loader reads most, under short names.
        self.batch_size = config.batch_size
        self.seed = config.seed
        self.pixels = config.pixels
        self.skip_corrupt = config.skip_corrupt
        import_dali()  # fail at construction, not at the first batch

        self.pack = FacePack(pack_dir, skip_corrupt=self.skip_corrupt)
        for reason in self.pack.bad_keys.values():
            logger.warning("skipping corrupt record: %s", reason)
        n = self.pack.num_images
        if n < self.world_size:
            raise ValueError(
                f"{self.pack.pack_dir}: {n} images cannot be shared by "
                f"world_size={self.world_size} ranks"
            )
        self.steps_per_epoch = steps_per_epoch(
            n, self.world_size, self.batch_size, self.config.drop_last
        )
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{self.pack.pack_dir}: {n} images give {n // self.world_size} per rank for "
                f"world_size={self.world_size}, fewer than batch_size={self.batch_size}: "
                "no full batch"
            )
        # The shard, the pipeline parts of an epoch and their indexes (see dataio.dali_plan).
        self._plan = EpochPlan(self.pack, config, rank=self.rank, world_size=self.world_size)
        self._known_bad: set[int] = set()  # positions found bad at run time (this rank)
        self._runtime_skipped = 0
        self.num_padded = 0
        """Samples yielded a second time in an epoch because the shard ran short."""
        self._epoch = 0
        self._start_batch = 0
        self._yielded = 0
        self._epoch_excluded: list[int] = []
        self._replay_history: list[tuple[int, list[int]]] = []
        self._pipe: Any = None

    # ------------------------------------------------------------------------------ interface

    def __len__(self) -> int:
        """Batches the next iteration yields (the epoch's, less a resumed start)."""
        return self.steps_per_epoch - self._start_batch

    @property
    def num_skipped(self) -> int:
        """Corrupt records skipped so far: left out at open plus found while reading."""
        return len(self.pack.bad_keys) + self._runtime_skipped

    @property
    def num_skipped_at_open(self) -> int:
        """Of :attr:`num_skipped`, the records left out when the pack was opened: every rank
        opens the whole pack, so every rank counts these."""
        return len(self.pack.bad_keys)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Start ``epoch``; skip its first ``start_batch`` batches (they were consumed)."""
        self._epoch = check_int("epoch", epoch)
        start = check_int("start_batch", start_batch)
        if start > self.steps_per_epoch:
            raise ValueError(
                f"start_batch {start} is past the {self.steps_per_epoch} batches of an epoch"
            )
        self._start_batch = start
        self._yielded = start
        self._epoch_excluded = sorted(int(self.pack.image_keys[p]) for p in self._known_bad)
        self._plan.reset()
        self._replay_history = []

    def state_dict(self) -> dict[str, Any]:
        """Position within the epoch plus what a replay needs (records excluded, pipelines)."""
        return position_state(
            "dali",
            self._epoch,
            self._yielded,
            self.world_size,
            self.batch_size,
            self.seed,
            self.pack.num_images,
            excluded=list(self._epoch_excluded),
            parts=[[p.start_batch, list(p.excluded)] for p in self._plan.parts[1:]],
        )

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> tuple[int, int]:
        """Position the loader after the batches ``state`` says were consumed.

        Returns ``(epoch, start_batch)``; see :func:`dataio.loading.resolve_position`.
        """
        expected = self.state_dict()
        for k in ("epoch", "batch", "excluded", "parts"):
            del expected[k]
        epoch, batch = resolve_position(state, expected, self.steps_per_epoch, strict)
        resumable = (epoch, batch) == (state["epoch"], state["batch"])
        self.set_epoch(epoch, batch)
        if resumable:
            key_to_pos = self._plan.key_positions()
            excluded = [int(k) for k in state.get("excluded", [])]
            history = [(int(b), [int(k) for k in ks]) for b, ks in state.get("parts", [])]
            for k in excluded + [k for _, ks in history for k in ks]:
                if k in key_to_pos:
                    self._known_bad.add(key_to_pos[k])
            self._epoch_excluded = sorted(excluded)
            self._replay_history = history
        return epoch, batch

    def close(self) -> None:
        """Release the pipeline and remove temporary index files."""
        self._pipe = None
        self._plan.remove_temp_files()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to report to
            pass

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return self._iterate()

    # ------------------------------------------------------------------------------ pipelines

    def _epoch_sizes(self) -> tuple[int, int]:
        """(samples this rank yields per epoch, size of the last batch)."""
        n, w, b = self.pack.num_images, self.world_size, self.batch_size
        if self.config.drop_last:
            return self.steps_per_epoch * b, b
        per_rank = -(-n // w)
        return per_rank, per_rank - (self.steps_per_epoch - 1) * b

    def _pipeline(self, part: Part, decode: bool) -> Any:
        """The built pipeline of ``part`` (``decode=False``: the reader alone, for replays)."""
        return build_pipeline(
            self.pack.rec_path, part, self.config, self.device, self._plan.fill(part), decode
        )

    def _replay(self, part: Part, batches: int) -> np.ndarray:
        """Positions of the first ``batches`` batches of ``part``, read without decoding."""
        if batches <= 0:
            return np.empty(0, dtype=np.int64)
        pipe = self._pipeline(part, decode=False)
        out = []
        for _ in range(batches):
            _, source = pipe.run()
            out.append(self._plan.positions_of(source))
        del pipe
        return np.concatenate(out)

    # ------------------------------------------------------------------------------ iteration

    def _iterate(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, total = self._epoch, self.steps_per_epoch
        _, last_size = self._epoch_sizes()
        _, shard = self._plan.shard(epoch)
        shard_index = {p: i for i, p in enumerate(shard.tolist())}
        seen = np.zeros(shard.size, dtype=bool)  # [S] yielded this epoch
        key_to_pos = self._plan.key_positions()
        bad = {key_to_pos[k] for k in self._epoch_excluded if k in key_to_pos}
        history, self._replay_history = self._replay_history, []
        self._plan.reset()
        self.close()

        def mark(pos: np.ndarray) -> None:
            for p in pos.tolist():
                i = shard_index.get(p)
                if i is None:
                    key = int(self.pack.image_keys[p])
                    raise PackError(
                        f"{self.pack.rec_path}: DALI returned key {key} outside rank "
                        f"{self.rank}'s shard of epoch {epoch}"
                    )
                if seen[i]:
                    self.num_padded += 1
                seen[i] = True

        # Resume: replay the consumed batches of each earlier part with the reader alone.
        if self._start_batch > 0:
            padded = self.num_padded
            starts = [(0, [])] + [(b, ks) for b, ks in history if b <= self._start_batch]
            for j, (begin, newly) in enumerate(starts):
                bad.update(key_to_pos[k] for k in newly if k in key_to_pos)
                stop = starts[j + 1][0] if j + 1 < len(starts) else self._start_batch
                part = self._plan.new_part(epoch, shard, seen, bad, begin, list(newly))
                mark(self._replay(part, stop - begin))
            self.num_padded = padded
        self._yielded = self._start_batch
        part = self._plan.new_part(epoch, shard, seen, bad, self._yielded, [])
        pipe = self._pipeline(part, decode=True)
        self._pipe = pipe
        while self._yielded < total:
            try:
                images, labels, source = pipe.run()
                pos = self._plan.positions_of(source)
                check_batch(self.pack, pos, labels, images.shape(), self.pixels)
            except (RuntimeError, PackError) as err:
                self._pipe = pipe = None
                found = self._find_bad(err, part, seen, shard, bad)
                bad.update(found)
                self._known_bad.update(found)
                self._runtime_skipped += len(found)
                newly = sorted(int(self.pack.image_keys[p]) for p in found)
                part = self._plan.new_part(epoch, shard, seen, bad, self._yielded, newly)
                pipe = self._pipeline(part, decode=True)
                self._pipe = pipe
                continue
            n = last_size if self._yielded == total - 1 else self.batch_size
            pos = pos[:n]
            mark(pos)
            x = self._to_torch(images, n)  # [n, 3, H, W] float32 or [n, H, W, 3] uint8
            y = torch.from_numpy(self.pack.labels[pos].copy()).to(x.device)  # [n] int64
            self._yielded += 1
            if self.config.with_keys:
                yield x, y, torch.from_numpy(self.pack.image_keys[pos].copy())
            else:
                yield x, y
        self.close()

    def _to_torch(self, images: Any, n: int) -> torch.Tensor:
        """The first ``n`` samples of a DALI batch as a torch tensor on ``self.device``."""
        if self.device.type == "cpu":
            return torch.from_numpy(images.as_array()[:n])
        from nvidia.dali.plugin.pytorch import feed_ndarray

        shape, dtype = batch_layout(self.pixels, self.batch_size, *self.pack.image_size)
        out = torch.empty(shape, dtype=dtype, device=self.device)
        feed_ndarray(images.as_tensor(), out, cuda_stream=torch.cuda.current_stream(self.device))
        return out[:n]

    # ------------------------------------------------------------------------------ corruption

    def _find_bad(
        self, err: Exception, part: Part, seen: np.ndarray, shard: np.ndarray, bad: set[int]
    ) -> set[int]:
        """Positions of the records behind a failed batch (found by
        :func:`dataio.dali_faults.blame_records`); raise if not ``skip_corrupt``."""
        unseen = shard[~seen]
        unseen = unseen[[p not in bad for p in unseen.tolist()]]
        reasons = blame_records(err, self.pack, self._plan, unseen, lambda: self._upcoming(part))
        if not reasons:
            raise PackError(
                f"{self.pack.rec_path}: DALI failed on rank {self.rank}'s shard and no record "
                f"could be blamed: {dali_reason(str(err))}"
            ) from err
        if not self.skip_corrupt:
            raise PackError(next(iter(reasons.values()))) from err
        key_to_pos = self._plan.key_positions()
        for reason in reasons.values():
            logger.warning("skipping corrupt record: %s", reason)
        return {key_to_pos[k] for k in reasons}

    def _upcoming(self, part: Part) -> np.ndarray:
        """Positions of the records ``part``'s pipeline was about to return (a replay)."""
        taken = self._yielded - part.start_batch
        ahead = taken + self.config.prefetch + 1
        return self._replay(part, ahead)[taken * self.batch_size :]


@register_loader("dali")
def build_dali_loader(
    pack_dir: str | os.PathLike[str],
    config: LoaderConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device | str = "cpu",
) -> DaliLoader:
    """The DALI training loader of one rank (the ``"dali"`` kind of
    :func:`dataio.loaders.build_loader`).

    ``config.workers``: DALI CPU threads (at least 1); ``config.dali``: the shuffle buffer,
    the index's cache folder and colour jitter. ``device``: ``cpu`` decodes on the CPU,
    ``cuda:N`` decodes on GPU N ("mixed") and yields tensors there.
    """
    return DaliLoader(pack_dir, config, rank=rank, world_size=world_size, device=device)
