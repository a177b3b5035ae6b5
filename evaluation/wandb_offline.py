"""Read back what a wandb offline run logged (the ``run-<id>.wandb`` file), without wandb's
service: for tests that check the logged keys and steps, and for plots of logged statistics.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then
32 KiB blocks of records, each with a 7-byte header (crc32 uint32, length uint16, type uint8:
1 full, 2 first, 3 middle, 4 last fragment); a block tail shorter than 7 bytes is zero
padding. Each joined record is a serialized ``wandb_internal_pb2.Record`` protobuf. The log of
a job killed while writing ends at its last complete record.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_FILE_HEADER = struct.Struct("<4sHB")
_RECORD_HEADER = struct.Struct("<IHB")
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class WandbLogError(ValueError):
    """The file is not a readable wandb run log."""


def iter_records(path: str | Path) -> Iterator[bytes]:
    """Serialized protobuf records of a ``.wandb`` file, in order."""
    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise WandbLogError(f"{path}: too short for a wandb log header")
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise WandbLogError(f"{path}: not a wandb log (header {ident!r} {magic:#x} v{version})")
    pos, pending = _FILE_HEADER.size, b""
    while pos + _RECORD_HEADER.size <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _RECORD_HEADER.size:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = _RECORD_HEADER.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled tail of a file still being written
            break
        start = pos + _RECORD_HEADER.size
        chunk = data[start : start + length]
        if len(chunk) < length:  # cut short: its writer was killed while writing it
            break
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            raise WandbLogError(f"{path}: unknown record type {kind} at byte {pos}")


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Every ``run.log`` call of the run as a dict (with ``_step``), in logging order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in iter_records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, Any] = {}
        for item in record.history.item:
            value = json.loads(item.value_json)
            if item.key:
                row[item.key] = value
                continue
            # A logged dict (a wandb.Histogram: _type, bins, values) arrives one field per
            # item under a nested key; put it back together.
            *parents, leaf = item.nested_key
            node = row
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = value
        if record.history.HasField("step"):
            row.setdefault("_step", record.history.step.num)
        rows.append(row)
    return rows


def find_run_log(run_dir: str | Path) -> Path:
    """The newest ``run-*.wandb`` file under a run folder (see :func:`find_run_logs`)."""
    return find_run_logs(run_dir)[-1]


def _started(log: Path) -> tuple[str, float]:
    """Sort key of a run log: its folder's start time (``offline-run-YYYYMMDD_HHMMSS-<id>``),
    then the file's modification time."""
    match = re.search(r"\d{8}_\d{6}", log.parent.name)
    return (match.group(0) if match else "", log.stat().st_mtime)


def find_run_logs(run_dir: str | Path) -> list[Path]:
    """The ``run-<id>.wandb`` files of the newest wandb run under a run folder, oldest first:
    a resumed training job continues its wandb run (same id) in a new folder."""
    logs = sorted(Path(run_dir).rglob("run-*.wandb"), key=_started)
    if not logs:
        raise WandbLogError(
            f"{run_dir}: no wandb run log (run-*.wandb) found (a run with wandb.mode: disabled "
            "logs none)"
        )
    return [log for log in logs if log.name == logs[-1].name]


def read_run_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged rows of the newest wandb run under a run folder, its resumed parts joined.

    A part resumed from a checkpoint logs no step the run already has
    (``trainer.wandb_rows``); where a part does (logs of earlier versions), the
    earlier parts' rows from the later part's first step on are dropped (they were redone).
    """
    rows: list[dict[str, Any]] = []
    for log in find_run_logs(run_dir):
        part = read_history(log)
        steps = [row["_step"] for row in part if "_step" in row]
        if steps:
            rows = [row for row in rows if row.get("_step", -1) < min(steps)]
        rows.extend(part)
    return rows
