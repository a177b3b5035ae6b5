"""``facetrain inspect PACK --grid out.png``: a sheet of a pack's images with their labels.

Why: a glance shows whether a pack holds what it should -- aligned faces, the same person
along a row, no rotated or black images -- before hours of training. Each row is one
identity (drawn at random, seeded), its images side by side in the pack's own size, each
with its class label and record key written under it; a record that does not decode is a
grey cell naming its key.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.checks import check_int
from dataio.decode import decode_record
from dataio.pack import FacePack, PackError

__all__ = ["CAPTION_HEIGHT", "GAP", "GridInfo", "grid_positions", "write_grid"]

CAPTION_HEIGHT = 14
"""Pixels under each image for its caption (label and record key)."""
GAP = 2
"""White pixels right of and below each cell."""


@dataclasses.dataclass(frozen=True)
class GridInfo:
    """What :func:`write_grid` drew."""

    path: Path
    rows: int
    cols: int
    image_size: tuple[int, int]
    """(height, width) of each image: the pack's."""
    positions: list[list[int | None]]
    """Per row, the pack positions drawn in each column (None: the identity has no more)."""
    labels: list[int]
    """The class label of each row."""
    bad: dict[int, str]
    """Record key -> reason, for the drawn records that did not decode."""


def grid_positions(
    labels: np.ndarray, rows: int, cols: int, seed: int = 0
) -> tuple[list[int], list[list[int | None]]]:
    """(row labels, per row the image positions) for a sheet of ``rows`` identities with up
    to ``cols`` images each: identities with images drawn at random without replacement
    (sorted), and for each, ``cols`` of its images at random (in pack order). Rows are as
    long as the longest one (None pads them)."""
    check_int("rows", rows, minimum=1)
    check_int("cols", cols, minimum=1)
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    chosen = np.sort(rng.choice(present, size=min(rows, present.size), replace=False))
    picked = []
    for label in chosen:
        where = np.flatnonzero(labels == label)
        picked.append(np.sort(rng.choice(where, size=min(cols, where.size), replace=False)))
    width = max(p.size for p in picked)
    grid: list[list[int | None]] = [[int(i) for i in p] + [None] * (width - p.size) for p in picked]
    return [int(v) for v in chosen], grid


def write_grid(
    pack_dir: str | os.PathLike[str],
    path: str | os.PathLike[str],
    rows: int = 8,
    cols: int = 8,
    seed: int = 0,
) -> GridInfo:
    """Draw ``rows`` identities x up to ``cols`` images of the pack, each with its label and
    record key under it, and save the sheet as PNG at ``path``.

    The sheet is ``cols * (W + GAP)`` wide and ``rows * (H + CAPTION_HEIGHT + GAP)`` high for
    the pack's ``H x W`` images (fewer rows or columns when the pack has fewer identities, or
    fewer images of each, than asked; :class:`GridInfo` says how many were drawn).
    """
    with FacePack(pack_dir, skip_corrupt=True) as pack:
        row_labels, positions = grid_positions(pack.labels, rows, cols, seed)
        cols = len(positions[0])
        h, w = pack.image_size
        cell_w, cell_h = w + GAP, h + CAPTION_HEIGHT + GAP
        sheet = Image.new("RGB", (cols * cell_w, len(positions) * cell_h), "white")
        draw = ImageDraw.Draw(sheet)
        font = ImageFont.load_default()
        bad: dict[int, str] = {}
        for r, row in enumerate(positions):
            for c, pos in enumerate(row):
                if pos is None:
                    continue
                x, y = c * cell_w, r * cell_h
                key = int(pack.image_keys[pos])
                try:
                    pixels, label = decode_record(pack, pos)
                except PackError as e:
                    bad[key] = str(e)
                    draw.rectangle((x, y, x + w - 1, y + h - 1), fill=(128, 128, 128))
                    draw.text((x + 2, y + h + 1), f"bad #{key}", fill=(200, 0, 0), font=font)
                    continue
                sheet.paste(Image.fromarray(pixels), (x, y))
                draw.text((x + 2, y + h + 1), f"id {label} #{key}", fill="black", font=font)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, format="PNG")
    return GridInfo(out, len(positions), cols, (h, w), positions, row_labels, bad)
