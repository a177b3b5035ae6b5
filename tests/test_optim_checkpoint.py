"""LR schedules and the checkpoint folder protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.config import ScheduleConfig
from trainer.optim import build_scheduler, lr_factor


def test_warmup_then_polynomial() -> None:
    cfg = ScheduleConfig(kind="polynomial", power=2.0, warmup_steps=4)
    assert [lr_factor(s, 20, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 20, cfg) == pytest.approx(1.0)
    assert lr_factor(12, 20, cfg) == pytest.approx((1 - 8 / 16) ** 2)
    assert lr_factor(20, 20, cfg) == pytest.approx(0.0)


def test_cosine_and_constant() -> None:
    cos = ScheduleConfig(kind="cosine", warmup_steps=0)
    assert lr_factor(0, 10, cos) == pytest.approx(1.0)
    assert lr_factor(5, 10, cos) == pytest.approx(0.5)
    assert lr_factor(10, 10, cos) == pytest.approx(0.0)
    assert lr_factor(7, 10, ScheduleConfig(kind="constant")) == 1.0


def test_linear_and_step_schedules_with_warmup() -> None:
    lin = ScheduleConfig(kind="linear", warmup_steps=2)
    assert [lr_factor(s, 10, lin) for s in (0, 1, 2, 6, 10)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.5, 0.0]
    )
    # Milestones are epochs: 10 steps per epoch -> x0.1 from step 15 and again from step 25.
    step = ScheduleConfig(kind="step", milestones=[1.5, 2.5], gamma=0.1, warmup_steps=3)
    milestones = step.milestone_steps(10)
    assert milestones == [15, 25]
    got = [lr_factor(s, 40, step, milestone_steps=milestones) for s in (0, 2, 3, 14, 15, 24, 25)]
    assert got == pytest.approx([1 / 3, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01])


def test_schedule_config_errors() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="needs at least one milestone"):
        ScheduleConfig(kind="step")
    with pytest.raises(ValidationError, match="increasing epochs"):
        ScheduleConfig(kind="step", milestones=[3, 2])


def test_nesterov_reaches_the_backbone_optimizer() -> None:
    from trainer.config import OptimizerConfig
    from trainer.optim import build_optimizer

    p = torch.nn.Parameter(torch.zeros(2))
    opt = build_optimizer([p], OptimizerConfig(name="sgd", nesterov=True))
    assert opt.param_groups[0]["nesterov"] is True


def test_scheduler_steps_once_per_optimizer_step() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.4)
    sched = build_scheduler(opt, 4, ScheduleConfig(kind="polynomial", power=1.0, warmup_steps=0))
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.4, 0.3, 0.2, 0.1])


def _publish(run: Path, step: int, keep: int = 2) -> Path:
    tmp = ckpt.tmp_dir_for(run, step)
    tmp.mkdir(parents=True)
    ckpt.save_torch({"w": torch.full((2,), float(step))}, tmp / "backbone.pt")
    return ckpt.finalize(run, step, {"step": step}, keep=keep)


def test_finalize_latest_and_keep(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _publish(tmp_path, step)
    assert [s for s, _ in ckpt.step_dirs(tmp_path)] == [20, 30]
    assert (tmp_path / "latest").read_text().strip() == "step-30"
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-30"
    assert json.loads((tmp_path / "step-30" / "meta.json").read_text())["step"] == 30
    assert torch.equal(
        ckpt.load_torch(tmp_path / "step-20" / "backbone.pt")["w"], torch.full((2,), 20.0)
    )


def test_unfinished_tmp_folder_is_ignored(tmp_path: Path) -> None:
    _publish(tmp_path, 5)
    ckpt.tmp_dir_for(tmp_path, 9).mkdir()  # a crash between writing and publishing
    assert ckpt.resolve_checkpoint(tmp_path).name == "step-5"


def test_truncated_file_gives_clear_error(tmp_path: Path) -> None:
    final = _publish(tmp_path, 1)
    path = final / "backbone.pt"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ckpt.CheckpointError, match="backbone.pt"):
        ckpt.load_torch(path)
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_torch(final / "nope.pt")
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "elsewhere")
