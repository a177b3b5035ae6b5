"""Corrupt records under DALI: checking what a pipeline returns, and blaming a failed batch.

A DALI batch whose label or image size disagrees with the pack raises
:class:`~dataio.pack.PackError` naming the record's key (:func:`check_batch`). When a batch
fails (that check, or DALI's own reader or decoder), :func:`blame_records` finds the records
behind it, so the loader can name them, or leave them out with ``skip_corrupt``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

from dataio.dali_pipeline import dali_reason
from dataio.dali_plan import EpochPlan
from dataio.decode import decode_record
from dataio.pack import FacePack, PackError

__all__ = ["blame_records", "check_batch"]

_SOURCE_OFFSET = re.compile(r" at index (\d+)")


def check_batch(
    pack: FacePack, pos: np.ndarray, labels: Any, shapes: list[tuple[int, ...]], pixels: str
) -> None:
    """Raise PackError (key named) for a wrong label or image size in a DALI batch of the
    records at ``pos`` (``pixels="uint8"``: images are HWC, else CHW)."""
    got = np.asarray(labels.as_array(), dtype=np.float64).reshape(-1)  # [B]
    want = pack.labels[pos]
    wrong = np.flatnonzero(got != want)
    h, w = pack.image_size
    dims = [tuple(int(d) for d in shape) for shape in shapes]  # B x (3, H, W) or (H, W, 3)
    if pixels == "uint8":
        dims = [(d[2], d[0], d[1]) for d in dims]  # as (3, H, W)
    odd = [j for j, d in enumerate(dims) if d != (3, h, w)]
    if wrong.size:
        j = int(wrong[0])
        key = int(pack.image_keys[pos[j]])
        raise PackError(
            f"{pack.rec_path}: key {key}: record label {got[j]} disagrees with the "
            f"pack's label {int(want[j])}"
        )
    if odd:
        j = odd[0]
        key = int(pack.image_keys[pos[j]])
        raise PackError(
            f"{pack.rec_path}: key {key}: image is {dims[j][1]}x{dims[j][2]} but the "
            f"pack's property says {h}x{w}"
        )


def blame_records(
    err: Exception,
    pack: FacePack,
    plan: EpochPlan,
    unseen: np.ndarray,
    upcoming: Callable[[], np.ndarray],
) -> dict[int, str]:
    """The records behind a failed batch, ``{key: reason}``; ``{}`` if none can be blamed.

    Tried in order: the key named by :func:`check_batch`, the offset in DALI's message, a
    head check of ``unseen`` (positions of the shard's records neither read nor known bad),
    decoding the records ``upcoming()`` gives (positions DALI was about to return; a
    ``RuntimeError`` there blames none).
    """
    reasons: dict[int, str] = {}
    message = str(err)
    if isinstance(err, PackError):
        m = re.search(r": key (\d+): ", message)
        if m is not None:
            reasons[int(m.group(1))] = message
    if not reasons:
        m = _SOURCE_OFFSET.search(message)
        key = None if m is None else plan.key_at_offset(int(m.group(1)))
        if key is not None:
            reasons[key] = f"{pack.rec_path}: key {key}: {dali_reason(message)}"
    if not reasons and unseen.size:
        reasons.update(pack.check_records(unseen))
    if not reasons and unseen.size:
        reasons.update(_decode_failures(pack, upcoming))
    return reasons


def _decode_failures(pack: FacePack, upcoming: Callable[[], np.ndarray]) -> dict[int, str]:
    """Decode, in Python, the records DALI was about to return and report failures."""
    try:
        positions = upcoming()
    except RuntimeError:
        return {}
    reasons: dict[int, str] = {}
    for p in np.unique(positions).tolist():
        try:
            decode_record(pack, p)
        except PackError as e:
            reasons[int(pack.image_keys[p])] = str(e)
    return reasons
