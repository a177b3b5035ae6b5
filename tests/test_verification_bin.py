"""insightface .bin verification sets: round trip, legacy pickles, refusal of unsafe pickles."""

from __future__ import annotations

import builtins
import io
import os
import pickle
import struct

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from dataio.verification_bin import (
    UnsafePickleError,
    VerificationBinError,
    VerificationSet,
    load_bin,
    save_bin,
)


def make_images(n: int, h: int = 16, w: int = 12) -> tuple[list[bytes], list[np.ndarray]]:
    rng = np.random.default_rng(n)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]
    return [simplejpeg.encode_jpeg(a, quality=90) for a in arrays], arrays


def test_round_trip_and_chunked_decode(tmp_path):
    jpegs, _ = make_images(6)
    issame = [True, False, True]
    path = tmp_path / "lfw.bin"
    save_bin(path, jpegs, issame)
    vs = load_bin(path)
    assert vs.name == "lfw"
    assert len(vs) == 6 and vs.num_pairs == 3
    assert vs.issame.dtype == bool and vs.issame.tolist() == issame
    assert [vs.encoded(i) for i in range(6)] == jpegs
    assert vs.image_size == (16, 12)

    full = vs.decode(0, 6)
    assert full.shape == (6, 16, 12, 3) and full.dtype == np.uint8
    for i in range(6):
        np.testing.assert_array_equal(full[i], simplejpeg.decode_jpeg(jpegs[i], colorspace="RGB"))
    part = vs.decode(2, 5)
    assert part.shape == (3, 16, 12, 3)
    np.testing.assert_array_equal(part, full[2:5])
    assert vs.decode(3, 3).shape[0] == 0

    chunks = list(vs.batches(4))
    assert [c.shape[0] for c in chunks] == [4, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), full)
    with pytest.raises(ValueError, match="decode range"):
        vs.decode(4, 7)
    with pytest.raises(ValueError, match="batch_size"):
        next(vs.batches(0))


def test_png_images_decode_and_size_mismatch_is_reported(tmp_path):
    arr = np.arange(16 * 12 * 3, dtype=np.uint8).reshape(16, 12, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    jpegs, _ = make_images(1)
    odd, _ = make_images(1, h=8, w=8)
    vs = VerificationSet([buf.getvalue(), jpegs[0], jpegs[0], odd[0]], [True, False], name="x")
    np.testing.assert_array_equal(vs.decode(0, 1)[0], arr)  # PNG is lossless
    with pytest.raises(VerificationBinError, match="x: image 3 is 8x8 but image 0 is 16x12"):
        vs.decode(0, 4)
    bad = VerificationSet([b"not an image", jpegs[0]], [True], name="bad")
    with pytest.raises(VerificationBinError, match="bad: image 0: cannot decode"):
        bad.decode(0, 2)


def _py2_pickle(images: list[bytes], issame: list[bool]) -> bytes:
    """The bytes Python 2's cPickle (protocol 2) writes for (list of str, list of bool)."""
    out = bytearray(b"\x80\x02(]q\x00(")  # PROTO 2, MARK, EMPTY_LIST, BINPUT, MARK
    for img in images:
        out += b"T" + struct.pack("<I", len(img)) + img  # BINSTRING: a py2 str
    out += b"e]q\x01("  # APPENDS, EMPTY_LIST, BINPUT, MARK
    out += b"".join(b"\x88" if s else b"\x89" for s in issame)  # NEWTRUE / NEWFALSE
    out += b"et."  # APPENDS, TUPLE, STOP
    return bytes(out)


def test_loads_python2_style_bin(tmp_path):
    jpegs, _ = make_images(4)
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(_py2_pickle(jpegs, [False, True]))
    assert pickle.loads(path.read_bytes(), encoding="bytes")[0] == jpegs  # the fixture is valid
    vs = load_bin(path)
    assert [vs.encoded(i) for i in range(4)] == jpegs  # high bytes survive latin-1
    assert vs.issame.tolist() == [False, True]
    assert vs.decode(0, 4).shape == (4, 16, 12, 3)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_loads_numpy_payloads(tmp_path, protocol):
    # protocol 2 stores bytes via _codecs.encode; numpy arrays/bools via numpy reconstructors.
    jpegs, _ = make_images(4)
    bins = [jpegs[0], np.frombuffer(jpegs[1], dtype=np.uint8), bytearray(jpegs[2]), jpegs[3]]
    path = tmp_path / "cfp_fp.bin"
    path.write_bytes(pickle.dumps((bins, [np.bool_(True), np.bool_(False)]), protocol=protocol))
    vs = load_bin(path)
    assert [vs.encoded(i) for i in range(4)] == jpegs
    assert vs.issame.tolist() == [True, False]
    path.write_bytes(pickle.dumps((jpegs, np.array([False, True])), protocol=protocol))
    assert load_bin(path).issame.tolist() == [False, True]


class _SystemPayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalPayload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({self.marker!r}, 'w').close()",))


class _NdarraySubclass(np.ndarray):
    pass


def test_malicious_pickles_are_refused_and_not_executed(tmp_path):
    jpegs, _ = make_images(2)

    # The eval payload is live: plain pickle would run it (harmless here: creates a file).
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(_EvalPayload(str(proof))))
    assert proof.exists()

    cases = [
        (_SystemPayload(str(tmp_path / "pwned_system")), "system"),
        (_EvalPayload(str(tmp_path / "pwned_eval")), r"'(__builtin__|builtins)\.eval'"),
    ]
    for payload, refused in cases:
        for protocol in (0, 2, 5):
            path = tmp_path / f"evil_{protocol}.bin"
            # The payload hides inside an otherwise plausible (bins, issame) tuple.
            path.write_bytes(pickle.dumps(([jpegs[0], payload], [True]), protocol=protocol))
            with pytest.raises(UnsafePickleError, match=refused) as ei:
                load_bin(path)
            assert str(path) in str(ei.value)
            assert isinstance(ei.value, ValueError)
    assert not (tmp_path / "pwned_system").exists()
    assert not (tmp_path / "pwned_eval").exists()

    # numpy's reconstructor is admitted, but only for numpy.ndarray itself
    sub = np.zeros(3, dtype=np.uint8).view(_NdarraySubclass)
    path = tmp_path / "subclass.bin"
    path.write_bytes(pickle.dumps(([sub, jpegs[1]], [True]), protocol=2))
    with pytest.raises(UnsafePickleError, match="_NdarraySubclass"):
        load_bin(path)


def test_malformed_bins_name_the_file(tmp_path):
    jpegs, _ = make_images(3)
    path = tmp_path / "bad.bin"
    path.write_bytes(pickle.dumps((jpegs, [True])))
    with pytest.raises(VerificationBinError, match="3 images for 1 pairs") as ei:
        load_bin(path)
    assert str(path) in str(ei.value)
    path.write_bytes(pickle.dumps((jpegs[:2], [2])))
    with pytest.raises(VerificationBinError, match="other than 0/1"):
        load_bin(path)
    path.write_bytes(pickle.dumps(([1, 2], [True])))
    with pytest.raises(VerificationBinError, match="image 0 is a int"):
        load_bin(path)
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(VerificationBinError, match=r"\(bins, issame_list\)"):
        load_bin(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(VerificationBinError, match="not a valid verification .bin") as ei:
        load_bin(path)
    assert str(path) in str(ei.value)
    with pytest.raises(VerificationBinError, match="not found"):
        load_bin(tmp_path / "absent.bin")
    with pytest.raises(ValueError, match="need 2 per pair"):
        save_bin(tmp_path / "x.bin", jpegs, [True])


def test_loading_keeps_images_encoded_and_decodes_in_chunks(tmp_path):
    import tracemalloc

    from _packs import smooth_image

    rng = np.random.default_rng(5)
    jpegs = [simplejpeg.encode_jpeg(smooth_image(rng, 112, 112), quality=90) for _ in range(300)]
    jpegs[7] = b"\xff\xd8\xff" + bytes(200)  # undecodable, but loading must not notice
    path = tmp_path / "big.bin"
    save_bin(path, jpegs, [True, False] * 75)
    encoded = sum(len(j) for j in jpegs)
    decoded = 300 * 112 * 112 * 3  # ~11 MB if everything were decoded at load time
    tracemalloc.start()
    try:
        vs = load_bin(path)
        _, peak_load = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = 0
        readable = VerificationSet([vs.encoded(i) for i in range(8, 300)], [True] * 146)
        for chunk in readable.batches(32):
            total += chunk.shape[0]
        _, peak_chunks = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 292
    assert peak_load < 3 * encoded < decoded / 4  # bytes stay encoded
    assert peak_chunks < 3 * encoded + 2 * 32 * 112 * 112 * 3  # one chunk decoded at a time
    with pytest.raises(VerificationBinError, match="big: image 7: cannot decode"):
        vs.decode(0, 16)
