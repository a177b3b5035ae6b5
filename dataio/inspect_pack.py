"""``facetrain inspect DIR``: what a face pack holds, with every record decoded and checked.

Why: a pack downloaded or packed elsewhere can hold truncated records, wrong labels or
undecodable JPEGs that a training run would only meet hours in. Inspecting reads each record
once (frame, IRHeader and label in one vectorised pass over the record heads, then a full
read and decode of every image in worker threads) and lists the bad ones by key.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from tqdm import tqdm

from common.checks import check_int
from dataio.decode import decode_record
from dataio.pack import FacePack, PackError


@dataclasses.dataclass
class InspectReport:
    """What :func:`inspect_pack` found; ``bad`` maps record key -> reason (file and key named)."""

    pack_dir: str
    has_header: bool
    num_classes: int
    num_images: int
    """Image records listed by the pack (including bad ones)."""
    image_size: tuple[int, int]
    label_min: int
    label_max: int
    identities_with_images: int
    images_per_identity_min: int
    images_per_identity_max: int
    images_per_identity_mean: float
    bad: dict[int, str]

    @property
    def ok(self) -> bool:
        """Whether every record passed."""
        return not self.bad

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (record keys as strings)."""
        out = dataclasses.asdict(self)
        out["image_size"] = list(self.image_size)
        out["bad"] = {str(k): v for k, v in sorted(self.bad.items())}
        out["ok"] = self.ok
        return out


def _check_chunk(pack: FacePack, positions: list[int]) -> dict[int, str]:
    """Read and decode the images at ``positions``; ``{key: reason}`` for the failures."""
    bad: dict[int, str] = {}
    for i in positions:
        try:
            decode_record(pack, i)
        except PackError as e:
            bad[int(pack.image_keys[i])] = str(e)
    return bad


def inspect_pack(
    pack_dir: str | os.PathLike[str],
    workers: int = 2,
    progress: bool = True,
    chunk_size: int = 256,
) -> InspectReport:
    """Summarise a pack and check every record; pack-level faults raise :class:`PackError`.

    Counts identities and images, the image size and label range, then checks each image
    record: its frame and IRHeader, its label against the identity records, that it decodes,
    and that its size matches ``property``. ``workers`` threads decode (the JPEG decoder
    releases the GIL) in chunks of ``chunk_size`` images; ``progress`` shows a bar.
    """
    check_int("workers", workers)
    check_int("chunk_size", chunk_size, minimum=1)
    pack = FacePack(pack_dir, skip_corrupt=True)  # per-record faults are reported, not raised
    bad = dict(pack.bad_keys)
    bad.update(pack.check_records())
    key_bad = set(bad)
    todo = [i for i, k in enumerate(pack.image_keys.tolist()) if k not in key_bad]
    chunks = [todo[i : i + chunk_size] for i in range(0, len(todo), chunk_size)]
    bar = tqdm(
        total=pack.num_images,
        initial=pack.num_images - len(todo),
        desc=f"inspecting {pack.pack_dir}",
        unit="img",
        disable=not progress,
    )
    try:
        results: Iterator[dict[int, str]]
        if workers > 0:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                results = pool.map(lambda c: _check_chunk(pack, c), chunks)
                for chunk, found in zip(chunks, results, strict=True):
                    bad.update(found)
                    bar.update(len(chunk))
        else:
            for chunk in chunks:
                bad.update(_check_chunk(pack, chunk))
                bar.update(len(chunk))
    finally:
        bar.close()
    counts = np.bincount(pack.labels, minlength=pack.num_classes)  # [C]
    present = counts[counts > 0]
    return InspectReport(
        pack_dir=pack.pack_dir,
        has_header=pack.has_header,
        num_classes=pack.num_classes,
        num_images=pack.num_images + len(pack.bad_keys),
        image_size=pack.image_size,
        label_min=int(pack.labels.min()),
        label_max=int(pack.labels.max()),
        identities_with_images=int(present.size),
        images_per_identity_min=int(present.min()),
        images_per_identity_max=int(present.max()),
        images_per_identity_mean=float(present.mean()),
        bad=dict(sorted(bad.items())),
    )


def format_report(report: InspectReport, max_listed: int = 50) -> str:
    """The report as text for the terminal; at most ``max_listed`` bad records are listed."""
    h, w = report.image_size
    layout = (
        "insightface header at key 0, identity records"
        if report.has_header
        else "header-less: every record an image"
    )
    lines = [
        f"pack        : {report.pack_dir} ({layout})",
        f"identities  : {report.num_classes} ({report.identities_with_images} with images)",
        f"images      : {report.num_images}, {h}x{w} (HxW)",
        f"labels      : {report.label_min} .. {report.label_max}",
        f"per identity: min {report.images_per_identity_min}, "
        f"mean {report.images_per_identity_mean:.1f}, max {report.images_per_identity_max}",
        f"bad records : {len(report.bad)}",
    ]
    for i, (key, reason) in enumerate(report.bad.items()):
        if i == max_listed:
            lines.append(f"  ... and {len(report.bad) - max_listed} more")
            break
        lines.append(f"  key {key}: {reason}")
    return "\n".join(lines)
