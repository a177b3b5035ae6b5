"""insightface face packs: ``train.rec`` + ``train.idx`` + ``property``.

Why this layout: it is how MS1MV2/MS1MV3/Glint360K/WebFace are shipped, and arcface_torch and
DALI read it directly, so packs we write are interchangeable with the published ones.

Layout with a header (what :func:`write_pack` writes by default)::

    key 0                         header:   vector label [first_identity_key, end_key], no payload
    keys 1 .. first_identity_key-1  images:   scalar label = class id, payload = JPEG bytes
    keys first_identity_key .. end_key-1
                                  identities: vector label [first_image_key, end_image_key) of
                                              class c = key - first_identity_key, no payload

``property`` is one text line ``"num_classes,height,width"``.

A headerless pack has only image records (record 0 is an ordinary image); it is recognised by
record 0 having a scalar label or a non-empty payload. Its labels are read by scanning every
record's IRHeader once at open, which reads only the header bytes of each record.
"""

from __future__ import annotations

import dataclasses
import io
import numbers
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dataio.recordio import (
    IR_HEADER_SIZE,
    IRHeader,
    RecordIOError,
    RecordReader,
    RecordWriter,
    pack_record,
    unpack_record,
)

REC_NAME = "train.rec"
IDX_NAME = "train.idx"
PROPERTY_NAME = "property"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""File suffixes :func:`pack_image_folder` treats as images (case-insensitive)."""

_JPEG_SOI = b"\xff\xd8\xff"
_IR_FLAG_LABEL = struct.Struct("<If")  # the first two IRHeader fields
_FLOAT = struct.Struct("<f")


class PackError(ValueError):
    """A face pack (or the input to build one) is malformed; the message names file and key."""


@dataclasses.dataclass(frozen=True)
class PackInfo:
    """What a written pack holds (the facts the trainer checks its config against)."""

    out_dir: str
    num_classes: int
    num_images: int
    image_size: tuple[int, int]
    """(height, width) of every image."""


# --------------------------------------------------------------------------------------------
# property file


def read_property(path: str | os.PathLike[str]) -> tuple[int, tuple[int, int]]:
    """Parse a ``property`` file into ``(num_classes, (height, width))``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PackError(f"{path}: property file not found (expected 'num_classes,height,width')")
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    fields = [x.strip() for x in text.split(",")]
    try:
        if len(fields) != 3:
            raise ValueError(text)
        num_classes, height, width = (int(x) for x in fields)
    except ValueError:
        raise PackError(
            f"{path}: expected 'num_classes,height,width' (three integers), got {text!r}"
        ) from None
    if num_classes <= 0 or height <= 0 or width <= 0:
        raise PackError(f"{path}: num_classes, height and width must be positive, got {text!r}")
    return num_classes, (height, width)


def _write_property(path: str, num_classes: int, image_size: tuple[int, int]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{num_classes},{image_size[0]},{image_size[1]}\n")


# --------------------------------------------------------------------------------------------
# writing


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    if (
        len(image_size) != 2
        or not all(isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in image_size)
        or min(image_size) <= 0
    ):
        raise ValueError(f"image_size must be two positive ints (height, width), got {image_size}")
    return int(image_size[0]), int(image_size[1])


def write_pack(
    out_dir: str | os.PathLike[str],
    samples: Iterable[tuple[int, bytes]],
    num_classes: int,
    image_size: tuple[int, int],
    with_header: bool = True,
) -> PackInfo:
    """Write ``(label, jpeg_bytes)`` samples as ``train.rec``/``train.idx``/``property``.

    With a header the samples are stably sorted by label (the layout needs each class's images
    to be one contiguous key range); without one they are written in the given order. The
    samples are materialised in memory. Files are written under temporary names and renamed at
    the end, so an interrupted run never leaves a pack that looks complete.
    """
    out = os.fspath(out_dir)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"num_classes must be an int, got {num_classes!r}")
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    num_classes = int(num_classes)
    size = _check_image_size(image_size)

    items: list[tuple[int, bytes]] = []
    for i, sample in enumerate(samples):
        try:
            label, payload = sample
        except (TypeError, ValueError):
            raise ValueError(f"sample {i}: expected a (label, bytes) pair") from None
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise ValueError(f"sample {i}: label must be an int, got {label!r}")
        if not 0 <= label < num_classes:
            raise ValueError(f"sample {i}: label {label} outside [0, num_classes={num_classes})")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ValueError(f"sample {i}: image must be bytes, got {type(payload).__name__}")
        items.append((int(label), bytes(payload)))
    if not items:
        raise ValueError(f"write_pack({out}): no samples to write")

    os.makedirs(out, exist_ok=True)
    rec_path = os.path.join(out, REC_NAME)
    idx_path = os.path.join(out, IDX_NAME)
    prop_path = os.path.join(out, PROPERTY_NAME)
    tmp = [p + ".tmp" for p in (rec_path, idx_path, prop_path)]
    num_images = len(items)
    try:
        with RecordWriter(tmp[0], tmp[1]) as writer:
            if with_header:
                items.sort(key=lambda s: s[0])  # stable: keeps within-class order
                first_identity_key = num_images + 1
                end_key = first_identity_key + num_classes
                writer.write(0, pack_record(IRHeader(0, [first_identity_key, end_key], 0, 0), b""))
                counts = np.bincount([lbl for lbl, _ in items], minlength=num_classes)
                for key, (label, payload) in enumerate(items, start=1):
                    writer.write(key, pack_record(IRHeader(0, float(label), key, 0), payload))
                start = 1
                for c in range(num_classes):
                    stop = start + int(counts[c])
                    key = first_identity_key + c
                    writer.write(key, pack_record(IRHeader(0, [start, stop], key, 0), b""))
                    start = stop
            else:
                for key, (label, payload) in enumerate(items):
                    writer.write(key, pack_record(IRHeader(0, float(label), key, 0), payload))
        _write_property(tmp[2], num_classes, size)
        for src, dst in zip(tmp, (rec_path, idx_path, prop_path), strict=True):
            os.replace(src, dst)
    finally:
        for p in tmp:
            if os.path.exists(p):
                os.remove(p)
    return PackInfo(out_dir=out, num_classes=num_classes, num_images=num_images, image_size=size)


# --------------------------------------------------------------------------------------------
# reading


def _wrap_errors(records: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """Re-raise RecordIO errors met while iterating as PackError (they already name the file)."""
    try:
        yield from records
    except RecordIOError as e:
        raise PackError(str(e)) from e


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

    Labels are read once at open (from identity records when the pack has a header, else by
    scanning every record's IRHeader). Picklable and fork-safe through :class:`RecordReader`.
    """

    def __init__(self, pack_dir: str | os.PathLike[str]):
        self.pack_dir = os.fspath(pack_dir)
        if not os.path.isdir(self.pack_dir):
            raise PackError(f"{self.pack_dir}: pack directory not found")
        self.rec_path = os.path.join(self.pack_dir, REC_NAME)
        self.idx_path = os.path.join(self.pack_dir, IDX_NAME)
        self.num_classes, self.image_size = read_property(
            os.path.join(self.pack_dir, PROPERTY_NAME)
        )
        self._reader = RecordReader(self.rec_path, self.idx_path)
        if len(self._reader) == 0:
            raise PackError(f"{self.idx_path}: empty pack (no records indexed)")
        header = self._read_pack_header()
        if header is None:
            self.has_header = False
            self.image_keys, self.labels = self._labels_by_scan()
        else:
            self.has_header = True
            self.image_keys, self.labels = self._labels_from_identities(*header)
        if self.image_keys.size == 0:
            raise PackError(f"{self.rec_path}: pack holds no images")

    # -- open-time helpers

    def _read_pack_header(self) -> tuple[int, int] | None:
        """(first_identity_key, end_key) if record 0 is an insightface header, else None."""
        if 0 not in self._reader:
            return None
        try:
            header, payload = unpack_record(self._reader.read(0))
        except RecordIOError as e:
            raise PackError(f"{self.rec_path}: key 0: {e}") from e
        if header.flag == 0 or payload:
            return None
        if header.flag < 2:
            raise PackError(
                f"{self.rec_path}: key 0 looks like a pack header but its label has "
                f"{header.flag} value(s); expected [first_identity_key, end_key]"
            )
        first_id, end = int(header.label[0]), int(header.label[1])  # type: ignore[index]
        if not 1 <= first_id <= end:
            raise PackError(f"{self.rec_path}: key 0: invalid header range [{first_id}, {end})")
        return first_id, end

    def _labels_from_identities(self, first_id: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        num_identities = end - first_id
        if num_identities != self.num_classes:
            raise PackError(
                f"{self.rec_path}: header lists {num_identities} identity records (keys "
                f"{first_id}..{end - 1}) but property says num_classes={self.num_classes}"
            )
        image_keys = np.arange(1, first_id, dtype=np.int64)
        for key in (1, first_id - 1, first_id, end - 1):
            if 1 <= key < end and key not in self._reader:
                raise PackError(f"{self.idx_path}: key {key} of the header's layout is missing")
        labels = np.full(image_keys.size, -1, dtype=np.int64)
        # Identity records are tiny and stored together: one sequential pass reads them all.
        identities = self._reader.scan(range(first_id, end))
        for key, record in _wrap_errors(identities):
            c = key - first_id
            try:
                head, _ = unpack_record(record)
            except RecordIOError as e:
                raise PackError(f"{self.rec_path}: identity record key {key}: {e}") from e
            if head.flag != 2:
                raise PackError(
                    f"{self.rec_path}: identity record key {key} (class {c}) has flag "
                    f"{head.flag}; expected a 2-value label [first_image_key, end_image_key)"
                )
            a, b = int(head.label[0]), int(head.label[1])  # type: ignore[index]
            if not 1 <= a <= b <= first_id:
                raise PackError(
                    f"{self.rec_path}: identity record key {key} (class {c}): image range "
                    f"[{a}, {b}) outside [1, {first_id})"
                )
            if np.any(labels[a - 1 : b - 1] >= 0):
                raise PackError(
                    f"{self.rec_path}: identity record key {key} (class {c}): image range "
                    f"[{a}, {b}) overlaps another class"
                )
            labels[a - 1 : b - 1] = c
        unassigned = np.flatnonzero(labels < 0)
        if unassigned.size:
            raise PackError(
                f"{self.rec_path}: image key {int(image_keys[unassigned[0]])} belongs to no "
                f"identity record ({unassigned.size} such images)"
            )
        return image_keys, labels

    def _labels_by_scan(self) -> tuple[np.ndarray, np.ndarray]:
        keys = self._reader.keys
        image_keys = np.asarray(keys, dtype=np.int64)
        labels = np.empty(len(keys), dtype=np.int64)
        for i, key in enumerate(keys):
            # The IRHeader plus the first float of a vector label is all we need.
            prefix = self._reader.read_prefix(key, IR_HEADER_SIZE + 4)
            if len(prefix) < IR_HEADER_SIZE:
                raise PackError(
                    f"{self.rec_path}: key {key}: record of {len(prefix)} bytes is shorter "
                    f"than the {IR_HEADER_SIZE}-byte IRHeader"
                )
            flag, value = _IR_FLAG_LABEL.unpack_from(prefix, 0)
            if flag > 0:
                if len(prefix) < IR_HEADER_SIZE + 4:
                    raise PackError(
                        f"{self.rec_path}: key {key}: record declares a {flag}-float label "
                        "but ends after the header"
                    )
                (value,) = _FLOAT.unpack_from(prefix, IR_HEADER_SIZE)
            labels[i] = self._check_label(value, key)
        return image_keys, labels

    def _check_label(self, value: float, key: int) -> int:
        label = int(value)
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


# --------------------------------------------------------------------------------------------
# packing an image folder


def _list_folder(image_dir: str) -> tuple[list[tuple[str, int]], int]:
    """(path, label) pairs of a folder-per-identity tree; labels follow sorted folder names."""
    classes = sorted(
        d
        for d in os.listdir(image_dir)
        if not d.startswith(".") and os.path.isdir(os.path.join(image_dir, d))
    )
    if not classes:
        raise PackError(f"{image_dir}: no identity sub-folders found")
    items: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        sub = os.path.join(image_dir, name)
        for fname in sorted(os.listdir(sub)):
            if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                items.append((os.path.join(sub, fname), label))
    return items, len(classes)


def _list_file(list_path: str) -> tuple[list[tuple[str, int]], int]:
    """(path, label) pairs from lines ``"path label"``; relative paths are from the list's dir."""
    base = os.path.dirname(os.path.abspath(list_path))
    items: list[tuple[str, int]] = []
    with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.rsplit(None, 1)
            try:
                if len(fields) != 2:
                    raise ValueError(line)
                label = int(fields[1])
            except ValueError:
                raise PackError(
                    f"{list_path}:{lineno}: expected 'path label', got {line!r}"
                ) from None
            if label < 0:
                raise PackError(f"{list_path}:{lineno}: negative label {label}")
            path = fields[0] if os.path.isabs(fields[0]) else os.path.join(base, fields[0])
            items.append((path, label))
    if not items:
        raise PackError(f"{list_path}: list file has no entries")
    return items, max(lbl for _, lbl in items) + 1


def _load_image(path: str, jpeg_quality: int) -> tuple[bytes, tuple[int, int]]:
    """Image file -> (JPEG bytes, (h, w)); JPEGs are kept byte for byte, others re-encoded."""
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(_JPEG_SOI):
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise PackError(f"{path}: unreadable JPEG header: {e}") from e
        if colorspace not in ("CMYK", "YCCK"):
            return data, (int(h), int(w))
    # Not a JPEG (or a CMYK one that decoders disagree on): decode and re-encode as RGB JPEG.
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise PackError(f"{path}: not a readable image: {e}") from e
    jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=jpeg_quality, colorspace="RGB")
    return jpeg, (int(rgb.shape[0]), int(rgb.shape[1]))


def pack_image_folder(
    image_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    shuffle: bool = False,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    with_header: bool = True,
    jpeg_quality: int = 95,
) -> PackInfo:
    """Pack a folder of identities (or a list file) into an insightface pack.

    ``image_dir`` is either a directory with one sub-folder per identity (sorted folder names
    become labels 0..C-1) or a text file of ``"path label"`` lines (num_classes = max label + 1).
    JPEG files are stored unchanged; other formats are re-encoded to JPEG at ``jpeg_quality``.
    All images must share the first image's size. ``shuffle`` permutes images within each
    identity when ``with_header`` (the header layout keeps classes contiguous), globally
    otherwise; ``seed`` makes it reproducible. ``workers`` threads read and check the files.
    """
    src = os.fspath(image_dir)
    if os.path.isdir(src):
        items, num_classes = _list_folder(src)
    elif os.path.isfile(src):
        items, num_classes = _list_file(src)
    else:
        raise PackError(f"{src}: neither an image folder nor a list file")
    if not items:
        raise PackError(f"{src}: no image files found (extensions {IMAGE_EXTENSIONS})")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if shuffle:
        rng = np.random.default_rng(seed)
        if with_header:
            perm = np.lexsort((rng.random(len(items)), [lbl for _, lbl in items]))
        else:
            perm = rng.permutation(len(items))
        items = [items[i] for i in perm]

    def load(item: tuple[str, int]) -> tuple[bytes, tuple[int, int]]:
        return _load_image(item[0], jpeg_quality)

    samples: list[tuple[int, bytes]] = []
    size: tuple[int, int] | None = None
    bar = tqdm(total=len(items), desc=f"packing {src}", unit="img", disable=not progress)
    try:
        if workers > 0:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                loaded = pool.map(load, items)
                size = _collect(items, loaded, samples, bar)
        else:
            size = _collect(items, map(load, items), samples, bar)
    finally:
        bar.close()
    return write_pack(out_dir, samples, num_classes, size, with_header=with_header)


def _collect(
    items: list[tuple[str, int]],
    loaded: Iterable[tuple[bytes, tuple[int, int]]],
    samples: list[tuple[int, bytes]],
    bar: tqdm,
) -> tuple[int, int]:
    """Append loaded images to ``samples``, checking every size against the first image."""
    size: tuple[int, int] | None = None
    for (path, label), (jpeg, hw) in zip(items, loaded, strict=True):
        if size is None:
            size = hw
        elif hw != size:
            raise PackError(
                f"{path}: image is {hw[0]}x{hw[1]} (HxW) but the first image "
                f"{items[0][0]} is {size[0]}x{size[1]}; all images must have the same size"
            )
        samples.append((label, jpeg))
        bar.update(1)
    if size is None:
        raise PackError("no images were loaded")
    return size
