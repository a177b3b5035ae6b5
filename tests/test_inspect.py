"""`facetrain inspect`: pack summary and every bad record listed by key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import simplejpeg
from _packs import corrupt_record, smooth_image, write_test_pack

from dataio.inspect_pack import format_report, inspect_pack
from dataio.pack import PackError
from dataio.packer import write_pack

LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 4, 4, 4]  # class 3 has no image


def test_clean_pack_summary(tmp_path):
    write_test_pack(tmp_path, LABELS, num_classes=5, size=(10, 12), magic_every=5)
    report = inspect_pack(tmp_path, workers=2, progress=False)
    assert report.ok and report.bad == {}
    assert (report.num_classes, report.num_images, report.image_size) == (5, 12, (10, 12))
    assert (report.label_min, report.label_max, report.identities_with_images) == (0, 4, 4)
    assert (report.images_per_identity_min, report.images_per_identity_max) == (2, 4)
    assert report.images_per_identity_mean == pytest.approx(3.0)
    assert report.has_header
    text = format_report(report)
    assert "identities  : 5 (4 with images)" in text and "bad records : 0" in text


def test_every_bad_record_is_listed_by_key(tmp_path):
    rng = np.random.default_rng(0)
    samples = [(lbl, simplejpeg.encode_jpeg(smooth_image(rng, 10, 12))) for lbl in LABELS]
    samples[10] = (4, simplejpeg.encode_jpeg(smooth_image(rng, 6, 6)))  # wrong size: key 11
    write_pack(tmp_path, samples, 5, (10, 12))
    faults = {3: "jpeg", 5: "magic", 7: "label", 9: "length"}
    for key, kind in faults.items():
        corrupt_record(tmp_path, key, kind)
    report = inspect_pack(tmp_path, workers=2, progress=False, chunk_size=3)
    assert sorted(report.bad) == [3, 5, 7, 9, 11]
    rec = str(tmp_path / "train.rec")
    assert all(f"{rec}: key {k}: " in reason for k, reason in report.bad.items())
    assert "cannot decode image" in report.bad[3]
    assert "wrong magic number" in report.bad[5]
    assert "disagrees with its identity record" in report.bad[7]
    assert "next record starts at" in report.bad[9]
    assert "image is 6x6 but the pack's property says 10x12" in report.bad[11]
    assert not report.ok and report.num_images == 12
    text = format_report(report, max_listed=2)
    assert "bad records : 5" in text and "  key 3: " in text and "... and 3 more" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert sorted(data["bad"]) == ["11", "3", "5", "7", "9"] and data["ok"] is False
    # the serial path finds the same
    assert inspect_pack(tmp_path, workers=0, progress=False).bad.keys() == report.bad.keys()


def test_pack_level_faults_raise(tmp_path):
    with pytest.raises(PackError, match="pack directory not found"):
        inspect_pack(tmp_path / "absent", progress=False)
    write_test_pack(tmp_path, LABELS, num_classes=5)
    (tmp_path / "property").unlink()
    with pytest.raises(PackError, match="property file not found"):
        inspect_pack(tmp_path, progress=False)
    with pytest.raises(ValueError, match="workers must be a non-negative int"):
        inspect_pack(tmp_path, workers=-1, progress=False)
