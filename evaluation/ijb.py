"""IJB-B / IJB-C 1:1 template verification, with insightface's ``eval_ijbc.py`` semantics.

IJB compares *templates* (sets of images and video frames of one subject), not single images.
The protocol, step by step:

1. every face (``loose_crop/<name>``) is aligned to 112x112 from its 5 landmarks with a
   similarity transform onto the ArcFace template (:func:`dataio.align.align_face`, the one
   the packer uses, so evaluation crops match training crops), embedded, and its flip
   embedding added ("F2" in insightface's terms);
2. the raw feature norm is kept ("N1": it acts as a quality weight) and the feature is scaled
   by the detector's faceness score ("D1"); both can be switched off;
3. **media pooling**: frames of the same media (one video, or one still) inside a template are
   averaged, so a 300-frame video does not outweigh one photo;
4. **template aggregation**: the media features of a template are summed and the sum is
   L2-normalised;
5. a template pair's score is the cosine of its two template features; ROC and TAR@FAR at
   1e-6 ... 1e-1 follow (:mod:`evaluation.roc`).

Metadata layout (as distributed with insightface's IJB packs), for ``name`` = IJBB or IJBC::

    <root>/loose_crop/<image>                         face crops
    <root>/meta/<name>_name_5pts_score.txt            "<image> x1 y1 ... x5 y5 <faceness>"
    <root>/meta/<name>_face_tid_mid.txt               "<image> <template_id> <media_id>"
    <root>/meta/<name>_template_pair_label.txt        "<template_1> <template_2> <label 0/1>"

(``<name>`` lower-case). The two per-image files list the same images in the same order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from dataio.align import align_face
from evaluation.embed import Embedder, embed_images
from evaluation.roc import DEFAULT_FARS, RocCurve, TarAtFar, roc_curve, tar_at_far

__all__ = [
    "IJBError",
    "IJBMeta",
    "IJBResult",
    "evaluate_ijb",
    "ijb_verification",
    "read_ijb_meta",
    "template_features",
    "template_pair_scores",
]

PAIR_CHUNK = 100_000


class IJBError(ValueError):
    """Malformed IJB metadata; the message names the file and line."""


@dataclass(frozen=True)
class IJBMeta:
    """The per-image and per-pair metadata of one IJB benchmark."""

    root: Path
    name: str
    image_names: list[str]
    landmarks: np.ndarray
    """float64 [N, 5, 2] in the loose crop's pixel coordinates."""
    faceness: np.ndarray
    """float64 [N] detector scores."""
    templates: np.ndarray
    """int64 [N] template id of each image."""
    medias: np.ndarray
    """int64 [N] media id of each image."""
    pair_templates: np.ndarray
    """int64 [P, 2] template ids of each verification pair."""
    pair_labels: np.ndarray
    """bool [P], True for a genuine (same subject) pair."""

    @property
    def image_dir(self) -> Path:
        return self.root / "loose_crop"


def _rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    if not path.is_file():
        raise IJBError(f"{path}: IJB metadata file not found")
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if parts:
                yield lineno, parts


def _ints(path: Path, lineno: int, values: Sequence[str]) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError as e:
        raise IJBError(f"{path}:{lineno}: expected integers, got {list(values)}") from e


def read_ijb_meta(root: str | os.PathLike[str], name: str = "IJBC") -> IJBMeta:
    """Parse the three metadata files of ``<root>/meta`` (see the module docstring)."""
    root = Path(root)
    prefix = name.lower()
    meta = root / "meta"
    lmk_path = meta / f"{prefix}_name_5pts_score.txt"
    tid_path = meta / f"{prefix}_face_tid_mid.txt"
    pair_path = meta / f"{prefix}_template_pair_label.txt"

    names, landmarks, faceness = [], [], []
    for lineno, parts in _rows(lmk_path):
        if len(parts) != 12:
            raise IJBError(
                f"{lmk_path}:{lineno}: expected '<image> x1 y1 ... x5 y5 <score>' (12 fields), "
                f"got {len(parts)}"
            )
        try:
            values = [float(v) for v in parts[1:]]
        except ValueError as e:
            raise IJBError(f"{lmk_path}:{lineno}: landmarks/score must be numbers") from e
        names.append(parts[0])
        landmarks.append(values[:10])
        faceness.append(values[10])
    if not names:
        raise IJBError(f"{lmk_path}: no images listed")

    templates, medias = [], []
    for lineno, parts in _rows(tid_path):
        if len(parts) != 3:
            raise IJBError(f"{tid_path}:{lineno}: expected '<image> <template> <media>'")
        i = len(templates)
        if i >= len(names) or parts[0] != names[i]:
            expected = names[i] if i < len(names) else "(end of file)"
            raise IJBError(
                f"{tid_path}:{lineno}: image {parts[0]!r} but {lmk_path.name} line {i + 1} "
                f"is {expected!r}; both files must list the same images in the same order"
            )
        t, m = _ints(tid_path, lineno, parts[1:])
        templates.append(t)
        medias.append(m)
    if len(templates) != len(names):
        raise IJBError(f"{tid_path}: {len(templates)} images but {lmk_path.name} has {len(names)}")

    pairs, labels = [], []
    for lineno, parts in _rows(pair_path):
        if len(parts) != 3:
            raise IJBError(f"{pair_path}:{lineno}: expected '<template_1> <template_2> <label>'")
        t1, t2, label = _ints(pair_path, lineno, parts)
        if label not in (0, 1):
            raise IJBError(f"{pair_path}:{lineno}: label must be 0 or 1, got {label}")
        pairs.append((t1, t2))
        labels.append(bool(label))
    if not pairs:
        raise IJBError(f"{pair_path}: no template pairs listed")

    return IJBMeta(
        root=root,
        name=name,
        image_names=names,
        landmarks=np.asarray(landmarks, dtype=np.float64).reshape(-1, 5, 2),
        faceness=np.asarray(faceness, dtype=np.float64),
        templates=np.asarray(templates, dtype=np.int64),
        medias=np.asarray(medias, dtype=np.int64),
        pair_templates=np.asarray(pairs, dtype=np.int64).reshape(-1, 2),
        pair_labels=np.asarray(labels, dtype=bool),
    )


# ------------------------------------------------------------------------------ templates


def template_features(
    image_feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Media-average then template-sum image features [N, D]; returns (ids [T], feats [T, D]).

    ``ids`` are the sorted unique template ids; ``feats`` rows are L2-normalised.
    """
    feats = np.asarray(image_feats, dtype=np.float64)
    templates = np.asarray(templates, dtype=np.int64)
    medias = np.asarray(medias, dtype=np.int64)
    if feats.ndim != 2 or len(templates) != len(feats) or len(medias) != len(feats):
        raise ValueError(
            f"image_feats [N, D], templates [N] and medias [N] disagree: {feats.shape}, "
            f"{templates.shape}, {medias.shape}"
        )
    # One group per (template, media): the same media id in two templates is two groups.
    pairs = np.stack([templates, medias], axis=1)  # [N, 2]
    groups, group_of = np.unique(pairs, axis=0, return_inverse=True)  # [G, 2], [N]
    group_of = group_of.ravel()
    sums = np.zeros((len(groups), feats.shape[1]))
    np.add.at(sums, group_of, feats)
    counts = np.bincount(group_of, minlength=len(groups))
    media_feats = sums / counts[:, None]  # [G, D] media means
    ids, template_of = np.unique(groups[:, 0], return_inverse=True)  # [T], [G]
    out = np.zeros((len(ids), feats.shape[1]))
    np.add.at(out, template_of.ravel(), media_feats)  # [T, D] sum over media
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return ids, out / np.maximum(norms, 1e-12)


def template_pair_scores(
    template_ids: np.ndarray,
    template_feats: np.ndarray,
    pair_templates: np.ndarray,
    chunk: int = PAIR_CHUNK,
) -> np.ndarray:
    """Cosine score [P] of each template pair [P, 2], computed ``chunk`` pairs at a time."""
    ids = np.asarray(template_ids, dtype=np.int64)
    pairs = np.asarray(pair_templates, dtype=np.int64)
    rows = np.searchsorted(ids, pairs)  # [P, 2]
    rows_c = np.minimum(rows, len(ids) - 1)
    unknown = ids[rows_c] != pairs
    if unknown.any():
        bad = int(pairs[unknown][0])
        raise IJBError(f"template pair list references template {bad}, which has no images")
    scores = np.empty(len(pairs))
    for start in range(0, len(pairs), chunk):
        r = rows[start : start + chunk]
        scores[start : start + chunk] = np.sum(
            template_feats[r[:, 0]] * template_feats[r[:, 1]], axis=1
        )
    return scores


@dataclass(frozen=True)
class IJBResult:
    """Scores, ROC and TAR@FAR table of one IJB run."""

    name: str
    scores: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    roc: RocCurve = field(repr=False)
    table: list[TarAtFar]
    num_images: int
    num_templates: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "num_images": self.num_images,
            "num_templates": self.num_templates,
            "num_pairs": int(len(self.scores)),
            "num_genuine": int(self.labels.sum()),
            "auc": self.roc.auc(),
            "tar_at_far": [r.as_dict() for r in self.table],
        }


def ijb_verification(
    image_feats: np.ndarray,
    meta: IJBMeta,
    *,
    use_norm_score: bool = True,
    use_detector_score: bool = True,
    fars: Sequence[float] = DEFAULT_FARS,
    method: Literal["conservative", "insightface"] = "conservative",
) -> IJBResult:
    """Template verification from per-image features [N, D] (flip already added, raw norm).

    ``use_norm_score=False`` L2-normalises every image feature first (insightface "N0");
    ``use_detector_score`` multiplies it by the faceness score ("D1").
    """
    feats = np.asarray(image_feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) != len(meta.image_names):
        raise ValueError(
            f"image_feats must be [{len(meta.image_names)}, D] (one row per image of "
            f"{meta.name}), got {feats.shape}"
        )
    if not use_norm_score:
        feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    if use_detector_score:
        feats = feats * meta.faceness[:, None]
    ids, tfeats = template_features(feats, meta.templates, meta.medias)
    scores = template_pair_scores(ids, tfeats, meta.pair_templates)
    curve = roc_curve(scores, meta.pair_labels)
    return IJBResult(
        name=meta.name,
        scores=scores,
        labels=meta.pair_labels,
        roc=curve,
        table=tar_at_far(curve, fars, method),
        num_images=len(feats),
        num_templates=len(ids),
    )


def _aligned_batches(meta: IJBMeta, batch_size: int, size: tuple[int, int]) -> Iterator[np.ndarray]:
    for start in range(0, len(meta.image_names), batch_size):
        batch = []
        for i in range(start, min(start + batch_size, len(meta.image_names))):
            path = meta.image_dir / meta.image_names[i]
            try:
                with Image.open(path) as img:
                    rgb = np.asarray(img.convert("RGB"))
            except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
                raise IJBError(f"{path}: cannot read face image ({e})") from e
            batch.append(align_face(rgb, meta.landmarks[i], size=size))
        yield np.stack(batch)  # [b, H, W, 3]


def evaluate_ijb(
    embedder: Embedder,
    root: str | os.PathLike[str],
    name: str = "IJBC",
    *,
    batch_size: int = 128,
    input_size: tuple[int, int] = (112, 112),
    flip: bool = True,
    use_norm_score: bool = True,
    use_detector_score: bool = True,
    fars: Sequence[float] = DEFAULT_FARS,
    method: Literal["conservative", "insightface"] = "conservative",
    progress: bool = True,
) -> IJBResult:
    """Align, embed and score a whole IJB benchmark (``facetrain eval MODEL --ijb ROOT``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    meta = read_ijb_meta(root, name)
    feats = embed_images(
        embedder,
        _aligned_batches(meta, batch_size, input_size),
        flip=flip,
        normalize=False,
        progress=progress,
        total=len(meta.image_names),
        desc=name,
    )
    return ijb_verification(
        feats,
        meta,
        use_norm_score=use_norm_score,
        use_detector_score=use_detector_score,
        fars=fars,
        method=method,
    )
