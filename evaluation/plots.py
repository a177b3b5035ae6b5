"""Figures of an evaluation as PNG: ROC curves and pair-angle histograms.

* :func:`plot_roc_curves`: TAR against log FAR for one or more sets, TAR@FAR marks; the title
  names the model (and its training step) and each set's number of pairs.
* :func:`plot_pair_angle_histograms`: angles between the two embeddings of positive and of
  negative pairs (ArcFace paper, Fig. 7): the gap between the two humps is what a threshold
  separates, and the verification's decision threshold is marked as an angle.

Each has a ``*_figure`` twin that returns the matplotlib figure instead of writing it. A run's
curves against the step (loss, lr, accuracy, angle statistics) are
:mod:`evaluation.run_plots`; the 2-D toy figure of each margin loss lives in
:mod:`evaluation.toy_plots`; the figure and PNG helpers all use (Agg canvas, no pyplot, so
plotting changes no global state) in :mod:`evaluation.figures`. ``python -m evaluation.plots
toy --out DIR`` regenerates the toy figures, ``python -m evaluation.plots history RUN --out
DIR`` draws a run's curves.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.figures import new_figure, save_png
from evaluation.roc import DEFAULT_FARS, RocCurve, tar_at_far
from evaluation.run_plots import plot_run, set_label
from evaluation.toy_plots import make_toy_plots
from evaluation.verification import l2_normalize

__all__ = [
    "pair_angle_figure",
    "pair_angles",
    "plot_pair_angle_histograms",
    "plot_roc_curves",
    "roc_figure",
    "threshold_angle",
]


# ------------------------------------------------------------------------------ ROC


def roc_figure(
    curves: Mapping[str, RocCurve], fars: Sequence[float] = DEFAULT_FARS, model: str | None = None
) -> Any:
    """TAR vs FAR (log axis) of every curve, with its TAR@FAR points marked. The title names
    ``model`` (what was evaluated, e.g. "r50, step 1200 (run ms1mv3)") and each curve's pairs."""
    if not curves:
        raise ValueError("curves is empty: nothing to plot")
    fig = new_figure(6.0, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    lowest = 1.0
    for name, curve in curves.items():
        keep = curve.fpr > 0  # log axis: FAR 0 cannot be drawn
        label = f"{set_label(name)} (AUC {curve.auc():.4f})"
        ax.plot(curve.fpr[keep], curve.tpr[keep], label=label)
        if keep.any():
            lowest = min(lowest, float(curve.fpr[keep].min()))
        rows = [r for r in tar_at_far(curve, fars) if r.resolvable]
        ax.scatter([r.far for r in rows if r.far > 0], [r.tar for r in rows if r.far > 0], s=12)
    ax.set_xscale("log")
    ax.set_xlim(max(min(fars), lowest / 2), 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    pairs = ", ".join(
        f"{set_label(name)}: {c.num_positives + c.num_negatives} pairs"
        for name, c in curves.items()
    )
    ax.set_title(f"ROC of {model or 'the model'}\n{pairs}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def plot_roc_curves(
    curves: Mapping[str, RocCurve],
    path: str | os.PathLike[str],
    fars: Sequence[float] = DEFAULT_FARS,
    model: str | None = None,
) -> Path:
    """:func:`roc_figure` written as PNG to ``path``."""
    return save_png(roc_figure(curves, fars, model), path)


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


def threshold_angle(threshold: float) -> float:
    """The angle in degrees at which a squared L2 distance ``threshold`` between unit vectors
    decides: ``d = 2 - 2 cos``, so ``arccos(1 - d / 2)``."""
    return float(np.degrees(np.arccos(np.clip(1.0 - threshold / 2.0, -1.0, 1.0))))


def pair_angle_figure(
    embeddings: np.ndarray,
    issame: np.ndarray,
    bins: int = 90,
    title: str = "pair angles",
    threshold: float | None = None,
) -> Any:
    """Histograms of positive- and negative-pair angles (0-180 degrees) on shared bins, and
    the decision threshold as an angle: ``threshold`` is the k-fold protocol's squared-distance
    threshold (``VerificationResult.best_threshold``, the mean over folds of the threshold
    with the best accuracy on the other folds); pairs below the angle are called "same"."""
    pos, neg = pair_angles(embeddings, issame)
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(0.0, 180.0, bins + 1)
    for values, name, colour in ((pos, "positive", "tab:green"), (neg, "negative", "tab:red")):
        if len(values):
            label = f"{name} pairs (n={len(values)}, mean {values.mean():.1f} deg)"
            ax.hist(values, bins=edges, alpha=0.6, color=colour, label=label)
    if threshold is not None:
        angle = threshold_angle(threshold)
        label = f"decision threshold {angle:.1f} deg (10-fold best-accuracy threshold, mean)"
        ax.axvline(angle, color="black", linestyle="--", linewidth=1.5, label=label)
    ax.set_xlim(0, 180)
    ax.set_xlabel("angle between the pair's embeddings (degrees)")
    ax.set_ylabel("pairs")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return fig


def plot_pair_angle_histograms(
    embeddings: np.ndarray,
    issame: np.ndarray,
    path: str | os.PathLike[str],
    bins: int = 90,
    title: str = "pair angles",
    threshold: float | None = None,
) -> Path:
    """:func:`pair_angle_figure` written as PNG to ``path``."""
    return save_png(pair_angle_figure(embeddings, issame, bins, title, threshold), path)


def main(argv: list[str] | None = None) -> int:
    """``python -m evaluation.plots toy --out DIR`` / ``history RUN --out DIR``."""
    parser = argparse.ArgumentParser(description="facetrain figures")
    sub = parser.add_subparsers(dest="what", required=True)
    toy = sub.add_parser("toy", help="2-D decision-boundary figure per margin head")
    toy.add_argument("--out", required=True, help="output folder")
    toy.add_argument("--heads", nargs="*", default=None, help="default: softmax + every head")
    toy.add_argument("--steps", type=int, default=300)
    toy.add_argument("--classes", type=int, default=8)
    toy.add_argument("--seed", type=int, default=0)
    hist = sub.add_parser("history", help="a run's loss, lr, accuracy and angles by step")
    hist.add_argument("run", help="run folder, run-*.wandb file or JSON-lines file")
    hist.add_argument("--out", required=True, help="output folder")
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
    for name, path in plot_run(args.run, args.out).items():
        print(f"{name:<16} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
