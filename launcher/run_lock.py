"""One live writer per run folder: ``RUN_DIR/train.lock``.

The process that starts a run on node rank 0 holds it for as long as it lives: the launcher
that starts torchrun (``facetrain train``), or the process itself when it trains alone or is
rank 0 under a launcher of the user's (torchrun, srun with tasks). The other nodes of the same
job take none, so the agents of a multi-node or elastic job share the folder, whatever the
world size. A second ``facetrain train`` on the folder fails before it starts anything, with
one line naming the holder's ``host:pid``.

The lock is ``flock`` on the file: the kernel lets go of it when the holder's process ends,
however it ends (a shared filesystem with locking, NFSv4 or Lustre's ``flock`` mount, carries
it to other hosts). The file's content names the holder for that line; a holder that ended
without letting go (``kill -9``: its ranks die with it, see ``launcher.lifeline``) left its
name there, and the next start says it takes over that stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOCK_FILE", "RunFolderBusy", "hold_run_lock"]

LOCK_FILE = "train.lock"


class RunFolderBusy(ValueError):
    """Another live process trains in this run folder."""


def _holder(fd: int) -> str:
    return os.pread(fd, 256, 0).decode("utf-8", "replace").strip()


@contextlib.contextmanager
def hold_run_lock(run_dir: Path) -> Iterator[str | None]:
    """Hold ``run_dir``'s lock (the folder is made if missing) until the block ends; yields
    a note when it took over a stale lock, or when the filesystem has no locks (an NFS
    mounted without them: the run goes on, a second writer is not refused), else None.
    Raises :class:`RunFolderBusy`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd) or "another process"
            raise RunFolderBusy(
                f"{run_dir}: in use by {holder}, which is training in it ({path}): stop that "
                "run first, or give this one another run.name"
            ) from None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: no locks on this filesystem
            yield f"no file locks here ({exc.strerror}): a second writer is not refused"
            return
        stale = _holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        note = f"took over the stale lock of {stale} (it ended without letting go)"
        try:
            yield note if stale else None
        finally:
            os.ftruncate(fd, 0)  # a clean end leaves no name behind
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
