"""Measuring helpers shared by the benches: peak resident memory, free ports, timing of a
step on every rank, and the bare matrix products of a sampled Partial FC problem."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` size field in bytes (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where unavailable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def free_port() -> int:
    """A TCP port free on the loopback interface now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BareGemms:
    """The three matrix products of the sampled problem into preallocated outputs.

    ``[N, D] x [D, S]`` (logits), ``[N, S] x [S, D]`` (embedding gradient) and
    ``[S, N] x [N, D]`` (centre gradient): what any implementation must compute. The
    logits buffer doubles as the gradient operand (values do not change the time), and at
    sample_rate 1 the shard itself is the ``[S, D]`` operand. Buffers are allocated by
    ``prepare`` (untimed) and dropped by ``release``, so they never coexist with a step's.
    """

    def __init__(self, n: int, d: int, rows: Any) -> None:
        self.n, self.d, self.w = n, d, rows
        self.bufs: tuple[Any, ...] | None = None

    def prepare(self) -> None:
        import torch

        s = self.w.shape[0]
        self.bufs = (
            torch.randn(self.n, self.d),
            torch.ones(self.n, s),
            torch.empty(self.n, self.d),
            torch.ones(s, self.d),
        )

    def release(self) -> None:
        self.bufs = None

    def __call__(self) -> None:
        import torch

        assert self.bufs is not None
        x, out, gx, gw = self.bufs
        torch.mm(x, self.w.T, out=out)
        torch.mm(out, self.w, out=gx)
        torch.mm(out.T, x, out=gw)


def timed(fn: Any, barrier: Any) -> float:
    """Seconds of ``fn()`` on every rank, from a common start to the last rank's end."""
    barrier()
    t0 = time.perf_counter()
    fn()
    barrier()
    return time.perf_counter() - t0


def median(values: list[float]) -> float:
    """The upper median (an element of ``values``)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """A bench's JSON result at ``path`` (folders made), and a line saying where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
