"""An elastic job (``dist.elastic``): what ``facetrain train`` checks and asks of torchrun.

torchrun's elastic agent does the work -- a c10d rendezvous of ``min_nodes..max_nodes``
agents, worker restarts when one fails or a node joins. What facetrain adds: the worker
always continues the run folder's latest checkpoint (``launcher.worker``), re-sharding the
classifier onto the new world size (``trainer.resume``), and the collectives' timeout
(``dist.timeout_s``) that turns a peer lost without a word into a failure the agent sees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainer.config import Config
    from trainer.dist_config import ElasticConfig


def check_elastic_nodes(config: Config, nodes: int, option: str) -> None:
    """The nodes the job is planned for (``train --nnodes``, ``submit --nodes``: the
    dry-run's world size) must lie in dist.elastic's ``[min_nodes, max_nodes]``."""
    from trainer.config import ConfigError

    elastic = config.dist.elastic
    if elastic is not None and not elastic.min_nodes <= nodes <= elastic.max_nodes:
        raise ConfigError(
            f"{option} {nodes}: outside dist.elastic's {elastic.min_nodes}..{elastic.max_nodes} "
            f"nodes ({option} is the nodes the job is planned for)"
        )


def check_elastic_args(config: Config, nnodes: int, rdzv: str | None) -> None:
    """``facetrain train``: ``--nnodes`` fits (``check_elastic_nodes``), and every agent has
    the rendezvous, even the first one alone (the others join it later). Raises ConfigError
    naming the key."""
    from trainer.config import ConfigError

    check_elastic_nodes(config, nnodes, "--nnodes")
    if config.dist.elastic is not None and not rdzv:
        raise ConfigError(
            "dist.elastic: needs --rdzv HOST:PORT (the address of the node started with "
            "--node-rank 0, which hosts the rendezvous), also on one node"
        )


AGENT_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
"""The agent's environment in an elastic job. By default torchrun's agents hand the workers
the rendezvous round's first rank 0's store for good: a node joining a later round waits
forever for the address rank 0 no longer publishes, and a lost rank-0 node leaves the others
pointing at its store. Unshared, rank 0 publishes a fresh store every round, which its worker
hosts (``launcher.env.init_process_group``)."""


def rendezvous_args(
    elastic: ElasticConfig, node_rank: int, endpoint: str, run_id: str
) -> list[str]:
    """torchrun's options for an elastic c10d rendezvous.

    ``is_host``: node rank 0 hosts the rendezvous store, the others connect to it. torchrun
    would guess from the host name, and two agents on one machine would both qualify: the
    first to bind the port would host it, and losing that one ends the job for all.
    """
    conf = {
        "is_host": int(node_rank == 0),
        "join_timeout": elastic.join_timeout_s,
        "last_call_timeout": elastic.last_call_s,
        "keep_alive_interval": elastic.keep_alive_s,
        "keep_alive_max_attempt": 3,
    }
    return [
        f"--nnodes={elastic.min_nodes}:{elastic.max_nodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={run_id}",
        "--rdzv-conf=" + ",".join(f"{k}={v}" for k, v in conf.items()),
    ]
