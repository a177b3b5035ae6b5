"""``facetrain runs [OUTPUT_DIR]``: one line per run folder, read from what the run wrote
(``trainer.run_status.read_run``): name, latest step / total, last loss, best accuracy per
verification set, wandb id and state (running / finished / stopped / failed)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.run_status import RunInfo, is_run_dir, read_run

__all__ = ["cmd_runs", "format_runs"]

_HEADER = ("RUN", "STEP", "LOSS", "BEST ACCURACY", "WANDB", "STATE")


def _row(info: RunInfo) -> tuple[str, ...]:
    step = "-" if info.step is None else str(info.step)
    total = "?" if info.total_steps is None else str(info.total_steps)
    loss = "-" if info.loss is None else f"{info.loss:.4f}"
    best = " ".join(f"{name} {100 * acc:.2f}%" for name, acc in info.best_accuracy.items())
    state = info.state
    if info.reason:
        state += f" ({info.reason})"
    if info.state != "finished" and info.checkpoint_step is not None:
        state += f", checkpoint step-{info.checkpoint_step}"
    return (info.name, f"{step}/{total}", loss, best or "-", info.wandb_id or "-", state)


def format_runs(infos: list[RunInfo]) -> str:
    """A table with a header line; the last column (state) is not padded."""
    rows = [_HEADER, *(_row(i) for i in infos)]
    widths = [max(len(r[c]) for r in rows) for c in range(len(_HEADER) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(r, widths, strict=False)), r[-1]])
        for r in rows
    )


def cmd_runs(args: argparse.Namespace) -> int:
    root = Path(args.output_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (runs live in run.output_dir)")
    # A run folder itself, or the output folder holding runs.
    dirs = [root] if is_run_dir(root) else sorted(p for p in root.iterdir() if is_run_dir(p))
    if not dirs:
        print(f"no runs in {root}")
        return 0
    print(format_runs([read_run(d) for d in dirs]))
    return 0
