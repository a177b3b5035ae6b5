"""Which insightface pack layout a folder holds, and the facts it states about itself.

Users have three layouts of ``train.rec`` + ``train.idx`` + ``property``:

``header`` (insightface's ``face2rec2.py``, MS1MV2/MS1MV3/Glint360K, and our packer's default)
    Record **key 0** is a header with the vector label ``[first_identity_key, end_key]`` and no
    payload; images are keys ``1 .. first_identity_key-1``; keys ``first_identity_key ..
    end_key-1`` are identity records (class ``key - first_identity_key``, label
    ``[first_image_key, end_image_key)``). Where key 0 sits in the file does not matter:
    ``face2rec2.py`` writes the images first, then key 0, then the identity records, so the
    header is looked up **by key** in the index, never as the first line. ``face2rec2.py``
    also stores each image's label as the vector ``[class, aligned]``; the class is element 0.

``headerless`` (insightface's newer ``RecBuilder``, WebFace42M, ``facetrain pack --no-header``)
    Every record is an image, keys ``0 .. N-1``, with a scalar (or vector, class first) label.
    ``RecBuilder`` writes a two-line ``property`` whose second line is the image count, and a
    pickled ``train.meta`` that nothing here reads (unpickling a downloaded file can run code;
    the labels are in the records themselves).

``property`` is ``"num_classes,height,width"`` on its first line, optionally followed by the
image count on a second line.
"""

from __future__ import annotations

import dataclasses
import os

from dataio.record_reader import RecordReader
from dataio.recordio import RecordIOError, unpack_record

REC_NAME = "train.rec"
IDX_NAME = "train.idx"
PROPERTY_NAME = "property"
HEADER_KEY = 0
"""The key of the insightface header record (wherever it is stored in the file)."""
FLOAT32_EXACT = 2**24
"""IRHeader labels are float32: integers up to here are exact, larger ones may be rounded."""


class PackError(ValueError):
    """A face pack (or the input to build one) is malformed; the message names file and key."""


@dataclasses.dataclass(frozen=True)
class PackProperty:
    """The ``property`` file: what the pack says of itself."""

    num_classes: int
    image_size: tuple[int, int]
    """(height, width) of every image."""
    num_images: int | None = None
    """The image count of ``RecBuilder``'s second line; None where the file has one line."""


def read_property(path: str | os.PathLike[str]) -> PackProperty:
    """Parse a ``property`` file (one line ``num_classes,height,width``, optionally a second
    line with the image count, as insightface's ``RecBuilder`` writes)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PackError(f"{path}: property file not found (expected 'num_classes,height,width')")
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f.read().strip().splitlines()]
    expected = "'num_classes,height,width' and optionally an image count on a second line"
    try:
        if not 1 <= len(lines) <= 2:
            raise ValueError
        fields = [x.strip() for x in lines[0].split(",")]
        if len(fields) != 3:
            raise ValueError
        num_classes, height, width = (int(x) for x in fields)
        num_images = int(lines[1]) if len(lines) == 2 else None
    except ValueError:
        raise PackError(f"{path}: expected {expected}, got {'|'.join(lines)!r}") from None
    if min(num_classes, height, width) <= 0 or (num_images is not None and num_images <= 0):
        raise PackError(f"{path}: every number must be positive, got {'|'.join(lines)!r}")
    return PackProperty(num_classes, (height, width), num_images)


def write_property(path: str | os.PathLike[str], prop: PackProperty) -> None:
    """Write ``prop`` in the form :func:`read_property` reads (two lines with an image count)."""
    text = f"{prop.num_classes},{prop.image_size[0]},{prop.image_size[1]}\n"
    if prop.num_images is not None:
        text += f"{prop.num_images}\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def read_header(reader: RecordReader, skip_corrupt: bool = False) -> tuple[int, int] | None:
    """``(first_identity_key, end_key)`` if record key 0 is an insightface header, else None.

    Key 0 is read by key, wherever the index and the file hold it. A key 0 with a payload or a
    scalar label is an ordinary image (a headerless pack). The values are as stored (float32:
    exact below :data:`FLOAT32_EXACT`). A key 0 that cannot be read raises, unless
    ``skip_corrupt``: then it is taken for a damaged image (None), and
    :func:`check_not_headless` catches a header pack that lost its header.
    """
    if HEADER_KEY not in reader:
        return None
    try:
        header, payload = unpack_record(reader.read(HEADER_KEY))
    except RecordIOError as e:
        if skip_corrupt:
            return None
        raise PackError(str(e)) from e  # names the file and the key
    if header.flag == 0 or payload:
        return None
    if header.flag < 2:
        raise PackError(
            f"{reader.rec_path}: key {HEADER_KEY} looks like a pack header but its label has "
            f"{header.flag} value(s); expected [first_identity_key, end_key]"
        )
    first_id, end = int(header.label[0]), int(header.label[1])  # type: ignore[index]
    if not 1 <= first_id <= end:
        raise PackError(
            f"{reader.rec_path}: key {HEADER_KEY}: invalid header range [{first_id}, {end})"
        )
    return first_id, end


def check_not_headless(reader: RecordReader) -> None:
    """Raise if a pack read as header-less ends with an identity record (a 2-value label and
    no image): an insightface header pack whose key 0 is missing from the index or damaged,
    which must not be read as images. One record is read (the last in the file)."""
    if not len(reader):
        return
    last = max(reader.keys, key=reader.offset)
    try:
        header, payload = unpack_record(reader.read(last))
    except RecordIOError:
        return  # a damaged image: the record checks report it
    if header.flag == 2 and not payload:
        raise PackError(
            f"{reader.rec_path}: key {last} is an identity record but key {HEADER_KEY}, the "
            f"insightface header, is missing from {reader.idx_path} or unreadable"
        )


@dataclasses.dataclass(frozen=True)
class PackFacts:
    """The facts a run is planned from, read without decoding or scanning the images."""

    layout: str
    """``"header"`` or ``"headerless"`` (see the module docstring)."""
    num_classes: int
    num_images: int
    image_size: tuple[int, int]

    def as_dict(self) -> dict[str, object]:
        """The form ``--dry-run`` plans and tests compare (image size as a list)."""
        return {
            "num_classes": self.num_classes,
            "num_images": self.num_images,
            "image_size": list(self.image_size),
        }


def read_pack_facts(pack_dir: str | os.PathLike[str], skip_corrupt: bool = False) -> PackFacts:
    """Layout, class and image count and image size of a pack in about a second at 5.8M images.

    Reads ``property``, the index and record key 0 only. With a header the images are keys
    ``1 .. first_identity_key-1`` (past :data:`FLOAT32_EXACT` the header may be rounded, so
    the index count less the header and one identity record per class is used), and the
    header's identity records must be as many as ``property``'s classes; without one every
    indexed record is an image. A ``RecBuilder`` image count must agree with the index.
    :class:`dataio.pack.FacePack` reads the same layout and checks every record; the image
    count here includes records it would skip (``skip_corrupt``: a damaged key 0 is such an
    image, as there).
    """
    pack_dir = os.fspath(pack_dir)
    prop_path = os.path.join(pack_dir, PROPERTY_NAME)
    prop = read_property(prop_path)
    idx, rec = os.path.join(pack_dir, IDX_NAME), os.path.join(pack_dir, REC_NAME)
    if not os.path.isfile(idx):
        raise PackError(
            f"{idx}: index file missing (the pack needs train.rec, train.idx, property)"
        )
    try:
        with RecordReader(rec, idx, skip_bad_offsets=skip_corrupt) as reader:
            num_records = len(reader) + len(reader.bad_keys)
            header = read_header(reader, skip_corrupt) if num_records else None
            if header is None:
                check_not_headless(reader)
    except RecordIOError as e:
        raise PackError(str(e)) from e
    if header is None:
        layout, num_images = "headerless", num_records
    else:
        first_identity, end = header
        exact = first_identity < FLOAT32_EXACT
        layout = "header"
        num_images = first_identity - 1 if exact else num_records - 1 - prop.num_classes
        if end < FLOAT32_EXACT and end - first_identity != prop.num_classes:
            raise PackError(
                f"{prop_path}: says {prop.num_classes} classes but the header (key "
                f"{HEADER_KEY} of {rec}) lists {end - first_identity} identity records"
            )
    if num_images < 1:
        raise PackError(
            f"{idx}: {num_records} indexed records cannot hold the header, {prop.num_classes} "
            "identity records and any image (truncated index?)"
        )
    check_image_count(prop, prop_path, layout, num_images, f" ({idx}: {num_records} records)")
    return PackFacts(layout, prop.num_classes, num_images, prop.image_size)


def check_image_count(
    prop: PackProperty, prop_path: str, layout: str, count: int, detail: str = ""
) -> None:
    """A ``property`` that states an image count (``RecBuilder``'s second line) must agree
    with the ``count`` of images the pack's layout holds, damaged ones included."""
    if prop.num_images is not None and prop.num_images != count:
        raise PackError(
            f"{prop_path}: says {prop.num_images} images but the pack's {layout} layout has "
            f"{count}{detail}"
        )
