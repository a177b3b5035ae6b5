"""The training loop in one process (no process group): step accounting, gradient
accumulation, non-finite losses, bf16 autocast."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dataio.loading import to_model_input
from trainer.config import load_config
from trainer.context import DistContext
from trainer.loop import Trainer
from trainer.step import TrainingError

REPO = Path(__file__).resolve().parents[1]


def _trainer(tiny_dataset: Path, tmp_path: Path, *overrides: str) -> Trainer:
    cfg = load_config(
        REPO / "configs" / "demo_cpu.yaml",
        [
            f"data.train={tiny_dataset / 'train'}",
            "data.val=[]",
            "data.workers=0",
            f"run.output_dir={tmp_path}",
            "train.batch_size=4",
            "train.progress=false",
            "train.eval_at_start=false",
            "wandb.mode=disabled",
            "export.onnx=false",
            "dist.nproc=1",
            "partialfc.sample_rate=1.0",
            # The float32 step (the recipe's bf16 is not what the references below compute).
            "train.precision=fp32",
            "train.channels_last=false",
            *overrides,
        ],
    )
    return Trainer(cfg, DistContext.single())


def _grads(trainer: Trainer) -> list[torch.Tensor]:
    params = [*trainer.backbone.parameters(), *trainer.partial_fc.parameters()]
    return [p.grad.clone() for p in params if p.grad is not None]


def test_accumulation_averages_micro_batch_gradients(tiny_dataset: Path, tmp_path: Path) -> None:
    trainer = _trainer(
        tiny_dataset, tmp_path, "train.grad_accum_steps=2", "train.clip_grad_norm=null"
    )
    assert trainer.steps_per_epoch == len(trainer.loader) // 2
    # Same config and seed: an identical second trainer as the reference.
    reference = _trainer(
        tiny_dataset, tmp_path, "train.grad_accum_steps=2", "train.clip_grad_norm=null"
    )
    captured: dict[str, list[torch.Tensor]] = {}

    def record_and_skip() -> None:
        captured["accum"] = _grads(trainer)

    trainer.opt_backbone.step = record_and_skip  # type: ignore[method-assign]
    trainer.opt_fc.step = lambda: None  # type: ignore[method-assign]
    batches = trainer._batches()
    loss, _, finite = trainer._one_step(batches)
    assert finite and trainer.batch_in_epoch == 2
    assert int(trainer.partial_fc.num_steps) == 1  # optimizer steps, not forwards

    # The same two micro-batches, one at a time, on an identical copy.
    ref_batches = reference._batches()
    micro = [next(ref_batches), next(ref_batches)]
    per_micro = []
    for images, labels in micro:
        reference.opt_backbone.zero_grad(set_to_none=True)
        reference.opt_fc.zero_grad(set_to_none=True)
        l, _ = reference.partial_fc(reference.engine(to_model_input(images, "cpu")), labels)
        l.backward()
        per_micro.append((_grads(reference), l.detach()))
    for acc, g1, g2 in zip(captured["accum"], per_micro[0][0], per_micro[1][0], strict=True):
        torch.testing.assert_close(acc, (g1 + g2) / 2, rtol=1e-5, atol=1e-7)
    assert loss.item() == pytest.approx((per_micro[0][1] + per_micro[1][1]).item() / 2, rel=1e-6)


def test_nonfinite_steps_are_skipped_then_abort(tiny_dataset: Path, tmp_path: Path) -> None:
    trainer = _trainer(
        tiny_dataset,
        tmp_path,
        "train.max_steps=20",
        "train.max_nonfinite_steps=3",
        "train.log_every=1",
    )
    real_forward = trainer.partial_fc.forward
    calls = {"n": 0}

    def flaky(embeddings: torch.Tensor, labels: torch.Tensor):
        calls["n"] += 1
        loss, stats = real_forward(embeddings, labels)
        if calls["n"] == 2 or calls["n"] >= 4:  # one bad step, then bad for good
            loss = loss * float("nan")
        return loss, stats

    trainer.partial_fc.forward = flaky  # type: ignore[method-assign]
    snapshots = []
    original_step = trainer.opt_backbone.step

    def counting_step(*a, **k):
        snapshots.append(trainer.step)
        return original_step(*a, **k)

    trainer.opt_backbone.step = counting_step  # type: ignore[method-assign]
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        trainer.fit()
    # Steps 1 and 3 updated the weights; step 2 and steps 4..6 were skipped.
    assert snapshots == [0, 2]
    assert trainer.nonfinite_total == 4 and trainer.step == 6
    assert int(trainer.partial_fc.num_steps) == 2  # skipped steps do not anneal heads


def test_bf16_autocast_runs_and_loss_is_finite(tiny_dataset: Path, tmp_path: Path) -> None:
    trainer = _trainer(tiny_dataset, tmp_path, "train.precision=bf16")
    loss, stats, finite = trainer._one_step(trainer._batches())
    assert finite and torch.isfinite(loss) and loss.dtype == torch.float32


def test_fp16_on_cpu_is_a_config_error(tiny_dataset: Path, tmp_path: Path) -> None:
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="train.precision"):
        _trainer(tiny_dataset, tmp_path, "train.precision=fp16", "dist.device=cpu")


@pytest.mark.parametrize("update", ["sampled", "dense"])
def test_classifier_update_modes(tiny_dataset: Path, tmp_path: Path, update: str) -> None:
    """sampled: exactly the sampled rows move; dense: weight decay moves every row. The
    classifier clip works on either gradient (torch's own clip has no sparse kernel)."""
    trainer = _trainer(
        tiny_dataset,
        tmp_path,
        "partialfc.sample_rate=0.5",
        f"partialfc.update={update}",
        "partialfc.clip_grad_norm=0.5",
        "schedule.warmup_steps=0",
    )
    pfc = trainer.partial_fc
    before = pfc.weight.detach().clone()
    _, _, finite = trainer._one_step(trainer._batches())
    assert finite
    assert pfc.weight.grad.is_sparse == (update == "sampled")
    sampled = torch.zeros(pfc.num_local, dtype=torch.bool)
    sampled[pfc.last_sampled_global - pfc.class_start] = True
    assert 0 < int(sampled.sum()) < pfc.num_local  # 6 classes, budget 3: some unsampled
    moved = (pfc.weight.detach() != before).any(dim=1)
    if update == "sampled":
        assert torch.equal(moved, sampled)
    else:
        assert bool(moved.all())


@pytest.mark.parametrize(
    "margin",
    [
        "{name: curricularface, s: 16.0}",
        "{name: adaface, s: 16.0}",
        "{name: subcenter_arcface, s: 16.0, k: 3}",
        "{name: cosface, s: 16.0, aux: {center: {weight: 0.01}, triplet: {weight: 0.1}}}",
    ],
)
def test_margin_heads_train_from_the_config(
    tiny_dataset: Path, tmp_path: Path, margin: str
) -> None:
    trainer = _trainer(
        tiny_dataset,
        tmp_path,
        f"partialfc.margin={margin}",
        "train.max_steps=3",
        "train.log_every=1",
    )
    summary = trainer.fit()
    assert summary["train"]["steps"] == 3 and summary["train"]["nonfinite_steps"] == 0
    assert math.isfinite(summary["train"]["final_loss"])


def test_margin_config_errors_name_the_key(tiny_dataset: Path, tmp_path: Path) -> None:
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=r"partialfc\.margin\.q: unknown key"):
        _trainer(tiny_dataset, tmp_path, "partialfc.margin.q=1.0")


def test_dali_loader_trains_and_resumes_its_position(tiny_dataset: Path, tmp_path: Path) -> None:
    """data.loader=dali (CPU pipeline here): train 3 steps, stop, resume to 8 (crossing the
    6-step epoch), with the loader's own position restored from the checkpoint."""
    common = ("data.loader=dali", "train.max_steps=8", "run.resume=auto")
    first = _trainer(tiny_dataset, tmp_path, *common, "train.stop_at_step=3").fit()
    assert first["train"]["steps"] == 3 and "stopped" in first
    saved = torch.load(tmp_path / "demo_cpu" / "step-3" / "trainer-rank0.pt", weights_only=True)
    assert saved["loader"]["kind"] == "dali"
    assert (saved["loader"]["epoch"], saved["loader"]["batch"]) == (0, 3)
    resumed = _trainer(tiny_dataset, tmp_path, *common)
    summary = resumed.fit()
    assert summary["resumed_from"].endswith("step-3")
    assert summary["train"]["steps"] == 8 and summary["train"]["steps_this_run"] == 5
    assert resumed.epoch == 1 and resumed.batch_in_epoch == 2


def test_resume_with_a_loader_that_cuts_epochs_differently_starts_the_next_epoch(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """Saved by the torch loader mid-epoch, resumed with DALI (another shuffle): the saved
    epoch cannot be continued without repeating images, so training goes on from the next."""
    common = ("train.max_steps=8", "run.resume=auto")
    first = _trainer(tiny_dataset, tmp_path, *common, "train.stop_at_step=3").fit()
    assert first["train"]["steps"] == 3
    resumed = _trainer(tiny_dataset, tmp_path, *common, "data.loader=dali")
    summary = resumed.fit()
    assert summary["train"]["steps"] == 8
    # Steps 4..8 are the first 5 batches of epoch 1 (6 batches per epoch).
    assert (resumed.epoch, resumed.batch_in_epoch) == (1, 5)


def test_deepspeed_cannot_skip_a_half_accumulated_step(tiny_dataset: Path, tmp_path: Path) -> None:
    """A non-finite second micro-batch: DDP drops the step; under DeepSpeed (whose counter
    already took the first micro-batch) the run stops with a message instead of drifting."""
    for engine_name, expect_error in (("ddp", False), ("deepspeed", True)):
        trainer = _trainer(tiny_dataset, tmp_path, "train.grad_accum_steps=2")
        trainer.engine.name = engine_name  # the branch taken depends on the engine's name
        real_forward = trainer.partial_fc.forward
        calls = {"n": 0}

        def second_is_nan(embeddings, labels, real_forward=real_forward, calls=calls):
            calls["n"] += 1
            loss, stats = real_forward(embeddings, labels)
            return (loss * float("nan") if calls["n"] == 2 else loss), stats

        trainer.partial_fc.forward = second_is_nan  # type: ignore[method-assign]
        if expect_error:
            with pytest.raises(TrainingError, match="micro-batch 2 of 2"):
                trainer._one_step(trainer._batches())
        else:
            _, _, finite = trainer._one_step(trainer._batches())
            assert not finite and trainer.batch_in_epoch == 2


@pytest.mark.parametrize("backend", ["plain", "cpu_fused"])
def test_trainer_runs_either_classifier_backend(
    tiny_dataset: Path, tmp_path: Path, backend: str
) -> None:
    trainer = _trainer(tiny_dataset, tmp_path, f"partialfc.backend={backend}")
    assert trainer.derived()["classifier_backend"] == backend
    loss, stats, finite = trainer._one_step(trainer._batches())
    assert finite and torch.isfinite(loss) and stats is not None and stats.angles is not None
