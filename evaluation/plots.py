"""Figures as PNG: ROC curves, pair-angle histograms, target angles over training.

* :func:`plot_roc_curves`: TAR against log FAR for one or more sets, TAR@FAR marks.
* :func:`plot_pair_angle_histograms`: angles between the two embeddings of positive and of
  negative pairs (ArcFace paper, Fig. 7): the gap between the two humps is what a threshold
  separates.
* :func:`plot_target_angle_history`: how the angle between embeddings and their class centre
  shrinks during training, from the statistics the trainer logs to wandb (mean +- std, the
  percentiles and the hardest negative angle when logged, and a heat map when a sample of
  target angles is logged per step).

The 2-D toy figure of each margin loss lives in :mod:`evaluation.toy_plots`; the figure and
PNG helpers both use (Agg canvas, no pyplot, so plotting changes no global state) in
:mod:`evaluation.figures`. ``python -m evaluation.plots toy --out DIR`` regenerates the toy
figures, ``python -m evaluation.plots history RUN --out FILE`` draws a run's angle history.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.figures import new_figure, save_png
from evaluation.roc import DEFAULT_FARS, RocCurve, tar_at_far
from evaluation.toy_plots import make_toy_plots
from evaluation.verification import l2_normalize

__all__ = [
    "load_history",
    "pair_angles",
    "plot_pair_angle_histograms",
    "plot_roc_curves",
    "plot_target_angle_history",
]


# ------------------------------------------------------------------------------ ROC


def plot_roc_curves(
    curves: Mapping[str, RocCurve],
    path: str | os.PathLike[str],
    fars: Sequence[float] = DEFAULT_FARS,
    title: str = "ROC",
) -> Path:
    """TAR vs FAR (log axis) of every curve, with its TAR@FAR points marked."""
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    lowest = 1.0
    for name, curve in curves.items():
        keep = curve.fpr > 0  # log axis: FAR 0 cannot be drawn
        ax.plot(curve.fpr[keep], curve.tpr[keep], label=f"{name} (AUC {curve.auc():.4f})")
        if keep.any():
            lowest = min(lowest, float(curve.fpr[keep].min()))
        rows = [r for r in tar_at_far(curve, fars) if r.resolvable]
        ax.scatter([r.far for r in rows if r.far > 0], [r.tar for r in rows if r.far > 0], s=12)
    ax.set_xscale("log")
    ax.set_xlim(max(min(fars), lowest / 2), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return save_png(fig, path)


# ------------------------------------------------------------------------------ pair angles


def pair_angles(embeddings: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angles in degrees between rows (2i, 2i+1) of ``embeddings`` [2N, D]: (positive, negative)."""
    emb = l2_normalize(np.asarray(embeddings))
    same = np.asarray(issame, dtype=bool)
    if emb.shape[0] != 2 * len(same):
        raise ValueError(f"embeddings has {emb.shape[0]} rows for {len(same)} pairs (need 2N)")
    cos = np.clip(np.sum(emb[0::2] * emb[1::2], axis=1), -1.0, 1.0)  # [N]
    deg = np.degrees(np.arccos(cos))
    return deg[same], deg[~same]


def plot_pair_angle_histograms(
    embeddings: np.ndarray,
    issame: np.ndarray,
    path: str | os.PathLike[str],
    bins: int = 90,
    title: str = "pair angles",
) -> Path:
    """Histograms of positive- and negative-pair angles (0-180 degrees) on shared bins."""
    pos, neg = pair_angles(embeddings, issame)
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(0.0, 180.0, bins + 1)
    for values, name, colour in ((pos, "positive", "tab:green"), (neg, "negative", "tab:red")):
        if len(values):
            label = f"{name} pairs (n={len(values)}, mean {values.mean():.1f} deg)"
            ax.hist(values, bins=edges, alpha=0.6, color=colour, label=label)
    ax.set_xlim(0, 180)
    ax.set_xlabel("angle between the pair's embeddings (degrees)")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_png(fig, path)


# ------------------------------------------------------------------------------ training angles


def load_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Logged rows of a run: a wandb run folder or ``run-*.wandb`` file, or a JSON-lines file."""
    import json

    from evaluation.wandb_offline import find_run_log, read_history

    p = Path(path)
    if p.is_dir():
        return read_history(find_run_log(p))
    if p.suffix == ".wandb":
        return read_history(p)
    rows = []
    for lineno, line in enumerate(p.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{lineno}: not a JSON object ({e})") from e
    return rows


def _series(rows: Sequence[Mapping[str, Any]], suffix: str) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for i, row in enumerate(rows):
        for key, value in row.items():
            if key.endswith(suffix) and isinstance(value, int | float):
                steps.append(row.get("_step", i))
                values.append(float(value))
                break
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _as_weighted_samples(value: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Logged angles as (values, weights): a plain list of angles, or a wandb histogram dict
    (``{"_type": "histogram", "bins": [B+1 edges], "values": [B counts]}``, bin centres)."""
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        v = np.asarray(value, dtype=np.float64)
        return v, np.ones_like(v)
    if isinstance(value, dict) and value.get("_type") == "histogram":
        bins = np.asarray(value.get("bins", []), dtype=np.float64)
        counts = np.asarray(value.get("values", []), dtype=np.float64)
        if len(bins) == len(counts) + 1 and len(counts):
            return (bins[:-1] + bins[1:]) / 2, counts
    return None


def plot_target_angle_history(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "target angle during training",
) -> Path:
    """Target-angle statistics against the step, from logged rows (``_step`` + angle keys).

    Keys are matched by suffix, so any prefix (``angles/``) works: ``target_angle_mean_deg``
    (required) with ``target_angle_std_deg`` (a +-1 std band), ``target_angle_pNN_deg``
    percentiles, ``hardest_negative_angle_mean_deg``, and a key containing ``target_angle``
    and ``sample`` or ``hist`` whose value is a list of angles or a wandb histogram (a
    per-step heat map of the distribution).
    """
    steps, mean = _series(rows, "target_angle_mean_deg")
    if len(steps) == 0:
        raise ValueError("no row has a '*target_angle_mean_deg' value: nothing to plot")
    samples = [
        (row.get("_step", i), hist)
        for i, row in enumerate(rows)
        for key, value in row.items()
        if "target_angle" in key and ("sample" in key or "hist" in key)
        for hist in [_as_weighted_samples(value)]
        if hist is not None
    ]
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    if samples:
        edges = np.linspace(0.0, 180.0, 91)
        grid = np.stack([np.histogram(v, bins=edges, weights=w)[0] for _, (v, w) in samples])
        xs = np.asarray([s for s, _ in samples], dtype=float)
        x_edges = np.r_[xs, xs[-1] + (xs[-1] - xs[-2] if len(xs) > 1 else 1.0)]
        ax.pcolormesh(x_edges, edges, grid.T, cmap="Greys", shading="flat", alpha=0.6)
    ax.plot(steps, mean, color="tab:blue", label="target angle (mean)")
    std_steps, std = _series(rows, "target_angle_std_deg")
    if len(std) == len(mean):
        ax.fill_between(steps, mean - std, mean + std, color="tab:blue", alpha=0.2, label="+-1 std")
    percentile_keys = sorted(
        {
            m.group(0)
            for row in rows
            for k in row
            for m in [re.search(r"target_angle_p\d+_deg$", k)]
            if m
        }
    )
    for key in percentile_keys:
        p_steps, p_values = _series(rows, key)
        ax.plot(p_steps, p_values, linestyle=":", linewidth=1, label=key.replace("_deg", ""))
    neg_steps, neg = _series(rows, "hardest_negative_angle_mean_deg")
    if len(neg):
        ax.plot(neg_steps, neg, color="tab:red", label="hardest negative angle (mean)")
    ax.set_ylim(0, 180)
    ax.set_xlabel("step")
    ax.set_ylabel("degrees")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m evaluation.plots toy --out DIR`` / ``history RUN --out FILE``."""
    parser = argparse.ArgumentParser(description="facetrain figures")
    sub = parser.add_subparsers(dest="what", required=True)
    toy = sub.add_parser("toy", help="2-D decision-boundary figure per margin head")
    toy.add_argument("--out", required=True, help="output folder")
    toy.add_argument("--heads", nargs="*", default=None, help="default: softmax + every head")
    toy.add_argument("--steps", type=int, default=300)
    toy.add_argument("--classes", type=int, default=8)
    toy.add_argument("--seed", type=int, default=0)
    hist = sub.add_parser("history", help="target angle over training from a wandb run")
    hist.add_argument("run", help="wandb run folder, run-*.wandb file or JSON-lines file")
    hist.add_argument("--out", required=True, help="output PNG")
    args = parser.parse_args(argv)
    if args.what == "toy":
        res = make_toy_plots(
            args.out, args.heads, steps=args.steps, num_classes=args.classes, seed=args.seed
        )
        for name, path in res.files.items():
            print(f"{name:<16} test accuracy {100 * res.accuracy[name]:5.1f}%  -> {path}")
        for name, reason in res.skipped.items():
            print(f"{name:<16} skipped: {reason}")
        return 0 if res.files else 1
    path = plot_target_angle_history(load_history(args.run), args.out)
    print(f"target angle history -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
