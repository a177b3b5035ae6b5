"""How the processes of a run stop: stop signals at every phase, and dying with the process
that started them.

A run's processes on one node, each in a session of its own below the launcher (a signal to
the launcher's process group, as srun and slurmstepd send, must not reach them unasked)::

    facetrain train (the launcher) -> torchrun's agent (launcher.agent) -> ranks
                                                   (launcher.worker) -> DataLoader workers

**Stop signals** (SIGTERM, SIGUSR1: ``kill``, ``scancel``, Slurm's time limit and
``--signal``) ask for a clean stop, whichever of these processes gets one, in whatever phase:

- the launcher passes it to its agent; before the agent exists it starts nothing and says so;
- the agent passes it to its ranks; before they exist it stops there and says so (nothing was
  trained); it never kills its ranks for it;
- a rank raises its ``StopFlag``: before the first step it stops with nothing to save, after
  one it finishes the step and saves a checkpoint (``trainer.loop``).

Each exits 0. Slurm signals every process of a job: each gets it from Slurm and from its
parent, which does no harm. No signal is lost or fatal at start-up, nor interrupts a blocking
call: each process keeps the stop signals blocked in its main thread and takes them in a
thread of its own (``sigwait``). A signal mask is inherited through fork and exec, so a
child starts with them blocked: one that arrives while it is still importing torch waits
until it is ready to act on it.

**Death of the parent**: the agent dies with its launcher and each rank with its agent, by
Linux's parent-death signal (SIGKILL), which the child asks for itself; a child whose parent
died before it asked ends at once. So a launcher killed with SIGKILL (or by the OOM killer)
leaves no rank training and writing checkpoints into a run folder the next job then shares.
DataLoader workers follow their rank within seconds (torch's own watchdog).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from trainer.stop import StopFlag

__all__ = [
    "AGENT_PID_ENV",
    "LAUNCHER_PID_ENV",
    "STOP_SIGNALS",
    "StopSignals",
    "agent_lifeline",
    "die_with_parent",
    "rank_lifeline",
]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
LAUNCHER_PID_ENV = "FACETRAIN_LAUNCHER_PID"
"""Set by the launcher for its agent: the pid the agent must die with."""
AGENT_PID_ENV = "FACETRAIN_AGENT_PID"
"""Set by the agent for its ranks: the pid they must die with."""
STOP_ENV = "FACETRAIN_STOP"
"""Set by the agent once it had a stop signal (its name): a rank it starts later stops too."""

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class StopSignals:
    """From construction until :meth:`close`, SIGTERM / SIGUSR1 raise ``flag`` ("received
    SIGTERM") and are passed on: to ``on_signal(signum)``, and to the process given to
    :meth:`relay_to` (one received before it is passed on when it is given).

    Construct it in the main thread, before the threads it must cover: they inherit the block.
    A thread started earlier that does not block them still gets one now and then; a Python
    handler catches it there.
    """

    def __init__(self, flag: StopFlag, on_signal: Callable[[int], None] | None = None) -> None:
        self.flag = flag
        self._on_signal = on_signal
        self._lock = threading.Lock()
        self._received: list[int] = []
        self._relay: int | None = None
        self._handlers = {sig: signal.signal(sig, self._handler) for sig in STOP_SIGNALS}
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._wait, name="stop-signals", daemon=True)
        self._thread.start()

    def relay_to(self, pid: int) -> None:
        """Pass every stop signal on to ``pid`` from now on, and those received already."""
        with self._lock:
            self._relay = pid
            received = list(self._received)
        for signum in received:
            _kill(pid, signum)

    def close(self) -> None:
        """Stop taking the signals: unblock them (one still pending raises the flag) and put
        the previous handlers back."""
        self._closed.set()
        # A signal to the waiting thread alone (pthread_kill) wakes it, to end.
        signal.pthread_kill(self._thread.ident, signal.SIGUSR1)
        self._thread.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        for sig, handler in self._handlers.items():
            signal.signal(sig, handler)

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def _wait(self) -> None:
        # sigwait, not sigtimedwait with a timeout: CPython 3.11's sigtimedwait, woken by
        # SIGSTOP / SIGCONT (a suspended job) after its timeout, returns a siginfo that was
        # never filled in, and a signal that arrived meanwhile stays pending.
        while True:
            signum = signal.sigwait(STOP_SIGNALS)
            if self._closed.is_set():
                return
            self._take(signum)

    def _handler(self, signum: int, _frame: Any) -> None:
        self._take(signum)

    def _take(self, signum: int) -> None:
        self.flag.set(f"received {signal.Signals(signum).name}")
        with self._lock:
            self._received.append(signum)
            relay = self._relay
        if relay is not None:
            _kill(relay, signum)
        if self._on_signal is not None:
            self._on_signal(signum)


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def die_with_parent(parent_env: str) -> None:
    """End this process (SIGKILL) when its parent ends: the parent whose pid the environment
    variable ``parent_env`` holds; nothing without it, or off Linux.

    Linux's ``prctl(PR_SET_PDEATHSIG)``, called through ctypes: neither the standard library
    nor psutil offers it. It fires when the parent *thread* that started this process ends:
    the launcher and torchrun both start their children from their main threads. If the
    parent died before this process asked, it ends now.
    """
    parent = os.environ.get(parent_env)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != int(parent):
        os._exit(1)  # orphaned already: nobody to train for


def agent_lifeline() -> StopSignals:
    """torchrun's agent, first thing: die with the launcher, make the ranks die with it, and
    pass stop signals to the ranks, or stop right here while there are none."""
    die_with_parent(LAUNCHER_PID_ENV)
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # torchrun passes it to the ranks
    return StopSignals(StopFlag(), on_signal=_to_ranks)


def _to_ranks(signum: int) -> None:
    """The agent's stop signal: to its ranks (its children); with none running (not started
    yet, or between two rounds of an elastic job) the agent ends now, having trained nothing
    and started no rank that could (a rank forked meanwhile dies with it)."""
    import psutil

    from launcher import failure

    name = signal.Signals(signum).name
    # Ranks that torchrun starts from now on (a restart, an elastic round under way) inherit
    # the stop with the environment and stop before their first step.
    os.environ[STOP_ENV] = name
    children = psutil.Process().children()
    ranks = [child.pid for child in children if _alive(child)]
    for pid in ranks:
        _kill(pid, signum)
    if not children:  # (ranks that have just ended: torchrun reports how)
        if failure.told():  # they failed: the launcher tells how, with the agent's status
            os._exit(failure.EXIT_CODE)
        print(f"facetrain: received {name} before the ranks started; nothing to checkpoint")
        sys.stdout.flush()
        os._exit(0)


def _alive(process: Any) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def rank_lifeline() -> StopFlag:
    """A rank in a process of its own (``launcher.worker``), first thing: die with the agent
    that started it (if ours), and take the stop signals for the life of the process."""
    die_with_parent(AGENT_PID_ENV)
    flag = StopSignals(StopFlag()).flag
    if os.environ.get(STOP_ENV):  # the agent had a stop signal before it started this rank
        flag.set(f"received {os.environ[STOP_ENV]}")
    return flag
