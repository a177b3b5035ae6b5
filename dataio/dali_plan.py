"""Which records each DALI pipeline of an epoch reads: the rank's shard, the parts, the indexes.

DALI reads an index of ``key<TAB>offset`` lines. The population index (every image record of
the pack, in file order) is cut by DALI into ``world_size`` contiguous shards. An epoch
normally runs one pipeline over the rank's shard; after a resume or a corrupt record it goes
on with another pipeline (a :class:`~dataio.dali_pipeline.Part`) over a temporary index of
the shard's records not yet seen. :class:`EpochPlan` makes those parts, writes and removes
the temporary indexes, and maps what DALI returns (byte offsets) back to pack positions.

Vocabulary: a *position* is a record's index in the pack's arrays (``pack.image_keys``,
``pack.labels``); a *key* is its RecordIO key; the *file order* sorts positions by offset.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from dataio.dali_index import image_index_path, resolve_cache_dir, write_index
from dataio.dali_pipeline import Part, source_offsets
from dataio.loader_config import LoaderConfig
from dataio.pack import FacePack, PackError

__all__ = ["EpochPlan", "derive_seed"]


def derive_seed(*parts: int) -> int:
    """A DALI reader seed (31-bit) from integers, e.g. (seed, epoch, shard, part)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


class EpochPlan:
    """One rank's shards and pipeline parts over ``pack``, and the temporary indexes they use.

    ``parts`` are the parts made so far in the current epoch (:meth:`reset` starts a new
    one); :meth:`remove_temp_files` deletes the temporary indexes written for them.
    """

    def __init__(self, pack: FacePack, config: LoaderConfig, *, rank: int, world_size: int):
        self.pack = pack
        self.config = config
        self.rank = rank
        self.world_size = world_size
        # Records in file order: DALI reads them in this order and shards it in ranges.
        self.file_order = np.argsort(pack.image_offsets, kind="stable")  # [N] positions
        self.sorted_offsets = pack.image_offsets[self.file_order]  # [N]
        self.population_index = image_index_path(pack, self.file_order, config.dali.cache_dir)
        self.parts: list[Part] = []
        self._temp_files: list[str] = []

    def reset(self) -> None:
        """Forget the parts made so far: a new epoch (or a resumed one) starts."""
        self.parts = []

    # ------------------------------------------------------------------------------ sharding

    def shard(self, epoch: int) -> tuple[int, np.ndarray]:
        """(shard id, positions of the shard's records in file order) for ``epoch``.

        DALI's reader gives shard ``s`` of ``w`` the records ``[n*s//w, n*(s+1)//w)`` of the
        offset-sorted index; computing the same ranges lets a resumed or repaired epoch
        continue on exactly the records of its shard.
        """
        shard_id = (self.rank + epoch) % self.world_size
        n = self.file_order.size
        lo, hi = n * shard_id // self.world_size, n * (shard_id + 1) // self.world_size
        return shard_id, self.file_order[lo:hi]

    def key_positions(self) -> dict[int, int]:
        """Record key -> position in the pack's arrays."""
        return {int(k): i for i, k in enumerate(self.pack.image_keys.tolist())}

    # ------------------------------------------------------------------------------ parts

    def new_part(
        self,
        epoch: int,
        shard: np.ndarray,
        seen: np.ndarray,
        bad: set[int],
        start: int,
        newly: list[int],
    ) -> Part:
        """The next pipeline of the epoch: the whole shard, or its records not yet seen.

        A pure function of its arguments and of the parts made so far, so a resumed run can
        rebuild the parts of the interrupted one exactly (``bad``: positions known bad;
        ``newly``: keys found bad just before this part).
        """
        shard_id, _ = self.shard(epoch)
        bad_mask = np.fromiter((p in bad for p in shard.tolist()), bool, shard.size)
        part_no = len(self.parts)
        seed = derive_seed(self.config.seed, epoch, shard_id, part_no)
        if part_no == 0 and not bad_mask.any():
            # The plain case: DALI's own sharding of the population index.
            part = Part(self.population_index, shard_id, self.world_size, seed, start, newly)
        else:
            left = shard[~seen & ~bad_mask]
            if left.size == 0:  # everything read or bad: pad by repeating the shard
                left = shard[~bad_mask]
            if left.size == 0:
                raise PackError(
                    f"{self.pack.rec_path}: every record of rank {self.rank}'s shard in epoch "
                    f"{epoch} is corrupt"
                )
            part = Part(self._temp_index(left), 0, 1, seed, start, newly)
        self.parts.append(part)
        return part

    def _temp_index(self, positions: np.ndarray) -> str:
        folder = resolve_cache_dir(self.pack.pack_dir, self.config.dali.cache_dir)
        fd, path = tempfile.mkstemp(prefix=f"rank{self.rank}-", suffix=".idx", dir=folder)
        os.close(fd)
        pos = np.sort(positions)
        write_index(path, self.pack.image_keys[pos], self.pack.image_offsets[pos])
        self._temp_files.append(path)
        return path

    def remove_temp_files(self) -> None:
        """Delete the temporary indexes written so far (ones already gone are ignored)."""
        for path in self._temp_files:
            try:
                os.remove(path)
            except OSError:
                pass
        self._temp_files = []

    def fill(self, part: Part) -> int:
        """Shuffle buffer size: ``initial_fill``, but no larger than the part's records."""
        if part.num_shards == 1 and part.index_path != self.population_index:
            with open(part.index_path, encoding="ascii") as f:
                count = sum(1 for _ in f)
        else:
            count = -(-self.file_order.size // part.num_shards)
        return max(1, min(self.config.dali.initial_fill, count))

    # ------------------------------------------------------------------------------ offsets

    def positions_of(self, source: Any) -> np.ndarray:
        """Pack positions of a batch from its ``source_info``."""
        offsets = source_offsets(source, self.pack.rec_path)  # [B]
        i = np.searchsorted(self.sorted_offsets, offsets)
        i = np.minimum(i, self.sorted_offsets.size - 1)
        if not np.array_equal(self.sorted_offsets[i], offsets):
            bad = int(offsets[self.sorted_offsets[i] != offsets][0])
            raise PackError(f"{self.pack.rec_path}: DALI read a record at unknown offset {bad}")
        return self.file_order[i]

    def key_at_offset(self, offset: int) -> int | None:
        """The key of the image record starting at byte ``offset``, or None if none does."""
        i = np.searchsorted(self.sorted_offsets, offset)
        if i < self.sorted_offsets.size and self.sorted_offsets[i] == offset:
            return int(self.pack.image_keys[self.file_order[i]])
        return None
