"""Faults in the middle of a run (issue 20): non-finite steps and a full disk. A skipped step
leaves every buffer as it was, non-finite state is never checkpointed, every float of the
config is finite; a checkpoint that cannot be written is one line, its step-N.tmp removed, the
last complete checkpoint kept; a run folder that cannot be written is found before launch."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _runs import DEMO, run_train, write_run_pack
from test_trainer_unit import _trainer  # one trainer in this process, on tiny_dataset

from launcher import cli
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config
from trainer.loop import Trainer
from trainer.step import TrainingError

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_run_pack(tmp_path_factory.mktemp("midrun") / "pack")


@pytest.mark.parametrize(
    "override",
    [
        "optimizer.lr=.inf",
        "optimizer.betas=[0.9, .nan]",
        "schedule.milestones=[1.0, .inf]",
        "train.clip_grad_norm=.inf",
        "export.tolerance=.nan",
        "partialfc.lr=-.inf",
    ],
)
def test_every_float_of_the_config_is_finite(override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(DEMO, [override])
    assert "finite" in str(err.value)


def _buffers(trainer: Trainer) -> dict[str, torch.Tensor]:
    named = [*trainer.backbone.named_buffers(), *trainer.partial_fc.named_buffers()]
    return {name: b.detach().clone() for name, b in named}


def test_a_skipped_step_leaves_every_buffer_as_it_was(tiny_dataset: Path, tmp_path: Path) -> None:
    """The forward of a step whose loss is non-finite has already moved BatchNorm's running
    statistics and CurricularFace's t: the skipped step gives them back."""
    trainer = _trainer(tiny_dataset, tmp_path, "partialfc.margin={name: curricularface, s: 16.0}")
    batches = trainer._batches()
    assert trainer._one_step(batches)[2]  # a real step first: the statistics are warm
    before = _buffers(trainer)
    real_forward = trainer.partial_fc.forward

    def nan_loss(embeddings: torch.Tensor, labels: torch.Tensor):
        loss, stats = real_forward(embeddings, labels)
        return loss * float("nan"), stats

    trainer.partial_fc.forward = nan_loss  # type: ignore[method-assign]
    assert not trainer._one_step(batches)[2]
    after = _buffers(trainer)
    assert before.keys() == after.keys() and "margin.t" in after
    for name, value in before.items():
        assert torch.equal(value, after[name]), f"{name} moved in a skipped step"


def test_nonfinite_state_is_not_checkpointed(tiny_dataset: Path, tmp_path: Path) -> None:
    trainer = _trainer(tiny_dataset, tmp_path, "train.max_steps=2", "train.checkpoint_every=1")
    trainer.fit()  # step-1 and step-2
    name, var = next((n, b) for n, b in trainer.backbone.named_buffers() if "running_var" in n)
    with torch.no_grad():
        var.fill_(float("nan"))  # what a forward on non-finite weights leaves
    trainer.step = 3
    with pytest.raises(TrainingError) as err:
        trainer.save_checkpoint()
    assert str(err.value).startswith(
        f"step 3: backbone.{name} is not finite on rank 0: checkpoint step-3 not written; "
        "the last complete checkpoint is step-2"
    )
    run = tmp_path / "demo_cpu"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-1", "step-2"]


def test_diverging_run_exits_2_without_a_checkpoint(pack: Path, tmp_path: Path) -> None:
    """optimizer.lr 1e38 over 2 ranks: the first step leaves weights past float32's range,
    every later step is skipped, fewer than train.max_nonfinite_steps: the run used to end
    with exit 0 and a checkpoint of infinite weights and NaN running statistics."""
    proc = run_train(pack, tmp_path, "lr", "optimizer.lr=1e38", "train.max_steps=4")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert lines[0].startswith("facetrain train: error: step 4: "), lines[0]
    assert " is not finite on rank " in lines[0]
    assert "checkpoint step-4 not written; there is no complete checkpoint yet" in lines[0]
    assert not list((tmp_path / "lr").glob("step-*"))


def test_disk_full_while_checkpointing(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on a rank's file of step-2 (in process; a real full disk: the test below)."""
    trainer = _trainer(tiny_dataset, tmp_path, "train.max_steps=2", "train.checkpoint_every=1")
    real_save = ckpt.save_torch

    def full_at_step_2(obj: object, path: Path) -> None:
        if path.parent.name == "step-2.tmp" and path.name.startswith("trainer-rank"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) + ".part")
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "save_torch", full_at_step_2)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        trainer.fit()
    run = tmp_path / "demo_cpu"
    assert str(err.value) == (
        f"checkpoint step-2 not written: no space left on {run}; the last complete "
        "checkpoint is step-1"
    )
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == ["step-1"]
    monkeypatch.setattr(ckpt, "save_torch", real_save)
    resumed = _trainer(tiny_dataset, tmp_path, "train.max_steps=2", "run.resume=auto")
    assert resumed.fit()["resumed_from"].endswith("step-1")


def _mount_tmpfs(where: Path, *options: str) -> bool:
    """A tmpfs at ``where`` (root only): a real filesystem of a few MB to fill or to mount
    read-only. False where mounting is impossible."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    opts = ",".join(options)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=False)
    return done.returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk_is_one_line(pack: Path, tmp_path: Path) -> None:
    """2 ranks write checkpoints onto a 3 MB tmpfs: step-1 fits, step-2 does not."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "size=3m"):
        pytest.skip("needs root to mount a small tmpfs (the in-process test covers the rest)")
    try:
        args = ("train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2")
        proc = run_train(pack, disk, "full", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
        run = disk / "full"
        assert lines[0] == (
            f"facetrain train: error: checkpoint step-2 not written: no space left on {run}; "
            "the last complete checkpoint is step-1"
        )
        assert sorted(p.name for p in run.glob("step-*")) == ["step-1"]
        shutil.copytree(run, tmp_path / "full")
    finally:
        _umount(disk)
    resumed = run_train(pack, tmp_path, "full", *args, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step-1" in resumed.stdout


def test_output_folder_that_cannot_be_written_is_one_line_before_launch(
    tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_start: None
) -> None:
    out = tmp_path / "ro"
    if not _mount_tmpfs(out, "ro", "size=1m"):
        if os.geteuid() == 0:
            pytest.skip("root writes through permissions and cannot mount a read-only tmpfs")
        out.chmod(0o555)
    try:
        argv = ["train", str(DEMO), "--set", f"data.train={tiny_dataset / 'train'}"]
        argv += ["--set", "data.val=[]", "--set", f"run.output_dir={out}"]
        argv += ["--set", "train.batch_size=4"]
        assert cli.main(argv) == 2
    finally:
        if os.geteuid() == 0:
            _umount(out)
        else:
            out.chmod(0o755)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and not captured.out, captured.err
    assert lines[0].startswith(
        f"facetrain train: error: run.output_dir: cannot write the run folder {out / 'demo_cpu'}"
    ), lines[0]


def test_a_told_failure_is_final(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank that torchrun restarts after a rank told its failure (dist.max_restarts, an
    elastic job) ends at once with the failure's exit status, training nothing."""
    from launcher import failure, worker

    told = tmp_path / "failure"
    monkeypatch.setenv(failure.FAILURE_ENV, str(told))

    started: list[bool] = []

    def trains(**_kwargs: object) -> int:
        started.append(True)
        return 0

    monkeypatch.setattr(worker, "main", trains)
    told.write_text("facetrain train: error: train.rec: key 3: wrong magic\n")
    assert worker.rank_main() == failure.EXIT_CODE
    assert not started
    told.unlink()  # nothing told: the rank trains
    assert worker.rank_main() == 0 and started
