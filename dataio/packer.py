"""Writing face packs: ``(label, jpeg)`` samples, or a folder / list of image files (optionally
5-point aligned), into ``train.rec`` + ``train.idx`` + ``property`` (read by
:class:`dataio.pack.FacePack`).
"""

from __future__ import annotations

import io
import multiprocessing
import numbers
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from common.checks import check_int
from dataio.align import AlignmentError, align_face, template_for
from dataio.layout import IDX_NAME, PROPERTY_NAME, REC_NAME, PackError, PackProperty, write_property
from dataio.pack import PackInfo
from dataio.recordio import IRHeader, RecordWriter, pack_record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
"""File suffixes :func:`pack_image_folder` treats as images (case-insensitive)."""

_JPEG_SOI = b"\xff\xd8\xff"


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
    num_classes = check_int("num_classes", num_classes, minimum=1)
    size = _check_image_size(image_size)

    items: list[tuple[int, bytes]] = []
    for i, sample in enumerate(samples):
        try:
            label, payload = sample
        except (TypeError, ValueError):
            raise ValueError(f"sample {i}: expected a (label, bytes) pair") from None
        label = check_int(f"sample {i}: label", label, minimum=None)
        if not 0 <= label < num_classes:
            raise ValueError(f"sample {i}: label {label} outside [0, num_classes={num_classes})")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise ValueError(f"sample {i}: image must be bytes, got {type(payload).__name__}")
        items.append((label, bytes(payload)))
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
        write_property(tmp[2], PackProperty(num_classes, size))
        for src, dst in zip(tmp, (rec_path, idx_path, prop_path), strict=True):
            os.replace(src, dst)
    finally:
        for p in tmp:
            if os.path.exists(p):
                os.remove(p)
    return PackInfo(out_dir=out, num_classes=num_classes, num_images=num_images, image_size=size)


# --------------------------------------------------------------------------------------------
# packing an image folder


class _Item(NamedTuple):
    """One image to pack: its file, its class, and its 5 landmarks when it is to be aligned."""

    path: str
    label: int
    landmarks: tuple[float, ...] | None
    where: str
    """Where the item came from (``list.txt:12`` or the file path), for error messages."""


def _list_folder(image_dir: str) -> tuple[list[_Item], int]:
    """Items of a folder-per-identity tree; labels follow sorted folder names."""
    classes = sorted(
        d
        for d in os.listdir(image_dir)
        if not d.startswith(".") and os.path.isdir(os.path.join(image_dir, d))
    )
    if not classes:
        raise PackError(f"{image_dir}: no identity sub-folders found")
    items: list[_Item] = []
    for label, name in enumerate(classes):
        sub = os.path.join(image_dir, name)
        for fname in sorted(os.listdir(sub)):
            if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                path = os.path.join(sub, fname)
                items.append(_Item(path, label, None, path))
    return items, len(classes)


def _list_file(list_path: str) -> tuple[list[_Item], int]:
    """Items from lines ``path label [x1 y1 ... x5 y5]``; relative paths start at the list's dir.

    The optional ten numbers are the 5 landmarks (see :mod:`dataio.align`) used by
    ``align``. Blank lines and lines starting with ``#`` are ignored.
    """
    base = os.path.dirname(os.path.abspath(list_path))
    items: list[_Item] = []
    with open(list_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            where = f"{list_path}:{lineno}"
            landmarks: tuple[float, ...] | None = None
            try:
                if len(fields) == 12:
                    landmarks = tuple(float(x) for x in fields[2:])
                    fields = fields[:2]
                elif len(fields) != 2:
                    raise ValueError(line)
                label = int(fields[1])
            except ValueError:
                raise PackError(
                    f"{where}: expected 'path label' or 'path label x1 y1 ... x5 y5', got {line!r}"
                ) from None
            if label < 0:
                raise PackError(f"{where}: negative label {label}")
            path = fields[0] if os.path.isabs(fields[0]) else os.path.join(base, fields[0])
            items.append(_Item(path, label, landmarks, where))
    if not items:
        raise PackError(f"{list_path}: list file has no entries")
    return items, max(item.label for item in items) + 1


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
    rgb = _read_rgb(path, data)
    jpeg = simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=jpeg_quality, colorspace="RGB")
    return jpeg, (int(rgb.shape[0]), int(rgb.shape[1]))


def _read_rgb(path: str, data: bytes) -> np.ndarray:
    """Decode any image file's bytes to uint8 ``[H, W, 3]`` RGB (PackError naming the file)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PackError(f"{path}: not a readable image: {e}") from e


def _load_item(
    item: _Item, jpeg_quality: int, align_size: tuple[int, int] | None
) -> tuple[bytes, tuple[int, int]]:
    """One image ready for the pack: as stored (JPEG kept as is) or aligned and re-encoded."""
    if align_size is None:
        return _load_image(item.path, jpeg_quality)
    if item.landmarks is None:
        raise PackError(f"{item.where}: alignment needs 5 landmarks (x1 y1 ... x5 y5)")
    with open(item.path, "rb") as f:
        data = f.read()
    rgb = _read_rgb(item.path, data)
    try:
        aligned = align_face(rgb, item.landmarks, size=align_size)
    except AlignmentError as e:
        raise PackError(f"{item.where}: {e}") from e
    jpeg = simplejpeg.encode_jpeg(aligned, quality=jpeg_quality, colorspace="RGB")
    return jpeg, (int(aligned.shape[0]), int(aligned.shape[1]))


def _load_chunk(
    chunk: list[_Item], jpeg_quality: int, align_size: tuple[int, int] | None
) -> list[tuple[bytes, tuple[int, int]]]:
    """Worker-process entry point: load a chunk of items (fewer round trips than one each)."""
    return [_load_item(item, jpeg_quality, align_size) for item in chunk]


def pack_image_folder(
    image_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    shuffle: bool = False,
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    with_header: bool = True,
    jpeg_quality: int = 95,
    align: bool = False,
    align_size: tuple[int, int] = (112, 112),
    chunk_size: int = 64,
) -> PackInfo:
    """Pack a folder of identities (or a list file) into an insightface pack.

    ``image_dir`` is either a directory with one sub-folder per identity (sorted folder names
    become labels 0..C-1) or a text file of ``"path label"`` lines, optionally followed by
    the 5 landmarks ``x1 y1 ... x5 y5`` (num_classes = max label + 1). JPEG files are stored
    unchanged; other formats are re-encoded to JPEG at ``jpeg_quality``. With ``align`` every
    image is cropped onto the ArcFace template of ``align_size`` (height, width; see
    :func:`dataio.align.align_face`) from its landmarks and re-encoded. All images must share
    the first image's size. ``shuffle`` permutes images within each identity when
    ``with_header`` (the header layout keeps classes contiguous), globally otherwise; ``seed``
    makes it reproducible. ``workers`` processes read (and align) the files in chunks of
    ``chunk_size``; 0 does it in this process.
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
    check_int("workers", workers)
    check_int("chunk_size", chunk_size, minimum=1)
    size_for_align: tuple[int, int] | None = None
    if align:
        size_for_align = _check_image_size(align_size)
        try:
            template_for(size_for_align)
        except AlignmentError as e:
            raise ValueError(f"align_size: {e}") from e
        missing = next((item for item in items if item.landmarks is None), None)
        if missing is not None:
            raise PackError(
                f"{missing.where}: align needs a list file whose lines carry 5 landmarks "
                "('path label x1 y1 ... x5 y5')"
            )
    if shuffle:
        rng = np.random.default_rng(seed)
        if with_header:
            perm = np.lexsort((rng.random(len(items)), [item.label for item in items]))
        else:
            perm = rng.permutation(len(items))
        items = [items[i] for i in perm]

    chunks = [items[i : i + chunk_size] for i in range(0, len(items), chunk_size)]
    samples: list[tuple[int, bytes]] = []
    bar = tqdm(total=len(items), desc=f"packing {src}", unit="img", disable=not progress)
    try:
        if workers > 0 and len(chunks) > 1:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
                loaded = pool.map(
                    _load_chunk,
                    chunks,
                    [jpeg_quality] * len(chunks),
                    [size_for_align] * len(chunks),
                )
                size = _collect(chunks, loaded, samples, bar)
        else:
            loaded = (_load_chunk(c, jpeg_quality, size_for_align) for c in chunks)
            size = _collect(chunks, loaded, samples, bar)
    finally:
        bar.close()
    return write_pack(out_dir, samples, num_classes, size, with_header=with_header)


def _collect(
    chunks: list[list[_Item]],
    loaded: Iterable[list[tuple[bytes, tuple[int, int]]]],
    samples: list[tuple[int, bytes]],
    bar: tqdm,
) -> tuple[int, int]:
    """Append loaded images to ``samples``, checking every size against the first image."""
    size: tuple[int, int] | None = None
    first = chunks[0][0].path
    for chunk, results in zip(chunks, loaded, strict=True):
        for item, (jpeg, hw) in zip(chunk, results, strict=True):
            if size is None:
                size = hw
            elif hw != size:
                raise PackError(
                    f"{item.path}: image is {hw[0]}x{hw[1]} (HxW) but the first image "
                    f"{first} is {size[0]}x{size[1]}; all images must have the same size"
                )
            samples.append((item.label, jpeg))
        bar.update(len(chunk))
    if size is None:
        raise PackError("no images were loaded")
    return size
