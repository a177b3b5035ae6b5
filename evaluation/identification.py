"""1:N identification against a distractor gallery, MegaFace Challenge 1 style.

MegaFace measures how well a probe finds its mate when the gallery is flooded with up to a
million strangers. For a probe set with several images per identity (FaceScrub in MegaFace):

* every ordered pair (probe ``i``, mate ``j``) of different images of the same identity is one
  trial; the gallery of that trial is ``{j}`` plus every distractor;
* the trial's rank is 1 + the number of distractors at least as similar to the probe as its
  mate (ties count against the probe);
* rank-k accuracy (the CMC curve) is the fraction of trials with rank <= k; rank-1 is the
  headline number.

Only each probe's top ``max(ranks)`` distractor similarities are needed, so distractors are
streamed in chunks against all probes and a running top-k is kept: memory is
``O(probes * (chunk + k))``, independent of the number of distractors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluation.embed import Embedder, embed_images, open_image_source
from evaluation.verification import l2_normalize

__all__ = [
    "IdentificationResult",
    "evaluate_identification",
    "identification_ranks",
    "top_k_similarities",
]


@dataclass(frozen=True)
class IdentificationResult:
    """Rank-k accuracies of a MegaFace-style run."""

    rank_accuracy: dict[int, float]
    num_trials: int
    """Ordered (probe, mate) pairs evaluated."""
    num_probes: int
    num_identities: int
    """Identities with at least two probe images (the others give no trial)."""
    num_distractors: int

    @property
    def rank1(self) -> float:
        return self.rank_accuracy[1]

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank_accuracy": {str(k): v for k, v in self.rank_accuracy.items()},
            "rank1": self.rank_accuracy.get(1, float("nan")),
            "num_trials": self.num_trials,
            "num_probes": self.num_probes,
            "num_identities": self.num_identities,
            "num_distractors": self.num_distractors,
        }


def top_k_similarities(
    probes: np.ndarray, distractors: np.ndarray, k: int, chunk: int = 65536
) -> np.ndarray:
    """For unit rows ``probes`` [P, D], the ``k`` largest cosines to ``distractors`` [M, D].

    Returns float64 [P, min(k, M)] sorted descending. Streams ``chunk`` distractors at a time.
    """
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    keep = min(k, len(distractors))
    best = np.full((len(probes), 0), -np.inf)
    for start in range(0, len(distractors), chunk):
        sims = probes @ distractors[start : start + chunk].T  # [P, c]
        both = np.concatenate([best, sims], axis=1)  # [P, <= k + c]
        if both.shape[1] > keep:
            both = -np.partition(-both, keep - 1, axis=1)[:, :keep]
        best = both
    return -np.sort(-best, axis=1)  # [P, keep] descending


def identification_ranks(
    probe_emb: np.ndarray,
    probe_labels: np.ndarray,
    distractor_emb: np.ndarray,
    ranks: Sequence[int] = (1, 5, 10),
    chunk: int = 65536,
) -> IdentificationResult:
    """MegaFace-style rank-k accuracy (see the module docstring). Rows are L2-normalised here."""
    probe = l2_normalize(np.asarray(probe_emb))  # [P, D]
    labels = np.asarray(probe_labels)
    distract = l2_normalize(np.asarray(distractor_emb))  # [M, D]
    if labels.ndim != 1 or len(labels) != len(probe):
        raise ValueError(f"probe_labels must be [{len(probe)}], got shape {labels.shape}")
    if distract.ndim != 2 or distract.shape[1] != probe.shape[1]:
        raise ValueError(
            f"distractor embeddings {distract.shape} do not match probe dimension {probe.shape[1]}"
        )
    if len(distract) == 0:
        raise ValueError("the distractor gallery is empty")
    ranks = sorted({int(r) for r in ranks})
    if not ranks or ranks[0] < 1:
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    top = top_k_similarities(probe, distract, ranks[-1], chunk)  # [P, K] descending

    hits = np.zeros(len(ranks), dtype=np.int64)
    trials = 0
    identities = 0
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        identities += 1
        mate = probe[members] @ probe[members].T  # [n, n]
        for row, i in enumerate(members):
            mates = np.delete(mate[row], row)  # [n - 1] similarity to each mate
            # distractors beating the mate: top[i] is descending, count entries >= mate score
            beaten_by = np.sum(top[i][None, :] >= mates[:, None], axis=1)  # [n - 1]
            for r, k in enumerate(ranks):
                hits[r] += int(np.sum(beaten_by < k))
            trials += len(mates)
    if trials == 0:
        raise ValueError("no identity has two probe images: nothing to identify")
    return IdentificationResult(
        rank_accuracy={k: float(hits[r] / trials) for r, k in enumerate(ranks)},
        num_trials=trials,
        num_probes=len(probe),
        num_identities=identities,
        num_distractors=len(distract),
    )


def evaluate_identification(
    embedder: Embedder,
    probes: str | os.PathLike[str],
    distractors: str | os.PathLike[str],
    *,
    batch_size: int = 128,
    flip: bool = True,
    ranks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
) -> IdentificationResult:
    """Embed a labelled probe set and a distractor set, then :func:`identification_ranks`.

    ``probes`` must carry identity labels: a face pack or a folder with one sub-folder per
    identity (or a labelled list file). ``distractors`` is any image source; its labels, if
    any, are ignored (distractors are strangers by construction).
    """
    probe_src = open_image_source(probes)
    if probe_src.labels is None:
        raise ValueError(
            f"{probes}: the probe set needs identity labels (a pack, a folder with one "
            "sub-folder per identity, or a list file with 'path label' lines)"
        )
    distract_src = open_image_source(distractors)
    kwargs = {"flip": flip, "normalize": True, "progress": progress}
    probe_emb = embed_images(
        embedder, probe_src.batches(batch_size), total=len(probe_src), desc="probes", **kwargs
    )
    distract_emb = embed_images(
        embedder,
        distract_src.batches(batch_size),
        total=len(distract_src),
        desc="distractors",
        **kwargs,
    )
    return identification_ranks(probe_emb, probe_src.labels, distract_emb, ranks)
