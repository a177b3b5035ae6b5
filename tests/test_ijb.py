"""Tests for evaluation/ijb.py on small synthetic metadata files in the IJB layout."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataio.align import ARCFACE_TEMPLATE_112, align_face
from evaluation.ijb import (
    IJBError,
    evaluate_ijb,
    ijb_verification,
    read_ijb_meta,
    template_features,
    template_pair_scores,
)

# image -> (template, media, feature, faceness); worked by hand in the tests below
IMAGES = [
    ("a/0.jpg", 1, 10, [1.0, 0.0], 1.0),
    ("a/1.jpg", 1, 10, [0.0, 1.0], 1.0),
    ("a/2.jpg", 1, 11, [2.0, 0.0], 0.0),
    ("b/3.jpg", 2, 10, [0.0, 3.0], 1.0),  # media 10 again, but in another template
    ("c/4.jpg", 3, 12, [1.0, 1.0], 0.5),
    ("c/5.jpg", 3, 13, [-1.0, 1.0], 0.5),
]
PAIRS = [(1, 2, 1), (1, 3, 0), (2, 3, 1)]
FEATS = np.array([f for _, _, _, f, _ in IMAGES])


def write_ijb(root: Path, name: str = "IJBC", image_size: tuple[int, int] | None = None) -> Path:
    """IJB layout: meta/<name>_*.txt and, with ``image_size``, solid-colour crops in loose_crop/.

    Image i is (H, W) = image_size filled with colour 20 * (i + 1) in channel i % 3, and its
    landmarks are the ArcFace template scaled by W / 112, H / 112.
    """
    meta = root / "meta"
    meta.mkdir(parents=True)
    prefix = name.lower()
    lmk_lines, tid_lines = [], []
    for i, (img, t, m, _, score) in enumerate(IMAGES):
        h, w = image_size or (112, 112)
        lmk = ARCFACE_TEMPLATE_112 * np.array([w / 112, h / 112])
        lmk_lines.append(" ".join([img, *(f"{v:.4f}" for v in lmk.ravel()), str(score)]))
        tid_lines.append(f"{img} {t} {m}")
        if image_size is not None:
            pixels = np.zeros((h, w, 3), dtype=np.uint8)
            pixels[:, :, i % 3] = 20 * (i + 1)
            path = root / "loose_crop" / img
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path, format="PNG")  # lossless, despite the name
    (meta / f"{prefix}_name_5pts_score.txt").write_text("\n".join(lmk_lines) + "\n")
    (meta / f"{prefix}_face_tid_mid.txt").write_text("\n".join(tid_lines) + "\n")
    pairs = "\n".join(f"{a} {b} {c}" for a, b, c in PAIRS)
    (meta / f"{prefix}_template_pair_label.txt").write_text(pairs + "\n")
    return root


def test_read_meta_parses_every_field(tmp_path: Path) -> None:
    meta = read_ijb_meta(write_ijb(tmp_path, "IJBB"), "IJBB")
    assert meta.name == "IJBB" and meta.image_names[2] == "a/2.jpg"
    assert meta.templates.tolist() == [1, 1, 1, 2, 3, 3]
    assert meta.medias.tolist() == [10, 10, 11, 10, 12, 13]
    assert meta.faceness.tolist() == [1.0, 1.0, 0.0, 1.0, 0.5, 0.5]
    np.testing.assert_allclose(meta.landmarks[0], ARCFACE_TEMPLATE_112, atol=1e-4)
    assert meta.pair_templates.tolist() == [[1, 2], [1, 3], [2, 3]]
    assert meta.pair_labels.tolist() == [True, False, True]
    assert meta.image_dir == tmp_path / "loose_crop"


def test_template_features_average_media_then_sum_templates() -> None:
    """t1: media 10 = mean([1,0], [0,1]) = [.5,.5], media 11 = [2,0] -> sum [2.5,.5];
    t2: [0,3] (its media 10 is not t1's media 10); t3: [1,1] + [-1,1] = [0,2]."""
    ids, feats = template_features(FEATS, [1, 1, 1, 2, 3, 3], [10, 10, 11, 10, 12, 13])
    assert ids.tolist() == [1, 2, 3]
    np.testing.assert_allclose(feats[0], np.array([2.5, 0.5]) / math.sqrt(6.5))
    np.testing.assert_allclose(feats[1], [0.0, 1.0])
    np.testing.assert_allclose(feats[2], [0.0, 1.0])
    scores = template_pair_scores(ids, feats, np.array([[1, 2], [1, 3], [2, 3], [3, 3]]), chunk=3)
    np.testing.assert_allclose(scores, [0.5 / math.sqrt(6.5), 0.5 / math.sqrt(6.5), 1.0, 1.0])


def test_verification_options_hand_computed(tmp_path: Path) -> None:
    meta = read_ijb_meta(write_ijb(tmp_path))
    # N1 D1 (insightface default): faceness 0 removes a/2.jpg: t1 = [.5, .5] -> cos 45 deg
    res = ijb_verification(FEATS, meta, fars=[0.5, 1.0])
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(res.scores, [r, r, 1.0])
    assert res.num_templates == 3 and res.num_images == 6
    # the impostor (r) ties with a genuine pair: TAR 1/2 needs threshold 1.0 (FAR 0)
    assert [row.tar for row in res.table] == [0.5, 1.0]
    assert res.as_dict()["num_genuine"] == 2 and res.as_dict()["num_pairs"] == 3
    # no detector score, raw norms: t1 = [2.5, .5]
    res = ijb_verification(FEATS, meta, use_detector_score=False)
    np.testing.assert_allclose(res.scores, [0.5 / math.sqrt(6.5)] * 2 + [1.0])
    # per-image normalisation first (N0): t1 = [.5, .5] + [1, 0] = [1.5, .5]
    res = ijb_verification(FEATS, meta, use_norm_score=False, use_detector_score=False)
    np.testing.assert_allclose(res.scores[0], 0.5 / math.sqrt(2.5))
    with pytest.raises(ValueError, match=r"image_feats must be \[6, D\]"):
        ijb_verification(FEATS[:5], meta)


def test_metadata_errors_name_file_and_line(tmp_path: Path) -> None:
    root = write_ijb(tmp_path / "a")
    tid = root / "meta" / "ijbc_face_tid_mid.txt"
    lines = tid.read_text().splitlines()
    lines[1], lines[2] = lines[2], lines[1]
    tid.write_text("\n".join(lines))
    with pytest.raises(IJBError, match=r"ijbc_face_tid_mid\.txt:2: image 'a/2\.jpg'"):
        read_ijb_meta(root)

    root = write_ijb(tmp_path / "b")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("1 2 1\n1 3 2\n")
    with pytest.raises(IJBError, match=r"template_pair_label\.txt:2: label must be 0 or 1"):
        read_ijb_meta(root)

    root = write_ijb(tmp_path / "c")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("a/0.jpg 1 2 3\n")
    with pytest.raises(IJBError, match=r"5pts_score\.txt:1: .*12 fields"):
        read_ijb_meta(root)

    with pytest.raises(IJBError, match="ijbb_name_5pts_score.txt: IJB metadata file not found"):
        read_ijb_meta(write_ijb(tmp_path / "d"), "IJBB")

    ids = np.array([1, 2])
    with pytest.raises(IJBError, match="template 7"):
        template_pair_scores(ids, np.eye(2), np.array([[1, 2], [2, 7]]))


def test_align_face_is_identity_on_template_and_undoes_a_scaling() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    out = align_face(img, ARCFACE_TEMPLATE_112)
    assert out.shape == (112, 112, 3)
    assert np.abs(out.astype(int) - img).max() <= 1
    # 2x nearest upscaling: original pixel j covers big pixels 2j, 2j+1, centre at 2j + 0.5
    big = img.repeat(2, axis=0).repeat(2, axis=1)
    out = align_face(big, 2 * ARCFACE_TEMPLATE_112 + 0.5)
    assert np.abs(out.astype(int) - img).max() <= 1
    # shift by 10 pixels to the right: the aligned crop is the original again
    shifted = np.zeros((112, 140, 3), np.uint8)
    shifted[:, 10:122] = img
    out = align_face(shifted, ARCFACE_TEMPLATE_112 + np.array([10.0, 0.0]))
    assert np.abs(out.astype(int) - img).max() <= 1


def _mean_colour_embedder(x: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] -> [B, 3]: per-channel mean shifted to be positive (a stand-in model)."""
    return x.mean(axis=(2, 3)) + 1.0


@pytest.mark.parametrize("image_size", [(112, 112), (150, 130)])
def test_evaluate_ijb_end_to_end(tmp_path: Path, image_size: tuple[int, int]) -> None:
    root = write_ijb(tmp_path, image_size=image_size)
    res = evaluate_ijb(_mean_colour_embedder, root, batch_size=4, progress=False)
    # expected: each solid crop aligned (the template maps inside the image: no border)
    feats = np.zeros((6, 3))
    for i in range(6):
        colour = np.zeros(3)
        colour[i % 3] = 20 * (i + 1)
        feats[i] = 2 * ((colour - 127.5) / 127.5 + 1.0)  # image + flip
    meta = read_ijb_meta(root)
    expected = ijb_verification(feats, meta)
    np.testing.assert_allclose(res.scores, expected.scores, atol=2e-3)
    assert res.num_images == 6 and res.table[0].far_target == 1e-6
    d = res.as_dict()
    assert d["num_templates"] == 3 and len(d["tar_at_far"]) == 6


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    root = write_ijb(tmp_path, image_size=(112, 112))
    (root / "loose_crop" / "c" / "5.jpg").unlink()
    with pytest.raises(IJBError, match=r"loose_crop/c/5\.jpg: cannot read"):
        evaluate_ijb(_mean_colour_embedder, root, progress=False)


def test_run_ijb_returns_json_ready_results_and_a_roc_plot(tmp_path: Path) -> None:
    from evaluation.runner import format_ijb_table, run_ijb

    root = write_ijb(tmp_path / "ijb", image_size=(112, 112))
    out = run_ijb(_mean_colour_embedder, root, plots_dir=tmp_path / "plots", progress=False)
    assert out["name"] == "IJBC" and out["num_pairs"] == 3 and out["num_genuine"] == 2
    assert [r["far_target"] for r in out["tar_at_far"]] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert Path(out["plots"][0]).name == "roc_ijbc.png"
    assert Path(out["plots"][0]).stat().st_size > 5000
    assert {r["method"] for r in out["tar_at_far"]} == {"conservative"}
    table = format_ijb_table(out)
    assert table.startswith("IJBC: 3 templates, 3 pairs (2 genuine)")
    assert "TAR@FAR, conservative reading: the best TAR at a FAR not above" in table
