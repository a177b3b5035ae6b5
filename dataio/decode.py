"""Image decoding of pack records: bytes -> uint8 RGB pixels, with the pack's size checked.

Every reader of a pack's images decodes here (both training loaders, pack inspection, the
embedding of a pack in evaluation), so a record that cannot be decoded, or whose size differs
from the pack's ``property``, raises the same :class:`~dataio.layout.PackError` naming the
file and key everywhere.
"""

from __future__ import annotations

import io
import os

import numpy as np
import simplejpeg
import torch
from PIL import Image, UnidentifiedImageError

from dataio.layout import IDX_NAME, PROPERTY_NAME, REC_NAME, PackError, PackFacts
from dataio.pack import FacePack
from dataio.record_reader import RecordReader
from dataio.recordio import RecordIOError, unpack_record


def decode_image(data: bytes, what: str) -> np.ndarray:
    """Encoded image -> uint8 ``[H, W, 3]`` RGB; simplejpeg, then PIL if that fails.

    ``what`` names the source (file and key) in the error if neither decoder can read it.
    """
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError as jpeg_error:
        try:
            with Image.open(io.BytesIO(data)) as img:
                return np.array(img.convert("RGB"))  # a writable copy for torch
        except UnidentifiedImageError as e:
            raise PackError(
                f"{what}: cannot decode image (simplejpeg: {jpeg_error}; PIL: not a known "
                "image format)"
            ) from e
        except (OSError, ValueError) as e:
            raise PackError(
                f"{what}: cannot decode image (simplejpeg: {jpeg_error}; PIL: {e})"
            ) from e


def decode_record(
    pack: FacePack, index: int, record: tuple[bytes, int] | None = None
) -> tuple[np.ndarray, int]:
    """Image ``index`` of ``pack`` as uint8 ``[H, W, 3]`` RGB pixels + its label.

    Raises :class:`PackError` naming the file and key when the record cannot be read, its
    label is wrong, it does not decode, or its size differs from the pack's ``property``.
    ``record``: the image's ``pack.read(index)``, when already read.
    """
    data, label = pack.read(index) if record is None else record
    key = int(pack.image_keys[index])
    img = decode_image(data, f"{pack.rec_path}: key {key}")
    h, w = pack.image_size
    if img.shape != (h, w, 3):
        raise PackError(
            f"{pack.rec_path}: key {key}: image is {img.shape[0]}x{img.shape[1]} but "
            f"the pack's property says {h}x{w}"
        )
    return img, label


def load_pixels(
    pack: FacePack,
    index: int,
    out: np.ndarray | None = None,
    flip: bool = False,
    record: tuple[bytes, int] | None = None,
) -> tuple[np.ndarray, int]:
    """Image ``index`` of ``pack`` as model pixels + its label (errors: :func:`decode_record`).

    ``out`` (e.g. a row of a batch) decides the format (see :mod:`dataio.loading`): float32
    ``[3, H, W]`` gets ``(x - 127.5) / 127.5``, uint8 ``[H, W, 3]`` the decoded values;
    without ``out`` a float32 array is returned. Writing into ``out`` fills a batch without
    per-image temporaries; ``flip`` mirrors the image horizontally on the way.
    """
    if record is None:
        record = pack.read(index)
    if out is not None and out.dtype == np.uint8 and _decode_jpeg_into(record[0], out, flip):
        return out, record[1]
    img, label = decode_record(pack, index, record)  # [H, W, 3] uint8
    if out is None:
        out = np.empty((3, *pack.image_size), dtype=np.float32)
    hwc = torch.from_numpy(img)  # [H, W, 3] uint8
    if flip:
        hwc = hwc.flip(1)
    target = torch.from_numpy(out)
    if target.dtype == torch.uint8:
        target.copy_(hwc)  # layout changes wait for the device
        return out, label
    # One pass converts to float, centres and moves to CHW; a second scales to [-1, 1]
    # (the operations of dataio.loading.to_model_input, so both formats agree exactly).
    torch.sub(hwc.permute(2, 0, 1), 127.5, out=target)
    target.div_(127.5)
    return out, label


def _decode_jpeg_into(data: bytes, out: np.ndarray, flip: bool) -> bool:
    """Decode a JPEG of ``out``'s size straight into uint8 ``out`` ``[H, W, 3]``, mirrored with
    ``flip``; False (``out`` unspecified) for anything else, left to the general path.

    Why: the uint8 loader's per-image work beyond decoding is mostly copies. Unflipped, the
    decoder writes into the batch row; flipped, it decodes to BGR, whose rows read backwards
    byte by byte are the mirrored RGB rows -- one reversed copy of 1-byte elements, ~2x
    cheaper than flipping 3-byte pixels.
    """
    h, w, _ = out.shape
    if not out.flags.c_contiguous:
        return False
    try:
        if not flip:
            return simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=out).shape == (h, w, 3)
        bgr = simplejpeg.decode_jpeg(data, colorspace="BGR")
    except ValueError:  # not a JPEG, corrupt, or larger than ``out``
        return False
    if bgr.shape != (h, w, 3):
        return False
    torch.from_numpy(out.reshape(h, w * 3)).copy_(torch.from_numpy(bgr.reshape(h, w * 3)).flip(1))
    return True


def _stored_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from an encoded image's header (nothing decoded); None if unreadable."""
    try:
        return tuple(simplejpeg.decode_jpeg_header(data)[:2])  # type: ignore[return-value]
    except ValueError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.height, img.width
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def check_stored_size(pack_dir: str | os.PathLike[str], facts: PackFacts) -> None:
    """The pack's first image record has the size its ``property`` states, or PackError.

    Cheap (one record read, its image header parsed) where a wrong ``property`` would
    otherwise fail every record inside the loaders. A first record that cannot be read or
    decoded is left to them: they name it, or skip it with ``data.skip_corrupt``.
    """
    pack_dir = os.fspath(pack_dir)
    rec = os.path.join(pack_dir, REC_NAME)
    try:
        with RecordReader(rec, os.path.join(pack_dir, IDX_NAME), skip_bad_offsets=True) as reader:
            # Images are keys 1.. after a header (key 0), else every key.
            key = 1 if facts.layout == "header" else min(reader.keys, default=None)
            if key is None or key not in reader:
                return
            _, payload = unpack_record(reader.read(key))
    except RecordIOError:
        return
    size = _stored_size(payload)
    if size is not None and size != tuple(facts.image_size):
        h, w = facts.image_size
        raise PackError(
            f"{os.path.join(pack_dir, PROPERTY_NAME)}: says {h}x{w} images but {rec}: key "
            f"{key} is {size[0]}x{size[1]}"
        )
