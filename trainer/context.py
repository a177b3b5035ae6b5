"""DistContext: this process's place in the job, built once by launcher/ and passed down.

Nothing below launcher/ reads RANK / WORLD_SIZE / SLURM_* from the environment; code that
needs to know who it is receives a DistContext (or the rank / group taken from one).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int
    """Global rank in [0, world_size)."""
    world_size: int
    local_rank: int
    """Rank on this node; picks the GPU on CUDA machines."""
    local_world_size: int
    device: torch.device
    backend: str
    """"gloo" (CPU) or "nccl" (CUDA); "none" for a single process without a process group."""

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside [0, world_size={self.world_size})")
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            raise ValueError(
                f"local_rank {self.local_rank} outside "
                f"[0, local_world_size={self.local_world_size})"
            )

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, wandb, the ONNX file and the summary."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend != "none"

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> DistContext:
        """A one-process context with no process group (tests, evaluation tools)."""
        return cls(0, 1, 0, 1, torch.device(device), "none")
