"""``train.record_samples``: which images each step trained on, one file per rank and job.

Each rank writes ``run_dir/samples/from-step-S-rank-R-of-W-pid-P.jsonl`` (S: the step the
job started from, W: its world size), one JSON line per micro-batch it draws::

    {"step": 7, "epoch": 0, "keys": [12, 3, ...]}

``step`` is the optimizer step the micro-batch belongs to, ``epoch`` the epoch it was drawn
from, ``keys`` the pack's record keys of its images. A job never appends to another job's
file, so a job killed mid-line leaves at most its own last line cut short (readers skip a
line without its newline). With the files of every rank and job, an audit can check that a
run -- resumed, re-sized by an elastic restart -- saw each image of an epoch once, apart
from the steps run again after a restart (see ``read_samples``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

import torch

SAMPLES_DIR = "samples"


class SampleRecord:
    """One rank's record of the micro-batches it draws (disabled: does nothing)."""

    def __init__(self, run_dir: Path, rank: int, world_size: int, enabled: bool) -> None:
        self.dir = run_dir / SAMPLES_DIR
        self.rank = rank
        self.world_size = world_size
        self.enabled = enabled
        self._file: IO[str] | None = None

    def take(self, step: int, epoch: int, batch: tuple[torch.Tensor, ...]) -> tuple[Any, ...]:
        """Record ``batch``'s keys (its third item) as drawn for ``step`` from ``epoch``;
        return ``(images, labels)``. ``batch`` is returned as it is when disabled."""
        if not self.enabled:
            return batch
        images, labels, keys = batch
        if self._file is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            name = (
                f"from-step-{step - 1}-rank-{self.rank}-of-{self.world_size}"
                f"-pid-{os.getpid()}.jsonl"
            )
            self._file = open(self.dir / name, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        line = {"step": step, "epoch": epoch, "keys": keys.tolist()}
        self._file.write(json.dumps(line) + "\n")  # line-buffered: on disk line by line
        return images, labels

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_samples(run_dir: Path) -> list[dict[str, Any]]:
    """Every job's record of a run folder: per file (one rank of one job), ``{"file",
    "start_step", "rank", "world_size", "lines"}``; a last line cut short is left out."""
    out = []
    for path in sorted((run_dir / SAMPLES_DIR).glob("from-step-*.jsonl")):
        parts = path.stem.split("-")  # from step S rank R of W pid P
        text = path.read_text(encoding="utf-8")
        complete = text[: text.rfind("\n") + 1]
        out.append(
            {
                "file": path.name,
                "start_step": int(parts[2]),
                "rank": int(parts[4]),
                "world_size": int(parts[6]),
                "lines": [json.loads(line) for line in complete.splitlines()],
            }
        )
    return out
