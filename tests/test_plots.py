"""Tests for evaluation/plots.py and toy_plots.py: every figure is written and non-trivial,
and the toys are robust."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import partialfc
from evaluation.plots import (
    load_history,
    pair_angles,
    plot_pair_angle_histograms,
    plot_roc_curves,
    plot_target_angle_history,
)
from evaluation.roc import roc_curve
from evaluation.toy_plots import _toy_data as toy_data
from evaluation.toy_plots import make_toy_plots, train_toy_head


def assert_real_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The file is a PNG of ``size`` (W, H) with actual drawing on it; returns its pixels."""
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        assert img.size == size
        pixels = np.asarray(img.convert("RGB")).astype(float)
    assert pixels.std() > 10  # not blank
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # lines, text, fills
    return pixels


def test_roc_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(500, bool), np.zeros(5000, bool)]
    good = roc_curve(np.r_[rng.normal(2, 1, 500), rng.normal(0, 1, 5000)], labels)
    bad = roc_curve(np.r_[rng.normal(0.5, 1, 500), rng.normal(0, 1, 5000)], labels)
    path = plot_roc_curves({"good": good, "bad": bad}, tmp_path / "sub" / "roc.png")
    assert_real_png(path, (600, 450))
    with pytest.raises(ValueError, match="empty"):
        plot_roc_curves({}, tmp_path / "x.png")


def test_pair_angles_hand_computed_and_histogram(tmp_path: Path) -> None:
    emb = np.array([[1, 0], [0, 2], [1, 1], [1, 1], [1, 0], [-1, 0]], dtype=float)
    pos, neg = pair_angles(emb, np.array([True, False, False]))
    np.testing.assert_allclose(pos, [90.0])
    np.testing.assert_allclose(neg, [0.0, 180.0], atol=1e-5)
    with pytest.raises(ValueError, match="2N"):
        pair_angles(emb[:5], np.array([True, False, False]))
    rng = np.random.default_rng(1)
    base = rng.normal(size=(300, 16))
    emb = np.empty((600, 16))
    emb[0::2] = base
    same = np.arange(300) < 150
    emb[1::2] = np.where(
        same[:, None], base + 0.5 * rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    )
    pos, neg = pair_angles(emb, same)
    assert pos.mean() < 40 < 80 < neg.mean()
    assert_real_png(plot_pair_angle_histograms(emb, same, tmp_path / "a.png"), (600, 450))


def history_rows(steps: int = 30, with_samples: bool = False) -> list[dict]:
    rng = np.random.default_rng(2)
    rows = []
    for s in range(10, 10 * (steps + 1), 10):
        mean = 90 - 50 * s / (10 * steps)
        row = {
            "_step": s,
            "train/loss": 10.0,
            "angles/target_angle_mean_deg": mean,
            "angles/target_angle_std_deg": 8.0,
            "angles/target_angle_p10_deg": mean - 10,
            "angles/target_angle_p90_deg": mean + 10,
            "angles/hardest_negative_angle_mean_deg": 75.0,
        }
        if with_samples and s % 20:
            row["angles/target_angle_sample_deg"] = rng.normal(mean, 8, 64).tolist()
        elif with_samples:  # as wandb.Histogram is logged: bin edges and counts
            counts, edges = np.histogram(rng.normal(mean, 8, 64), bins=16)
            row["angles/target_angle_hist"] = {
                "_type": "histogram",
                "bins": edges.tolist(),
                "values": counts.tolist(),
            }
        rows.append(row)
    rows.insert(1, {"_step": 15, "eval/val/accuracy": 0.9})  # rows without angles are fine
    return rows


def grey_fraction(pixels: np.ndarray) -> float:
    """Fraction of mid-grey pixels (the heat map is drawn in greys)."""
    greys = np.all(np.abs(pixels - pixels.mean(axis=2, keepdims=True)) < 3, axis=2)
    return float((greys & (pixels[..., 0] < 230) & (pixels[..., 0] > 60)).mean())


def test_target_angle_history(tmp_path: Path) -> None:
    fractions = []
    for with_samples in (False, True):
        log = tmp_path / f"history{with_samples}.jsonl"
        log.write_text("\n".join(json.dumps(r) for r in history_rows(with_samples=with_samples)))
        rows = load_history(log)
        assert len(rows) == 31 and rows[0]["_step"] == 10
        path = plot_target_angle_history(rows, tmp_path / f"angles{with_samples}.png")
        fractions.append(grey_fraction(assert_real_png(path, (700, 450))))
    # the heat map of the logged angle samples adds a grey band around the mean curve
    assert fractions[1] > fractions[0] + 0.005
    with pytest.raises(ValueError, match="target_angle_mean_deg"):
        plot_target_angle_history([{"_step": 1, "train/loss": 1.0}], tmp_path / "x.png")
    log.write_text('{"_step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"historyTrue\.jsonl:2"):
        load_history(log)


def test_toy_training_learns_the_digits() -> None:
    data = toy_data(4, seed=0)
    head = partialfc.build_margin("arcface", s=16.0, m2=0.3)
    model = train_toy_head("arcface", head, data, steps=120, lr=0.02)
    assert model.test_accuracy > 0.85
    assert model.losses[-1] < model.losses[0]
    baseline = train_toy_head("softmax", None, data, steps=120, lr=0.02)
    assert baseline.test_accuracy > 0.85 and baseline.bias is not None


def test_toy_plots_cover_every_registered_head(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    res = make_toy_plots(tmp_path, steps=3, resolution=40, num_classes=4)
    assert torch.get_num_threads() == before
    expected = ["softmax", *partialfc.margin_names()]
    assert set(res.files) | set(res.skipped) == set(expected)
    assert {"softmax", "arcface", "cosface"} <= set(res.files)
    for name, path in res.files.items():
        assert path == tmp_path / f"toy_{name}.png"
        assert_real_png(path, (550, 550))
        assert 0.0 <= res.accuracy[name] <= 1.0


class _NeedsContext(nn.Module):
    """A head whose forward takes another interface than (cos, target)."""

    def forward(self, ctx: dict) -> torch.Tensor:
        return ctx["cos"]


def test_toy_plots_skip_heads_they_cannot_use(tmp_path: Path, monkeypatch) -> None:
    real_build = partialfc.build_margin

    def build(name: str, **kwargs):
        if name == "needs_arg":
            raise ValueError("margin 'needs_arg' needs k; missing ['k']")
        if name == "other_interface":
            return _NeedsContext()
        return real_build(name, **kwargs)

    monkeypatch.setattr(partialfc, "build_margin", build)
    monkeypatch.setattr(
        partialfc, "margin_names", lambda: ["arcface", "needs_arg", "other_interface"]
    )
    res = make_toy_plots(
        tmp_path,
        heads=["arcface", "needs_arg", "other_interface", "nonexistent"],
        head_kwargs={"arcface": {"s": 8.0, "m2": 0.2}},
        steps=2,
        resolution=30,
        num_classes=3,
    )
    assert list(res.files) == ["arcface"]
    assert "missing ['k']" in res.skipped["needs_arg"]
    assert res.skipped["other_interface"].startswith("TypeError")
    assert "not a registered margin head" in res.skipped["nonexistent"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_arcface.png"]
    with pytest.raises(ValueError, match="num_classes"):
        make_toy_plots(tmp_path, num_classes=11)
