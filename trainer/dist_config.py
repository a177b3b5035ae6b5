"""The ``dist`` and ``deepspeed`` sections of the run configuration: how the processes are
started and joined (torchrun, elastic nodes, the process group) and how the backbone is
replicated (DDP, a DeepSpeed engine). Part of :class:`trainer.config.Config`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from common.config_model import StrictModel


class ElasticConfig(StrictModel):
    """torchrun's elastic agent at a c10d rendezvous: ``facetrain train --rdzv HOST:PORT``
    on each node. When a node is lost, the others' workers fail (or time out, dist.timeout_s)
    and their agents restart them at the smaller world size (counted in dist.max_restarts);
    they resume from the run's latest checkpoint with the classifier re-sharded. A node that
    starts later (or comes back) joins at the next restart: the running workers checkpoint
    and the job goes on at the larger world size. The node started with ``--node-rank 0``
    hosts the rendezvous: it must stay up."""

    min_nodes: int = Field(1, ge=1)
    """Fewest nodes the job runs on; below it the agents wait (join_timeout_s) and then fail."""
    max_nodes: int = Field(1, ge=1)
    """Most nodes the job grows to; a node beyond it waits as a spare."""
    join_timeout_s: int = Field(600, ge=1)
    """How long a rendezvous may take to reach min_nodes before the agents give up."""
    last_call_s: int = Field(30, ge=0)
    """Once min_nodes are there, wait this long for more before the rendezvous completes."""
    keep_alive_s: int = Field(5, ge=1)
    """Agents' heartbeat interval; an agent silent for 3 of them counts as lost."""

    @model_validator(mode="after")
    def _bounds(self) -> ElasticConfig:
        if self.min_nodes > self.max_nodes:
            raise ValueError(
                f"dist.elastic.min_nodes: {self.min_nodes} is more than max_nodes {self.max_nodes}"
            )
        return self


class DistConfig(StrictModel):
    nproc: int = Field(1, ge=1)
    """Processes per node started by ``facetrain train`` when not under a launcher."""
    engine: Literal["ddp", "deepspeed"] = "ddp"
    """How the backbone is replicated: torch DDP, or a DeepSpeed engine (see `deepspeed`)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl on CUDA, gloo on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    max_restarts: int = Field(0, ge=0)
    """torchrun restarts after a worker failure; a restarted job resumes from the latest
    checkpoint automatically. dist.elastic needs at least 1 (each lost node costs one)."""
    timeout_s: float = Field(1800.0, gt=0.0)
    """How long a collective (or the process group's store) may wait for the other ranks
    before this rank fails: a peer that vanished without closing its connections (a machine
    lost, a network cut) is noticed after this long, and only then can torchrun restart the
    survivors. It must exceed the longest wait of a healthy run (rank 0 saving a checkpoint,
    evaluating or exporting while the others wait)."""
    elastic: ElasticConfig | None = None
    """null: a fixed set of nodes (any node lost ends the job). Set: torchrun's elastic agent
    (see ElasticConfig) with min_nodes..max_nodes nodes."""

    @model_validator(mode="after")
    def _elastic_restarts(self) -> DistConfig:
        if self.elastic is not None and self.max_restarts < 1:
            raise ValueError(
                "dist.max_restarts: dist.elastic restarts the workers when a node is lost; "
                "set dist.max_restarts to at least 1 (one per node loss to survive, e.g. 3)"
            )
        return self


class DeepSpeedConfig(StrictModel):
    zero_stage: int = Field(1, ge=0, le=3)
    """ZeRO stage of the backbone's optimizer state / gradients / parameters (0-3)."""
    config: dict[str, Any] = Field(default_factory=dict)
    """Extra DeepSpeed config keys, merged over the ones derived from train.* (batch size,
    accumulation, precision, clipping)."""
