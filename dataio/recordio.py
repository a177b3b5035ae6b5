"""The dmlc/MXNet RecordIO format, byte-compatible, without an MXNet dependency.

Why: the public face-recognition datasets (MS1MV2/3, Glint360K, WebFace) are distributed as
MXNet ``train.rec`` / ``train.idx`` packs, and DALI reads the same files. Writing our own packs
byte-identically to ``mx.recordio.MXIndexedRecordIO`` means one file serves every loader.

File layout (dmlc-core ``recordio.h`` / ``recordio.cc``), all integers little endian::

    part   := uint32 magic (0xced7230a) | uint32 lrecord | data | zero pad to a multiple of 4
    lrecord = cflag << 29 | length         # length = len(data) of this part, < 2**29
    cflag   : 0 whole record, 1 first part, 2 middle part, 3 last part

A record whose payload holds the magic number at a 4-byte aligned offset (relative to the
payload start) is split there: the magic itself is dropped from the data, every part but the
last ends right before it, and the reader re-joins the parts with the magic bytes between them.
Without this, a scanner that resynchronises on the magic number could take image bytes for a
record start. Only the final part carries padding (earlier parts are 4-byte multiples anyway).

The ``.idx`` index is text, one line per record: ``"{key}\\t{offset}\\n"`` where offset is the
byte offset of the record's first part.

The image-record header (``mx.recordio.IRHeader``) is the struct ``'IfQQ'``: flag (uint32),
label (float32), id (uint64), id2 (uint64). ``flag == 0``: scalar label in the struct;
``flag == k > 0``: the struct's label is 0 and ``k`` float32 values precede the payload.

This module holds the format and the writing side (framing, IRHeader, :class:`RecordWriter`);
reading a pack (index, random access, scans, the vectorised header scan) is
:mod:`dataio.record_reader`.
"""

from __future__ import annotations

import io
import numbers
import os
import struct
from types import TracebackType
from typing import BinaryIO, NamedTuple

import numpy as np

from common.checks import check_int

MAGIC = 0xCED7230A
"""The dmlc RecordIO magic number (``RecordIOWriter::kMagic``)."""
MAGIC_BYTES = struct.pack("<I", MAGIC)
PART_HEAD = struct.Struct("<II")  # magic, lrecord: the 8-byte head in front of every part
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
MAX_RECORD_BYTES = 1 << LENGTH_BITS
"""dmlc refuses records of 2**29 bytes or more (the length field has 29 bits)."""

CFLAG_WHOLE, CFLAG_FIRST, CFLAG_MIDDLE, CFLAG_LAST = 0, 1, 2, 3

_IR_STRUCT = struct.Struct("<IfQQ")
IR_HEADER_SIZE = _IR_STRUCT.size
"""Bytes of the packed IRHeader struct (24)."""


class RecordIOError(ValueError):
    """A RecordIO file, its index or a record in it is malformed or missing.

    The message always names the file and, where one is involved, the record key.
    """


# --------------------------------------------------------------------------------------------
# Record framing


def pad_len(n: int) -> int:
    """Zero bytes that bring ``n`` up to a multiple of 4."""
    return (-n) & 3


def encode_record(payload: bytes) -> bytes:
    """Frame one payload as dmlc ``RecordIOWriter::WriteRecord`` does (possibly several parts).

    Returned bytes are exactly what MXNet writes to the ``.rec`` file for this payload.
    """
    data = memoryview(payload).cast("B")
    n = len(data)
    if n >= MAX_RECORD_BYTES:
        raise RecordIOError(f"record of {n} bytes is too large: RecordIO allows < 2**29 bytes")
    out = bytearray()
    start = 0  # first byte of the part being built (always 4-aligned)
    # Only whole 4-byte words are checked: a magic straddling the tail is never split (dmlc
    # loops `i < lower_align`).
    for i in range(0, n - n % 4, 4):
        if data[i : i + 4] == MAGIC_BYTES:
            cflag = CFLAG_FIRST if start == 0 else CFLAG_MIDDLE
            out += PART_HEAD.pack(MAGIC, (cflag << LENGTH_BITS) | (i - start))
            out += data[start:i]
            start = i + 4
    cflag = CFLAG_LAST if start != 0 else CFLAG_WHOLE
    out += PART_HEAD.pack(MAGIC, (cflag << LENGTH_BITS) | (n - start))
    out += data[start:]
    out += b"\x00" * pad_len(n)
    return bytes(out)


def _find_magic_aligned(payload: bytes) -> bool:
    """Whether any 4-aligned word of ``payload`` equals the magic (the rare slow path)."""
    pos = payload.find(MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            return True
        pos = payload.find(MAGIC_BYTES, pos + 1)
    return False


def _frame(payload: bytes) -> bytes:
    """Fast path of :func:`encode_record`: one part unless an aligned magic is present."""
    if not isinstance(payload, bytes):
        payload = bytes(payload)
    n = len(payload)
    if n >= MAX_RECORD_BYTES:
        raise RecordIOError(f"record of {n} bytes is too large: RecordIO allows < 2**29 bytes")
    if _find_magic_aligned(payload):
        return encode_record(payload)
    return PART_HEAD.pack(MAGIC, n) + payload + b"\x00" * pad_len(n)


# --------------------------------------------------------------------------------------------
# Image-record header (mx.recordio.pack / unpack)


class IRHeader(NamedTuple):
    """Header of an image record, as ``mx.recordio.IRHeader``.

    ``flag`` is derived by :func:`pack_record` from ``label``: 0 for a scalar, ``label.size``
    for a vector label. After :func:`unpack_record` a vector label is a float32 ndarray.
    """

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(header: IRHeader, payload: bytes) -> bytes:
    """Serialise header + payload like ``mx.recordio.pack`` (the record body, not framed)."""
    flag, label, rid, rid2 = header
    if isinstance(label, numbers.Number):
        prefix = b""
        flag = 0
        label_field = float(label)  # type: ignore[arg-type]
    else:
        vec = np.ascontiguousarray(np.asarray(label, dtype=np.float32).reshape(-1))
        if vec.size == 0:
            raise ValueError("pack_record: a vector label must have at least one element")
        prefix = vec.tobytes()
        flag = int(vec.size)
        label_field = 0.0
    try:
        head = _IR_STRUCT.pack(flag, label_field, int(rid), int(rid2))
    except struct.error as e:
        raise ValueError(f"pack_record: header {header!r} does not fit 'IfQQ': {e}") from e
    return head + prefix + bytes(payload)


def unpack_record(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record body into its IRHeader and payload, like ``mx.recordio.unpack``."""
    if len(record) < IR_HEADER_SIZE:
        raise RecordIOError(
            f"record of {len(record)} bytes is shorter than the {IR_HEADER_SIZE}-byte IRHeader"
        )
    flag, label, rid, rid2 = _IR_STRUCT.unpack_from(record, 0)
    payload_start = IR_HEADER_SIZE
    label_out: float | np.ndarray = float(label)
    if flag > 0:
        payload_start += 4 * flag
        if len(record) < payload_start:
            raise RecordIOError(
                f"record declares a {flag}-float label but has only "
                f"{len(record) - IR_HEADER_SIZE} bytes after the header"
            )
        label_out = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_HEADER_SIZE).astype(
            np.float32
        )
    return IRHeader(flag, label_out, rid, rid2), bytes(record[payload_start:])


# --------------------------------------------------------------------------------------------
# Writer


class RecordWriter:
    """Write an indexed RecordIO pair (``.rec`` + ``.idx``) like ``mx.recordio.MXIndexedRecordIO``.

    ``write(key, record)`` frames ``record`` (typically the output of :func:`pack_record`) and
    appends ``"key\\toffset\\n"`` to the index. Keys must be unique non-negative integers.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]):
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path)
        self._rec: BinaryIO | None = open(self.rec_path, "wb")
        try:
            self._idx: io.TextIOWrapper | None = open(
                self.idx_path, "w", encoding="ascii", newline="\n"
            )
        except OSError as e:
            self._rec.close()
            raise RecordIOError(f"{self.idx_path}: cannot open index for writing: {e}") from e
        self._offset = 0
        self._keys: set[int] = set()

    def write(self, key: int, record: bytes) -> None:
        """Append one record under ``key``; its offset goes to the index."""
        if self._rec is None or self._idx is None:
            raise RecordIOError(f"{self.rec_path}: write after close (key {key})")
        key = check_int(f"{self.rec_path}: key", key)
        if key in self._keys:
            raise ValueError(f"{self.rec_path}: duplicate key {key}")
        try:
            framed = _frame(record)
        except RecordIOError as e:
            raise RecordIOError(f"{self.rec_path}: key {key}: {e}") from e
        self._rec.write(framed)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._keys.add(key)
        self._offset += len(framed)

    def close(self) -> None:
        """Flush and close both files (idempotent)."""
        if self._rec is not None:
            self._rec.close()
            self._rec = None
        if self._idx is not None:
            self._idx.close()
            self._idx = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
