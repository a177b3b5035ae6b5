"""Reading an indexed RecordIO pack (``.rec`` + ``.idx``), byte-compatible with MXNet/dmlc.

* :func:`read_index`: the ``.idx`` text index -> keys in file order and key -> offset.
* :class:`RecordReader`: random access by key (``os.pread``, safe across threads and forks),
  header-only prefixes, and sequential scans in file order.
* :func:`read_record_heads`: the frame and IRHeader fields of many records in one vectorised,
  memory-mapped pass (checking millions of headers without a Python loop).

The format itself (framing, the IRHeader struct) and the writer are :mod:`dataio.recordio`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, BinaryIO, NamedTuple

import numpy as np

from dataio.recordio import (
    CFLAG_FIRST,
    CFLAG_LAST,
    CFLAG_MIDDLE,
    CFLAG_WHOLE,
    IR_HEADER_SIZE,
    LENGTH_BITS,
    LENGTH_MASK,
    MAGIC,
    MAGIC_BYTES,
    PART_HEAD,
    RecordIOError,
    pad_len,
)

__all__ = ["RecordHeads", "RecordReader", "read_index", "read_record_heads"]


# --------------------------------------------------------------------------------------------
# Record decoding (the mirror of recordio.encode_record)


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
        head = _read_exact(f, PART_HEAD.size)
        if len(head) != PART_HEAD.size:
            raise RecordIOError(
                f"{path}: truncated record (key {key}): expected an 8-byte part header, "
                f"got {len(head)} bytes"
            )
        magic, lrec = PART_HEAD.unpack(head)
        if magic != MAGIC:
            raise RecordIOError(
                f"{path}: wrong magic number 0x{magic:08x} (expected 0x{MAGIC:08x}) in record "
                f"key {key} at offset {f.tell() - PART_HEAD.size}"
            )
        cflag = lrec >> LENGTH_BITS
        length = lrec & LENGTH_MASK
        padded = length + pad_len(length)
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
        chunks.append(MAGIC_BYTES)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


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


_HEAD_WORDS = (PART_HEAD.size + IR_HEADER_SIZE + 4) // 4  # 9 words: frame, IRHeader, 1 float


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
        cflag=(lrec >> LENGTH_BITS).astype(np.uint32),
        length=(lrec & LENGTH_MASK).astype(np.int64),
        flag=words[:, 2].copy(),
        label=words[:, 3].view("<f4").astype(np.float32),
        first_value=words[:, 8].view("<f4").astype(np.float32),
        available=available,
    )


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
            if off + PART_HEAD.size > self._size:
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
        head = _read_exact(_PositionalFile(self._handle(), off), PART_HEAD.size + size)
        if len(head) >= PART_HEAD.size:
            magic, lrec = PART_HEAD.unpack_from(head, 0)
            length = lrec & LENGTH_MASK
            cflag = lrec >> LENGTH_BITS
            if magic == MAGIC and (cflag == CFLAG_WHOLE or length >= size):
                if cflag == CFLAG_WHOLE and len(head) < PART_HEAD.size + min(length, size):
                    raise RecordIOError(
                        f"{self.rec_path}: truncated record (key {key}) at offset {off}"
                    )
                return head[PART_HEAD.size : PART_HEAD.size + min(length, size)]
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
