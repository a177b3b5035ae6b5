"""Header packs past 2**24 records (Glint360K, WebFace42M): the header's and the identity
records' key ranges are float32, so MXNet's packer stores them rounded to a multiple of the
float32 gap there (2 above 2**24, 4 above 2**25). The reader must still give every image its
own class. A real pack that size does not fit a test, so float32 is made coarser instead:
``_float32_spacing`` says 4 from key 16 on, and the stored ranges are rounded to match."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataio.identity_labels as identity_labels
from dataio.pack import FacePack, PackError
from dataio.packer import write_pack
from dataio.record_reader import read_index
from dataio.recordio import IRHeader, pack_record, unpack_record

COUNTS = [3, 9, 2, 11, 1, 14]  # images per class: boundaries at 1, 4, 13, 15, 26, 27, 41
GAP, EXACT_BELOW = 4, 16


def _coarse_spacing(value: int) -> int:
    return GAP if value >= EXACT_BELOW else 1


def _round(value: int) -> int:
    return value if value < EXACT_BELOW else int(np.round(value / GAP) * GAP)


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10 * i % 256, 0, 0)).save(buf, format="JPEG")
    return buf.getvalue()


def _rewrite_label(pack: Path, key: int, label: list[int]) -> None:
    """Overwrite a header/identity record's 2-value label in place (same length)."""
    _, offsets = read_index(pack / "train.idx")
    rec = bytearray((pack / "train.rec").read_bytes())
    off = offsets[key]
    length = int.from_bytes(rec[off + 4 : off + 8], "little") & ((1 << 29) - 1)
    head, payload = unpack_record(bytes(rec[off + 8 : off + 8 + length]))
    new = pack_record(IRHeader(0, np.asarray(label, np.float32), head.id, head.id2), payload)
    assert len(new) == length
    rec[off + 8 : off + 8 + length] = new
    (pack / "train.rec").write_bytes(bytes(rec))


@pytest.fixture()
def rounded_pack(tmp_path: Path) -> tuple[Path, list[int]]:
    labels = [c for c, n in enumerate(COUNTS) for _ in range(n)]
    write_pack(tmp_path, [(c, _jpeg(i)) for i, c in enumerate(labels)], len(COUNTS), (8, 8))
    first_id = len(labels) + 1
    _rewrite_label(tmp_path, 0, [_round(first_id), _round(first_id + len(COUNTS))])
    start = 1
    for c, n in enumerate(COUNTS):
        _rewrite_label(tmp_path, first_id + c, [_round(start), _round(start + n)])
        start += n
    return tmp_path, labels


def test_rounded_identity_ranges_still_give_every_image_its_class(
    rounded_pack: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, labels = rounded_pack
    monkeypatch.setattr(identity_labels, "_float32_spacing", _coarse_spacing)
    with FacePack(path) as pack:
        assert pack.image_keys.tolist() == list(range(1, len(labels) + 1))
        assert pack.labels.tolist() == labels
        assert pack.check_records() == {}
        for i in range(pack.num_images):
            assert pack.read(i)[1] == labels[i]


def test_taken_at_face_value_the_rounded_layout_is_unreadable(
    rounded_pack: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the exact layout is for: read as exact, the rounded header [40, 48) lists 8
    identity records for 6 classes."""
    path, _ = rounded_pack
    monkeypatch.setattr(identity_labels, "_float32_spacing", lambda value: 1)
    with pytest.raises(PackError, match="header lists 8 identity records"):
        FacePack(path)


def test_a_header_beyond_its_rounding_is_refused(
    rounded_pack: tuple[Path, list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, labels = rounded_pack
    _rewrite_label(path, 0, [_round(len(labels) + 1) + 2 * GAP, 60])
    monkeypatch.setattr(identity_labels, "_float32_spacing", _coarse_spacing)
    with pytest.raises(PackError, match="does not match the index"):
        FacePack(path)
