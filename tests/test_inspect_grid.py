"""`facetrain inspect PACK --grid out.png`: a sheet of sample images, each with its label."""

from __future__ import annotations

import numpy as np
import pytest
from _packs import corrupt_record, write_test_pack
from PIL import Image

from dataio.decode import decode_record
from dataio.inspect_grid import CAPTION_HEIGHT, GAP, grid_positions
from dataio.pack import FacePack
from launcher import cli

LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 4, 4, 4]  # class 3 has no image; key = position + 1
H, W = 40, 64


def test_grid_positions_draw_distinct_identities_and_their_images() -> None:
    labels = np.repeat(np.arange(10), 5)
    row_labels, grid = grid_positions(labels, rows=4, cols=3, seed=1)
    assert len(set(row_labels)) == 4 and row_labels == sorted(row_labels)
    for label, row in zip(row_labels, grid, strict=True):
        assert len(row) == 3 and row == sorted(row)
        assert all(labels[p] == label for p in row)
    assert grid_positions(labels, rows=4, cols=3, seed=1) == (row_labels, grid)
    assert grid_positions(labels, rows=4, cols=3, seed=2) != (row_labels, grid)
    # More than the pack holds: every identity, rows as long as its largest identity.
    row_labels, grid = grid_positions(np.array(LABELS), rows=9, cols=9)
    assert row_labels == [0, 1, 2, 4] and [len(r) for r in grid] == [4] * 4
    assert grid[1] == [3, 4, None, None]


def test_inspect_grid_writes_each_image_with_its_label(tmp_path, capsys) -> None:
    pack_dir = tmp_path / "pack"
    write_test_pack(pack_dir, LABELS, num_classes=5, size=(H, W))
    corrupt_record(pack_dir, 3, "jpeg")  # position 2 (identity 0) does not decode
    out = tmp_path / "sheets" / "grid.png"
    args = ["inspect", str(pack_dir), "--workers", "0", "--grid", str(out)]
    code = cli.main([*args, "--grid-rows", "4", "--grid-cols", "4"])
    assert code == 1  # the bad record is still reported by the check
    assert f"grid: 4 identities x 4 images -> {out}" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG"
        sheet = np.asarray(img.convert("RGB"))
    cell_h, cell_w = H + CAPTION_HEIGHT + GAP, W + GAP
    assert sheet.shape == (4 * cell_h, 4 * cell_w, 3)  # rows x cols of captioned images
    _, grid = grid_positions(np.array(LABELS), rows=4, cols=4)
    with FacePack(pack_dir, skip_corrupt=True) as pack:
        for r, row in enumerate(grid):
            for c, pos in enumerate(row):
                y, x = r * cell_h, c * cell_w
                image = sheet[y : y + H, x : x + W].astype(int)
                caption = sheet[y + H : y + H + CAPTION_HEIGHT, x : x + W].astype(int)
                if pos is None:  # identity 1 has two images: white cells
                    assert (image == 255).all() and (caption == 255).all()
                elif pos == 2:  # the undecodable record: grey, captioned in red
                    assert (image == 128).all()
                    red = (caption[..., 0] > 150) & (caption[..., 1] < 80)
                    assert red.sum() > 10
                else:  # the decoded pixels, exactly, with a dark caption under them
                    pixels, _ = decode_record(pack, pos)
                    assert np.array_equal(image, pixels.astype(int)), (r, c)
                    assert (caption.max(axis=2) < 100).sum() > 20
    # Each caption names its own record (label and key): no two are drawn alike.
    captions = {
        sheet[
            r * cell_h + H : r * cell_h + H + CAPTION_HEIGHT, c * cell_w : c * cell_w + W
        ].tobytes()
        for r, row in enumerate(grid)
        for c, pos in enumerate(row)
        if pos is not None
    }
    assert len(captions) == len(LABELS)


def test_grid_size_flags_are_named_when_wrong(tmp_path, capsys) -> None:
    for flag, value in (("--grid-rows", "0"), ("--grid-cols", "-2"), ("--grid-rows", "x")):
        args = ["inspect", str(tmp_path), "--grid", str(tmp_path / "g.png"), flag, value]
        with pytest.raises(SystemExit) as stop:
            cli.main(args)
        assert stop.value.code == 2
        assert f"argument {flag}: expected a positive integer" in capsys.readouterr().err
