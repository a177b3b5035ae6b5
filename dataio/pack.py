"""insightface face packs: ``train.rec`` + ``train.idx`` + ``property``.

Why this layout: it is how MS1MV2/MS1MV3/Glint360K/WebFace are shipped, and arcface_torch and
DALI read it directly, so packs we write are interchangeable with the published ones.

The three layouts users have (an insightface header anywhere in the file, header-less
``RecBuilder`` packs, ours) are described and detected in :mod:`dataio.layout`;
:class:`FacePack` reads any of them and checks every record; a header pack's labels come from
its identity records (:mod:`dataio.identity_labels`). Packs are written by
:mod:`dataio.packer`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from types import TracebackType

import numpy as np

from dataio.identity_labels import labels_from_identities
from dataio.layout import (
    IDX_NAME,
    PROPERTY_NAME,
    REC_NAME,
    PackError,
    check_image_count,
    check_not_headless,
    read_header,
    read_property,
)
from dataio.record_reader import RecordReader, read_record_heads
from dataio.recordio import (
    CFLAG_FIRST,
    CFLAG_WHOLE,
    IR_HEADER_SIZE,
    MAGIC,
    PART_HEAD,
    IRHeader,
    RecordIOError,
    unpack_record,
)


@dataclasses.dataclass(frozen=True)
class PackInfo:
    """What a written pack holds (the facts the trainer checks its config against)."""

    out_dir: str
    num_classes: int
    num_images: int
    image_size: tuple[int, int]
    """(height, width) of every image."""


def _label_from_header(header: IRHeader) -> float:
    """The class label of an image record: the scalar, or element 0 of a vector label.

    insightface packs store some image labels as vectors (class id first), and arcface_torch
    takes ``label[0]`` in that case; we do the same.
    """
    if isinstance(header.label, np.ndarray):
        return float(header.label[0])
    return float(header.label)


class FacePack:
    """Read-only view of a face pack: image keys, labels, and per-image reads.

    Labels are read once at open (from identity records when the pack has a header, else from
    every record's IRHeader in one vectorised pass). Picklable and fork-safe through
    :class:`RecordReader`.

    ``skip_corrupt``: per-record faults found at open (an index offset past the end of the
    ``.rec``, an image key missing from the index, a malformed head or a label outside
    ``[0, num_classes)`` in a headerless pack) raise :class:`PackError` naming the file and
    key unless this is set; then the record is left out of :attr:`image_keys` and listed in
    :attr:`bad_keys`. Pack-level faults (missing ``property`` or index, empty pack, broken
    header or identity records) always raise.
    """

    def __init__(self, pack_dir: str | os.PathLike[str], skip_corrupt: bool = False):
        self.pack_dir = os.fspath(pack_dir)
        if not os.path.isdir(self.pack_dir):
            raise PackError(f"{self.pack_dir}: pack directory not found")
        self.skip_corrupt = bool(skip_corrupt)
        self.rec_path = os.path.join(self.pack_dir, REC_NAME)
        self.idx_path = os.path.join(self.pack_dir, IDX_NAME)
        prop_path = os.path.join(self.pack_dir, PROPERTY_NAME)
        prop = read_property(prop_path)
        self.num_classes, self.image_size = prop.num_classes, prop.image_size
        try:
            self._reader = RecordReader(
                self.rec_path, self.idx_path, skip_bad_offsets=self.skip_corrupt
            )
        except RecordIOError as e:  # the message names the file (and key)
            raise PackError(str(e)) from e
        self.bad_keys: dict[int, str] = dict(self._reader.bad_keys)
        """Records left out at open (``skip_corrupt``): key -> reason."""
        if len(self._reader) == 0:
            raise PackError(f"{self.idx_path}: empty pack (no records indexed)")
        self._sorted_offsets: np.ndarray | None = None
        self._image_offsets: np.ndarray | None = None
        header = read_header(self._reader, self.skip_corrupt)
        self.has_header = header is not None
        self.layout = "header" if self.has_header else "headerless"
        """Which layout of :mod:`dataio.layout` the pack has."""
        if header is None:
            check_not_headless(self._reader)
            self.image_keys, self.labels = self._labels_by_scan()
        else:
            self.image_keys, self.labels, missing = labels_from_identities(
                self._reader, header, self.num_classes, self.bad_keys, self.skip_corrupt
            )
            for key, reason in missing.items():
                self.bad_keys.setdefault(key, reason)
        if self.image_keys.size == 0:
            raise PackError(f"{self.rec_path}: pack holds no images")
        # Skipped records included: the layout's count.
        check_image_count(prop, prop_path, self.layout, self.image_keys.size + len(self.bad_keys))

    # -- open-time helpers

    def _labels_by_scan(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.asarray(self._reader.keys, dtype=np.int64)  # [N]
        offsets = np.fromiter(
            (self._reader.offset(int(k)) for k in keys), dtype=np.int64, count=keys.size
        )
        values, bad = self._check_heads(keys, offsets, expected=None)
        if bad:
            if not self.skip_corrupt:
                key = min(bad, key=lambda k: self._reader.offset(k))
                raise PackError(bad[key])
            self.bad_keys.update(bad)
            keep = np.fromiter((int(k) not in bad for k in keys), dtype=bool, count=keys.size)
            keys, values, offsets = keys[keep], values[keep], offsets[keep]
        self._image_offsets = offsets
        return keys, values.astype(np.int64)

    def _all_sorted_offsets(self) -> np.ndarray:
        """Offsets of every indexed record, sorted (record i ends before the next one)."""
        if self._sorted_offsets is None:
            self._sorted_offsets = np.sort(
                np.fromiter(
                    (self._reader.offset(k) for k in self._reader.keys),
                    dtype=np.int64,
                    count=len(self._reader),
                )
            )
        return self._sorted_offsets

    def _check_heads(
        self, keys: np.ndarray, offsets: np.ndarray, expected: np.ndarray | None
    ) -> tuple[np.ndarray, dict[int, str]]:
        """Check the frame and IRHeader of image records -> (label values, {key: reason}).

        A record is bad when its frame is broken (unaligned offset, wrong magic, a
        continuation part where a record should start, a length running past the next
        record or the end of the file), its IRHeader is short, it carries no image bytes, or
        its label is not a class id (or differs from ``expected``, the identity-record label).
        """
        heads = read_record_heads(self.rec_path, offsets)
        n = keys.size
        sorted_offs = self._all_sorted_offsets()
        nxt_i = np.searchsorted(sorted_offs, offsets, side="right")
        size = self._reader.file_size
        next_off = np.where(
            nxt_i < sorted_offs.size, sorted_offs[np.minimum(nxt_i, sorted_offs.size - 1)], size
        )
        values = np.where(heads.flag == 0, heads.label, heads.first_value).astype(np.float64)
        reason: list[str | None] = [None] * n
        whole = heads.cflag == CFLAG_WHOLE
        body_needed = IR_HEADER_SIZE + 4 * heads.flag.astype(np.int64)
        checks = [
            (offsets % 4 != 0, lambda i: f"offset {offsets[i]} is not 4-byte aligned"),
            (
                heads.available < PART_HEAD.size,
                lambda i: f"truncated record: no part header at offset {offsets[i]}",
            ),
            (
                heads.magic != MAGIC,
                lambda i: (
                    f"wrong magic number 0x{int(heads.magic[i]):08x} at offset "
                    f"{offsets[i]} (expected 0x{MAGIC:08x})"
                ),
            ),
            (
                heads.cflag > CFLAG_FIRST,
                lambda i: f"record starts with continuation flag {int(heads.cflag[i])}",
            ),
            (
                whole & (offsets + PART_HEAD.size + heads.length > next_off),
                lambda i: (
                    f"truncated record: needs {int(heads.length[i])} bytes after offset "
                    f"{offsets[i] + PART_HEAD.size}, "
                    + (
                        f"file has {size - offsets[i] - PART_HEAD.size}"
                        if next_off[i] == size
                        else f"next record starts at {next_off[i]}"
                    )
                ),
            ),
            (
                whole & (heads.length < body_needed),
                lambda i: (
                    f"record of {int(heads.length[i])} bytes is shorter than its "
                    f"IRHeader and {int(heads.flag[i])}-float label"
                ),
            ),
            (
                whole & (heads.length == body_needed),
                lambda i: "record holds no image bytes",
            ),
        ]
        for mask, message in checks:
            for i in np.flatnonzero(mask).tolist():
                if reason[i] is None:
                    reason[i] = message(i)
        # Multi-part records with a short first part are rare: read them whole.
        for i in np.flatnonzero(heads.cflag == CFLAG_FIRST).tolist():
            if reason[i] is not None:
                continue
            key = int(keys[i])
            try:
                head, payload = unpack_record(self._reader.read(key))
            except RecordIOError as e:
                reason[i] = str(e)
                continue
            values[i] = _label_from_header(head)
            if not payload:
                reason[i] = "record holds no image bytes"
        for i in range(n):
            if reason[i] is not None:
                continue
            v = values[i]
            is_class_id = bool(np.isfinite(v)) and v == int(v) and 0 <= v < self.num_classes
            if not is_class_id:
                reason[i] = f"label {v} is not a class id in [0, num_classes={self.num_classes})"
            elif expected is not None and int(v) != expected[i]:
                reason[i] = (
                    f"record label {int(v)} disagrees with its identity record "
                    f"(class {int(expected[i])})"
                )
        bad = {
            int(keys[i]): f"{self.rec_path}: key {int(keys[i])}: {r}"
            for i, r in enumerate(reason)
            if r is not None
        }
        return values, bad

    def _check_label(self, value: float, key: int) -> int:
        label = int(value) if math.isfinite(value) else -1  # a Python float: not np (20x slower)
        if label != value or not 0 <= label < self.num_classes:
            raise PackError(
                f"{self.rec_path}: key {key}: label {value} is not a class id in "
                f"[0, num_classes={self.num_classes})"
            )
        return label

    # -- public API

    @property
    def num_images(self) -> int:
        """Number of image records."""
        return int(self.image_keys.size)

    def __len__(self) -> int:
        return self.num_images

    @property
    def image_offsets(self) -> np.ndarray:
        """Byte offset in ``train.rec`` of each image record, int64 ``[num_images]``."""
        if self._image_offsets is None:
            self._image_offsets = np.fromiter(
                (self._reader.offset(int(k)) for k in self.image_keys),
                dtype=np.int64,
                count=self.image_keys.size,
            )
        return self._image_offsets

    def check_records(self, positions: np.ndarray | None = None) -> dict[int, str]:
        """Check the frame, IRHeader and label of image records without decoding them.

        ``positions`` index :attr:`image_keys` (default: all images). Returns ``{key: reason}``
        for the bad ones (each reason names the file and key); one vectorised pass over the
        record heads, so millions of records take seconds, not minutes.
        """
        pos = (
            np.arange(self.num_images)
            if positions is None
            else np.asarray(positions, dtype=np.int64).reshape(-1)
        )
        _, bad = self._check_heads(self.image_keys[pos], self.image_offsets[pos], self.labels[pos])
        return bad

    def read(self, i: int) -> tuple[bytes, int]:
        """The ``i``-th image: (encoded image bytes, class label)."""
        n = self.num_images
        if not -n <= i < n:
            raise IndexError(f"{self.pack_dir}: image index {i} out of range [0, {n})")
        key = int(self.image_keys[i])
        try:
            head, payload = unpack_record(self._reader.read(key))
        except RecordIOError as e:
            raise PackError(f"{self.rec_path}: key {key}: {e}") from e
        label = self._check_label(_label_from_header(head), key)
        if label != self.labels[i]:
            raise PackError(
                f"{self.rec_path}: key {key}: record label {label} disagrees with its identity "
                f"record (class {int(self.labels[i])})"
            )
        if not payload:
            raise PackError(f"{self.rec_path}: key {key}: record holds no image bytes")
        return payload, label

    def info(self) -> PackInfo:
        """Summary of the pack in the same form :func:`write_pack` returns."""
        return PackInfo(self.pack_dir, self.num_classes, self.num_images, self.image_size)

    def close(self) -> None:
        """Close the file handle (reads re-open it)."""
        self._reader.close()

    def __enter__(self) -> FacePack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
