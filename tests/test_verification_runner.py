"""Tests for evaluation/runner.py: what `facetrain eval` computes, prints and writes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from dataio.verification_bin import save_bin
from evaluation.roc import READINGS
from evaluation.runner import (
    format_identification_table,
    format_ijb_table,
    format_verification_table,
    run_verification,
    write_json,
)
from evaluation.verification import kfold_verification


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def mean_colour(x: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] -> [B, 3] channel means, shifted positive (a stand-in model)."""
    return x.mean(axis=(2, 3)) + 1.0


@pytest.fixture()
def bin_set(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """40 pairs of solid 8x8 crops: same pairs share a colour up to noise, others do not."""
    rng = np.random.default_rng(0)
    issame = np.arange(40) % 2 == 0
    colours = []
    for same in issame:
        a = rng.integers(0, 256, 3)
        b = np.clip(a + rng.integers(-40, 41, 3), 0, 255) if same else rng.integers(0, 256, 3)
        colours += [a, b]
    colours = np.array(colours, dtype=np.uint8)
    jpegs = [png(np.broadcast_to(c, (8, 8, 3)).copy()) for c in colours]
    path = tmp_path / "toy_set.bin"
    save_bin(path, jpegs, issame)
    return path, colours, issame


def test_run_verification_matches_the_protocol_and_sklearn(bin_set, tmp_path: Path) -> None:
    path, colours, issame = bin_set
    results = run_verification(
        mean_colour, [path], nfolds=4, plots_dir=tmp_path / "p", progress=False
    )
    res = results["toy_set"]
    emb = 2 * (colours / 127.5)  # (c - 127.5) / 127.5 + 1, image + flip
    expected = kfold_verification(emb, issame, nfolds=4)
    assert res["accuracy_mean"] == pytest.approx(expected.accuracy_mean)
    assert res["fold_thresholds"] == pytest.approx(list(expected.fold_thresholds))
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = np.sum(unit[0::2] * unit[1::2], axis=1)
    assert res["auc"] == pytest.approx(roc_auc_score(issame, cos), abs=1e-9)
    assert [r["far_target"] for r in res["tar_at_far"]] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    # 20 impostor pairs: only FAR 1e-1 is resolvable
    assert [r["resolvable"] for r in res["tar_at_far"]] == [False] * 5 + [True]
    assert sorted(Path(p).name for p in res["plots"]) == ["angles_toy_set.png", "roc.png"]
    assert all(Path(p).stat().st_size > 5000 for p in res["plots"])

    table = format_verification_table(results)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["set", "accuracy", "(%)"]
    assert lines[1].startswith("toy_set") and f"{100 * res['accuracy_mean']:.2f} +-" in lines[1]
    assert lines[-2] == f"TAR@FAR, {READINGS['conservative']}"
    assert lines[-1] == "* FAR below 1 / number of negative pairs: read at zero false accepts"

    out = write_json(results, tmp_path / "json" / "eval.json")
    back = json.loads(out.read_text())
    assert back["toy_set"]["accuracy_mean"] == pytest.approx(res["accuracy_mean"])
    # FAR 1e-6 < 1/20: read at zero false accepts, i.e. above the best impostor pair
    zero_far_tar = np.mean(cos[issame] > cos[~issame].max())
    assert back["toy_set"]["tar_at_far"][0]["tar"] == pytest.approx(zero_far_tar)
    assert back["toy_set"]["tar_at_far"][0]["far"] == 0.0
    assert {r["method"] for r in back["toy_set"]["tar_at_far"]} == {"conservative"}


def test_run_verification_rejects_a_non_bin_source(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="not a verification .bin set"):
        run_verification(mean_colour, [tmp_path], progress=False)


def test_ijb_and_identification_tables() -> None:
    ijb = {
        "name": "IJBC",
        "num_templates": 3,
        "num_pairs": 3,
        "num_genuine": 2,
        "auc": 0.75,
        "tar_at_far": [
            {"far_target": 1e-4, "tar": 0.5, "far": 0.0, "threshold": 1.0, "resolvable": False},
            {"far_target": 1e-1, "tar": 0.96, "far": 0.1, "threshold": 0.3, "resolvable": True},
        ],
    }
    for row in ijb["tar_at_far"]:
        row["method"] = "insightface"
    lines = format_ijb_table(ijb).splitlines()
    assert lines[0] == "IJBC: 3 templates, 3 pairs (2 genuine), AUC 0.7500"
    assert lines[2].split() == ["IJBC", "50.00*", "96.00"]
    assert lines[3] == f"TAR@FAR, {READINGS['insightface']}"
    assert lines[4].endswith("read at the nearest FAR on the curve, which may be above it")
    ident = {
        "rank_accuracy": {"1": 0.5, "5": 0.875},
        "num_trials": 8,
        "num_identities": 2,
        "num_distractors": 4,
    }
    lines = format_identification_table(ident).splitlines()
    assert "8 trials (2 identities), 4 distractors" in lines[0]
    assert lines[1].split() == ["rank-1", "rank-5"] and lines[2].split() == ["50.00", "87.50"]


def test_write_json_cleans_nan_and_numpy_values(tmp_path: Path) -> None:
    path = write_json(
        {"a": float("nan"), "b": np.float32(1.5), "c": [np.int64(3), -np.inf]}, tmp_path / "x.json"
    )
    assert json.loads(path.read_text()) == {"a": None, "b": 1.5, "c": [3, None]}
