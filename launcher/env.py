"""The one place that reads the process environment: torchrun, DeepSpeed launcher or Slurm.

``dist_context_from_env`` turns the variables a launcher sets into a DistContext; every other
package gets its rank, world size and device from that object.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.context import DistContext

# (rank, world size, local rank, local world size) under each launcher, in order of preference.
_LAUNCHER_VARS = (
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),  # torchrun, deepspeed
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),  # srun
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),  # MPI
)


class LaunchError(RuntimeError):
    """The environment does not describe a consistent distributed job."""


def under_launcher(environ: Mapping[str, str] | None = None) -> bool:
    """True when a launcher (torchrun, deepspeed, srun with tasks) started this process."""
    env = os.environ if environ is None else environ
    return "RANK" in env and "WORLD_SIZE" in env


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    raw = env.get(name)
    if raw is None:
        if default is None:
            raise LaunchError(f"environment variable {name} is not set")
        return default
    try:
        # SLURM_NTASKS_PER_NODE may look like "2(x3)"; the count is the leading number.
        return int(raw.split("(")[0])
    except ValueError as exc:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer") from exc


def planned_world_size(nproc: int, nnodes: int, environ: Mapping[str, str] | None = None) -> int:
    """The job's world size: the launcher's WORLD_SIZE when under one, else nproc x nnodes."""
    env = os.environ if environ is None else environ
    if under_launcher(env):
        return _int(env, "WORLD_SIZE")
    return nproc * nnodes


def restart_count(environ: Mapping[str, str] | None = None) -> int:
    """How many times torchrun's elastic agent has restarted this worker group."""
    env = os.environ if environ is None else environ
    return _int(env, "TORCHELASTIC_RESTART_COUNT", default=0)


def resolve_device(kind: str, local_rank: int) -> torch.device:
    """ "auto" -> cuda:<local_rank> when CUDA is available, else cpu."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LaunchError("dist.device is cuda but torch.cuda.is_available() is False")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def dist_context_from_env(
    device: str = "auto", backend: str = "auto", environ: Mapping[str, str] | None = None
) -> DistContext:
    """Build this process's DistContext from the launcher's environment variables.

    Without any launcher variables the process is a single rank with no process group.
    """
    env = os.environ if environ is None else environ
    names = next((n for n in _LAUNCHER_VARS if n[0] in env and n[1] in env), None)
    if names is None:
        dev = resolve_device(device, 0)
        return DistContext(0, 1, 0, 1, dev, "none")
    rank, world = _int(env, names[0]), _int(env, names[1])
    local_rank = _int(env, names[2], default=0)
    local_world = _int(env, names[3], default=1)
    dev = resolve_device(device, local_rank)
    if world == 1:  # e.g. a one-task srun: nothing to synchronise with
        return DistContext(rank, 1, local_rank, max(local_world, 1), dev, "none")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    return DistContext(rank, world, local_rank, local_world, dev, backend)


def prepare_deepspeed(ctx: DistContext, environ: MutableMapping[str, str] | None = None) -> None:
    """DeepSpeed picks its accelerator from DS_ACCELERATOR when it is first imported, and
    reads LOCAL_RANK (set by every launcher; here for a single process started without one)."""
    env = os.environ if environ is None else environ
    env.setdefault("DS_ACCELERATOR", "cuda" if ctx.device.type == "cuda" else "cpu")
    env.setdefault("LOCAL_RANK", str(ctx.local_rank))


INDUCTOR_CACHE_VAR = "TORCHINDUCTOR_CACHE_DIR"
USER_INDUCTOR_CACHE = os.path.join("~", ".cache", "facetrain", "inductor")


def compile_cache_dir(environ: MutableMapping[str, str] | None = None) -> Path:
    """Where torch.compile (train.compile) keeps its compiled kernels -- inductor's FX graph
    and AOT autograd caches -- so a second start or a resume loads them instead of compiling
    again: ``TORCHINDUCTOR_CACHE_DIR`` when set, else ``~/.cache/facetrain/inductor``, set in
    the environment for this process (and the compile workers it starts). Not torch's
    default: that is under the system temp dir, which clusters and reboots clear."""
    env = os.environ if environ is None else environ
    if not env.get(INDUCTOR_CACHE_VAR):
        env[INDUCTOR_CACHE_VAR] = os.path.expanduser(USER_INDUCTOR_CACHE)
    return Path(env[INDUCTOR_CACHE_VAR])


def init_process_group(
    ctx: DistContext,
    timeout_s: float = 1800.0,
    environ: Mapping[str, str] | None = None,
    one_rank_group: bool = False,
) -> None:
    """Join the job's process group (MASTER_ADDR/MASTER_PORT come from the launcher).

    Under torchrun, when the workers share the agent's store, its keys are prefixed with the
    restart attempt: after a restart the agent's store still holds the previous attempt's
    gloo addresses, and a new worker reading those would fail to connect to peers that no
    longer exist. Without it (an elastic job, ``launcher.elastic.AGENT_ENV``) rank 0 hosts a
    fresh store each round, and no prefix is needed: none would fit, as a node that joined
    later counts its restarts from 0.

    ``one_rank_group``: a single process (no job group) gets a group of its own, on an
    in-memory store (DeepSpeed refuses to start without a process group).
    """
    if dist.is_initialized():
        return
    if not ctx.distributed:
        if one_rank_group and ctx.world_size == 1:
            backend = "nccl" if ctx.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    env = os.environ if environ is None else environ
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if "TORCHELASTIC_RESTART_COUNT" in env and "MASTER_ADDR" in env:
        agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        base = dist.TCPStore(
            env["MASTER_ADDR"],
            _int(env, "MASTER_PORT"),
            ctx.world_size,
            is_master=not agent_store and ctx.rank == 0,
            timeout=timeout,
            multi_tenant=not agent_store,
        )
        store = base
        if agent_store:
            store = dist.PrefixStore(f"facetrain/attempt_{restart_count(env)}", base)
        dist.init_process_group(
            backend=ctx.backend,
            store=store,
            rank=ctx.rank,
            world_size=ctx.world_size,
            timeout=timeout,
        )
        return
    dist.init_process_group(
        backend=ctx.backend, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout
    )


def has_process_group() -> bool:
    """Whether this process's default process group is initialised (and not destroyed)."""
    return dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if has_process_group():
        dist.barrier()


def destroy_process_group() -> None:
    if has_process_group():
        dist.destroy_process_group()
