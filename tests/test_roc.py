"""Tests for evaluation/roc.py: ROC against scikit-learn and hand-computed TAR@FAR."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from evaluation.roc import DEFAULT_FARS, READINGS, format_tar_table, roc_curve, tar_at_far

# 4 genuine, 6 impostor pairs; worked by hand below.
HAND_SCORES = np.array([0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
HAND_LABELS = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0])


def test_hand_computed_curve() -> None:
    """Thresholds inf, .9, .8 (two pairs: one genuine, one impostor), .7, .6, ..., .1."""
    curve = roc_curve(HAND_SCORES, HAND_LABELS)
    np.testing.assert_array_equal(
        curve.thresholds, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    )
    np.testing.assert_allclose(curve.tpr, [0, 1, 2, 3, 3, 4, 4, 4, 4, 4] / np.float64(4))
    np.testing.assert_allclose(curve.fpr, [0, 0, 1, 1, 2, 2, 3, 4, 5, 6] / np.float64(6))
    assert (curve.num_positives, curve.num_negatives) == (4, 6)
    # AUC: fraction of (genuine, impostor) pairs ranked right, ties half:
    # .9 beats 6, .8 beats 5 and ties 1, .7 beats 5, .5 beats 4 -> 20.5 / 24
    assert curve.auc() == pytest.approx(20.5 / 24)


def test_hand_computed_tar_at_far() -> None:
    """FAR 0.1 < 1/6 only allows threshold .9 (TAR 1/4). FAR 1/6 is first reached at .8, and
    .7 keeps it at 1/6 with TAR 3/4. FAR 0.5 allows down to .4, but TAR 1 is already reached
    at .5 (FAR 2/6): the highest threshold with the best TAR is reported; same for FAR 1.
    'insightface' takes the FAR nearest the target and the highest TAR there: for 0.1 that is
    FAR 1/6, reached at .8 (TAR 2/4) and .7 (TAR 3/4) -> .7; for 0.4 it is FAR 2/6 at .6 (TAR
    3/4) and .5 (TAR 1) -> .5. (sklearn drops .3 and .2, FAR 4/6 and 5/6, which do not matter.)"""
    curve = roc_curve(HAND_SCORES, HAND_LABELS)
    rows = tar_at_far(curve, [0.1, 1 / 6, 0.5, 1.0])
    assert [r.tar for r in rows] == [0.25, 0.75, 1.0, 1.0]
    assert [r.threshold for r in rows] == [0.9, 0.7, 0.5, 0.5]
    assert rows[0].far == 0.0 and rows[1].far == pytest.approx(1 / 6)
    assert rows[2].far == pytest.approx(2 / 6) and rows[3].far == pytest.approx(2 / 6)
    assert [r.resolvable for r in rows] == [False, True, True, True]
    nearest = tar_at_far(curve, [0.1, 0.4], method="insightface")
    assert [r.tar for r in nearest] == [0.75, 1.0]
    assert nearest[0].far == pytest.approx(1 / 6) and nearest[0].threshold == 0.7
    assert nearest[1].far == pytest.approx(2 / 6) and nearest[1].threshold == 0.5
    assert {r.method for r in rows} == {"conservative"}
    assert {r.method for r in nearest} == {"insightface"}
    assert nearest[0].as_dict()["method"] == "insightface"


def _insightface_reference(
    scores: np.ndarray, labels: np.ndarray, fars: list[float]
) -> list[tuple[float, float, float]]:
    """(TAR, FAR, threshold) per target as insightface's eval_ijbc.py reads them: sklearn's
    roc_curve with its default drop_intermediate, both arrays flipped, argmin |fpr - far|."""
    fpr, tpr, thr = sk_roc_curve(labels, scores)
    fpr, tpr, thr = np.flipud(fpr), np.flipud(tpr), np.flipud(thr)
    out = []
    for far in fars:
        i = np.argmin(np.abs(fpr - far))
        out.append((float(tpr[i]), float(fpr[i]), float(thr[i])))
    return out


def _ours(scores: np.ndarray, labels: np.ndarray, fars: list[float], method: str) -> list:
    rows = tar_at_far(roc_curve(scores, labels), fars, method=method)
    return [(r.tar, r.far, r.threshold) for r in rows]


def test_insightface_reading_on_an_fpr_plateau() -> None:
    """Negatives at .9, .7, .7, .5; positives at .8, .6 (FAR 1/4 from .9 to .8, 3/4 from .7 to
    .6). For FAR 1/2 the FARs 1/4 and 3/4 are equally near: insightface's flipped argmin takes
    the one sklearn lists last, 3/4, and its highest TAR, 1 at .6. The conservative reading
    stays within 1/2: TAR 1/2 at .8. The lowest TAR of the nearest plateau would be 0 at .9."""
    scores = np.array([0.9, 0.8, 0.7, 0.7, 0.6, 0.5])
    labels = np.array([0, 1, 0, 0, 1, 0])
    assert _ours(scores, labels, [0.5], "insightface") == [(1.0, 0.75, 0.6)]
    assert _insightface_reference(scores, labels, [0.5]) == [(1.0, 0.75, 0.6)]
    assert _ours(scores, labels, [0.5], "conservative") == [(0.5, 0.25, 0.8)]
    # FAR 0.3: the plateau at 1/4 alone is nearest; its highest TAR is 1/2 at .8
    assert _ours(scores, labels, [0.3], "insightface") == [(0.5, 0.25, 0.8)]


def test_insightface_reading_uses_the_curve_with_intermediate_points_dropped() -> None:
    """One positive and one negative at each of .9, .8, .7, .1: the points (1/4, 1/4), (2/4,
    2/4), (3/4, 3/4), (1, 1) are equally spaced on a line, so sklearn keeps only the first and
    the last of them (and (0, 0)). FAR 1/2 is then read at the nearest kept FAR, 1/4 (TAR 1/4
    at .9), not at the point (1/2, 1/2) of the full curve."""
    scores = np.array([0.9, 0.9, 0.8, 0.8, 0.7, 0.7, 0.1, 0.1])
    labels = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    assert _insightface_reference(scores, labels, [0.5]) == [(0.25, 0.25, 0.9)]
    assert _ours(scores, labels, [0.5], "insightface") == [(0.25, 0.25, 0.9)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_insightface_reading_matches_the_ijb_script_with_ties(seed: int) -> None:
    """20,000 scores rounded to 0.05 (about 60 distinct values, shared by genuine and impostor
    pairs): TAR, FAR and threshold equal the script's reading at every FAR, bit for bit."""
    rng = np.random.default_rng(seed)
    labels = rng.random(20_000) < 0.2
    scores = np.round(rng.normal(np.where(labels, 0.55, 0.0), 0.2) / 0.05) * 0.05
    fars = [*DEFAULT_FARS, 0.02, 0.05, 0.3, 0.5, 0.9, 1.0, 0.0]
    assert _ours(scores, labels, fars, "insightface") == _insightface_reference(
        scores, labels, fars
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_roc_curve_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.3
    # rounded scores: many ties, some shared between genuine and impostor pairs
    scores = np.round(rng.normal(labels * 1.5, 1.0), 1)
    ours = roc_curve(scores, labels)
    fpr, tpr, thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_array_equal(ours.fpr, fpr)
    np.testing.assert_array_equal(ours.tpr, tpr)
    np.testing.assert_array_equal(ours.thresholds, thr)
    assert ours.auc() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_conservative_tar_never_exceeds_the_far_target() -> None:
    rng = np.random.default_rng(5)
    labels = np.r_[np.ones(300, bool), np.zeros(3000, bool)]
    scores = np.round(np.r_[rng.normal(0.4, 0.1, 300), rng.normal(0.1, 0.1, 3000)], 3)
    curve = roc_curve(scores, labels)
    for row in tar_at_far(curve, DEFAULT_FARS):
        assert row.far <= row.far_target
        # brute force: best TPR over thresholds whose FPR stays within the target
        accept_neg = scores[~labels][None, :] >= np.unique(scores)[:, None]
        fpr = accept_neg.mean(axis=1)
        tpr = (scores[labels][None, :] >= np.unique(scores)[:, None]).mean(axis=1)
        ok = fpr <= row.far_target
        assert row.tar == pytest.approx(tpr[ok].max() if ok.any() else 0.0)
        assert row.resolvable == (row.far_target * 3000 >= 1)
        assert np.mean(scores[~labels] >= row.threshold) == pytest.approx(row.far)


def test_bad_inputs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="both positive"):
        roc_curve(np.array([0.1, 0.2]), np.array([1, 1]))
    with pytest.raises(ValueError, match="one entry per score"):
        roc_curve(np.array([0.1, 0.2]), np.array([1]))
    with pytest.raises(ValueError, match="NaN"):
        roc_curve(np.array([0.1, np.nan]), np.array([1, 0]))
    with pytest.raises(ValueError, match="0/1"):
        roc_curve(np.array([0.1, 0.2]), np.array([2, 0]))
    curve = roc_curve(HAND_SCORES, HAND_LABELS)
    with pytest.raises(ValueError, match="method"):
        tar_at_far(curve, method="nearest")
    with pytest.raises(ValueError, match="fars"):
        tar_at_far(curve, [2.0])


def test_format_table_marks_unresolvable_fars() -> None:
    curve = roc_curve(HAND_SCORES, HAND_LABELS)
    text = format_tar_table({"hand": tar_at_far(curve, [0.1, 0.5])})
    lines = text.splitlines()
    assert "1e-01" in lines[0] and "5e-01" in lines[0]
    assert lines[1].split() == ["hand", "25.00*", "100.00"]
    assert lines[2] == f"TAR@FAR, {READINGS['conservative']}"
    assert "zero false accepts" in lines[3]


def test_format_table_names_the_insightface_reading() -> None:
    curve = roc_curve(HAND_SCORES, HAND_LABELS)
    lines = format_tar_table({"hand": tar_at_far(curve, [0.1, 0.5], "insightface")}).splitlines()
    assert lines[1].split() == ["hand", "75.00*", "100.00"]
    assert lines[2].startswith("TAR@FAR, insightface reading")
    assert "highest TAR at the FAR nearest the target" in lines[2]
    assert "nearest FAR on the curve" in lines[3]
