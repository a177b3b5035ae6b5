"""What a researcher looks at: the in-training verification's ROC AUC, TAR@FAR and best
accuracy so far and the mean embedding norm in wandb, and `facetrain plots --run` on the
folder of a run that was resumed from an earlier checkpoint (two wandb logs of one run)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_resume import _train

from evaluation.run_plots import load_history, run_figures
from evaluation.wandb_offline import find_run_logs, read_history, read_run_history
from launcher import cli
from launcher.tools import describe_model

pytestmark = pytest.mark.timeout(2400)


def _settings(tiny_dataset: Path) -> tuple[str, ...]:
    return (
        "wandb.mode=offline",
        f"data.val=[{tiny_dataset / 'val.bin'}]",
        "train.max_steps=4",
        "train.eval_every=1",
        "train.eval_at_start=true",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=3",
        "eval.batch_size=16",
    )


@pytest.fixture(scope="module")
def resumed_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps evaluated at every step, then steps 3-4 again from step-2's checkpoint (as
    after a crash past a checkpoint): the same wandb run continues in a second log."""
    out = tmp_path_factory.mktemp("views")
    _train(tiny_dataset, out, "run", *_settings(tiny_dataset))
    _train(tiny_dataset, out, "run", *_settings(tiny_dataset), "--resume", str(out / "run/step-2"))
    return out / "run"


def _column(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    picked = [r for r in rows if key in r]
    return [r["_step"] for r in picked], [r[key] for r in picked]


def test_wandb_gets_roc_tar_norm_and_best_accuracy(resumed_run: Path) -> None:
    logs = find_run_logs(resumed_run)
    assert len(logs) == 2 and logs[0].name == logs[1].name  # one wandb run, two parts
    # The second part logs no step the run has (trainer.wandb_rows): steps 3-4, computed
    # again from step-2, appear once, as the first part logged them.
    assert _column(read_history(logs[1]), "train/loss")[0] == []
    rows = read_run_history(resumed_run)
    steps, norms = _column(rows, "train/embedding_norm_mean")
    assert steps == [1, 2, 3, 4]
    assert all(np.isfinite(n) and n > 0 for n in norms)
    assert norms == _column(read_history(logs[0]), "train/embedding_norm_mean")[1]
    steps, accuracy = _column(rows, "eval/val/accuracy")
    assert steps == [0, 1, 2, 3, 4]
    _, best = _column(rows, "eval/val/best_accuracy")
    assert best == list(np.maximum.accumulate(accuracy))  # monotone, the running maximum
    _, auc = _column(rows, "eval/val/roc_auc")
    _, tar4 = _column(rows, "eval/val/tar_at_far_1e-4")
    _, tar3 = _column(rows, "eval/val/tar_at_far_1e-3")
    assert len(auc) == len(tar4) == len(tar3) == 5
    for a, t4, t3 in zip(auc, tar4, tar3, strict=True):
        assert 0.0 <= a <= 1.0 and 0.0 <= t4 <= t3 <= 1.0
    # The best accuracy so far travels in the checkpoint: the resumed part starts from it.
    meta = json.loads((resumed_run / "step-2" / "meta.json").read_text())
    assert meta["best_accuracy"] == {"val": max(accuracy[:3])}
    final = json.loads((resumed_run / "summary.json").read_text())["eval_after"]["val"]
    assert final["best_accuracy"] == best[-1] and final["roc_auc"] == auc[-1]


def test_in_training_roc_figures_are_those_of_eval(
    resumed_run: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The logged AUC and TAR@FAR are `facetrain eval`'s for the checkpoint of that step; its
    --plots figures are written."""
    out, figs = tmp_path / "eval.json", tmp_path / "figs"
    val = str(tiny_dataset / "val.bin")
    args = ["eval", str(resumed_run / "step-4"), "--bin", val, "--json", str(out)]
    assert cli.main([*args, "--plots", str(figs)]) == 0
    ours = json.loads(out.read_text())["verification"]["val"]
    last = [r for r in read_run_history(resumed_run) if "eval/val/roc_auc" in r][-1]
    assert last["_step"] == 4
    assert last["eval/val/roc_auc"] == pytest.approx(ours["auc"], abs=1e-12)
    tar = {row["far_target"]: row["tar"] for row in ours["tar_at_far"]}
    assert last["eval/val/tar_at_far_1e-4"] == tar[1e-4]
    assert last["eval/val/tar_at_far_1e-3"] == tar[1e-3]
    assert sorted(p.name for p in figs.iterdir()) == ["angles_val.png", "roc.png"]
    # Their titles name the model: the checkpoint's backbone, step and run.
    backbone = json.loads((resumed_run / "step-4" / "meta.json").read_text())["backbone"]
    assert describe_model(resumed_run) == f"{backbone}, step 4 (run run)"
    assert describe_model(tmp_path / "m.onnx") == "m.onnx (ONNX, training step not recorded)"


def test_plots_command_draws_the_run(resumed_run: Path) -> None:
    assert cli.main(["plots", "--run", str(resumed_run)]) == 0
    names = ["angles", "embedding_norm", "eval", "loss", "lr"]
    written = sorted(p.name for p in (resumed_run / "plots").iterdir())
    assert written == [f"{n}.png" for n in names]
    for name in names:
        with Image.open(resumed_run / "plots" / f"{name}.png") as img:
            assert img.format == "PNG" and min(img.size) > 300
            assert np.asarray(img.convert("L")).std() > 10  # drawn on
    figures = run_figures(load_history(resumed_run))
    accuracy = next(
        x for x in figures["eval"].axes[0].get_lines() if x.get_label() == "val accuracy"
    )
    assert list(accuracy.get_xdata()) == [0, 1, 2, 3, 4]  # both parts, each step once
    for fig in figures.values():
        for ax in fig.axes:
            for text in ax.get_legend().get_texts():
                assert "/" not in text.get_text() and "_" not in text.get_text(), text
