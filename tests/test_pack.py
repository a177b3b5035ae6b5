"""insightface face packs: layout, reading, validation, image-folder packing, worker safety."""

from __future__ import annotations

import io
import multiprocessing as mp
import pickle

import numpy as np
import pytest
import simplejpeg
import torch
from PIL import Image

from dataio.pack import FacePack, PackError, PackInfo
from dataio.packer import pack_image_folder, write_pack
from dataio.record_reader import RecordReader
from dataio.recordio import IRHeader, RecordWriter, pack_record
from dataio.recordio import unpack_record as unpack


def make_jpeg(seed: int, h: int = 8, w: int = 6) -> bytes:
    rng = np.random.default_rng(seed)
    return simplejpeg.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), quality=90)


def records(pack_dir) -> dict[int, tuple[IRHeader, bytes]]:
    with RecordReader(pack_dir / "train.rec", pack_dir / "train.idx") as r:
        return {k: unpack(v) for k, v in r.scan()}


def test_write_pack_with_header_layout_and_read(tmp_path):
    a, b, c, d = (make_jpeg(i) for i in range(4))
    samples = [(2, a), (0, b), (1, c), (0, d)]  # unsorted; class 3 has no image
    info = write_pack(tmp_path, iter(samples), num_classes=4, image_size=(8, 6))
    assert info == PackInfo(str(tmp_path), 4, 4, (8, 6))
    assert (tmp_path / "property").read_text() == "4,8,6\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["property", "train.idx", "train.rec"]

    recs = records(tmp_path)
    assert sorted(recs) == list(range(9))  # header + 4 images + 4 identities
    head, payload = recs[0]
    assert head.flag == 2 and payload == b""
    np.testing.assert_array_equal(head.label, [5, 9])  # [first_identity_key, end_key)
    # images sorted stably by label: b(0), d(0), c(1), a(2); scalar labels, id = key
    assert [recs[k][1] for k in range(1, 5)] == [b, d, c, a]
    assert [recs[k][0].label for k in range(1, 5)] == [0.0, 0.0, 1.0, 2.0]
    assert [recs[k][0].flag for k in range(1, 5)] == [0] * 4
    assert [recs[k][0].id for k in range(1, 5)] == [1, 2, 3, 4]
    ranges = [recs[k][0].label.tolist() for k in range(5, 9)]
    assert ranges == [[1, 3], [3, 4], [4, 5], [5, 5]]

    pack = FacePack(tmp_path)
    assert pack.has_header
    assert (pack.num_classes, pack.image_size, pack.num_images, len(pack)) == (4, (8, 6), 4, 4)
    assert pack.image_keys.dtype == np.int64 and pack.labels.dtype == np.int64
    assert pack.image_keys.tolist() == [1, 2, 3, 4]
    assert pack.labels.tolist() == [0, 0, 1, 2]
    assert [pack.read(i) for i in range(4)] == [(b, 0), (d, 0), (c, 1), (a, 2)]
    assert pack.read(-1) == (a, 2)
    with pytest.raises(IndexError, match="out of range"):
        pack.read(4)


def test_write_pack_without_header(tmp_path):
    jpegs = [make_jpeg(i) for i in range(5)]
    labels = [2, 0, 1, 0, 2]
    info = write_pack(tmp_path, zip(labels, jpegs, strict=True), 3, (8, 6), with_header=False)
    assert info.num_images == 5
    recs = records(tmp_path)
    assert sorted(recs) == [0, 1, 2, 3, 4]  # no header, order kept
    assert [recs[k][0].label for k in range(5)] == [float(x) for x in labels]
    pack = FacePack(tmp_path)
    assert not pack.has_header
    assert pack.image_keys.tolist() == [0, 1, 2, 3, 4]
    assert pack.labels.tolist() == labels
    assert [pack.read(i) for i in range(5)] == list(zip(jpegs, labels, strict=True))


def test_headerless_pack_with_vector_labels_uses_first_element(tmp_path):
    # Some published packs store image labels as vectors; label[0] is the class (arcface_torch).
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_record(IRHeader(0, [1.0, 0.25], 0, 0), b"img0"))
        w.write(1, pack_record(IRHeader(0, 0.0, 1, 0), b"img1"))
    (tmp_path / "property").write_text("2,8,6")
    pack = FacePack(tmp_path)
    assert not pack.has_header
    assert pack.labels.tolist() == [1, 0]
    assert pack.read(0) == (b"img0", 1)


def test_write_pack_validates_input(tmp_path):
    jpeg = make_jpeg(0)
    with pytest.raises(ValueError, match=r"sample 1: label 3 outside \[0, num_classes=3\)"):
        write_pack(tmp_path, [(0, jpeg), (3, jpeg)], 3, (8, 6))
    with pytest.raises(ValueError, match="sample 0: label -1"):
        write_pack(tmp_path, [(-1, jpeg)], 3, (8, 6))
    with pytest.raises(ValueError, match="label must be an int"):
        write_pack(tmp_path, [(1.0, jpeg)], 3, (8, 6))
    with pytest.raises(ValueError, match="image_size"):
        write_pack(tmp_path, [(0, jpeg)], 3, (8, 0))
    with pytest.raises(ValueError, match="no samples"):
        write_pack(tmp_path, [], 3, (8, 6))
    assert not (tmp_path / "train.rec").exists()  # nothing half-written


def test_facepack_rejects_label_outside_num_classes(tmp_path):
    write_pack(tmp_path, [(0, b"x"), (1, b"y")], 5, (8, 6), with_header=False)
    (tmp_path / "property").write_text("1,8,6\n")  # now label 1 >= num_classes
    with pytest.raises(PackError, match=r"key 1: label 1.0 is not a class id") as ei:
        FacePack(tmp_path)
    assert str(tmp_path / "train.rec") in str(ei.value)


def test_facepack_read_checks_record_label_against_identity_records(tmp_path):
    # Header pack whose image record 2 says class 1 while identity records put it in class 0.
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_record(IRHeader(0, [3, 5], 0, 0), b""))
        w.write(1, pack_record(IRHeader(0, 0.0, 1, 0), b"a"))
        w.write(2, pack_record(IRHeader(0, 1.0, 2, 0), b"b"))
        w.write(3, pack_record(IRHeader(0, [1, 3], 3, 0), b""))
        w.write(4, pack_record(IRHeader(0, [3, 3], 4, 0), b""))
    (tmp_path / "property").write_text("2,8,6")
    pack = FacePack(tmp_path)
    assert pack.labels.tolist() == [0, 0]
    assert pack.read(0) == (b"a", 0)
    with pytest.raises(PackError, match="key 2: record label 1 disagrees"):
        pack.read(1)


def test_facepack_header_inconsistencies(tmp_path):
    write_pack(tmp_path, [(0, b"a"), (1, b"b")], 2, (8, 6))
    (tmp_path / "property").write_text("3,8,6")
    with pytest.raises(PackError, match="2 identity records .* num_classes=3"):
        FacePack(tmp_path)
    # identity ranges that leave an image without a class
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_record(IRHeader(0, [3, 4], 0, 0), b""))
        w.write(1, pack_record(IRHeader(0, 0.0, 1, 0), b"a"))
        w.write(2, pack_record(IRHeader(0, 0.0, 2, 0), b"b"))
        w.write(3, pack_record(IRHeader(0, [1, 2], 3, 0), b""))
    (tmp_path / "property").write_text("1,8,6")
    with pytest.raises(PackError, match="image key 2 belongs to no identity"):
        FacePack(tmp_path)
    # the header promises identity keys 3 and 4, the index has only key 3
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_record(IRHeader(0, [3, 5], 0, 0), b""))
        w.write(1, pack_record(IRHeader(0, 0.0, 1, 0), b"a"))
        w.write(2, pack_record(IRHeader(0, 1.0, 2, 0), b"b"))
        w.write(3, pack_record(IRHeader(0, [1, 2], 3, 0), b""))
    (tmp_path / "property").write_text("2,8,6")
    with pytest.raises(PackError, match="key 4 of the header's layout is missing"):
        FacePack(tmp_path)


def test_facepack_missing_files_and_empty_pack(tmp_path):
    with pytest.raises(PackError, match="pack directory not found"):
        FacePack(tmp_path / "absent")
    write_pack(tmp_path, [(0, b"a")], 1, (8, 6))
    (tmp_path / "property").unlink()
    with pytest.raises(PackError, match="property file not found") as ei:
        FacePack(tmp_path)
    assert str(tmp_path / "property") in str(ei.value)
    (tmp_path / "property").write_text("1,8")
    with pytest.raises(PackError, match="num_classes,height,width"):
        FacePack(tmp_path)
    (tmp_path / "property").write_text("1,8,6")
    (tmp_path / "train.idx").unlink()
    with pytest.raises(PackError, match="index file not found") as ei:
        FacePack(tmp_path)
    assert str(tmp_path / "train.idx") in str(ei.value)
    (tmp_path / "train.idx").write_text("")
    (tmp_path / "train.rec").write_bytes(b"")
    with pytest.raises(PackError, match="empty pack") as ei:
        FacePack(tmp_path)
    assert str(tmp_path / "train.idx") in str(ei.value)


def _make_folder(root, sizes=None):
    """3 identities; 'b_id' holds one PNG. Returns {path: (label, raw bytes, rgb array)}."""
    rng = np.random.default_rng(1)
    expected = {}
    layout = {"c_id": 2, "a_id": 3, "b_id": 1}  # sorted: a_id=0, b_id=1, c_id=2
    for name, count in layout.items():
        d = root / name
        d.mkdir(parents=True)
        for j in range(count):
            h, w = (sizes or {}).get((name, j), (10, 12))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            if name == "b_id":
                buf = io.BytesIO()
                Image.fromarray(arr).save(buf, format="PNG")
                data, path = buf.getvalue(), d / f"{j}.png"
            else:
                data, path = simplejpeg.encode_jpeg(arr, quality=95), d / f"{j}.jpg"
            path.write_bytes(data)
            expected[str(path)] = (sorted(layout).index(name), data, arr)
    (root / "a_id" / "notes.txt").write_text("not an image")
    return expected


def test_pack_image_folder(tmp_path):
    expected = _make_folder(tmp_path / "imgs")
    info = pack_image_folder(tmp_path / "imgs", tmp_path / "pack", workers=2, progress=False)
    assert info == PackInfo(str(tmp_path / "pack"), 3, 6, (10, 12))
    pack = FacePack(tmp_path / "pack")
    assert pack.labels.tolist() == [0, 0, 0, 1, 2, 2]
    got = [pack.read(i) for i in range(6)]
    # JPEGs are stored byte for byte, identities in sorted folder order, files sorted inside
    for i, name in ((0, "a_id/0.jpg"), (1, "a_id/1.jpg"), (2, "a_id/2.jpg"), (4, "c_id/0.jpg")):
        assert got[i] == (expected[str(tmp_path / "imgs" / name)][1], pack.labels[i])
    assert got[5][0] == expected[str(tmp_path / "imgs" / "c_id" / "1.jpg")][1]
    # the PNG was re-encoded as JPEG and still looks like the original
    png_payload, label = got[3]
    assert label == 1 and png_payload[:3] == b"\xff\xd8\xff"
    (png_orig,) = [v[2] for v in expected.values() if v[0] == 1]
    decoded = simplejpeg.decode_jpeg(png_payload).astype(np.int16)
    assert decoded.shape == (10, 12, 3)
    assert np.abs(decoded - png_orig).mean() < 20  # JPEG of noise at q=95: small mean error


def test_pack_image_folder_list_file_and_shuffle(tmp_path):
    expected = _make_folder(tmp_path / "imgs")
    jpeg_paths = sorted(p for p, v in expected.items() if p.endswith(".jpg"))
    lines = [f"{p} {expected[p][0]}" for p in jpeg_paths]
    lines[0] = lines[0].replace(str(tmp_path / "imgs") + "/", "")  # a relative path
    (tmp_path / "imgs" / "list.txt").write_text("\n".join(lines) + "\n")
    info = pack_image_folder(tmp_path / "imgs" / "list.txt", tmp_path / "p1", progress=False)
    assert (info.num_classes, info.num_images) == (3, 5)  # max label + 1; class 1 empty
    assert FacePack(tmp_path / "p1").labels.tolist() == [0, 0, 0, 2, 2]

    def order(out, seed, with_header=True):
        pack_image_folder(
            tmp_path / "imgs",
            tmp_path / out,
            shuffle=True,
            seed=seed,
            progress=False,
            workers=0,
            with_header=with_header,
        )
        p = FacePack(tmp_path / out)
        return [p.read(i) for i in range(len(p))]

    s1, s1b, s2 = order("s1", 0), order("s1b", 0), order("s2", 5)
    assert s1 == s1b  # same seed, same order
    assert [lbl for _, lbl in s1] == [0, 0, 0, 1, 2, 2]  # header packs stay grouped
    assert sorted(s1) == sorted(s2) and s1 != s2  # a permutation within identities
    flat = order("flat", 3, with_header=False)
    assert sorted(flat) == sorted(s1) and [lbl for _, lbl in flat] != [0, 0, 0, 1, 2, 2]


def test_pack_image_folder_size_mismatch_names_file(tmp_path):
    _make_folder(tmp_path / "imgs", sizes={("c_id", 1): (10, 14)})
    with pytest.raises(PackError, match=r"c_id/1\.jpg: image is 10x14 .* 10x12"):
        pack_image_folder(tmp_path / "imgs", tmp_path / "pack", progress=False)
    assert not (tmp_path / "pack" / "train.rec").exists()


def test_pack_image_folder_bad_inputs(tmp_path):
    with pytest.raises(PackError, match="neither an image folder nor a list file"):
        pack_image_folder(tmp_path / "missing", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackError, match="no identity sub-folders"):
        pack_image_folder(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "list.txt").write_text("x.jpg notanint\n")
    with pytest.raises(PackError, match=r"list\.txt:1: expected 'path label'"):
        pack_image_folder(tmp_path / "list.txt", tmp_path / "out", progress=False)
    (tmp_path / "d" / "id0").mkdir(parents=True)
    (tmp_path / "d" / "id0" / "x.jpg").write_bytes(b"\xff\xd8\xffgarbage")
    with pytest.raises(PackError, match=r"x\.jpg: unreadable JPEG header"):
        pack_image_folder(tmp_path / "d", tmp_path / "out", progress=False)


class _PackBytes(torch.utils.data.Dataset):
    """Returns (index, label, byte sum) so the parent can check what a worker read."""

    def __init__(self, pack: FacePack):
        self.pack = pack

    def __len__(self) -> int:
        return len(self.pack)

    def __getitem__(self, i: int):
        data, label = self.pack.read(i)
        return i, label, sum(data)


def _spawned_read(pack: FacePack, i: int) -> tuple[bytes, int]:
    return pack.read(i)


def test_facepack_picklable_and_readable_in_workers(tmp_path):
    samples = [(i % 3, make_jpeg(i)) for i in range(12)]
    write_pack(tmp_path, samples, 3, (8, 6))
    pack = FacePack(tmp_path)
    expected = [pack.read(i) for i in range(12)]  # parent handle open before workers fork
    clone = pickle.loads(pickle.dumps(pack))
    assert [clone.read(i) for i in range(12)] == expected
    np.testing.assert_array_equal(clone.labels, pack.labels)

    loader = torch.utils.data.DataLoader(_PackBytes(pack), batch_size=3, num_workers=2)
    seen = {}
    for idx, label, total in loader:
        for i, lbl, s in zip(idx.tolist(), label.tolist(), total.tolist(), strict=True):
            seen[i] = (lbl, s)
    assert seen == {i: (lbl, sum(d)) for i, (d, lbl) in enumerate(expected)}

    with mp.get_context("spawn").Pool(1) as pool:
        got = pool.starmap(_spawned_read, [(pack, 0), (pack, 11)])
    assert got == [expected[0], expected[11]]
