"""Tests for evaluation/verification.py and kfold.py: insightface k-fold verification semantics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.interpolate import BSpline
from sklearn.metrics import roc_curve
from sklearn.model_selection import KFold
from torch import nn

from evaluation.kfold import (
    _kfold_splits,
    _threshold_for_far,
    kfold_verification_from_distances,
    roc_points,
)
from evaluation.verification import (
    cosine_pixel_baseline,
    extract_embeddings,
    kfold_verification,
    pair_distances,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def embeddings_with_distances(distances: np.ndarray) -> np.ndarray:
    """Unit 2-D vectors whose pairs have the given squared L2 distances (d = 2 - 2 cos)."""
    angles = np.arccos(1.0 - np.asarray(distances) / 2.0)
    rows = []
    for i, a in enumerate(angles):
        base = 0.37 * i  # rotate each pair differently; only the in-pair angle matters
        rows.append([np.cos(base), np.sin(base)])
        rows.append([np.cos(base + a), np.sin(base + a)])
    return np.array(rows)


# ----------------------------------------------------------------------------- hand cases

# 8 pairs, 4 folds of 2. Distances sit 0.0055 off the 0.01 / 0.001 threshold grids so no
# threshold ties with a distance. Worked out by hand in the test docstring below.
HAND_D = np.array([0.5055, 1.5055, 0.8055, 1.2055, 1.0055, 0.9055, 0.3055, 2.0055])
HAND_SAME = np.array([True, False, True, False, True, False, True, False])


@pytest.mark.parametrize("via_embeddings", [False, True])
def test_four_fold_hand_computed_accuracy(via_embeddings: bool) -> None:
    """Fold k tests pairs (2k, 2k+1) with a threshold chosen on the other 6 pairs.

    fold 0: train same {.8055, 1.0055, .3055} diff {1.2055, .9055, 2.0055}: acc 5/6 first for
            t in (.8055, .9055] -> t = 0.81; test (.5055 same accepted, 1.5055 diff rejected) 2/2
    fold 1: train same {.5055, 1.0055, .3055} diff {1.5055, .9055, 2.0055}: 5/6 first on
            (.5055, .9055] -> 0.51; test .8055 same rejected (wrong), 1.2055 diff rejected: 1/2
    fold 2: train same {.5055, .8055, .3055} diff {1.5055, 1.2055, 2.0055}: 6/6 on
            (.8055, 1.2055] -> 0.81; test 1.0055 same rejected (wrong), .9055 diff ok: 1/2
    fold 3: train same {.5055, .8055, 1.0055} diff {1.5055, 1.2055, .9055}: 5/6 first on
            (.8055, .9055] -> 0.81; test .3055 same accepted, 2.0055 diff rejected: 2/2
    VAL@FAR=0.4 (3 impostors in train -> FAR steps 0, 1/3, 2/3, 1): the threshold sits 0.4 of
    the way from the last 0.001-grid point with FAR 1/3 to the next: fold 0 diff sorted
    (.9055, 1.2055, 2.0055) -> 1.205 + 0.0002 = 1.2052; fold 1 -> 1.5052; fold 2 -> 1.5052;
    fold 3 -> 1.2052. Test: every same pair is accepted (VAL 1); impostors 1.2055 (fold 1) and
    .9055 (fold 2) are accepted -> FAR 0, 1, 1, 0.
    """
    if via_embeddings:
        result = kfold_verification(embeddings_with_distances(HAND_D), HAND_SAME, 4, 0.4)
    else:
        result = kfold_verification_from_distances(HAND_D, HAND_SAME, 4, 0.4)
    np.testing.assert_allclose(result.fold_accuracies, [1.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(result.fold_thresholds, [0.81, 0.51, 0.81, 0.81])
    assert result.accuracy_mean == pytest.approx(0.75)
    assert result.accuracy_std == pytest.approx(0.25)
    assert result.best_threshold == pytest.approx(0.735)
    np.testing.assert_allclose(result.fold_val_thresholds, [1.2052, 1.5052, 1.5052, 1.2052])
    assert result.val_mean == pytest.approx(1.0) and result.val_std == pytest.approx(0.0)
    assert result.far_mean == pytest.approx(0.5)
    assert result.num_pairs == 8


def test_two_fold_hand_computed_val_at_far() -> None:
    """fold A tests pairs 0-3, trains on 4-7; fold B the reverse.

    A: train same {.4055, 1.1055} diff {.7055, 1.5055}: 3/4 first on (.4055, .7055] -> 0.41;
       test at .41: .3055 S ok, .9055 S wrong, .6055 D ok, 1.8055 D ok -> 3/4.
       FAR=0.2 (impostor steps 0, .5, 1): 0.705 + 0.2/0.5 * 0.001 = 0.7054; test same
       (.3055 yes, .9055 no) VAL 1/2; impostors .6055 accepted, 1.8055 not: FAR 1/2.
    B: train same {.3055, .9055} diff {.6055, 1.8055}: 3/4 first on (.3055, .6055] -> 0.31;
       test at .31: .4055 S wrong, 1.1055 S wrong, .7055 D ok, 1.5055 D ok -> 2/4.
       threshold 0.605 + 0.0004 = 0.6054; VAL (.4055 yes, 1.1055 no) 1/2; FAR 0.
    """
    d = np.array([0.3055, 0.9055, 0.6055, 1.8055, 0.4055, 1.1055, 0.7055, 1.5055])
    same = np.array([True, True, False, False, True, True, False, False])
    result = kfold_verification_from_distances(d, same, nfolds=2, far_target=0.2)
    np.testing.assert_allclose(result.fold_accuracies, [0.75, 0.5])
    assert result.accuracy_mean == pytest.approx(0.625)
    assert result.accuracy_std == pytest.approx(0.125)
    assert result.best_threshold == pytest.approx(0.36)
    np.testing.assert_allclose(result.fold_val_thresholds, [0.7054, 0.6054])
    assert result.val_mean == pytest.approx(0.5)
    assert result.val_std == pytest.approx(0.0)
    assert result.far_mean == pytest.approx(0.25)


def test_unreachable_far_target_falls_back_to_threshold_zero() -> None:
    # Impostors at distance 4 (opposite vectors) are never accepted on the [0, 4) grid, so the
    # training FAR never reaches 1e-3: insightface then uses threshold 0 (accept nothing).
    d = np.array([0.2, 4.0, 0.3, 4.0])
    same = np.array([True, False, True, False])
    result = kfold_verification_from_distances(d, same, nfolds=2, far_target=1e-3)
    assert result.fold_val_thresholds == (0.0, 0.0)
    assert result.val_mean == 0.0 and result.far_mean == 0.0
    # FAR target 0 is reached (FAR is 0 everywhere): the last threshold of the plateau, 3.999.
    result = kfold_verification_from_distances(d, same, nfolds=2, far_target=0.0)
    np.testing.assert_allclose(result.fold_val_thresholds, [3.999, 3.999])
    assert result.val_mean == 1.0 and result.far_mean == 0.0


def test_folds_without_impostors_or_genuines_are_left_out_of_val_far() -> None:
    """fold 0 trains on pairs 2, 3 (impostor at 1.5055 -> FAR-0 plateau ends at 1.505, so the
    1e-3 target interpolates to 1.505 + 1e-3 * 0.001) and tests two genuine pairs: VAL 1, FAR
    undefined. fold 1 trains on two genuine pairs: no impostor to calibrate on -> threshold 0;
    tests a genuine (rejected, VAL 0) and an impostor (rejected, FAR 0)."""
    d = np.array([0.2, 0.3, 0.25, 1.5055])
    same = np.array([True, True, True, False])
    result = kfold_verification_from_distances(d, same, nfolds=2, far_target=1e-3)
    np.testing.assert_allclose(result.fold_val_thresholds, [1.505001, 0.0])
    assert result.val_mean == pytest.approx(0.5)
    assert result.val_std == pytest.approx(0.5)
    assert result.far_mean == 0.0
    only_same = kfold_verification_from_distances(d[:3], same[:3], nfolds=3)
    assert np.isnan(only_same.far_mean)
    # 1 pair per fold: fold 1 learns t = 0.26 from {0.2, 0.25} and rejects its 0.3 pair
    assert only_same.fold_accuracies == (1.0, 0.0, 1.0)


# ----------------------------------------------------------------------------- behaviour


def test_perfect_embeddings_give_full_accuracy() -> None:
    rng = np.random.default_rng(0)
    n = 600
    ids = rng.normal(size=(2 * n, 128))
    same = rng.random(n) < 0.5
    emb = ids.copy()
    emb[1::2][same] = emb[0::2][same] * 3.0  # same direction, different norm
    result = kfold_verification(emb, same)
    assert result.accuracy_mean == 1.0
    assert result.accuracy_std == 0.0
    assert all(a == 1.0 for a in result.fold_accuracies)
    # VAL@FAR calibrates on the closest impostors (d ~ 1.5 here): all genuines are accepted,
    # an occasional held-out impostor too (one in one of the 10 folds: FAR mean ~0.004)
    assert result.val_mean == 1.0 and result.far_mean < 0.01
    # best threshold: first grid point above the (zero) same-pair distances
    assert result.best_threshold == pytest.approx(0.01)


def test_random_embeddings_are_at_chance() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    emb = rng.normal(size=(2 * n, 64))
    same = rng.random(n) < 0.5
    result = kfold_verification(emb, same)
    assert 0.46 < result.accuracy_mean < 0.54
    assert result.val_mean < 0.01  # at FAR 1e-3, random scores accept ~0.1% of anything
    assert result.far_mean < 0.005


def test_matches_a_direct_port_of_the_insightface_loops() -> None:
    """Compare with a literal per-threshold loop using sklearn KFold and an old-scipy-style
    interp1d(kind="slinear") (a degree-1 B-spline through possibly duplicated x)."""
    rng = np.random.default_rng(2)
    n = 300
    labels = rng.random(n) < 0.5
    base = rng.normal(size=(n, 16))
    other = np.where(
        labels[:, None], base + 0.9 * rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
    )
    emb = np.empty((2 * n, 16))
    emb[0::2], emb[1::2] = base, other
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    far_target = 0.05

    dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)
    thresholds = np.arange(0, 4, 0.01)
    val_thresholds = np.arange(0, 4, 0.001)
    accs, vals, fars = [], [], []
    for train, test in KFold(n_splits=10, shuffle=False).split(np.arange(n)):
        acc_train = [np.mean(np.less(dist[train], t) == labels[train]) for t in thresholds]
        best = thresholds[int(np.argmax(acc_train))]
        accs.append(np.mean(np.less(dist[test], best) == labels[test]))
        far_train = np.array(
            [
                np.sum(np.less(dist[train], t) & ~labels[train]) / np.sum(~labels[train])
                for t in val_thresholds
            ]
        )
        if np.max(far_train) >= far_target:
            spline = BSpline.construct_fast(
                np.r_[far_train[0], far_train, far_train[-1]], val_thresholds, 1
            )
            threshold = float(spline(far_target))
        else:
            threshold = 0.0
        accept = np.less(dist[test], threshold)
        vals.append(np.sum(accept & labels[test]) / np.sum(labels[test]))
        fars.append(np.sum(accept & ~labels[test]) / np.sum(~labels[test]))

    result = kfold_verification(emb, labels, nfolds=10, far_target=far_target, normalize=False)
    np.testing.assert_allclose(result.fold_accuracies, accs, atol=1e-12)
    assert result.accuracy_mean == pytest.approx(np.mean(accs), abs=1e-12)
    assert result.accuracy_std == pytest.approx(np.std(accs), abs=1e-12)
    assert result.val_mean == pytest.approx(np.mean(vals), abs=1e-12)
    assert result.val_std == pytest.approx(np.std(vals), abs=1e-12)
    assert result.far_mean == pytest.approx(np.mean(fars), abs=1e-12)
    assert 0.6 < result.accuracy_mean < 0.99  # a non-trivial case
    assert 0.0 < result.val_mean < 1.0


def test_threshold_for_far_equals_old_scipy_slinear_on_plateaus() -> None:
    thresholds = np.arange(10) / 10.0
    far = np.array([0, 0, 0, 0.1, 0.1, 0.2, 0.5, 0.5, 0.9, 1.0])
    spline = BSpline.construct_fast(np.r_[far[0], far, far[-1]], thresholds, 1)
    for target in [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 0.95]:
        assert _threshold_for_far(far, thresholds, target) == pytest.approx(float(spline(target)))
    assert _threshold_for_far(far, thresholds, 0.05) == pytest.approx(0.25)
    assert _threshold_for_far(far, thresholds, 0.1) == pytest.approx(0.4)  # end of plateau
    assert _threshold_for_far(far[:5], thresholds[:5], 0.5) == 0.0  # target never reached


def test_roc_points_agree_with_sklearn_roc_curve() -> None:
    rng = np.random.default_rng(3)
    n = 500
    emb = rng.normal(size=(2 * n, 8))
    same = rng.random(n) < 0.4
    dist = pair_distances(emb)
    fpr_sk, tpr_sk, thr_sk = roc_curve(same, -dist, drop_intermediate=False)
    # sklearn predicts positive for score >= s, i.e. dist <= -s; ours is dist < t, so the
    # matching threshold is the next float above -s.
    finite = np.isfinite(thr_sk)
    ours_t = np.nextafter(-thr_sk[finite], np.inf)
    tpr, fpr = roc_points(dist, same, ours_t)
    np.testing.assert_allclose(tpr, tpr_sk[finite], atol=1e-12)
    np.testing.assert_allclose(fpr, fpr_sk[finite], atol=1e-12)
    assert len(ours_t) == n  # distinct distances: one ROC point each

    # and the fold-averaged curve in the result spans the full range
    result = kfold_verification(emb, same)
    assert result.tpr[0] == 0.0 and result.fpr[0] == 0.0
    assert result.tpr[-1] == 1.0 and result.fpr[-1] == 1.0
    assert np.all(np.diff(result.tpr) >= 0) and np.all(np.diff(result.fpr) >= 0)


@pytest.mark.parametrize(("n", "k"), [(10, 10), (6000, 10), (23, 4), (7, 3), (9, 2)])
def test_folds_are_contiguous_unshuffled_blocks(n: int, k: int) -> None:
    """insightface's LFold: k contiguous test blocks in order, the first n % k one longer,
    each fold training on the rest (written out here, not taken from sklearn)."""
    ours = _kfold_splits(n, k)
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    starts = np.cumsum([0, *sizes])
    assert len(ours) == k
    for i, (tr, te) in enumerate(ours):
        np.testing.assert_array_equal(te, np.arange(starts[i], starts[i + 1]))
        np.testing.assert_array_equal(tr, np.setdiff1d(np.arange(n), te))
    tr, te = _kfold_splits(n, 1)[0]  # one fold: train and test on everything
    np.testing.assert_array_equal(tr, np.arange(n))
    np.testing.assert_array_equal(te, np.arange(n))


def test_as_dict_is_json_ready() -> None:
    result = kfold_verification_from_distances(HAND_D, HAND_SAME, 4, 0.4)
    d = json.loads(json.dumps(result.as_dict()))
    assert d["accuracy_mean"] == pytest.approx(0.75)
    assert d["fold_accuracies"] == [1.0, 0.5, 0.5, 1.0]
    assert "tpr" not in d
    with_roc = result.as_dict(include_roc=True)
    assert len(with_roc["tpr"]) == len(with_roc["thresholds"]) == 400


def test_bad_inputs_name_the_argument() -> None:
    emb = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(ValueError, match="issame has 9 entries"):
        kfold_verification(emb, np.ones(9, bool))
    with pytest.raises(ValueError, match=r"\[2N, D\]"):
        kfold_verification(emb[:19], np.ones(9, bool))
    with pytest.raises(ValueError, match="nfolds"):
        kfold_verification(emb, np.ones(10, bool), nfolds=11)
    with pytest.raises(ValueError, match="far_target"):
        kfold_verification(emb, np.ones(10, bool), far_target=2.0)
    with pytest.raises(ValueError, match="NaN"):
        kfold_verification(np.full((20, 4), np.nan), np.ones(10, bool))
    with pytest.raises(ValueError, match="issame"):
        kfold_verification(emb, np.ones(10) * 0.5)


# ----------------------------------------------------------------------------- embeddings


class PixelProbe(nn.Module):
    """Embedding = (R, G, B) of the top-left pixel, and a constant 1 to expose the scale."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :, 0, 0], torch.ones(len(x), 1)], dim=1)  # [B, 4]


class LinearEmbed(nn.Module):
    """Not flip-invariant: a fixed random projection of all pixels; records batch sizes."""

    def __init__(self, hw: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * hw * hw, dim, bias=False)
        self.bn = nn.BatchNorm1d(dim)
        self.batches: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(len(x))
        return self.bn(self.proj(x.flatten(1)))


def test_extract_embeddings_normalises_pixels_rgb_first() -> None:
    img = np.zeros((1, 4, 4, 3), np.uint8)
    img[0, 0, 0] = (255, 0, 128)
    emb = extract_embeddings(
        PixelProbe(), img, batch_size=8, device=torch.device("cpu"), flip=False
    )
    raw = np.array([1.0, -1.0, 0.5 / 127.5, 1.0])
    np.testing.assert_allclose(emb[0], raw / np.linalg.norm(raw), rtol=1e-6)
    assert emb.dtype == np.float32


def test_extract_embeddings_adds_the_flipped_embedding() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 6, 6, 3), dtype=np.uint8)
    model = LinearEmbed(6, 5).eval()
    w = model.proj.weight.detach().double().numpy()  # [5, 108]

    def manual(imgs: np.ndarray) -> np.ndarray:
        x = (imgs.astype(np.float64) - 127.5) / 127.5
        x = x.transpose(0, 3, 1, 2).reshape(len(imgs), -1)  # CHW flatten, as the model sees it
        return x @ w.T / np.sqrt(1.0 + 1e-5)  # eval BN with fresh running stats

    plain = manual(images)
    flipped = manual(images[:, :, ::-1, :])  # horizontal flip = reverse the width axis
    expected_flip = plain + flipped
    expected_flip /= np.linalg.norm(expected_flip, axis=1, keepdims=True)
    expected_plain = plain / np.linalg.norm(plain, axis=1, keepdims=True)

    got = extract_embeddings(model, images, batch_size=4, device=torch.device("cpu"))
    np.testing.assert_allclose(got, expected_flip, atol=1e-5)
    got_plain = extract_embeddings(model, images, 4, torch.device("cpu"), flip=False)
    np.testing.assert_allclose(got_plain, expected_plain, atol=1e-5)
    assert np.abs(expected_flip - expected_plain).max() > 0.1  # the flip really matters here
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_extract_embeddings_rebatches_chunks_and_restores_modes() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(9, 6, 6, 3), dtype=np.uint8)
    model = LinearEmbed(6, 5)
    model.train()
    model.proj.eval()  # a submodule in a different mode must come back as it was
    running = model.bn.running_mean.clone()
    whole = extract_embeddings(model, images, 4, torch.device("cpu"), flip=False)
    assert model.batches == [4, 4, 1]
    model.batches.clear()
    chunks = [images[:3], images[3:8], images[8:]]
    parts = extract_embeddings(model, iter(chunks), 4, torch.device("cpu"), flip=True)
    assert model.batches == [4, 4, 4, 4, 1, 1]  # [plain, flipped] per batch
    np.testing.assert_allclose(
        extract_embeddings(model, chunks, 4, torch.device("cpu"), flip=False), whole, atol=1e-6
    )
    assert parts.shape == (9, 5)
    assert model.training is True and model.bn.training is True and model.proj.training is False
    assert torch.equal(model.bn.running_mean, running)  # ran in eval mode: stats untouched


def test_extract_embeddings_rejects_bad_images_and_devices() -> None:
    model = PixelProbe()
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"images\[0\].*uint8"):
        extract_embeddings(model, np.zeros((2, 4, 4, 3), np.float32), 2, cpu)
    with pytest.raises(ValueError, match=r"images\[1\].*RGB"):
        extract_embeddings(
            model, [np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 4, 4, 1), np.uint8)], 2, cpu
        )
    with pytest.raises(ValueError, match=r"images\[1\].*differs"):
        extract_embeddings(
            model, [np.zeros((2, 4, 4, 3), np.uint8), np.zeros((2, 5, 4, 3), np.uint8)], 2, cpu
        )
    with pytest.raises(ValueError, match="batch_size"):
        extract_embeddings(model, np.zeros((2, 4, 4, 3), np.uint8), 0, cpu)
    with pytest.raises(ValueError, match="empty"):
        extract_embeddings(model, [], 2, cpu)
    with pytest.raises(ValueError, match="meta"):
        extract_embeddings(
            LinearEmbed(4, 2), np.zeros((2, 4, 4, 3), np.uint8), 2, torch.device("meta")
        )


# ----------------------------------------------------------------------------- baseline


def test_cosine_pixel_baseline_matches_flattened_pixels() -> None:
    rng = np.random.default_rng(4)
    n = 60
    faces = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    images = np.empty((2 * n, 8, 8, 3), np.uint8)
    images[0::2] = faces
    same = rng.random(n) < 0.5
    noisy = np.clip(faces.astype(int) + rng.integers(-20, 21, size=faces.shape), 0, 255)
    images[1::2] = np.where(same[:, None, None, None], noisy, rng.permutation(faces))
    result = cosine_pixel_baseline(images, same, nfolds=5, pixel_chunk_pairs=7)
    flat = (images.reshape(2 * n, -1).astype(np.float64) - 127.5) / 127.5
    reference = kfold_verification(flat, same, nfolds=5)
    assert result.fold_accuracies == reference.fold_accuracies
    assert result.val_mean == reference.val_mean
    assert result.accuracy_mean > 0.9  # near-duplicates vs other images: pixels suffice
    with pytest.raises(ValueError, match="even"):
        cosine_pixel_baseline(images[:3], same[:1])
    with pytest.raises(ValueError, match="uint8"):
        cosine_pixel_baseline(images.astype(np.float32), same)
