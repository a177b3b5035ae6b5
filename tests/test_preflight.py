"""User errors fail before any process starts: one line naming the key or path, exit status 2.

`facetrain train` (with and without --dry-run), `submit` and `eval` run in-process; starting a
worker (torchrun or the in-process worker), submitting or loading a model fails the test, so
each check is shown to come first.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launcher import cli

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo_cpu.yaml")


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and not out, err
    assert "Traceback" not in err
    return lines[0]


def _train(tiny_dataset: Path, tmp_path: Path, *sets: str, dry_run: bool) -> list[str]:
    base = [
        f"data.train={tiny_dataset / 'train'}",
        f"data.val=[{tiny_dataset / 'val.bin'}]",
        f"run.output_dir={tmp_path}",
        "train.batch_size=4",  # 24 images in the pack
    ]
    argv = ["train", DEMO, "--dry-run"] if dry_run else ["train", DEMO]  # dist.nproc: 2
    for item in [*base, *sets]:
        argv += item.split(" ", 1) if item.startswith("--") else ["--set", item]
    return argv


def _bad_inputs(tiny_dataset: Path, tmp_path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (extra argument, what the message must contain)."""
    val = (tiny_dataset / "val.bin").read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(val[: len(val) // 2])
    rec = tiny_dataset / "train" / "train.rec"
    no_checkpoint = tmp_path / "run_without_checkpoint"
    no_checkpoint.mkdir()
    return {
        "backbone": ("model.backbone=iresnet5O", ["model.backbone", "did you mean 'iresnet50'"]),
        "unknown key": ("optimizer.lrr=0.1", ["optimizer.lrr", "did you mean 'lr'"]),
        "val missing": (f"data.val=[{tmp_path / 'nope.bin'}]", ["data.val", "nope.bin"]),
        "val truncated": (f"data.val=[{truncated}]", ["data.val", str(truncated), "truncated"]),
        "val not a bin": (f"data.val=[{rec}]", ["data.val", str(rec)]),
        "resume missing": (f"--resume {tmp_path / 'gone'}", ["--resume", str(tmp_path / "gone")]),
        "resume no checkpoint": (f"--resume {no_checkpoint}", ["--resume", str(no_checkpoint)]),
    }


CASES = [
    "backbone",
    "unknown key",
    "val missing",
    "val truncated",
    "val not a bin",
    "resume missing",
    "resume no checkpoint",
]


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("case", CASES)
def test_train_input_errors_are_one_line_before_any_process(
    tiny_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_start: None,
    case: str,
    dry_run: bool,
) -> None:
    extra, expected = _bad_inputs(tiny_dataset, tmp_path)[case]
    line = _one_line_error(_train(tiny_dataset, tmp_path, extra, dry_run=dry_run), capsys)
    assert line.startswith("facetrain train: error: ")
    for part in expected:
        assert part in line, line


def test_good_inputs_pass_the_checks(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The checks accept a real .bin set and a checkpoint: step-N folder or run folder."""
    run = tmp_path / "run"
    step = run / "step-3"
    step.mkdir(parents=True)
    (step / "meta.json").write_text(json.dumps({"step": 3}))
    for resume in (str(step), str(run), "auto"):
        argv = _train(tiny_dataset, tmp_path, f"--resume {resume}", dry_run=True)
        assert cli.main(argv) == 0, capsys.readouterr().err
        assert "steps            :" in capsys.readouterr().out


@pytest.mark.parametrize(
    "shape, message",
    [
        (["--nodes", "0", "--gpus-per-node", "8"], "--nodes must be >= 1, got 0"),
        (["--nodes", "2", "--gpus-per-node", "-1"], "--gpus-per-node must be >= 0"),
    ],
)
def test_submit_job_shape(
    tiny_dataset: Path,
    capsys: pytest.CaptureFixture[str],
    no_start: None,
    shape: list[str],
    message: str,
) -> None:
    argv = ["submit", DEMO, *shape, "--set", f"data.train={tiny_dataset / 'train'}"]
    assert message in _one_line_error(argv, capsys)


def test_eval_of_a_file_that_is_no_bin_set_names_it(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_start: None
) -> None:
    """Not an image list read as text (a codec error), and before the model is loaded."""
    rec = tiny_dataset / "train" / "train.rec"
    text = tmp_path / "notes.bin"
    text.write_text("not a pickle\n")
    for path, message in (
        (rec, "not a verification .bin set"),
        (text, "not a valid verification .bin pickle"),
    ):
        line = _one_line_error(["eval", str(tmp_path / "model.onnx"), "--bin", str(path)], capsys)
        assert str(path) in line and message in line, line


@pytest.mark.parametrize("restarts", ["dist.max_restarts=1", "dist.elastic.max_nodes=2"])
def test_going_back_in_a_run_folder_that_restarts_continue_is_refused(
    tmp_path: Path, restarts: str
) -> None:
    """``--resume RUN/step-2`` while RUN/step-4 exists, in a job whose restarts (and, elastic,
    whose every start) continue the folder's latest checkpoint: refused before launch, as the
    first restart would jump to step-4; the latest checkpoint itself, a checkpoint of another
    run, or a job without restarts are fine."""
    from launcher.preflight import PreflightError, check_rollback
    from trainer.config import load_config

    for name in ("run", "other"):
        for step in (2, 4):
            (tmp_path / name / f"step-{step}").mkdir(parents=True)
            (tmp_path / name / f"step-{step}" / "meta.json").write_text("{}")
    sets = [f"run.output_dir={tmp_path}", "run.name=run", "dist.max_restarts=1", restarts]

    def check(resume: Path, *extra: str) -> None:
        check_rollback(load_config(DEMO, [*sets, f"run.resume={resume}", *extra]))

    with pytest.raises(PreflightError, match=r"not the latest checkpoint of its run folder"):
        check(tmp_path / "run" / "step-2")
    check(tmp_path / "run" / "step-4")
    check(tmp_path / "run")  # the folder: its latest checkpoint
    check(tmp_path / "other" / "step-2")  # another run's: this folder is continued later
    if restarts == "dist.max_restarts=1":
        check(tmp_path / "run" / "step-2", "dist.max_restarts=0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="dist.device auto is CUDA here")
def test_a_step_that_needs_cuda_on_auto_is_one_line_before_any_process(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_start: None
) -> None:
    """dist.device auto is resolved to this machine's CPU before launch: DeepSpeed's bf16 step
    (the recipe's precision) is refused there as for dist.device cpu. A dry run is not: it
    may plan for GPU machines (tests/test_recipes.py)."""
    sets = ("dist.device=auto", "--engine deepspeed")
    line = _one_line_error(_train(tiny_dataset, tmp_path, *sets, dry_run=False), capsys)
    assert "train.precision: bf16 with dist.engine deepspeed needs CUDA" in line, line
    assert "dist.device auto" in line, line
