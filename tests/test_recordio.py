"""dmlc RecordIO: exact bytes, index, round trips, multi-process use and error reporting."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import struct

import numpy as np
import pytest

from dataio.record_reader import RecordReader
from dataio.recordio import (
    MAGIC,
    IRHeader,
    RecordIOError,
    RecordWriter,
    encode_record,
    pack_record,
    unpack_record,
)

M = b"\x0a\x23\xd7\xce"  # 0xced7230a little endian


def le32(x: int) -> bytes:
    return struct.pack("<I", x)


def lrec(cflag: int, length: int) -> bytes:
    return le32(cflag << 29 | length)


def write_all(tmp_path, payloads):
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    with RecordWriter(rec, idx) as w:
        for key, p in payloads.items():
            w.write(key, p)
    return rec, idx


def test_magic_bytes_are_little_endian():
    assert struct.pack("<I", MAGIC) == M


@pytest.mark.parametrize(
    "payload, expected",
    [
        # whole records: magic, length, data, zero pad to 4
        (b"", M + lrec(0, 0)),
        (b"abc", M + lrec(0, 3) + b"abc\x00"),
        (b"abcd", M + lrec(0, 4) + b"abcd"),
        (b"abcde", M + lrec(0, 5) + b"abcde\x00\x00\x00"),
        # magic at an unaligned offset (1, 2, 3) is NOT split
        (b"a" + M + b"xyz", M + lrec(0, 8) + b"a" + M + b"xyz"),
        (b"ab" + M, M + lrec(0, 6) + b"ab" + M + b"\x00\x00"),
        (b"abc" + M + b"z", M + lrec(0, 8) + b"abc" + M + b"z"),
        # aligned magic: split into first (1) and last (3) parts, the magic dropped
        (b"abcd" + M + b"xy", M + lrec(1, 4) + b"abcd" + M + lrec(3, 2) + b"xy\x00\x00"),
        # magic at offset 0 and at the very end
        (M, M + lrec(1, 0) + M + lrec(3, 0)),
        (M + b"q", M + lrec(1, 0) + M + lrec(3, 1) + b"q\x00\x00\x00"),
        (b"abcd" + M, M + lrec(1, 4) + b"abcd" + M + lrec(3, 0)),
        # two magics in a row: first, empty middle (2), empty last
        (M + M, M + lrec(1, 0) + M + lrec(2, 0) + M + lrec(3, 0)),
        (
            b"1234" + M + b"5678" + M + b"9",
            M + lrec(1, 4) + b"1234" + M + lrec(2, 4) + b"5678" + M + lrec(3, 1) + b"9\0\0\0",
        ),
        # a magic straddling the unaligned tail is not checked (dmlc loops i < lower_align)
        (b"abcdef" + M, M + lrec(0, 10) + b"abcdef" + M + b"\x00\x00"),
    ],
)
def test_framing_matches_dmlc_bytes(tmp_path, payload, expected):
    assert encode_record(payload) == expected
    # The writer produces the same bytes after a leading record, and reads back the payload.
    rec, idx = write_all(tmp_path, {7: b"zz", 3: payload})
    data = rec.read_bytes()
    assert data == M + lrec(0, 2) + b"zz\x00\x00" + expected
    assert idx.read_text() == "7\t0\n3\t12\n"
    with RecordReader(rec, idx) as r:
        assert r.read(3) == payload
        assert r.read(7) == b"zz"
        assert [k for k, _ in r.scan()] == [7, 3]


def test_round_trip_random_records_with_embedded_magic(tmp_path):
    rng = np.random.default_rng(0)
    payloads = {}
    for key in rng.permutation(200).tolist():
        n = int(rng.integers(0, 300))
        p = bytearray(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 3))):  # plant magics at random offsets
            if n >= 4:
                off = int(rng.integers(0, n - 3))
                p[off : off + 4] = M
        payloads[key] = bytes(p)
    rec, idx = write_all(tmp_path, payloads)

    # idx: one line per record, in write order, offset = start of the first part
    lines = idx.read_text().splitlines()
    assert [int(x.split("\t")[0]) for x in lines] == list(payloads)
    offsets = [int(x.split("\t")[1]) for x in lines]
    sizes = [len(encode_record(p)) for p in payloads.values()]
    assert offsets == np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
    assert os.path.getsize(rec) == sum(sizes)

    with RecordReader(rec, idx) as r:
        assert len(r) == 200
        assert r.keys == list(payloads)
        scanned = dict(r.scan())
        assert scanned == payloads
        subset = [int(k) for k in rng.choice(list(payloads), 30, replace=False)]
        got = list(r.scan(subset))
        assert sorted(k for k, _ in got) == sorted(subset)
        assert [r.offset(k) for k, _ in got] == sorted(r.offset(k) for k in subset)  # file order
        assert all(p == payloads[k] for k, p in got)
        with pytest.raises(RecordIOError, match="unknown key 1000"):
            list(r.scan([0, 1000]))
        for key in rng.permutation(list(payloads)).tolist():
            assert r.read(key) == payloads[key]
            assert r.read_prefix(key, 6) == payloads[key][:6]


def test_pack_unpack_scalar_and_vector_labels():
    # scalar: flag forced to 0, label in the struct
    rec = pack_record(IRHeader(5, 3.0, 17, 2), b"jpeg")
    assert rec == struct.pack("<IfQQ", 0, 3.0, 17, 2) + b"jpeg"
    header, payload = unpack_record(rec)
    assert header == IRHeader(0, 3.0, 17, 2)
    assert payload == b"jpeg"

    # vector: flag = size, struct label 0, floats precede the payload
    rec = pack_record(IRHeader(0, [1.5, 7.0, -2.0], 9, 0), b"xy")
    assert rec == struct.pack("<IfQQ", 3, 0.0, 9, 0) + struct.pack("<3f", 1.5, 7.0, -2.0) + b"xy"
    header, payload = unpack_record(rec)
    assert header.flag == 3 and header.id == 9 and payload == b"xy"
    assert header.label.dtype == np.float32
    np.testing.assert_array_equal(header.label, [1.5, 7.0, -2.0])

    # numpy scalar counts as a scalar label (as in mx.recordio.pack)
    assert unpack_record(pack_record(IRHeader(0, np.float32(4), 0, 0), b""))[0].flag == 0

    with pytest.raises(RecordIOError, match="shorter than"):
        unpack_record(b"\x00" * 10)
    with pytest.raises(RecordIOError, match="3-float label"):
        unpack_record(struct.pack("<IfQQ", 3, 0.0, 0, 0) + b"\x00" * 8)


def test_vector_label_record_with_magic_round_trips(tmp_path):
    # A label vector whose float bytes equal the magic lands at an aligned offset (24) and
    # must survive the split/join.
    magic_float = struct.unpack("<f", M)[0]
    rec_bytes = pack_record(IRHeader(0, [magic_float, 2.0], 1, 0), M + b"payload")
    assert rec_bytes[24:28] == M and rec_bytes[32:36] == M
    rec, idx = write_all(tmp_path, {0: rec_bytes})
    assert rec.read_bytes().count(M) == 3  # record start + two split points
    with RecordReader(rec, idx) as r:
        header, payload = unpack_record(r.read(0))
    assert payload == M + b"payload"
    assert struct.pack("<f", header.label[0]) == M


def test_writer_rejects_bad_keys(tmp_path):
    with RecordWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        w.write(1, b"x")
        with pytest.raises(ValueError, match="duplicate key 1"):
            w.write(1, b"y")
        with pytest.raises(ValueError, match="non-negative int"):
            w.write(-1, b"y")
        with pytest.raises(ValueError, match="non-negative int"):
            w.write("3", b"y")  # type: ignore[arg-type]
    with pytest.raises(RecordIOError, match="after close"):
        w.write(2, b"z")


def test_error_wrong_magic_names_file_and_key(tmp_path):
    rec, idx = write_all(tmp_path, {0: b"aaaa", 1: b"bbbb"})
    data = bytearray(rec.read_bytes())
    data[12] ^= 0xFF  # first byte of record 1's magic
    rec.write_bytes(bytes(data))
    r = RecordReader(rec, idx)
    assert r.read(0) == b"aaaa"
    with pytest.raises(RecordIOError, match="wrong magic") as ei:
        r.read(1)
    assert str(rec) in str(ei.value) and "key 1" in str(ei.value)
    with pytest.raises(RecordIOError, match="wrong magic"):
        list(r.scan())


def test_error_truncated_record(tmp_path):
    rec, idx = write_all(tmp_path, {0: b"a" * 10, 1: b"b" * 40})
    data = rec.read_bytes()
    rec.write_bytes(data[:-5])
    r = RecordReader(rec, idx)
    assert r.read(0) == b"a" * 10
    with pytest.raises(RecordIOError, match="truncated") as ei:
        r.read(1)
    assert str(rec) in str(ei.value) and "key 1" in str(ei.value)
    with pytest.raises(RecordIOError, match="truncated"):
        r.read_prefix(1, 100)


def test_error_truncated_multipart_record(tmp_path):
    rec, idx = write_all(tmp_path, {5: b"abcd" + M + b"efgh"})
    rec.write_bytes(rec.read_bytes()[:16])  # first part only
    with pytest.raises(RecordIOError, match="truncated.*key 5"):
        RecordReader(rec, idx).read(5)


def test_error_idx_offset_past_end(tmp_path):
    rec, idx = write_all(tmp_path, {0: b"abcd"})
    idx.write_text("0\t0\n1\t4096\n")
    with pytest.raises(RecordIOError, match="past the end") as ei:
        RecordReader(rec, idx)
    assert str(idx) in str(ei.value) and "key 1" in str(ei.value)


def test_error_unknown_key_missing_and_malformed_idx(tmp_path):
    rec, idx = write_all(tmp_path, {0: b"abcd"})
    r = RecordReader(rec, idx)
    with pytest.raises(RecordIOError, match="unknown key 9") as ei:
        r.read(9)
    assert str(idx) in str(ei.value)
    missing = tmp_path / "nope.idx"
    with pytest.raises(RecordIOError, match="index file not found") as ei:
        RecordReader(rec, missing)
    assert str(missing) in str(ei.value)
    idx.write_text("0 0\n")
    with pytest.raises(RecordIOError, match=r"t\.idx:1: expected 'key<TAB>offset'"):
        RecordReader(rec, idx)
    idx.write_text("0\t0\n0\t0\n")
    with pytest.raises(RecordIOError, match="duplicate key 0"):
        RecordReader(rec, idx)
    with pytest.raises(RecordIOError, match="record file not found"):
        RecordReader(tmp_path / "none.rec", idx)


def test_reader_pickles_without_handle_and_reopens_after_pid_change(tmp_path, monkeypatch):
    rec, idx = write_all(tmp_path, {0: b"zero", 1: b"one"})
    r = RecordReader(rec, idx)
    assert r.read(1) == b"one"
    first = r._fh
    assert first is not None
    clone = pickle.loads(pickle.dumps(r))
    assert clone._fh is None
    assert clone.read(0) == b"zero"
    # A changed pid (as after fork) makes the reader open its own handle.
    monkeypatch.setattr(os, "getpid", lambda: -12345)
    assert r.read(0) == b"zero"
    assert r._fh is not first
    monkeypatch.undo()
    first.close()
    r.close()


def _read_in_child(reader: RecordReader, key: int, queue) -> None:
    queue.put(reader.read(key))


def test_reader_in_forked_child_does_not_share_position(tmp_path):
    payloads = {k: bytes([k]) * (50 + k) for k in range(20)}
    rec, idx = write_all(tmp_path, payloads)
    r = RecordReader(rec, idx)
    assert r.read(3) == payloads[3]  # handle opened in the parent before fork
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_read_in_child, args=(r, k, queue)) for k in (5, 11, 17)]
    for p in procs:
        p.start()
    got = sorted(queue.get(timeout=30) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert got == sorted(payloads[k] for k in (5, 11, 17))
    assert r.read(19) == payloads[19]


def test_jpeg_payload_with_aligned_magic_is_split_and_rejoined(tmp_path):
    import simplejpeg
    from _packs import aligned_magic_offsets, jpeg_with_magic, smooth_image

    rgb = smooth_image(np.random.default_rng(3), 24, 20)
    jpeg = jpeg_with_magic(rgb, copies=2)
    body = pack_record(IRHeader(0, 3.0, 1, 0), jpeg)
    first, second = aligned_magic_offsets(body)
    assert second == first + 4 and first % 4 == 0 and first > 24  # inside the JPEG
    tail = body[second + 4 :]
    pad = b"\x00" * (-len(tail) % 4)
    # first part, an empty middle part (two magics in a row), last part + padding
    expected = (
        M + lrec(1, first) + body[:first]
        + M + lrec(2, 0)
        + M + lrec(3, len(tail)) + tail + pad
    )  # fmt: skip
    assert encode_record(body) == expected

    rec, idx = write_all(tmp_path, {0: b"lead", 1: body})
    assert rec.read_bytes() == M + lrec(0, 4) + b"lead" + expected
    with RecordReader(rec, idx) as r:
        header, payload = unpack_record(r.read(1))
        assert header.label == 3.0 and payload == jpeg
        assert dict(r.scan())[1] == body
    decoded = simplejpeg.decode_jpeg(payload, colorspace="RGB")
    np.testing.assert_array_equal(decoded, simplejpeg.decode_jpeg(jpeg, colorspace="RGB"))
    assert np.abs(decoded.astype(int) - rgb).max() <= 8  # a real image, not garbage


def test_reader_skips_bad_offsets_on_request_and_heads_scan(tmp_path):
    from dataio.record_reader import read_record_heads

    rec, idx = write_all(tmp_path, {0: pack_record(IRHeader(0, 2.0, 0, 0), b"ab")})
    idx.write_text("0\t0\n5\t9999\n")
    r = RecordReader(rec, idx, skip_bad_offsets=True)
    assert r.keys == [0] and 5 not in r
    assert "offset 9999 of key 5 is past the end" in r.bad_keys[5]
    heads = read_record_heads(rec, np.array([0, 2, 9999]))
    assert heads.magic.tolist() == [MAGIC, 0, 0]
    assert heads.length[0] == 26 and heads.cflag[0] == 0 and heads.flag[0] == 0
    assert heads.label[0] == 2.0 and heads.available.tolist() == [36, 0, 0]
