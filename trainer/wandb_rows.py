"""Every step of a resumed run in its wandb history exactly once: the rows a job logged, kept
in the run folder, and the last step the wandb run already has.

wandb writes an offline run's log (``run-<id>.wandb``) out every 15 s and per 32 KiB block,
so a job killed with ``kill -9`` loses the rows it logged since (all of them when it ran less
than that). And wandb keeps one row per step, the first logged: it drops a step that is not
above the last one the run has (online at once; a synced offline log when it is merged with
the run), and offline logs simply appended would hold such a step twice.

So rank 0 also writes each row it logs into ``RUN/wandb_rows.jsonl`` (a JSON line per log
call, written through: a killed job keeps all but the line it was writing), and a job that
resumes the wandb run from checkpoint step C:

- finds L, the last step the run has: the largest in its earlier offline logs in the run
  folder (read up to where a killed job's log ends), or, online, where wandb resumes it;
- logs again, from the record, the rows of the steps L < s <= C (logged before the
  checkpoint, lost with the killed job's log);
- logs none of the steps C < s <= L it computes again: the killed job's log has them, with
  the same values (the resume continues the checkpoint exactly).

The record then holds the re-logged rows and the job's own: what wandb may still lack.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

__all__ = ["ROWS_FILE", "RowRecord", "last_logged_step"]

ROWS_FILE = "wandb_rows.jsonl"


def last_logged_step(run_dir: Path, run_id: str) -> int:
    """The last step of wandb run ``run_id`` in the offline logs under ``run_dir`` (-1: none;
    a log that cannot be read counts as holding none)."""
    from evaluation.wandb_offline import read_history

    last = -1
    for log in run_dir.rglob(f"run-{run_id}.wandb"):
        try:
            rows = read_history(log)
        except Exception:  # a damaged log (its framing, a protobuf record, I/O): no steps
            continue
        last = max([last, *(int(row["_step"]) for row in rows if "_step" in row)])
    return last


class RowRecord:
    """``RUN/wandb_rows.jsonl``: ``{"step": s, "metrics": {...}}`` per line; a histogram
    (``wandb.Histogram``) is kept as its bins and counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def start(self, resumed_at: int | None, logged_up_to: int) -> list[tuple[int, dict]]:
        """Open the record for this job; returns the rows to log again, oldest first: those
        of the steps ``logged_up_to < s <= resumed_at`` (none for a job that does not
        resume a wandb run, whose record starts empty)."""
        rows = []
        if resumed_at is not None:
            rows = [
                (step, metrics)
                for step, metrics in self._read()
                if logged_up_to < step <= resumed_at
            ]
        part = self.path.with_name(self.path.name + ".part")
        part.write_text("".join(_line(step, metrics) for step, metrics in rows))
        os.replace(part, self.path)
        self._file = self.path.open("a", encoding="utf-8")
        return [(step, _decode(metrics)) for step, metrics in rows]

    def append(self, step: int, metrics: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(_line(step, _encode(metrics)))
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _read(self) -> list[tuple[int, dict]]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
                rows.append((int(row["step"]), dict(row["metrics"])))
            except (ValueError, KeyError, TypeError):  # the line a killed job was writing
                continue
        return rows


def _line(step: int, metrics: dict[str, Any]) -> str:
    return json.dumps({"step": step, "metrics": metrics}, default=_plain) + "\n"


def _plain(value: Any) -> Any:
    """A numpy scalar as a Python number."""
    return value.item()


def _encode(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        key: {"_histogram": {"bins": value.bins, "counts": value.histogram}}
        if hasattr(value, "histogram") and hasattr(value, "bins")
        else value
        for key, value in metrics.items()
    }


def _decode(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict) and "_histogram" in value:
            import wandb

            hist = value["_histogram"]
            value = wandb.Histogram(np_histogram=(hist["counts"], hist["bins"]))
        out[key] = value
    return out
