"""A rank's share of a seeded per-epoch permutation of a pack: the torch loader's sampler.

Why not ``DistributedSampler``: the sharding must be a pure function of ``(num_samples, rank,
world_size, seed, epoch)`` that the trainer can also resume mid-epoch (``start_index``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from common.checks import check_int


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
        self.num_samples = check_int("num_samples", num_samples)
        self.world_size = check_int("world_size", world_size)
        self.rank = check_int("rank", rank)
        self.seed = check_int("seed", seed)
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
        self.epoch = check_int("epoch", epoch)
        start = check_int("start_index", start_index)
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
