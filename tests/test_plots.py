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
    pair_angle_figure,
    pair_angles,
    plot_pair_angle_histograms,
    plot_roc_curves,
    roc_figure,
    threshold_angle,
)
from evaluation.roc import roc_curve
from evaluation.run_plots import (
    load_history,
    metric_label,
    plot_run,
    plot_target_angle_history,
    run_figures,
)
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
    path = plot_roc_curves({"good": good, "lfw": bad}, tmp_path / "sub" / "roc.png")
    assert_real_png(path, (600, 480))
    with pytest.raises(ValueError, match="empty"):
        plot_roc_curves({}, tmp_path / "x.png")
    # The title names the model and its step, and each set's number of pairs.
    fig = roc_figure({"good": good, "lfw": bad}, model="r50, step 1200 (run ms1mv3)")
    title = fig.axes[0].get_title()
    assert title == "ROC of r50, step 1200 (run ms1mv3)\ngood: 5500 pairs, LFW: 5500 pairs"
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [f"good (AUC {good.auc():.4f})", f"LFW (AUC {bad.auc():.4f})"]


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


def test_pair_angle_histogram_marks_the_decision_threshold() -> None:
    """The k-fold squared-distance threshold is drawn as the angle it decides at."""
    assert threshold_angle(2.0) == pytest.approx(90.0)  # d = 2 - 2 cos: cos 0
    assert threshold_angle(1.0) == pytest.approx(60.0)  # cos 0.5
    assert threshold_angle(4.5) == pytest.approx(180.0)  # beyond the range: clipped
    rng = np.random.default_rng(1)
    emb, same = rng.normal(size=(40, 8)), np.arange(20) < 10
    fig = pair_angle_figure(emb, same, title="LFW: 20 pairs, r50", threshold=1.0)
    ax = fig.axes[0]
    marks = [line for line in ax.get_lines() if line.get_label().startswith("decision threshold")]
    assert len(marks) == 1 and np.allclose(marks[0].get_xdata(), 60.0)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "decision threshold 60.0 deg (10-fold best-accuracy threshold, mean)" in legend
    assert ax.get_title() == "LFW: 20 pairs, r50"
    unmarked = pair_angle_figure(emb, same)
    assert not [x for x in unmarked.axes[0].get_lines() if "threshold" in x.get_label()]


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


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_run_figures_have_readable_legends(tmp_path: Path) -> None:
    """Loss, lr, eval per set and the angle statistics against the step, each curve named in
    words (no logged key in a legend); a subject nothing was logged for is left out."""
    rows = history_rows()
    for i, row in enumerate(rows):
        if "train/loss" in row:
            row.update({"train/loss_ce": 9.0, "train/loss_aux_center": 1.0, "train/lr": 0.1})
            row["train/embedding_norm_mean"] = 20.0 + i
    for step, acc in ((0, 0.5), (100, 0.8), (200, 0.7)):
        for name in ("lfw", "agedb_30"):
            prefix = f"eval/{name}/"
            rows.append({"_step": step, prefix + "accuracy": acc, prefix + "best_accuracy": 0.8,
                         prefix + "roc_auc": 0.9, prefix + "tar_at_far_1e-4": 0.3,
                         prefix + "tar_at_far_1e-3": 0.4})  # fmt: skip
    figures = run_figures(rows)
    assert sorted(figures) == ["angles", "embedding_norm", "eval", "loss", "lr"]
    texts = {name: legend_texts(fig) for name, fig in figures.items()}
    assert texts["loss"] == [
        "loss (total)",
        "margin softmax cross-entropy",
        "auxiliary loss: center",
    ]
    assert texts["lr"] == ["learning rate (backbone)"]
    assert texts["embedding_norm"] == ["embedding norm (mean, before normalisation)"]
    assert texts["eval"] == [
        "val accuracy", "LFW accuracy", "LFW best accuracy so far", "AgeDB-30 accuracy",
        "AgeDB-30 best accuracy so far", "LFW ROC AUC", "LFW TAR @ FAR 1e-4",
        "LFW TAR @ FAR 1e-3", "AgeDB-30 ROC AUC", "AgeDB-30 TAR @ FAR 1e-4",
        "AgeDB-30 TAR @ FAR 1e-3",
    ]  # fmt: skip
    assert texts["angles"] == [
        "target angle (mean)", "target angle +-1 std", "target angle (10th percentile)",
        "target angle (90th percentile)", "hardest negative angle (mean)",
    ]  # fmt: skip
    for text in (t for ts in texts.values() for t in ts):
        assert "/" not in text and "_" not in text, text  # no raw key
    # The eval curves are drawn at the logged steps with the logged values.
    eval_ax = figures["eval"].axes[0]
    lfw = next(line for line in eval_ax.get_lines() if line.get_label() == "LFW accuracy")
    assert list(lfw.get_xdata()) == [0, 100, 200] and list(lfw.get_ydata()) == [0.5, 0.8, 0.7]
    assert metric_label("angles/target_angle_p50_deg") == "target angle (median)"
    assert metric_label("eval/my_set/val_at_far_1e-3") == "my_set VAL @ FAR 1e-3"
    assert metric_label("train/some_new_key") == "some new key"

    log = tmp_path / "h.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in rows))
    paths = plot_run(log, tmp_path / "out")
    assert sorted(paths) == sorted(figures)
    for path in paths.values():
        assert path.parent == tmp_path / "out"
        assert_real_png(path, Image.open(path).size)
    log.write_text(json.dumps({"_step": 1, "data/skipped_records": 2}))
    with pytest.raises(ValueError, match="no loss, lr, eval or angle"):
        plot_run(log, tmp_path / "none")


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
