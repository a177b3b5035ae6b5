"""A run folder's state: ``run.json`` written by rank 0, and reading a folder back.

``run.json`` (rewritten atomically, so a reader never sees half of it) says who runs the run
and how far it got: ``state`` (running, finished, stopped, failed), ``reason``, ``pid`` and
``host`` of rank 0, ``started`` / ``updated`` (Unix times), ``step``, ``total_steps``,
``loss`` (the last logged), ``best_accuracy`` (per verification set), ``wandb_id``,
``world_size``. It is written when a job starts, at every progress line and evaluation, and
when the job ends.

:func:`read_run` gives ``facetrain runs`` one run's line from whatever the folder holds: a
run killed without a word still says "running" in its run.json, so "running" is believed
only while rank 0's process is alive on this host (or, seen from another host, while the run
wrote something in the last :data:`STALE_AFTER_S` seconds); otherwise the run is "stopped".
A folder without run.json (an older run, a job killed before its first line) is read from
its latest complete checkpoint, ``summary.json`` and the last lines of ``training.log``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from trainer import checkpoint as ckpt
from trainer.run_log import LOG_FILE

__all__ = [
    "CONFIG_FILE",
    "STATUS_FILE",
    "RunInfo",
    "RunStatus",
    "is_run_dir",
    "read_run",
    "read_status",
]

STATUS_FILE = "run.json"
CONFIG_FILE = "config.yaml"
STALE_AFTER_S = 900.0
"""A run on another host counts as running while its folder changed this recently."""

_STEP_LINE = re.compile(r"\[step (\d+)/(\d+)\].*?  loss (\S+)")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_config(run_dir: Path, text: str) -> Path:
    """The resolved config (``trainer.config.dump_config``) as ``run_dir/config.yaml``."""
    path = run_dir / CONFIG_FILE
    _write_atomic(path, text)
    return path


class RunStatus:
    """Rank 0's ``run.json``; a no-op on the other ranks."""

    def __init__(self, run_dir: Path, enabled: bool, **fields: Any) -> None:
        self.path = run_dir / STATUS_FILE
        self.enabled = enabled
        now = time.time()
        self.fields: dict[str, Any] = {
            "state": "running",
            "reason": None,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": now,
            **fields,
        }

    def update(self, **changes: Any) -> None:
        """Merge ``changes`` and rewrite the file (with ``updated`` set to now)."""
        if not self.enabled:
            return
        self.fields.update(changes, updated=time.time())
        _write_atomic(self.path, json.dumps(self.fields, indent=2))


@dataclasses.dataclass
class RunInfo:
    """What ``facetrain runs`` shows of one run folder (None where the folder does not say)."""

    name: str
    state: str  # running / finished / stopped / failed
    reason: str | None = None
    step: int | None = None
    total_steps: int | None = None
    checkpoint_step: int | None = None
    loss: float | None = None
    best_accuracy: dict[str, float] = dataclasses.field(default_factory=dict)
    wandb_id: str | None = None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; {} when missing, unreadable or half-written."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_status(run_dir: Path) -> dict[str, Any]:
    """The run folder's ``run.json`` as written ({} when missing or unreadable)."""
    return _read_json(run_dir / STATUS_FILE)


def _latest_checkpoint(run_dir: Path) -> dict[str, Any]:
    """meta.json of the newest complete, readable step-N folder ({} if none)."""
    try:
        found = ckpt.step_dirs(run_dir)
    except OSError:  # an unreadable folder
        return {}
    for _, step_dir in reversed(found):
        try:
            return ckpt.read_meta(step_dir)
        except ckpt.CheckpointError:
            continue
    return {}


def _last_step_line(run_dir: Path) -> tuple[int, int, float] | None:
    """(step, total, loss) of the last step line of training.log (its last 64 KiB)."""
    path = run_dir / LOG_FILE
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 65536))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        m = _STEP_LINE.search(line)
        if m:
            try:
                return int(m.group(1)), int(m.group(2)), float(m.group(3))
            except ValueError:
                continue
    return None


def _process_alive(pid: Any, started: Any) -> bool:
    """``pid`` is a live process on this host that was already there at ``started``."""
    import psutil

    try:
        proc = psutil.Process(int(pid))
        alive = proc.status() != psutil.STATUS_ZOMBIE
        # A pid reused by a later process is not the run's.
        return alive and proc.create_time() <= float(started) + 1.0
    except (psutil.Error, TypeError, ValueError):
        return False


def _last_write(run_dir: Path) -> float:
    times = []
    for name in (STATUS_FILE, LOG_FILE):
        try:
            times.append((run_dir / name).stat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


def _state(run_dir: Path, status: dict[str, Any]) -> tuple[str, str | None]:
    """(state, reason): run.json's word, unless it says running and nobody is."""
    state = status.get("state")
    if state in ("finished", "stopped", "failed"):
        return state, status.get("reason")
    fresh = time.time() - _last_write(run_dir) < STALE_AFTER_S
    if not status:  # an older run, or one killed before it wrote run.json
        if (run_dir / "summary.json").is_file():
            return "finished", None
        return ("running", "training.log is being written") if fresh else ("stopped", None)
    host = status.get("host")
    if host == socket.gethostname():
        if _process_alive(status.get("pid"), status.get("started")):
            return "running", None
        return "stopped", "process ended without a word: killed?"
    if fresh:
        return "running", f"on {host}"
    return "stopped", f"on {host}, nothing written for {STALE_AFTER_S / 60:.0f} min"


def is_run_dir(path: Path) -> bool:
    """A folder that a training run wrote into (run.json, training.log, a checkpoint...)."""
    names = (STATUS_FILE, LOG_FILE, CONFIG_FILE, "latest", "summary.json")
    try:
        return path.is_dir() and (
            any((path / n).exists() for n in names) or bool(ckpt.step_dirs(path))
        )
    except OSError:  # unreadable: not one we can show
        return False


def read_run(run_dir: Path) -> RunInfo:
    """One run's state, step, loss, best accuracies and wandb id, from what its folder holds;
    whatever is missing or half-written stays None."""
    status = _read_json(run_dir / STATUS_FILE)
    meta = _latest_checkpoint(run_dir)
    state, reason = _state(run_dir, status)
    info = RunInfo(name=run_dir.name, state=state, reason=reason)
    info.checkpoint_step = meta.get("step")
    info.step = status.get("step", meta.get("step"))
    info.total_steps = status.get("total_steps", meta.get("derived", {}).get("total_steps"))
    info.loss = status.get("loss")
    info.best_accuracy = status.get("best_accuracy") or meta.get("best_accuracy") or {}
    info.wandb_id = status.get("wandb_id") or meta.get("wandb_id")
    if info.loss is None or info.step is None:
        last = _last_step_line(run_dir)
        if last is not None:
            if info.step is None or last[0] >= info.step:
                info.step, info.total_steps, info.loss = last
    if info.loss is None:
        info.loss = _read_json(run_dir / "summary.json").get("train", {}).get("final_loss")
    return info
