"""The accuracy printed during training is what `facetrain eval` gives for the checkpoint
saved at that step, to the bit, for DDP and DeepSpeed on 1-3 ranks (each rank's BatchNorm
statistics drift apart; the checkpoint holds rank 0's)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from test_resume import _train

from launcher import cli

pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny training pack with 200 held-out pairs: enough pairs that BatchNorm statistics
    of another rank move the accuracy, threshold and VAL figures."""
    from dataio.synth import write_synthetic_dataset

    out = tmp_path_factory.mktemp("eval_synth")
    write_synthetic_dataset(
        str(out), identities=6, images_per_id=4, val_identities=10, val_images_per_id=4,
        val_pairs=200, seed=3, workers=1, progress=False,
    )  # fmt: skip
    return out


def _eval(step_dir: Path, val: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    """`facetrain eval STEP --bin val.bin` with its defaults (the checkpoint's eval settings)."""
    assert cli.main(["eval", str(step_dir), "--bin", str(val), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())["verification"]["val"]
    return {"printed": printed, **result}


# ZeRO-3 gathers the parameters in every forward: with 2 batches for 3 ranks (rank 0 has none)
# and nothing kept gathered between forwards, every rank must still run as many forwards.
ZERO3_STRICT = (
    "deepspeed.zero_stage=3",
    'deepspeed.config={"zero_optimization": {"stage3_param_persistence_threshold": 0, '
    '"stage3_max_reuse_distance": 0, "stage3_max_live_parameters": 1000}}',
)


# The demo recipe's own CPU step (the runs here take tests/_runs.FP32_STEP otherwise): bf16
# autocast, the backbone's weights channels-last; evaluation during training must still give
# what `facetrain eval` gives.
DEMO_FAST = ("train.precision=bf16", "train.channels_last=true")


@pytest.mark.parametrize(
    "engine,world,settings",
    [
        ("ddp", 1, ()),
        ("ddp", 2, ()),
        ("ddp", 3, ()),
        ("deepspeed", 1, ()),
        ("deepspeed", 2, ()),
        ("deepspeed", 3, ()),
        ("deepspeed", 3, (*ZERO3_STRICT, "eval.batch_size=256")),
        ("ddp", 2, DEMO_FAST),
    ],
    ids=["ddp1", "ddp2", "ddp3", "ds1", "ds2", "ds3", "zero3-uneven", "ddp2-demo-fast"],
)
def test_training_figures_equal_eval_of_the_checkpoint(
    dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    engine: str,
    world: int,
    settings: tuple[str, ...],
) -> None:
    stdout = _train(
        dataset, tmp_path, "run",
        f"data.val=[{dataset / 'val.bin'}]", f"dist.engine={engine}", f"dist.nproc={world}",
        "train.max_steps=4", "train.eval_every=2", "train.checkpoint_every=2",
        "train.keep_checkpoints=3", "eval.batch_size=48",  # 400 images: 9 batches, 1 short
        *settings,
    )  # fmt: skip
    printed = dict(re.findall(r"\[eval step (\d+)\] val: (accuracy [\d.]+% \+- [\d.]+)", stdout))
    # The evaluation at the last step runs once, although eval_every divides it.
    assert sorted(printed) == ["2", "4"] and stdout.count("[eval step 4]") == 1, stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["eval_after"]["val"]
    for step in ("2", "4"):
        step_dir, out = tmp_path / "run" / f"step-{step}", tmp_path / f"eval-{step}.json"
        ours = _eval(step_dir, dataset / "val.bin", out, capsys)
        line = f"accuracy {100 * ours['accuracy_mean']:.2f}% +- {100 * ours['accuracy_std']:.2f}"
        assert printed[step] == line, (step, printed[step], ours["printed"])
    # The final figures bit for bit (the last `ours` is step 4's), ROC AUC and TAR@FAR too.
    tar = {row["far_target"]: row["tar"] for row in ours["tar_at_far"]}
    # The best accuracy of the run's evaluations (steps 0, 2 and 4) comes with the figures.
    assert summary.pop("best_accuracy", summary["accuracy"]) >= summary["accuracy"]
    assert summary == {
        "accuracy": ours["accuracy_mean"],
        "accuracy_std": ours["accuracy_std"],
        "best_threshold": ours["best_threshold"],
        "val_at_far_1e-3": ours["val_mean"],
        "roc_auc": ours["auc"],
        "tar_at_far_1e-4": tar[1e-4],
        "tar_at_far_1e-3": tar[1e-3],
    }


def test_eval_settings_of_a_checkpoint_of_another_version(tmp_path: Path) -> None:
    """Only batch_size and nfolds are taken; eval keys this version does not know are ignored
    and missing ones take the defaults."""
    import yaml

    from launcher.tools import eval_settings

    step = tmp_path / "step-3"
    step.mkdir()
    config = {"eval": {"batch_size": 7, "retired_option": True}}
    (step / "meta.json").write_text(json.dumps({"config": yaml.safe_dump(config)}))
    assert eval_settings(step) == {"batch_size": 7, "nfolds": 10}
    assert eval_settings(tmp_path / "model.onnx") == {"batch_size": 128, "nfolds": 10}
