"""The DALI pipeline of one part of an epoch, and reading what comes out of it.

The pipeline: ``fn.readers.mxnet`` (one shard of an index, shuffled with the part's seed) ->
``fn.decoders.image`` ("mixed" on CUDA, "cpu" otherwise) -> optional colour augmentation ->
``fn.crop_mirror_normalize`` to CHW float ``(x - 127.5) / 127.5``, or with ``pixels="uint8"``
just ``fn.flip`` (HWC uint8, normalised later on the training device, see
:mod:`dataio.loading`). The CUDA and CPU pipelines differ only in their device strings. Each
sample also carries its source (``fn.get_property(..., "source_info")``: file and byte
offset), from which :func:`source_offsets` recovers the record.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from dataio.layout import PackError
from dataio.loader_config import LoaderConfig


def import_dali() -> tuple[Any, Any, Any]:
    """(fn, types, pipeline_def) of nvidia.dali, imported on first use with a clear error."""
    try:
        from nvidia.dali import fn, pipeline_def, types
    except ImportError as e:
        raise ImportError(
            "data.loader 'dali' needs NVIDIA DALI (pip package nvidia-dali-cuda120); "
            f"import failed: {e}"
        ) from e
    return fn, types, pipeline_def


@dataclasses.dataclass
class Part:
    """One pipeline of an epoch: what it reads and how many batches were taken from it."""

    index_path: str
    """The index the reader reads (its records, by offset)."""
    shard_id: int
    """The shard of that index this pipeline reads."""
    num_shards: int
    """How many shards the index is cut into."""
    seed: int
    """The reader's (and the flips') seed."""
    start_batch: int
    """Batches of the epoch already yielded when this part started."""
    excluded: list[int]
    """Keys found bad just before this part (recorded for an exact replay on resume)."""


def build_pipeline(
    rec_path: str,
    part: Part,
    config: LoaderConfig,
    device: torch.device,
    fill: int,
    decode: bool,
) -> Any:
    """The built DALI pipeline of ``part`` over ``rec_path``; ``decode=False`` builds the
    reader alone (it yields ``(labels, sources)``; for replays), else ``(images, labels,
    sources)``. ``fill``: the shuffle buffer, in records."""
    fn, types, pipeline_def = import_dali()
    cuda = device.type == "cuda"
    augment = config.dali.augment
    flip = config.flip

    @pipeline_def(
        batch_size=config.batch_size,
        num_threads=max(1, config.workers),
        device_id=(device.index or 0) if cuda else None,
        prefetch_queue_depth=config.prefetch,
        seed=part.seed,
    )
    def pipeline() -> tuple[Any, ...]:
        jpegs, labels = fn.readers.mxnet(
            path=[rec_path],
            index_path=[part.index_path],
            shard_id=part.shard_id,
            num_shards=part.num_shards,
            random_shuffle=True,
            initial_fill=fill,
            seed=part.seed,
            stick_to_shard=True,
            pad_last_batch=True,
            name="reader",
        )
        # "path at index OFFSET" as bytes, padded to one length so a batch is one array
        source = fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)
        label = labels[0]  # the class id (first element of a vector label)
        if not decode:
            return label, source
        images = fn.decoders.image(jpegs, device="mixed" if cuda else "cpu", output_type=types.RGB)
        if augment is not None:
            images = fn.brightness_contrast(
                images,
                brightness=fn.random.uniform(
                    range=[1 - augment.brightness, 1 + augment.brightness]
                ),
                contrast=fn.random.uniform(range=[1 - augment.contrast, 1 + augment.contrast]),
                contrast_center=128.0,
            )
            images = fn.hsv(
                images,
                saturation=fn.random.uniform(
                    range=[1 - augment.saturation, 1 + augment.saturation]
                ),
            )
        mirror = fn.random.coin_flip(probability=0.5) if flip else 0
        if (
            config.pixels == "uint8"
        ):  # HWC as decoded: reordering and normalising wait for the device
            if flip:
                images = fn.flip(images, horizontal=mirror)
        else:
            images = fn.crop_mirror_normalize(
                images,
                mirror=mirror,
                dtype=types.FLOAT,
                output_layout="CHW",
                mean=[127.5, 127.5, 127.5],
                std=[127.5, 127.5, 127.5],
            )
        return images, label, source

    pipe = pipeline()
    pipe.build()
    return pipe


def source_offsets(source: Any, rec_path: str) -> np.ndarray:
    """Byte offsets int64 ``[B]`` of a batch's records, from its padded ``source_info``
    ("path at index OFFSET")."""
    rows = np.asarray(source.as_array(), dtype=np.uint8)  # [B, L], zero padded
    offsets = np.empty(rows.shape[0], dtype=np.int64)
    for j, row in enumerate(rows):
        text = row.tobytes().rstrip(b"\0")
        _, sep, digits = text.rpartition(b" at index ")
        if not sep or not digits.isdigit():
            raise PackError(f"{rec_path}: DALI returned a sample from {text!r}")
        offsets[j] = int(digits)
    return offsets


def dali_reason(message: str) -> str:
    """The informative line of a DALI error message."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    for marker in ("Invalid RecordIO", "Assert", "failure", "Error"):
        for ln in lines:
            if marker in ln and "pipeline" not in ln:
                return ln
    return lines[-1] if lines else message
