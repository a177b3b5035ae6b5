"""Test helpers: small packs and images built byte by byte.

Several test files need the same material -- smooth images (whose JPEG decodes agree closely
across decoders), JPEGs that carry the RecordIO magic number at a 4-byte aligned offset (the
case that splits a record into parts), and packs in every layout -- and it must not depend on
the (slower) synthetic face renderer. Only tests use it (bench/ renders its packs with
:mod:`dataio.synth`), so it lives here rather than in the package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import simplejpeg

from dataio.layout import IDX_NAME, PROPERTY_NAME, REC_NAME, PackProperty, write_property
from dataio.pack import PackInfo
from dataio.packer import write_pack
from dataio.recordio import IR_HEADER_SIZE, MAGIC, IRHeader, RecordWriter, pack_record

MAGIC_BYTES = int(MAGIC).to_bytes(4, "little")
"""The RecordIO magic number as it appears in a file."""


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random smooth RGB image, uint8 ``[H, W, 3]``: a few random gradients and blobs.

    Smooth content keeps JPEG decoders within about one intensity level of each other.
    """
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.empty((height, width, 3))
    for c in range(3):
        a, b, base = rng.uniform(-1.5, 1.5), rng.uniform(-1.5, 1.5), rng.uniform(60, 190)
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(3, 8)
        blob = 60 * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * r * r))
        img[:, :, c] = base + a * xs + b * ys + blob
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def jpeg_with_magic(
    rgb: np.ndarray, quality: int = 90, copies: int = 2, payload_offset: int = IR_HEADER_SIZE
) -> bytes:
    """A valid JPEG of ``rgb`` whose bytes hold the RecordIO magic at 4-byte aligned offsets.

    The magic sits in a comment (COM) segment right after the SOI marker, which decoders
    skip. ``payload_offset`` is where the JPEG starts inside the record body (24 for an
    IRHeader with a scalar label); the magics are placed so that their offset in the record
    body is a multiple of 4 -- the case that makes a RecordIO writer split the record.
    ``copies`` back-to-back magics give a first, ``copies - 1`` middle and a last part.
    """
    jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality, colorspace="RGB")
    # SOI (2) + COM marker (2) + length (2): comment data starts at JPEG offset 6.
    lead = (-(payload_offset + 6)) % 4
    data = b"\x00" * lead + MAGIC_BYTES * copies + b"facetrain"
    segment = b"\xff\xfe" + (len(data) + 2).to_bytes(2, "big") + data
    return jpeg[:2] + segment + jpeg[2:]


def aligned_magic_offsets(record_body: bytes) -> list[int]:
    """Offsets of the magic number at 4-byte aligned positions of a record body."""
    return [i for i in range(0, len(record_body) - 3, 4) if record_body[i : i + 4] == MAGIC_BYTES]


def write_test_pack(
    out_dir: str | os.PathLike[str],
    labels: Sequence[int],
    num_classes: int | None = None,
    size: tuple[int, int] = (16, 16),
    seed: int = 0,
    with_header: bool = True,
    magic_every: int = 0,
    quality: int = 90,
) -> PackInfo:
    """A pack of smooth random JPEGs with the given per-image ``labels``.

    ``magic_every``: every k-th image (k > 0) is a :func:`jpeg_with_magic` JPEG, so the pack
    has multi-part records. ``num_classes`` defaults to ``max(labels) + 1``.
    """
    rng = np.random.default_rng(seed)
    h, w = size
    samples = []
    for i, label in enumerate(labels):
        rgb = smooth_image(rng, h, w)
        if magic_every and i % magic_every == 0:
            payload = jpeg_with_magic(rgb, quality=quality)
        else:
            payload = simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB")
        samples.append((int(label), payload))
    classes = num_classes if num_classes is not None else max(int(x) for x in labels) + 1
    return write_pack(out_dir, samples, classes, (h, w), with_header=with_header)


def _smooth_jpegs(labels: Sequence[int], size: tuple[int, int], seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [
        simplejpeg.encode_jpeg(smooth_image(rng, *size), quality=90, colorspace="RGB")
        for _ in labels
    ]


def write_face2rec2_pack(
    out_dir: str | os.PathLike[str],
    labels: Sequence[int],
    size: tuple[int, int] = (16, 16),
    seed: int = 0,
) -> PackInfo:
    """A pack in the record order of insightface's ``face2rec2.py`` (header-layout packs such
    as MS1MV2 were written by it), built record by record.

    ``labels`` must be sorted class ids ``0 .. C-1`` (face2rec2 reads a list grouped by
    identity). Images are keys ``1..N`` with the vector label ``[class, aligned=1]``
    (``mx.recordio.pack`` of a list: flag 2), written first; then key 0, the header
    ``[N+1, N+1+C]``; then one identity record ``[first_image_key, end_image_key)`` per class.
    The index lists the keys in that write order, so its first line is key 1, not key 0.
    """
    labels = [int(x) for x in labels]
    classes = sorted(set(labels))
    if labels != sorted(labels) or classes != list(range(len(classes))):
        raise ValueError("write_face2rec2_pack: labels must be sorted class ids 0..C-1")
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    first_identity = len(labels) + 1
    jpegs = _smooth_jpegs(labels, size, seed)
    with RecordWriter(os.path.join(out, REC_NAME), os.path.join(out, IDX_NAME)) as writer:
        for key, (label, jpeg) in enumerate(zip(labels, jpegs, strict=True), 1):
            writer.write(key, pack_record(IRHeader(0, [label, 1.0], key, 0), jpeg))
        header = [first_identity, first_identity + len(classes)]
        writer.write(0, pack_record(IRHeader(0, header, 0, 0), b""))
        starts = np.searchsorted(labels, classes + [len(classes)]) + 1  # first key per class
        for c in classes:
            key = first_identity + c
            span = [int(starts[c]), int(starts[c + 1])]
            writer.write(key, pack_record(IRHeader(0, span, key, 0), b""))
    write_property(os.path.join(out, PROPERTY_NAME), PackProperty(len(classes), size))
    return PackInfo(out, len(classes), len(labels), size)


def write_recbuilder_pack(
    out_dir: str | os.PathLike[str],
    labels: Sequence[int],
    num_classes: int | None = None,
    size: tuple[int, int] = (16, 16),
    seed: int = 0,
) -> PackInfo:
    """A header-less pack as insightface's ``RecBuilder`` writes it, built record by record.

    Images are keys ``0..N-1`` in the given order with scalar labels and ``id = key``;
    ``property`` has two lines (``C,H,W`` and the image count); ``train.meta`` is a pickled
    list of ``{"image_index", "image_classes"}`` dicts (written here with protocol 4, as a
    file users have; no reader unpickles it).
    """
    import pickle

    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    labels = [int(x) for x in labels]
    jpegs = _smooth_jpegs(labels, size, seed)
    with RecordWriter(os.path.join(out, REC_NAME), os.path.join(out, IDX_NAME)) as writer:
        for key, (label, jpeg) in enumerate(zip(labels, jpegs, strict=True)):
            writer.write(key, pack_record(IRHeader(0, float(label), key, 0), jpeg))
    meta = [{"image_index": k, "image_classes": [c]} for k, c in enumerate(labels)]
    with open(os.path.join(out, "train.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=4)
    classes = num_classes if num_classes is not None else max(labels) + 1
    prop = PackProperty(classes, size, num_images=len(labels))
    write_property(os.path.join(out, PROPERTY_NAME), prop)
    return PackInfo(out, classes, len(labels), size)


CORRUPTIONS = ("magic", "label", "negative", "length", "jpeg", "truncate", "offset")
"""Faults :func:`corrupt_record` can plant."""


def corrupt_record(pack_dir: str | os.PathLike[str], key: int, kind: str) -> None:
    """Damage record ``key`` of a pack in place, the way real files go bad.

    ``magic``: a flipped byte in the record's magic number. ``label``: the IRHeader's scalar
    label set to ``label + 1`` (disagrees with the identity record, or leaves ``[0, C)`` in a
    headerless pack when it was the last class). ``negative``: that label set to -1.
    ``length``: the frame claims 4 KiB more bytes than the record has. ``jpeg``: the image
    bytes after the JPEG start marker zeroed (same length, undecodable). ``truncate``: the
    ``.rec`` file cut in the middle of the record (and everything after it removed).
    ``offset``: the index points the key past the end of file.
    """
    from dataio.record_reader import read_index

    rec = os.path.join(os.fspath(pack_dir), REC_NAME)
    idx = os.path.join(os.fspath(pack_dir), IDX_NAME)
    keys, offsets = read_index(idx)
    off = offsets[key]
    with open(rec, "rb") as f:
        data = bytearray(f.read())
    if kind == "magic":
        data[off] ^= 0xFF
    elif kind == "label":
        value = np.frombuffer(bytes(data[off + 12 : off + 16]), dtype="<f4")[0]
        data[off + 12 : off + 16] = np.float32(value + 1).tobytes()
    elif kind == "negative":
        data[off + 12 : off + 16] = np.float32(-1).tobytes()
    elif kind == "length":
        lrec = int.from_bytes(data[off + 4 : off + 8], "little")
        data[off + 4 : off + 8] = (lrec + 4096).to_bytes(4, "little")
    elif kind == "jpeg":
        length = int.from_bytes(data[off + 4 : off + 8], "little") & ((1 << 29) - 1)
        start = off + 8 + IR_HEADER_SIZE + 2  # past the frame, IRHeader and SOI marker
        data[start : off + 8 + length] = bytes(off + 8 + length - start)
    elif kind == "truncate":
        del data[off + 20 :]
    elif kind == "offset":
        with open(idx, "w", encoding="ascii") as f:
            for k in keys:
                f.write(f"{k}\t{len(data) + 64 if k == key else offsets[k]}\n")
        return
    else:
        raise ValueError(f"corrupt_record: unknown kind {kind!r}; expected one of {CORRUPTIONS}")
    with open(rec, "wb") as f:
        f.write(bytes(data))
