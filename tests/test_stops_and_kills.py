"""Faults in the middle of a run (issue 20): a stop signal at every phase of a start, the
launcher killed with SIGKILL, a second writer of a run folder, and the wandb history of a
run resumed after a kill.

Real ``facetrain train`` processes, 2 gloo ranks on a tiny pack. A test waits for the phase
it needs by watching the process tree and the run folder; every wait has a generous limit
(a loaded 2-core machine), none a tight one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from _runs import train_args, write_run_pack

from launcher.lifeline import StopSignals
from launcher.run_lock import LOCK_FILE, RunFolderBusy, hold_run_lock
from trainer.stop import StopFlag

LIMIT = 300.0
"""Seconds any one phase of a run may take here (a start, a stop, a short run)."""
GONE_WITHIN = 30.0
"""Seconds the processes of a killed launcher may take to end (the agent and the ranks end
at once; DataLoader workers notice their rank is gone within about 5 s)."""

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run_pack(tmp_path_factory.mktemp("stops") / "pack")


def _command(pack: Path, out: Path, *extra: str) -> list[str]:
    return train_args(
        pack,
        out,
        "run",
        "data.workers=1",  # a DataLoader worker per rank: it must go with its rank too
        "train.precision=fp32",  # whatever the demo recipe picks: runs of hundreds of steps
        "train.checkpoint_every=0",
        *extra,
    )


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Run:
    """A ``facetrain train`` process, its console in a file."""

    def __init__(self, pack: Path, out: Path, *extra: str) -> None:
        self.dir = out / "run"
        self.console = out / f"console-{time.monotonic_ns()}.txt"
        with self.console.open("w") as sink:
            self.proc = subprocess.Popen(
                _command(pack, out, *extra),
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=out,
                # As from a terminal: a shell's background job (CI) inherits SIGINT ignored.
                preexec_fn=_sigint_default,
            )

    def agent(self) -> psutil.Process | None:
        return next(iter(_children(self.proc.pid)), None)

    def ranks(self) -> list[psutil.Process]:
        agent = self.agent()
        return [] if agent is None else _children(agent.pid)

    def step(self) -> int:
        """The last step rank 0 reported (run.json)."""
        try:
            return int(json.loads((self.dir / "run.json").read_text()).get("step") or 0)
        except (OSError, ValueError):
            return 0

    def finish(self) -> tuple[int, str]:
        """Exit status and console, once the process ends."""
        try:
            code = self.proc.wait(timeout=LIMIT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return code, self.console.read_text()


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _wait_for(what: str, check: Callable[[], Any], limit: float = LIMIT) -> Any:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {limit:.0f} s: {what}")


def _checkpoints(run_dir: Path) -> dict[str, float]:
    """Complete checkpoints: name -> when published (meta.json's mtime)."""
    return {p.parent.name: p.stat().st_mtime for p in run_dir.glob("step-*/meta.json")}


def _stopped_cleanly(code: int, console: str, signame: str = "SIGTERM") -> str:
    """Exit 0, no traceback, and one line saying the stop; returns that line."""
    assert code == 0, console
    assert "Traceback" not in console, console
    said = [
        line for line in console.splitlines() if line.startswith(f"facetrain: received {signame}")
    ]
    assert len(said) == 1, console
    return said[0]


def _python(process: psutil.Process) -> bool:
    """Whether ``process`` runs Python (not wandb's service, which has a lifeline of its own)."""
    try:
        return process.cmdline()[0] == sys.executable
    except (psutil.Error, IndexError):
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_to_the_launcher_while_the_ranks_start(pack: Path, tmp_path: Path) -> None:
    """The ranks exist but are still importing torch: they stop before their first step
    (nothing to save), and the run exits 0 with one line."""
    run = Run(pack, tmp_path, "train.max_steps=60")
    _wait_for("2 ranks started", lambda: len(run.ranks()) == 2)
    run.proc.send_signal(signal.SIGTERM)
    code, console = run.finish()
    line = _stopped_cleanly(code, console)
    assert line == "facetrain: received SIGTERM before the first step; nothing to checkpoint"
    assert not _checkpoints(run.dir)


def test_sigterm_before_the_launcher_starts_anything(
    pack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process: SIGTERM while ``facetrain train`` checks its inputs: it starts nothing and
    says so, exit 0."""
    from launcher import cli, preflight, train_commands

    def checks_then_signal(_config: object) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        # The signal thread takes it (then it is no longer pending) and raises the flag.
        _wait_for("SIGTERM taken", lambda: signal.SIGTERM not in signal.sigpending())
        time.sleep(0.5)

    def started(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("started after a stop signal")

    monkeypatch.setattr(preflight, "check_run_inputs", checks_then_signal)
    monkeypatch.setattr(train_commands, "_spawn_torchrun", started)
    argv = _command(pack, tmp_path)[3:]  # after `python -m launcher.cli`
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out == "facetrain: received SIGTERM before the run started; nothing to checkpoint\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # given back


def test_sigterm_to_the_agent_before_any_rank_exists(pack: Path, tmp_path: Path) -> None:
    """torchrun's agent gets SIGTERM before it started a rank: it stops there, exit 0."""
    run = Run(pack, tmp_path, "train.max_steps=60")
    agent = _wait_for("torchrun's agent started", run.agent)
    agent.send_signal(signal.SIGTERM)
    code, console = run.finish()
    line = _stopped_cleanly(code, console)
    # (On a slow machine the ranks may have been forked meanwhile: then they stop.)
    assert line.endswith(
        (
            "before the ranks started; nothing to checkpoint",
            "before the first step; nothing to checkpoint",
        )
    ), line
    assert not _checkpoints(run.dir)


def test_sigterm_to_the_agent_mid_run_and_a_second_writer(pack: Path, tmp_path: Path) -> None:
    """While a run trains, a second ``facetrain train`` on its folder is refused before it
    starts anything, naming the holder; SIGTERM to torchrun's agent then stops the run with
    a checkpoint of the last step."""
    run = Run(pack, tmp_path, "train.max_steps=600")
    _wait_for("step 2 reported", lambda: run.step() >= 2)
    holder = f"{socket.gethostname()}:{run.proc.pid}"
    assert (run.dir / LOCK_FILE).read_text().strip() == holder
    second = subprocess.run(
        _command(pack, tmp_path, "train.max_steps=600"),
        capture_output=True,
        text=True,
        timeout=LIMIT,
        cwd=tmp_path,
    )
    assert second.returncode == 2, second.stdout + second.stderr
    assert second.stdout == ""  # nothing started
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"in use by {holder}" in lines[0], second.stderr

    run.agent().send_signal(signal.SIGTERM)
    code, console = run.finish()
    line = _stopped_cleanly(code, console)
    saved = sorted(_checkpoints(run.dir), key=lambda name: int(name.split("-")[1]))
    assert len(saved) == 1 and line.endswith(f"{saved[0]}; resume with --resume auto"), line
    meta = json.loads((run.dir / saved[0] / "meta.json").read_text())
    assert meta["step"] >= 2
    assert json.loads((run.dir / "run.json").read_text())["state"] == "stopped"
    assert (run.dir / LOCK_FILE).read_text() == ""  # let go


def test_a_killed_launcher_leaves_no_rank_and_the_resumed_history_holds_each_step_once(
    pack: Path, tmp_path: Path
) -> None:
    """kill -9 of ``facetrain train`` alone: its agent, ranks and DataLoader workers end
    within seconds and write no checkpoint after it; the next start takes over the stale
    lock, resumes, and the wandb history of the two jobs, merged as wandb merges a resumed
    run, holds every step exactly once."""
    from evaluation.wandb_offline import find_run_logs, read_history

    settings = ("wandb.mode=offline", "train.checkpoint_every=20")
    run = Run(pack, tmp_path, *settings, "train.max_steps=600")
    # Well past step-20 (and before step-40): the next job computes some steps again.
    _wait_for("step 22 reported", lambda: run.step() >= 22)
    for rank in run.ranks():  # held where they are (SIGKILL ends a stopped process too)
        rank.suspend()
    tree = [p for p in psutil.Process(run.proc.pid).children(recursive=True) if _python(p)]
    # The agent, two ranks and (most of the time) their DataLoader workers.
    assert len(tree) >= 3, tree
    run.proc.kill()
    killed_at = time.time()
    run.proc.wait(timeout=LIMIT)
    _wait_for(
        "the agent, the ranks and their DataLoader workers ended",
        lambda: not any(_alive(p) for p in tree),
        limit=GONE_WITHIN,
    )
    gone_after = time.time() - killed_at
    time.sleep(2.0)
    saved = _checkpoints(run.dir)
    late = {name: when for name, when in saved.items() if when > killed_at + 1.0}
    assert not late, f"written after the launcher was killed: {late}"
    reached = run.step()
    last_saved = max(int(name.split("-")[1]) for name in saved)
    # (On a loaded machine step-40 may be written before the ranks are held.)
    assert "step-20" in saved and last_saved <= reached, (saved, reached)

    end = reached + 3
    resumed = Run(pack, tmp_path, *settings, f"train.max_steps={end}", "--resume", "auto")
    code, console = resumed.finish()
    assert code == 0, console
    assert f"took over the stale lock of {socket.gethostname()}:{run.proc.pid}" in console

    first, second = (
        [row["_step"] for row in read_history(log) if "train/loss" in row]
        for log in find_run_logs(run.dir)
    )
    # The killed job's log ends where wandb last wrote it out (maybe before step 1).
    last = max(first, default=0)
    assert first == list(range(1, last + 1)), first
    # The resumed job logged what the run lacked, and only that: merged as wandb merges a
    # resumed run (it drops a step not above the last one it has) or simply appended, the
    # history holds every step once.
    assert second == list(range(last + 1, end + 1)), (last, second)
    print(f"ranks gone {gone_after:.2f} s after the kill; killed log ends at step {last}")


def test_stop_signals_raise_the_flag_and_pass_on_to_a_process() -> None:
    """In-process: a stop signal raises the flag; one received before a relay target is
    known is passed on when it is given; the previous handler is back after close."""
    flag = StopFlag()
    previous = signal.getsignal(signal.SIGUSR1)
    child_code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(7))\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])\n"  # inherited blocked
        "time.sleep(120)\n"
    )
    with StopSignals(flag) as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        _wait_for("the flag raised", flag.is_set, limit=30)
        assert flag.reason == "received SIGUSR1"
        child = subprocess.Popen([sys.executable, "-c", child_code])
        time.sleep(1.0)  # let it install its handler (a signal before is kept pending)
        signals.relay_to(child.pid)
        assert child.wait(timeout=60) == 7
    assert signal.getsignal(signal.SIGUSR1) is previous
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_run_lock_refuses_a_second_holder_and_takes_over_a_stale_one(tmp_path: Path) -> None:
    me = f"{socket.gethostname()}:{os.getpid()}"
    with hold_run_lock(tmp_path / "r") as note:
        assert note is None
        assert (tmp_path / "r" / LOCK_FILE).read_text() == f"{me}\n"
        with pytest.raises(RunFolderBusy, match=f"in use by {me}"), hold_run_lock(tmp_path / "r"):
            pass
    assert (tmp_path / "r" / LOCK_FILE).read_text() == ""
    # A holder killed without letting go left its name (the kernel let go of the lock).
    (tmp_path / "r" / LOCK_FILE).write_text("elsewhere:4242\n")
    with hold_run_lock(tmp_path / "r") as note:
        assert note == "took over the stale lock of elsewhere:4242 (it ended without letting go)"


def test_run_lock_on_a_filesystem_without_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NFS mounted without locks: the run goes on, and says a second writer is not refused."""
    import errno
    import fcntl

    def no_locks(*_args: object) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with hold_run_lock(tmp_path / "r") as note:
        assert note == "no file locks here (No locks available): a second writer is not refused"


def test_ctrl_c_stops_the_run_as_sigterm_does(pack: Path, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to ``facetrain train``; its agent has a session of its own): the ranks
    finish their step and checkpoint, exit 0 with the stop line, no traceback."""
    run = Run(pack, tmp_path, "train.max_steps=600")
    _wait_for("step 2 reported", lambda: run.step() >= 2)
    run.proc.send_signal(signal.SIGINT)
    code, console = run.finish()
    line = _stopped_cleanly(code, console)
    assert "facetrain: interrupted: stopping the ranks (as on SIGTERM)" in console, console
    saved = sorted(_checkpoints(run.dir), key=lambda name: int(name.split("-")[1]))
    assert len(saved) == 1 and line.endswith(f"{saved[0]}; resume with --resume auto"), line


def test_a_rank_started_after_its_agent_had_a_stop_signal_stops_too() -> None:
    """The agent had SIGTERM while torchrun was between two rounds (a restart, an elastic
    round): the rank torchrun starts next inherits the stop in its environment."""
    code = (
        "from launcher.lifeline import rank_lifeline\n"
        "flag = rank_lifeline()\n"
        "print(flag.is_set(), flag.reason)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACETRAIN_")}
    plain = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert plain.stdout.split()[0] == "False", plain.stdout + plain.stderr
    env["FACETRAIN_STOP"] = "SIGTERM"
    told = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert told.stdout.strip() == "True received SIGTERM", told.stdout + told.stderr
