"""What ``facetrain eval`` / ``embed`` / ``plots`` run, as functions the CLI calls.

The CLI (launcher/) only parses arguments, builds an :data:`~evaluation.embed.Embedder` (from a
checkpoint or an ONNX file) and prints/writes what these functions return. Every result is a
plain dict, ready for ``json.dumps``; the ``format_*`` functions render the console tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evaluation.embed import Embedder, embed_images, open_image_source
from evaluation.identification import evaluate_identification
from evaluation.ijb import evaluate_ijb
from evaluation.roc import DEFAULT_FARS, tar_at_far, tar_reading_notes
from evaluation.verification import kfold_verification, pair_roc

__all__ = [
    "format_identification_table",
    "format_ijb_table",
    "format_verification_table",
    "run_identification",
    "run_ijb",
    "run_verification",
    "write_json",
]


def run_verification(
    embedder: Embedder,
    bins: Sequence[str | os.PathLike[str]],
    *,
    batch_size: int = 128,
    nfolds: int = 10,
    flip: bool = True,
    fars: Sequence[float] = DEFAULT_FARS,
    plots_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    model: str | None = None,
) -> dict[str, dict[str, Any]]:
    """k-fold verification of every ``.bin`` set, plus ROC AUC and TAR@FAR of its pairs.

    Returns ``{set name: VerificationResult.as_dict() + {"auc", "tar_at_far"}}``. With
    ``plots_dir``, writes ``roc.png`` (all sets) and ``angles_<set>.png`` (positive/negative
    pair-angle histograms with the decision threshold) there and lists them under ``"plots"``
    of each set; their titles name ``model`` (what was evaluated, and its step) and the pairs.
    """
    from evaluation.plots import plot_pair_angle_histograms, plot_roc_curves
    from evaluation.run_plots import set_label

    results: dict[str, dict[str, Any]] = {}
    curves = {}
    for bin_path in bins:
        src = open_image_source(bin_path)
        if src.issame is None:
            raise ValueError(f"{bin_path}: not a verification .bin set")
        name = Path(bin_path).stem
        emb = embed_images(
            embedder,
            src.batches(batch_size),
            flip=flip,
            progress=progress,
            total=len(src),
            desc=name,
        )
        res = kfold_verification(emb, src.issame, nfolds=nfolds).as_dict()
        curve = pair_roc(emb, src.issame)
        res["auc"] = curve.auc()
        res["tar_at_far"] = [r.as_dict() for r in tar_at_far(curve, fars)]
        if plots_dir is not None:
            path = Path(plots_dir) / f"angles_{name}.png"
            title = f"{set_label(name)}: {len(src.issame)} pairs, {model or 'the model'}"
            path = plot_pair_angle_histograms(
                emb, src.issame, path, title=title, threshold=res["best_threshold"]
            )
            res["plots"] = [str(path)]
        curves[name] = curve
        results[name] = res
    if plots_dir is not None and curves:
        roc_path = str(plot_roc_curves(curves, Path(plots_dir) / "roc.png", fars, model))
        for res in results.values():
            res["plots"].append(roc_path)
    return results


def run_ijb(
    embedder: Embedder,
    root: str | os.PathLike[str],
    name: str = "IJBC",
    *,
    batch_size: int = 128,
    input_size: tuple[int, int] = (112, 112),
    flip: bool = True,
    fars: Sequence[float] = DEFAULT_FARS,
    plots_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    model: str | None = None,
) -> dict[str, Any]:
    """IJB-B/C 1:1 template verification (see :mod:`evaluation.ijb`); optional ROC plot (its
    title names ``model`` and the template pairs)."""
    result = evaluate_ijb(
        embedder,
        root,
        name,
        batch_size=batch_size,
        input_size=input_size,
        flip=flip,
        fars=fars,
        progress=progress,
    )
    out = result.as_dict()
    if plots_dir is not None:
        from evaluation.plots import plot_roc_curves

        path = Path(plots_dir) / f"roc_{name.lower()}.png"
        path = plot_roc_curves({name: result.roc}, path, model=model)
        out["plots"] = [str(path)]
    return out


def run_identification(
    embedder: Embedder,
    probes: str | os.PathLike[str],
    distractors: str | os.PathLike[str],
    *,
    batch_size: int = 128,
    flip: bool = True,
    ranks: Sequence[int] = (1, 5, 10),
    progress: bool = True,
) -> dict[str, Any]:
    """MegaFace-style rank-k identification (see :mod:`evaluation.identification`)."""
    return evaluate_identification(
        embedder,
        probes,
        distractors,
        batch_size=batch_size,
        flip=flip,
        ranks=ranks,
        progress=progress,
    ).as_dict()


# ------------------------------------------------------------------------------ tables


def _far_header(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(f"{r['far_target']:>9.0e}" for r in rows)


def _tar_cells(rows: Sequence[Mapping[str, Any]]) -> str:
    return "".join(f"{100 * r['tar']:>8.2f}{' ' if r['resolvable'] else '*'}" for r in rows)


def format_verification_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """One line per set: accuracy +- std, threshold, VAL@FAR=1e-3, then TAR (%) at each FAR;
    a note under the table names the TAR@FAR reading (:data:`evaluation.roc.READINGS`)."""
    if not results:
        return ""
    first = next(iter(results.values()))
    lines = [
        f"{'set':<16} {'accuracy (%)':>16} {'threshold':>9} {'VAL@1e-3':>9}  TAR@FAR:"
        + _far_header(first.get("tar_at_far", []))
    ]
    for name, r in results.items():
        acc = f"{100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f}"
        lines.append(
            f"{name:<16} {acc:>16} {r['best_threshold']:>9.3f} {r['val_mean']:>9.4f}  "
            + " " * 8
            + _tar_cells(r.get("tar_at_far", []))
        )
    lines += tar_reading_notes(t for r in results.values() for t in r.get("tar_at_far", []))
    return "\n".join(lines)


def format_ijb_table(result: Mapping[str, Any]) -> str:
    """IJB TAR@FAR row (percent) with the pair and template counts and the reading used."""
    rows = result["tar_at_far"]
    lines = [
        f"{result['name']}: {result['num_templates']} templates, {result['num_pairs']} pairs "
        f"({result['num_genuine']} genuine), AUC {result['auc']:.4f}",
        f"{'TAR@FAR':<10}" + _far_header(rows),
        f"{result['name']:<10}" + _tar_cells(rows),
    ]
    lines += tar_reading_notes(rows)
    return "\n".join(lines)


def format_identification_table(result: Mapping[str, Any]) -> str:
    """Rank-k accuracies (percent) with the trial and gallery sizes."""
    ranks = result["rank_accuracy"]
    head = "".join(f"{'rank-' + k:>9}" for k in ranks)
    cells = "".join(f"{100 * v:>9.2f}" for v in ranks.values())
    return "\n".join(
        [
            f"identification: {result['num_trials']} trials ({result['num_identities']} "
            f"identities), {result['num_distractors']} distractors",
            head,
            cells,
        ]
    )


def write_json(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write ``results`` as indented JSON (NaN written as null), creating parent folders."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not np.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, np.generic):
            return clean(value.item())
        return value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(results), indent=2) + "\n")
    return path
