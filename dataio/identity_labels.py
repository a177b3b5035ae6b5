"""Class labels of a header pack, read from its identity records.

In the ``header`` layout (:mod:`dataio.layout`) record key 0 holds ``[first_identity_key,
end_key)`` and each identity record ``first_identity_key + c`` holds the key range
``[first_image_key, end_image_key)`` of class ``c``'s images. One sequential pass over the
identity records (they are tiny and stored together) labels every image, without reading an
image record.

Past 2**24 records (Glint360K, WebFace42M) these ranges are float32-rounded by MXNet's packer:
the exact layout comes from the index, and the images next to a rounded class boundary are
labelled from their own IRHeaders (class ids are exact) in one vectorised gather.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from dataio.layout import PackError
from dataio.record_reader import RecordReader, read_record_heads
from dataio.recordio import MAGIC, RecordIOError, unpack_record

__all__ = ["labels_from_identities"]


def _float32_spacing(value: int) -> int:
    """Gap between neighbouring float32 numbers at ``value``; 1 where every integer is exact.

    IRHeader labels are float32, so the key ranges of a header and of identity records are
    rounded to a multiple of this above 2**24 = 16,777,216 records (Glint360K, WebFace42M).
    """
    return max(1, int(np.spacing(np.float32(value))))


def _wrap_errors(records: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """Re-raise RecordIO errors met while iterating as PackError (they already name the file)."""
    try:
        yield from records
    except RecordIOError as e:
        raise PackError(str(e)) from e


def _exact_layout(
    reader: RecordReader, num_classes: int, first_id: int, end: int
) -> tuple[int, int]:
    """The header's [first_identity_key, end_key), exact even where float32 rounded it.

    Identity records are the last ``num_classes`` keys of the layout, so past 2**24 the
    exact values come from the index, checked to lie within the rounding of the header's.
    """
    if _float32_spacing(end) == 1:
        return first_id, end
    exact_end = max(reader.keys) + 1
    exact_first = exact_end - num_classes
    if abs(exact_end - end) > _float32_spacing(end) or abs(
        exact_first - first_id
    ) > _float32_spacing(first_id):
        raise PackError(
            f"{reader.rec_path}: key 0: header range [{first_id}, {end}) does not match the "
            f"index (last key {exact_end - 1}, {num_classes} classes), even allowing "
            "for float32 rounding"
        )
    return exact_first, exact_end


def _repair_rounded_boundaries(
    reader: RecordReader,
    num_classes: int,
    labels: np.ndarray,
    boundaries: np.ndarray,
    first_id: int,
) -> None:
    """Past 2**24 an identity record's [first, end) image keys are float32-rounded, so the
    images next to a class boundary may be given the neighbouring class. Their own
    IRHeaders (class ids are exact) decide: the heads of the images within one float32
    gap of every rounded boundary are read (a vectorised gather) and their labels used.
    """
    rounded = boundaries[np.array([_float32_spacing(int(v)) > 1 for v in boundaries])]
    if rounded.size == 0:
        return
    gap = _float32_spacing(int(rounded.max()))
    keys = np.unique((rounded[:, None] + np.arange(-gap, gap + 1)[None, :]).reshape(-1))
    keys = keys[(keys >= 1) & (keys < first_id)]
    keys = np.array([k for k in keys.tolist() if k in reader], dtype=np.int64)
    if keys.size == 0:
        return
    offsets = np.fromiter((reader.offset(int(k)) for k in keys), dtype=np.int64, count=keys.size)
    heads = read_record_heads(reader.rec_path, offsets)
    values = np.where(heads.flag == 0, heads.label, heads.first_value).astype(np.float64)
    ok = (heads.magic == MAGIC) & np.isfinite(values)
    ok &= (values >= 0) & (values < num_classes) & (values == np.floor(values))
    # A broken head keeps the identity records' label; reading it reports the record.
    labels[keys[ok] - 1] = values[ok].astype(np.int64)
    if np.any(np.diff(labels) < 0):
        key = int(np.flatnonzero(np.diff(labels) < 0)[0]) + 2
        raise PackError(
            f"{reader.rec_path}: key {key}: image labels are not in class order around the "
            "float32-rounded identity ranges of this pack"
        )


def labels_from_identities(
    reader: RecordReader,
    header: tuple[int, int],
    num_classes: int,
    bad_keys: Mapping[int, str],
    skip_corrupt: bool,
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """(image keys, class labels, image keys missing from the index) of a header pack.

    ``header`` is the header record's ``(first_identity_key, end_key)``. Every identity
    record's ``[first_image_key, end_image_key)`` labels its images; the ranges must cover
    the images once, in class order. ``bad_keys`` are records the reader left out: an
    identity record among them is an error. An image key missing from the index raises
    :class:`PackError` unless ``skip_corrupt``; then it is left out and returned with its
    reason in the third element.
    """
    first_id, end = _exact_layout(reader, num_classes, *header)
    num_identities = end - first_id
    if num_identities != num_classes:
        raise PackError(
            f"{reader.rec_path}: header lists {num_identities} identity records (keys "
            f"{first_id}..{end - 1}) but property says num_classes={num_classes}"
        )
    image_keys = np.arange(1, first_id, dtype=np.int64)
    for key in sorted(k for k in bad_keys if first_id <= k < end):
        raise PackError(bad_keys[key])  # an identity record cannot be skipped
    for key in (first_id, end - 1):
        if first_id <= key < end and key not in reader:
            raise PackError(f"{reader.idx_path}: key {key} of the header's layout is missing")
    labels = np.full(image_keys.size, -1, dtype=np.int64)
    missing_reasons: dict[int, str] = {}
    boundaries: list[int] = []  # every class's [first, end) image keys, as stored
    # Identity records are tiny and stored together: one sequential pass reads them all.
    identities = reader.scan(range(first_id, end))
    for key, record in _wrap_errors(identities):
        c = key - first_id
        try:
            head, _ = unpack_record(record)
        except RecordIOError as e:
            raise PackError(f"{reader.rec_path}: identity record key {key}: {e}") from e
        if head.flag != 2:
            raise PackError(
                f"{reader.rec_path}: identity record key {key} (class {c}) has flag "
                f"{head.flag}; expected a 2-value label [first_image_key, end_image_key)"
            )
        a, b = int(head.label[0]), int(head.label[1])  # type: ignore[index]
        boundaries += [a, b]
        if _float32_spacing(b) > 1:  # rounded past 2**24: may overshoot by half a gap
            a, b = min(a, first_id), min(b, first_id)
        if not 1 <= a <= b <= first_id:
            raise PackError(
                f"{reader.rec_path}: identity record key {key} (class {c}): image range "
                f"[{a}, {b}) outside [1, {first_id})"
            )
        if np.any(labels[a - 1 : b - 1] >= 0):
            raise PackError(
                f"{reader.rec_path}: identity record key {key} (class {c}): image range "
                f"[{a}, {b}) overlaps another class"
            )
        labels[a - 1 : b - 1] = c
    if _float32_spacing(end) > 1:
        _repair_rounded_boundaries(reader, num_classes, labels, np.unique(boundaries), first_id)
    unassigned = np.flatnonzero(labels < 0)
    if unassigned.size:
        raise PackError(
            f"{reader.rec_path}: image key {int(image_keys[unassigned[0]])} belongs to no "
            f"identity record ({unassigned.size} such images)"
        )
    present = np.fromiter((int(k) in reader for k in image_keys), dtype=bool, count=image_keys.size)
    if not present.all():
        missing = image_keys[~present]
        if not skip_corrupt:
            raise PackError(
                f"{reader.idx_path}: image key {int(missing[0])} of the header's layout is "
                f"missing from the index ({missing.size} missing)"
            )
        missing_reasons = {
            key: f"{reader.idx_path}: image key {key} not indexed" for key in missing.tolist()
        }
        image_keys, labels = image_keys[present], labels[present]
    return image_keys, labels, missing_reasons
