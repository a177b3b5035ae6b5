"""Spawn a few gloo worker processes on 127.0.0.1 for multi-process tests.

The worker function must be defined at module level of an importable module (spawn pickles it
by name). Each worker gets ``(rank, world_size, *args)`` with the default process group already
initialised; an exception in any worker fails the calling test with that worker's traceback.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A hung collective should fail the test quickly rather than wait for pytest's global timeout.
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple[Any, ...]
) -> None:
    # The test machine has 2 cores; several processes with many threads each would thrash.
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Success: leave without tearing gloo down. destroy_process_group right after the final
    # barrier aborts now and then in gloo's destructors ("terminate called without an active
    # exception", SIGABRT; about 1 run in 40 of a 2-process test on the development machine),
    # which would fail a test whose checks all passed. The OS closes the sockets.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned gloo processes."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)
