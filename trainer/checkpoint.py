"""Checkpoints: ``run_dir/step-N/`` folders written atomically, a ``latest`` pointer, keep k.

Layout of one checkpoint::

    step-N/
      meta.json                 step, epoch, world size, backbone name/kwargs, resolved config
      backbone.pt               backbone state_dict (rank 0; the same on every DDP rank)
      classifier-rank{r}.pt     rank r's Partial FC shard: rows [class_start, class_start+count)
                                of the class centres with that global offset, and its optimizer
      trainer-rank{r}.pt        rank r's backbone optimizer and scheduler state

Every rank writes into ``step-N.tmp``; after a barrier rank 0 writes meta.json, renames the
folder to ``step-N`` (atomic on POSIX), rewrites ``latest`` and prunes old checkpoints. A
crash therefore leaves either a complete ``step-N`` or a ``.tmp`` folder that is ignored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not match the run."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk): its step-N.tmp folder is removed, the
    last complete checkpoint is as it was; the message names both."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_torch(obj: Any, path: Path) -> None:
    """torch.save through a temporary file, so a reader never sees half a file.

    Written through a Python file: a failed write raises its OSError (ENOSPC: no space left),
    where torch.save to a path raises a RuntimeError that names neither the cause nor the
    file ("unexpected pos 1344 vs 1238")."""
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as exc:
        # After a failed write torch's zip writer fails again as it closes: the OSError that
        # started it is the error.
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise
    os.replace(tmp, path)


def load_torch(path: Path) -> Any:
    """Safe load (weights_only: tensors and plain containers only) with a clear error."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, wrong format, unsafe content
        raise CheckpointError(f"{path}: cannot load checkpoint file: {exc}") from exc


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for child in run_dir.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / "meta.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def tmp_dir_for(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step}.tmp"


def fresh_tmp_dir(run_dir: Path, step: int) -> Path:
    """Rank 0: an empty ``step-N.tmp`` to write into. A job killed while saving step N (an
    elastic job's lost node) leaves its files there, shards of its own world size among them,
    which must not end up in the checkpoint of the job that saves step N next."""
    tmp = tmp_dir_for(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finalize(run_dir: Path, step: int, meta: dict[str, Any], keep: int) -> Path:
    """Rank 0, after every rank wrote its files into the .tmp folder: publish the checkpoint."""
    tmp = tmp_dir_for(run_dir, step)
    _atomic_write_bytes(tmp / "meta.json", json.dumps(meta, indent=2).encode())
    final = run_dir / f"step-{step}"
    if final.exists():  # the same step saved again (e.g. the end of a run that just saved)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _atomic_write_bytes(run_dir / "latest", f"{final.name}\n".encode())
    for _, old in step_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(step_dir: Path) -> dict[str, Any]:
    path = step_dir / "meta.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint metadata: {exc}") from exc


def resolve_checkpoint(path: str | Path) -> Path:
    """A step-N folder from itself, a run folder (its ``latest``) or a ``latest`` file."""
    p = Path(path)
    if p.is_file() and p.name == "latest":
        p = p.parent
    if (p / "meta.json").is_file():
        return p
    latest = p / "latest"
    if latest.is_file():
        target = p / latest.read_text().strip()
        if (target / "meta.json").is_file():
            return target
    found = step_dirs(p)
    if found:
        return found[-1][1]
    raise CheckpointError(f"{p}: no complete checkpoint (step-N/meta.json) found")
