"""A training run's curves against the step, from what it logged (``facetrain plots --run``).

* :func:`load_history`: the logged rows of a run folder (its wandb offline logs, the parts of
  a resumed run joined), a ``run-*.wandb`` file or a JSON-lines file.
* :func:`run_figures`: one figure per subject -- ``loss`` (the total and its terms), ``lr``,
  ``eval`` (accuracy per verification set with the best so far; ROC AUC and TAR@FAR where
  logged), ``angles`` (:func:`target_angle_figure`) and ``embedding_norm``; :func:`plot_run`
  writes them as ``<subject>.png``.

Legends and axes name what is drawn (:func:`metric_label`: ``eval/lfw/accuracy`` is "LFW
accuracy", ``angles/target_angle_p90_deg`` "target angle (90th percentile)"), never the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.figures import new_figure, save_png

__all__ = [
    "load_history",
    "metric_label",
    "plot_run",
    "plot_target_angle_history",
    "run_figures",
    "set_label",
    "target_angle_figure",
]

Rows = Sequence[Mapping[str, Any]]

_SETS = {
    "lfw": "LFW",
    "cfp_fp": "CFP-FP",
    "cfp_ff": "CFP-FF",
    "agedb_30": "AgeDB-30",
    "calfw": "CALFW",
    "cplfw": "CPLFW",
    "vgg2_fp": "VGG2-FP",
}
_NAMES = {
    "train/loss": "loss (total)",
    "train/loss_ce": "margin softmax cross-entropy",
    "train/loss_regularizer": "head regulariser",
    "train/lr": "learning rate (backbone)",
    "train/samples_per_sec": "samples / s",
    "train/grad_norm": "gradient norm",
    "train/embedding_norm_mean": "embedding norm (mean, before normalisation)",
    "angles/target_angle_mean_deg": "target angle (mean)",
    "angles/target_angle_std_deg": "target angle (std)",
    "angles/target_angle_p50_deg": "target angle (median)",
    "angles/hardest_negative_angle_mean_deg": "hardest negative angle (mean)",
    "angles/negative_angle_mean_deg": "negative angle (mean)",
}
_EVAL = {
    "accuracy": "accuracy",
    "best_accuracy": "best accuracy so far",
    "roc_auc": "ROC AUC",
    "val_at_far_1e-3": "VAL @ FAR 1e-3",
}


def set_label(name: str) -> str:
    """A verification set as papers write it (``agedb_30`` -> "AgeDB-30"; others as named)."""
    return _SETS.get(name.lower(), name)


def metric_label(key: str) -> str:
    """What a logged key means, in words (``eval/lfw/tar_at_far_1e-4`` -> "LFW TAR @ FAR
    1e-4"); an unknown key's last part with spaces for underscores."""
    if key in _NAMES:
        return _NAMES[key]
    leaf = key.rsplit("/", 1)[-1]
    if m := re.fullmatch(r"eval/(.+)/([^/]+)", key):
        name, what = m.groups()
        if t := re.fullmatch(r"tar_at_far_(.+)", what):
            return f"{set_label(name)} TAR @ FAR {t.group(1)}"
        return f"{set_label(name)} {_EVAL.get(what, what.replace('_', ' '))}"
    if m := re.fullmatch(r"target_angle_p(\d+)_deg", leaf):
        return f"target angle ({m.group(1)}th percentile)"
    if m := re.fullmatch(r"train/loss_aux_(.+)", key):
        return f"auxiliary loss: {m.group(1).replace('_', ' ')}"
    return leaf.removesuffix("_deg").replace("_", " ")


def load_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Logged rows of a run: a run folder or wandb run folder (every part of a resumed run,
    :func:`evaluation.wandb_offline.read_run_history`), a ``run-*.wandb`` file, or a JSON-lines
    file of ``{"_step": N, key: value, ...}`` rows."""
    import json

    from evaluation.wandb_offline import read_history, read_run_history

    p = Path(path)
    if p.is_dir():
        return read_run_history(p)
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


def _series(rows: Rows, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows holding a number under ``key``, sorted by step."""
    pairs = sorted(
        (row.get("_step", i), float(row[key]))
        for i, row in enumerate(rows)
        if isinstance(row.get(key), int | float) and not isinstance(row.get(key), bool)
    )
    steps, values = zip(*pairs, strict=True) if pairs else ((), ())
    return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _keys(rows: Rows, pattern: str) -> list[str]:
    """Logged keys matching ``pattern`` (a regular expression), in first-logged order."""
    return list(dict.fromkeys(k for row in rows for k in row if re.fullmatch(pattern, k)))


def _line(ax: Any, rows: Rows, key: str, **style: Any) -> bool:
    steps, values = _series(rows, key)
    if len(steps):
        ax.plot(steps, values, label=style.pop("label", metric_label(key)), **style)
    return bool(len(steps))


def _finish(ax: Any, ylabel: str, title: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def loss_figure(rows: Rows) -> Any | None:
    """The total loss and, when there are several, its terms (None: no loss logged)."""
    terms = _keys(rows, r"train/loss_.+")
    if not _series(rows, "train/loss")[0].size:
        return None
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    _line(ax, rows, "train/loss", color="black", linewidth=2)
    for key in terms if len(terms) > 1 else []:
        _line(ax, rows, key, linewidth=1)
    _finish(ax, "loss", "training loss")
    return fig


def _roc_order(what: str) -> tuple[int, float]:
    """ROC AUC first, then TAR@FAR by increasing FAR."""
    if m := re.fullmatch(r"tar_at_far_(.+)", what):
        try:
            return (1, float(m.group(1)))
        except ValueError:
            return (2, 0.0)
    return (0, 0.0)


def eval_figure(rows: Rows) -> Any | None:
    """Accuracy per verification set (solid) with the best so far (dashed); below, where
    logged, each set's ROC AUC (solid) and TAR@FAR (dotted, dash-dotted). None: no eval."""
    sets = [key.split("/")[1] for key in _keys(rows, r"eval/[^/]+/accuracy")]
    if not sets:
        return None
    roc_keys = _keys(rows, r"eval/.+/(roc_auc|tar_at_far_.+)")
    fig = new_figure(7.0, 7.0 if roc_keys else 4.5)
    ax = fig.add_subplot(2 if roc_keys else 1, 1, 1)
    colours = {name: f"C{i % 10}" for i, name in enumerate(sets)}
    for name in sets:
        _line(ax, rows, f"eval/{name}/accuracy", color=colours[name], marker="o", markersize=3)
        _line(ax, rows, f"eval/{name}/best_accuracy", color=colours[name], linestyle="--")
    _finish(ax, "10-fold accuracy", "verification accuracy")
    if roc_keys:
        ax2 = fig.add_subplot(2, 1, 2)
        whats = sorted({k.rsplit("/", 1)[1] for k in roc_keys}, key=_roc_order)
        dashes = ["-", ":", "-.", "--", (0, (1, 4))]
        for name in sets:
            for i, what in enumerate(whats):
                style = dict(color=colours[name], linestyle=dashes[i % len(dashes)])
                _line(ax2, rows, f"eval/{name}/{what}", **style)
        ax2.set_ylim(0.0, 1.02)
        _finish(ax2, "ROC AUC / TAR", "ROC AUC and TAR @ FAR per set")
    return fig


def _one_curve(key: str, colour: str, ylabel: str, title: str) -> Callable[[Rows], Any | None]:
    """A figure of ``key`` alone against the step (None where it was not logged)."""

    def figure(rows: Rows) -> Any | None:
        if not _series(rows, key)[0].size:
            return None
        fig = new_figure(7.0, 3.5)
        ax = fig.add_subplot(1, 1, 1)
        _line(ax, rows, key, color=colour)
        _finish(ax, ylabel, title)
        return fig

    return figure


lr_figure = _one_curve("train/lr", "tab:purple", "learning rate", "learning rate schedule")
norm_figure = _one_curve("train/embedding_norm_mean", "tab:brown", "L2 norm", "embedding norm")


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


def target_angle_figure(rows: Rows, title: str = "angle statistics during training") -> Any:
    """Angle statistics against the step: the target angle's mean (+-1 std band) and
    percentiles, the hardest and the mean negative angle, and a heat map of the logged
    samples of target angles (a key with ``target_angle`` and ``sample`` or ``hist``: a list
    of angles or a wandb histogram). Keys are matched on their last part, any prefix."""
    keys: dict[str, str] = {}  # last part -> logged key
    for key in _keys(rows, r".+_deg"):
        keys.setdefault(key.rsplit("/", 1)[-1], key)
    if "target_angle_mean_deg" not in keys:
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
        ax.plot([], [], color="grey", linewidth=6, alpha=0.6, label="target angles (histogram)")
    mean_key = keys["target_angle_mean_deg"]
    steps, mean = _series(rows, mean_key)
    ax.plot(steps, mean, color="tab:blue", label=metric_label("angles/target_angle_mean_deg"))
    if "target_angle_std_deg" in keys:
        std_steps, std = _series(rows, keys["target_angle_std_deg"])
        if np.array_equal(std_steps, steps):
            band = (mean - std, mean + std)
            ax.fill_between(steps, *band, color="tab:blue", alpha=0.2, label="target angle +-1 std")
    for leaf in sorted(k for k in keys if re.fullmatch(r"target_angle_p\d+_deg", k)):
        label = metric_label(f"angles/{leaf}")
        _line(ax, rows, keys[leaf], linestyle=":", linewidth=1, label=label)
    negatives = {"hardest_negative_angle_mean_deg": "tab:red", "negative_angle_mean_deg": "C1"}
    for leaf, colour in negatives.items():
        if leaf in keys:
            _line(ax, rows, keys[leaf], color=colour, label=metric_label(f"angles/{leaf}"))
    ax.set_ylim(0, 180)
    _finish(ax, "degrees", title)
    return fig


def plot_target_angle_history(
    rows: Rows, path: str | os.PathLike[str], title: str = "angle statistics during training"
) -> Path:
    """:func:`target_angle_figure` written as PNG to ``path``."""
    return save_png(target_angle_figure(rows, title), path)


def angles_figure(rows: Rows) -> Any | None:
    """:func:`target_angle_figure`, or None when no angle statistics were logged."""
    return target_angle_figure(rows) if _keys(rows, r".*target_angle_mean_deg") else None


_FIGURES: dict[str, Callable[[Rows], Any | None]] = {
    "loss": loss_figure,
    "lr": lr_figure,
    "eval": eval_figure,
    "angles": angles_figure,
    "embedding_norm": norm_figure,
}


def run_figures(rows: Rows) -> dict[str, Any]:
    """The figures the rows allow, by subject (``loss``, ``lr``, ``eval``, ``angles``,
    ``embedding_norm``); a subject nothing was logged for is left out."""
    figures = {name: make(rows) for name, make in _FIGURES.items()}
    return {name: fig for name, fig in figures.items() if fig is not None}


def plot_run(run: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``<subject>.png`` of :func:`run_figures` for a run's logged history
    (:func:`load_history`) into ``out_dir``; returns the paths by subject."""
    rows = load_history(run)
    figures = run_figures(rows)
    if not figures:
        raise ValueError(f"{run}: the logged history holds no loss, lr, eval or angle values")
    return {name: save_png(fig, Path(out_dir) / f"{name}.png") for name, fig in figures.items()}
