"""Bad packs at the pack level: record-head checks, and skip_corrupt at open."""

from __future__ import annotations

import numpy as np
import pytest
from _packs import corrupt_record, write_test_pack

from dataio.pack import FacePack, PackError
from dataio.recordio import IRHeader, RecordWriter, pack_record

LABELS = [0, 0, 1, 1, 1, 2, 2, 3]  # header pack: image keys 1..8 in this label order


def test_check_records_finds_each_head_fault_by_key(tmp_path):
    write_test_pack(tmp_path, LABELS, magic_every=3)  # keys 1, 4, 7 are multi-part records
    pack = FacePack(tmp_path)
    assert pack.check_records() == {}
    corrupt_record(tmp_path, 2, "magic")
    corrupt_record(tmp_path, 3, "label")
    corrupt_record(tmp_path, 5, "length")
    corrupt_record(tmp_path, 6, "jpeg")  # a decode fault: heads are fine
    corrupt_record(tmp_path, 4, "label")  # multi-part record: checked by a full read
    pack = FacePack(tmp_path)  # identity records are intact: the pack opens
    bad = pack.check_records()
    assert sorted(bad) == [2, 3, 4, 5]
    rec = str(tmp_path / "train.rec")
    assert all(reason.startswith(f"{rec}: key {k}: ") for k, reason in bad.items())
    assert "wrong magic number" in bad[2]
    assert "record label 2 disagrees with its identity record (class 1)" in bad[3]
    assert "record label 2 disagrees" in bad[4]
    assert "next record starts at" in bad[5]
    assert pack.check_records(np.array([0, 6, 7])) == {}  # keys 1, 7, 8 are fine
    with pytest.raises(PackError, match=r"train\.rec: key 3: record label 2 disagrees"):
        pack.read(2)


def test_headerless_faults_raise_or_are_skipped_at_open(tmp_path):
    write_test_pack(tmp_path, [0, 1, 2, 3, 1, 3], with_header=False)
    corrupt_record(tmp_path, 3, "label")  # class 3 -> 4 >= num_classes
    with pytest.raises(PackError, match=r"train\.rec: key 3: label 4\.0 is not a class id"):
        FacePack(tmp_path)
    pack = FacePack(tmp_path, skip_corrupt=True)
    assert pack.image_keys.tolist() == [0, 1, 2, 4, 5] and list(pack.bad_keys) == [3]
    assert pack.labels.tolist() == [0, 1, 2, 1, 3]

    corrupt_record(tmp_path, 1, "offset")
    with pytest.raises(PackError, match=r"train\.idx: offset \d+ of key 1 is past the end"):
        FacePack(tmp_path)
    corrupt_record(tmp_path, 5, "truncate")  # the last record
    pack = FacePack(tmp_path, skip_corrupt=True)
    assert pack.image_keys.tolist() == [0, 2, 4]
    assert sorted(pack.bad_keys) == [1, 3, 5]
    assert "truncated record" in pack.bad_keys[5]
    assert "past the end" in pack.bad_keys[1]


def test_header_pack_missing_image_key_and_empty_payload(tmp_path):
    write_test_pack(tmp_path, LABELS)
    idx = tmp_path / "train.idx"
    idx.write_text("".join(ln for ln in idx.read_text().splitlines(True) if ln.split()[0] != "4"))
    with pytest.raises(PackError, match=r"train\.idx: image key 4 of the header's layout is miss"):
        FacePack(tmp_path)
    pack = FacePack(tmp_path, skip_corrupt=True)
    assert 4 not in pack.image_keys.tolist() and pack.num_images == 7 and 4 in pack.bad_keys
    # an identity record cannot be skipped: its key past the end fails the pack
    corrupt_record(tmp_path, 10, "offset")
    with pytest.raises(PackError, match="offset .* of key 10 is past the end"):
        FacePack(tmp_path, skip_corrupt=True)

    d = tmp_path / "empty_payload"
    d.mkdir()
    with RecordWriter(d / "train.rec", d / "train.idx") as w:
        w.write(0, pack_record(IRHeader(0, 0.0, 0, 0), b"jpeg"))
        w.write(1, pack_record(IRHeader(0, 1.0, 1, 0), b""))
    (d / "property").write_text("2,4,4")
    with pytest.raises(PackError, match="key 1: record holds no image bytes"):
        FacePack(d)
