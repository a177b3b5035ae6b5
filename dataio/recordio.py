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
"""

from __future__ import annotations

import io
import numbers
import os
import struct
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from dataio.checks import check_int

MAGIC = 0xCED7230A
"""The dmlc RecordIO magic number (``RecordIOWriter::kMagic``)."""
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEAD = struct.Struct("<II")  # magic, lrecord
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
MAX_RECORD_BYTES = 1 << _LENGTH_BITS
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


def _pad_len(n: int) -> int:
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
        if data[i : i + 4] == _MAGIC_BYTES:
            cflag = CFLAG_FIRST if start == 0 else CFLAG_MIDDLE
            out += _PART_HEAD.pack(MAGIC, (cflag << _LENGTH_BITS) | (i - start))
            out += data[start:i]
            start = i + 4
    cflag = CFLAG_LAST if start != 0 else CFLAG_WHOLE
    out += _PART_HEAD.pack(MAGIC, (cflag << _LENGTH_BITS) | (n - start))
    out += data[start:]
    out += b"\x00" * _pad_len(n)
    return bytes(out)


def _find_magic_aligned(payload: bytes) -> bool:
    """Whether any 4-aligned word of ``payload`` equals the magic (the rare slow path)."""
    pos = payload.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:
            return True
        pos = payload.find(_MAGIC_BYTES, pos + 1)
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
    return _PART_HEAD.pack(MAGIC, n) + payload + b"\x00" * _pad_len(n)


def _read_exact(f: BinaryIO | _PositionalFile, n: int) -> bytes:
    """Read ``n`` bytes, fewer only at end of file (raw handles may return short reads)."""
    data = f.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _PositionalFile:
    """A read-only file view with its own position, reading through ``os.pread``.

    Why: ``seek`` + ``read`` on a shared handle races when threads read concurrently; a
    positional read does not touch the handle's file position.
    """

    def __init__(self, fh: BinaryIO, offset: int):
        self._fd = fh.fileno()
        self._pos = offset

    def read(self, n: int) -> bytes:
        data = os.pread(self._fd, n, self._pos)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos


def _read_record_at(f: BinaryIO | _PositionalFile, path: str, key: object) -> bytes:
    """Read one (possibly multi-part) record starting at the current position of ``f``.

    Mirrors ``RecordIOReader::NextRecord``: parts are joined with the magic bytes between them.
    """
    chunks: list[bytes] = []
    while True:
        head = _read_exact(f, _PART_HEAD.size)
        if len(head) != _PART_HEAD.size:
            raise RecordIOError(
                f"{path}: truncated record (key {key}): expected an 8-byte part header, "
                f"got {len(head)} bytes"
            )
        magic, lrec = _PART_HEAD.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(
                f"{path}: wrong magic number 0x{magic:08x} (expected 0x{MAGIC:08x}) in record "
                f"key {key} at offset {f.tell() - _PART_HEAD.size}"
            )
        cflag = lrec >> _LENGTH_BITS
        length = lrec & _LENGTH_MASK
        padded = length + _pad_len(length)
        body = _read_exact(f, padded)
        if len(body) != padded:
            raise RecordIOError(
                f"{path}: truncated record (key {key}): part needs {padded} bytes, "
                f"file has {len(body)}"
            )
        if cflag > CFLAG_LAST:
            raise RecordIOError(f"{path}: invalid continuation flag {cflag} in record key {key}")
        if cflag in (CFLAG_MIDDLE, CFLAG_LAST) and not chunks:
            raise RecordIOError(
                f"{path}: record key {key} starts with a continuation part (cflag {cflag})"
            )
        if cflag in (CFLAG_WHOLE, CFLAG_FIRST) and chunks:
            raise RecordIOError(
                f"{path}: record key {key}: a multi-part record is interrupted by a new record"
            )
        chunks.append(body[:length])
        if cflag in (CFLAG_WHOLE, CFLAG_LAST):
            break
        chunks.append(_MAGIC_BYTES)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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
# Vectorised header scan


class RecordHeads(NamedTuple):
    """The frame and IRHeader fields of many records, read in one vectorised pass.

    All arrays have one entry per requested offset. ``available`` counts the bytes of the
    9-word head that lie inside the file (36 for any record not cut short by the end of file).
    Fields whose bytes are not available are 0.
    """

    magic: np.ndarray  # uint32 [M]
    cflag: np.ndarray  # uint32 [M] continuation flag of the first part
    length: np.ndarray  # int64 [M] payload length of the first part
    flag: np.ndarray  # uint32 [M] IRHeader.flag (0: scalar label, k: k-float vector label)
    label: np.ndarray  # float32 [M] IRHeader.label (the scalar label)
    first_value: np.ndarray  # float32 [M] first float of a vector label
    available: np.ndarray  # int64 [M] bytes of the 36-byte head inside the file


_HEAD_WORDS = (_PART_HEAD.size + IR_HEADER_SIZE + 4) // 4  # 9 words: frame, IRHeader, 1 float


def read_record_heads(
    rec_path: str | os.PathLike[str], offsets: np.ndarray, chunk: int = 1 << 16
) -> RecordHeads:
    """Read the first 36 bytes of the record at each of ``offsets`` without a Python loop.

    Why: checking the IRHeader of millions of records one ``read`` at a time takes minutes;
    a memory-mapped gather reads only the pages holding the heads. Records are 4-byte
    aligned in a valid file; an unaligned offset gets ``available == 0`` (the caller reports
    it). ``chunk`` bounds the temporary gather arrays (rows per step).
    """
    path = os.fspath(rec_path)
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1)  # [M]
    m = offs.size
    words = np.zeros((m, _HEAD_WORDS), dtype="<u4")  # [M, 9]
    available = np.zeros(m, dtype=np.int64)
    size = os.path.getsize(path)
    n_words = size // 4
    if m and n_words:
        mm = np.memmap(path, dtype="<u4", mode="r", shape=(n_words,))
        try:
            col = np.arange(_HEAD_WORDS, dtype=np.int64)  # [9]
            for start in range(0, m, chunk):
                o = offs[start : start + chunk]
                aligned = (o % 4 == 0) & (o >= 0)
                first = np.where(aligned, o // 4, n_words)  # [c]
                pos = first[:, None] + col[None, :]  # [c, 9]
                inside = pos < n_words
                got = mm[np.minimum(pos, n_words - 1)]
                words[start : start + chunk] = np.where(inside, got, 0)
                available[start : start + chunk] = np.where(
                    aligned, np.minimum(size - o, 4 * _HEAD_WORDS).clip(min=0), 0
                )
        finally:
            del mm
    lrec = words[:, 1]
    return RecordHeads(
        magic=words[:, 0].copy(),
        cflag=(lrec >> _LENGTH_BITS).astype(np.uint32),
        length=(lrec & _LENGTH_MASK).astype(np.int64),
        flag=words[:, 2].copy(),
        label=words[:, 3].view("<f4").astype(np.float32),
        first_value=words[:, 8].view("<f4").astype(np.float32),
        available=available,
    )


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


# --------------------------------------------------------------------------------------------
# Reader


def read_index(idx_path: str | os.PathLike[str]) -> tuple[list[int], dict[int, int]]:
    """Parse an ``.idx`` file into (keys in file order, key -> offset)."""
    path = os.fspath(idx_path)
    if not os.path.isfile(path):
        raise RecordIOError(f"{path}: index file not found")
    keys: list[int] = []
    offsets: dict[int, int] = {}
    with open(path, encoding="ascii", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise RecordIOError(f"{path}:{lineno}: expected 'key<TAB>offset', got {line!r}")
            try:
                key, offset = int(fields[0]), int(fields[1])
            except ValueError as e:
                raise RecordIOError(f"{path}:{lineno}: non-integer key/offset {line!r}") from e
            if offset < 0:
                raise RecordIOError(f"{path}:{lineno}: negative offset for key {key}")
            if key in offsets:
                raise RecordIOError(f"{path}:{lineno}: duplicate key {key}")
            keys.append(key)
            offsets[key] = offset
    return keys, offsets


class RecordReader:
    """Random and sequential access to an indexed RecordIO pair.

    The file handle is opened lazily and re-opened whenever ``os.getpid()`` changes, so one
    reader can be built in the parent and used after ``fork`` or in DataLoader workers; pickling
    drops the handle (spawned workers re-open). The index is parsed once, eagerly, so a missing
    or broken index fails at construction.
    """

    def __init__(
        self,
        rec_path: str | os.PathLike[str],
        idx_path: str | os.PathLike[str],
        buffer_size: int = 1 << 20,
        skip_bad_offsets: bool = False,
    ):
        """``buffer_size``: read buffer of the sequential :meth:`scan` handle, in bytes.

        ``skip_bad_offsets``: an index entry whose offset lies past the end of the ``.rec``
        file raises :class:`RecordIOError` (naming the index file and key) unless this is set;
        then the key is dropped from :attr:`keys` and listed in :attr:`bad_keys` with the reason.
        """
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path)
        self.buffer_size = int(buffer_size)
        if not os.path.isfile(self.rec_path):
            raise RecordIOError(f"{self.rec_path}: record file not found")
        self.keys, self._offsets = read_index(self.idx_path)
        self._size = os.path.getsize(self.rec_path)
        self.bad_keys: dict[int, str] = {}
        """Keys dropped at open (``skip_bad_offsets``), with the reason."""
        for key in self.keys:
            off = self._offsets[key]
            if off + _PART_HEAD.size > self._size:
                reason = (
                    f"{self.idx_path}: offset {off} of key {key} is past the end of "
                    f"{self.rec_path} ({self._size} bytes)"
                )
                if not skip_bad_offsets:
                    raise RecordIOError(reason)
                self.bad_keys[key] = reason
        if self.bad_keys:
            self.keys = [k for k in self.keys if k not in self.bad_keys]
            for key in self.bad_keys:
                del self._offsets[key]
        self._fh: BinaryIO | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._offsets

    @property
    def file_size(self) -> int:
        """Size of the ``.rec`` file in bytes when the reader was opened."""
        return self._size

    def _handle(self) -> BinaryIO:
        pid = os.getpid()
        if self._fh is None or self._pid != pid:
            # After fork the inherited handle shares its file position with the parent, so a
            # fresh one is opened (the inherited object is left for the parent to close).
            self._fh = open(self.rec_path, "rb", buffering=0)
            self._pid = pid
        return self._fh

    def offset(self, key: int) -> int:
        """Byte offset of ``key``'s first part in the ``.rec`` file."""
        try:
            return self._offsets[key]
        except KeyError:
            raise RecordIOError(f"{self.idx_path}: unknown key {key!r}") from None

    def read(self, key: int) -> bytes:
        """The record body stored under ``key`` (parts re-joined).

        Reads with ``os.pread`` at the record's offset, so threads sharing one reader never
        disturb each other's file position.
        """
        off = self.offset(key)
        return _read_record_at(_PositionalFile(self._handle(), off), self.rec_path, key)

    def read_prefix(self, key: int, size: int) -> bytes:
        """The first ``size`` bytes of the record (fewer if shorter), reading little of the file.

        Used to read IRHeaders of many records without reading their images.
        """
        off = self.offset(key)
        head = _read_exact(_PositionalFile(self._handle(), off), _PART_HEAD.size + size)
        if len(head) >= _PART_HEAD.size:
            magic, lrec = _PART_HEAD.unpack_from(head, 0)
            length = lrec & _LENGTH_MASK
            cflag = lrec >> _LENGTH_BITS
            if magic == MAGIC and (cflag == CFLAG_WHOLE or length >= size):
                if cflag == CFLAG_WHOLE and len(head) < _PART_HEAD.size + min(length, size):
                    raise RecordIOError(
                        f"{self.rec_path}: truncated record (key {key}) at offset {off}"
                    )
                return head[_PART_HEAD.size : _PART_HEAD.size + min(length, size)]
        # Multi-part with a short first part, or an error case: the full path reports it.
        return self.read(key)[:size]

    def scan(self, keys: Iterable[int] | None = None) -> Iterator[tuple[int, bytes]]:
        """Yield ``(key, record)`` for every indexed record (or for ``keys``) in file order.

        Uses its own buffered handle, so it does not disturb :meth:`read` and is fast on large
        packs (one forward pass; gaps between the wanted records are skipped by seeking).
        """
        wanted = self.keys if keys is None else [int(k) for k in keys]
        for key in wanted:
            if key not in self._offsets:
                raise RecordIOError(f"{self.idx_path}: unknown key {key!r}")
        order = sorted(wanted, key=self._offsets.__getitem__)
        with open(self.rec_path, "rb", buffering=self.buffer_size) as f:
            pos = 0
            for key in order:
                off = self._offsets[key]
                if off != pos:
                    f.seek(off)
                yield key, _read_record_at(f, self.rec_path, key)
                pos = f.tell()

    def close(self) -> None:
        """Close the random-access handle (it is re-opened on the next read)."""
        if self._fh is not None and self._pid == os.getpid():
            self._fh.close()
        self._fh = None
        self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fh"] = None
        state["_pid"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
