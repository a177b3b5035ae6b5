"""Tests for evaluation/identification.py: MegaFace-style rank-k with a distractor gallery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.identification import (
    evaluate_identification,
    identification_ranks,
    top_k_similarities,
)


def unit(degrees: list[float]) -> np.ndarray:
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1)


def test_hand_computed_ranks() -> None:
    """Identity A at 0 and 10 deg, B at 90, 100, 120 deg, C alone at 200 deg (no trial).
    Distractors at 3, 95, 155, 250 deg.

    A: each probe's nearest distractor (3 deg) is closer than its mate (10 deg): rank 2, twice.
    B: 95 deg is within 5 deg of 90 and 100, so those 4 trials rank 2; probe 120: mate 90
       (30 deg) loses to 95 (25 deg) -> rank 2, mate 100 (20 deg) beats all -> rank 1.
    8 trials: rank-1 1/8, rank-2 and rank-5 8/8.
    """
    probes = unit([0, 10, 90, 100, 120, 200])
    labels = np.array([0, 0, 1, 1, 1, 2])
    result = identification_ranks(probes, labels, unit([3, 95, 155, 250]), ranks=(5, 1, 2))
    assert result.rank_accuracy == {1: 0.125, 2: 1.0, 5: 1.0}
    assert result.rank1 == 0.125
    assert (result.num_trials, result.num_identities) == (8, 2)
    assert (result.num_probes, result.num_distractors) == (6, 4)
    d = result.as_dict()
    assert d["rank1"] == 0.125 and d["rank_accuracy"]["2"] == 1.0


def test_a_tie_with_a_distractor_counts_against_the_probe() -> None:
    probes = np.array([[1.0, 0.0], [0.6, 0.8]])
    result = identification_ranks(probes, np.array([4, 4]), np.array([[0.6, -0.8]]), ranks=(1,))
    # probe 0: mate cos 0.6 == distractor cos 0.6 -> rank 2; probe 1: distractor cos -0.28
    assert result.rank_accuracy == {1: 0.5}


def test_more_distractors_never_help_and_scale_is_ignored() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 16))
    labels = np.repeat(np.arange(20), 3)
    probes = centres[labels] + 0.6 * rng.normal(size=(60, 16))
    distractors = rng.normal(size=(3000, 16))
    accs = [identification_ranks(probes, labels, distractors[:m]).rank1 for m in (10, 300, 3000)]
    assert accs[0] >= accs[1] >= accs[2]
    assert accs[0] > accs[2]  # the distractors do bite
    scaled = identification_ranks(5 * probes, labels, 0.1 * distractors)
    assert scaled.rank1 == accs[2]


def test_matches_brute_force_and_is_chunk_invariant() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 15, size=80)
    probes = rng.normal(size=(80, 8)) + 2 * np.eye(15, 8)[labels % 8]
    distractors = rng.normal(size=(500, 8))
    ranks = (1, 3, 10)
    fast = identification_ranks(probes, labels, distractors, ranks=ranks, chunk=37)
    assert (
        fast.rank_accuracy == identification_ranks(probes, labels, distractors, ranks).rank_accuracy
    )
    p = probes / np.linalg.norm(probes, axis=1, keepdims=True)
    g = distractors / np.linalg.norm(distractors, axis=1, keepdims=True)
    hits, trials = np.zeros(3), 0
    for i in range(80):
        for j in range(80):
            if i != j and labels[i] == labels[j]:
                better = np.sum(p[i] @ g.T >= p[i] @ p[j])
                hits += [better < k for k in ranks]
                trials += 1
    assert fast.num_trials == trials
    np.testing.assert_allclose(list(fast.rank_accuracy.values()), hits / trials)


def test_top_k_similarities_streams_chunks() -> None:
    rng = np.random.default_rng(2)
    p = rng.normal(size=(7, 4))
    g = rng.normal(size=(50, 4))
    full = -np.sort(-(p @ g.T), axis=1)[:, :5]
    np.testing.assert_allclose(top_k_similarities(p, g, 5, chunk=6), full)
    assert top_k_similarities(p, g[:3], 5).shape == (7, 3)  # fewer distractors than k


def test_bad_inputs() -> None:
    probes = unit([0, 10])
    with pytest.raises(ValueError, match="probe_labels"):
        identification_ranks(probes, np.array([0]), unit([5]))
    with pytest.raises(ValueError, match="dimension"):
        identification_ranks(probes, np.array([0, 0]), np.ones((3, 5)))
    with pytest.raises(ValueError, match="no identity has two"):
        identification_ranks(probes, np.array([0, 1]), unit([5]))
    with pytest.raises(ValueError, match="ranks"):
        identification_ranks(probes, np.array([0, 0]), unit([5]), ranks=(0,))


def _solid(path: Path, rgb: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), rgb, dtype=np.uint8)).save(path)


def test_evaluate_identification_from_image_folders(tmp_path: Path) -> None:
    colours = {"alice": [(250, 10, 10), (240, 20, 10)], "bob": [(10, 250, 10), (10, 230, 30)]}
    for name, cs in colours.items():
        for k, c in enumerate(cs):
            _solid(tmp_path / "probes" / name / f"{k}.png", c)
    _solid(tmp_path / "distractors" / "x.png", (245, 15, 10))  # between alice's two images
    _solid(tmp_path / "distractors" / "y.png", (10, 10, 250))

    def embed(x: np.ndarray) -> np.ndarray:  # mean colour, shifted positive
        return x.mean(axis=(2, 3)) + 1.0

    res = evaluate_identification(
        embed, tmp_path / "probes", tmp_path / "distractors", ranks=(1, 2), progress=False
    )
    feats = np.array([c for cs in colours.values() for c in cs], dtype=float) / 127.5
    expected = identification_ranks(
        feats, np.array([0, 0, 1, 1]), np.array([[245, 15, 10], [10, 10, 250]]) / 127.5, (1, 2)
    )
    assert res.rank_accuracy == expected.rank_accuracy
    assert res.rank_accuracy[1] == 0.5  # alice's trials lose to the distractor x
    assert res.num_distractors == 2 and res.num_trials == 4

    with pytest.raises(ValueError, match="identity labels"):
        evaluate_identification(embed, tmp_path / "distractors", tmp_path / "distractors")


def test_run_identification_returns_json_ready_results(tmp_path: Path) -> None:
    from evaluation.runner import run_identification

    for name, colour in (("a", (200, 10, 10)), ("b", (10, 200, 10))):
        for k in range(2):
            _solid(tmp_path / "probes" / name / f"{k}.png", colour)
    _solid(tmp_path / "distractors" / "x.png", (10, 10, 200))
    out = run_identification(
        lambda x: x.mean(axis=(2, 3)) + 1.0,
        tmp_path / "probes",
        tmp_path / "distractors",
        ranks=(1,),
        progress=False,
    )
    assert out == {
        "rank_accuracy": {"1": 1.0},
        "rank1": 1.0,
        "num_trials": 4,
        "num_probes": 4,
        "num_identities": 2,
        "num_distractors": 1,
    }
