"""One optimizer step of the ``Trainer``: micro-batches from the loader's position, gradient
accumulation under mixed precision, and non-finite losses (the step is skipped; too many in a
row stop the run)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dataio.loading import to_model_input
from partialfc import StepStats
from trainer.nonfinite import ForwardBuffers
from trainer.run_log import RunLog

__all__ = ["Stepping", "TrainingError"]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite)."""


class Stepping:
    """Micro-batches, one optimizer step over ``accum`` of them, and the non-finite guard;
    mixed into ``trainer.loop.Trainer``, whose modules, optimizers, schedules, loader and
    position (step, epoch, batch in epoch) it reads and advances."""

    # Set by the Trainer.
    config: Any
    ctx: Any
    accum: int
    forward_buffers: ForwardBuffers
    samples: Any  # trainer.sample_record.SampleRecord

    def _autocast(self) -> contextlib.AbstractContextManager:
        precision = self.config.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.ctx.device.type, dtype=dtype)

    def _batches(self):
        """Micro-batches from the current position on, across epochs, with epoch bookkeeping."""
        while True:
            if not self._loader_positioned:
                self.loader.set_epoch(self.epoch, start_batch=self.batch_in_epoch)
            self._loader_positioned = False
            for batch in self.loader:
                self.batch_in_epoch += 1
                yield self.samples.take(self.step + 1, self.epoch, batch)  # train.record_samples
            self.epoch += 1
            self.batch_in_epoch = 0

    def _one_step(self, batches) -> tuple[torch.Tensor, StepStats | None, bool]:
        """One optimizer step over ``accum`` micro-batches. Returns (loss, the last
        micro-batch's Partial FC stats, finite); ``self.grad_norm`` is the step's gradient
        norm where the engine computed one.

        The loss is the global-batch mean on every rank (distributed CE), so every rank takes
        the same branch when it is non-finite and skips the step: no rank is left waiting in a
        gradient all-reduce.
        """
        ctx, engine = self.ctx, self.engine
        engine.zero_grad()
        self.opt_fc.zero_grad(set_to_none=True)
        self.forward_buffers.save()  # BatchNorm statistics: a skipped step gives them back
        total = torch.zeros((), device=ctx.device)
        stats: StepStats | None = None
        self.grad_norm = None
        for micro in range(self.accum):
            images, labels = next(batches)
            images = to_model_input(images, ctx.device)  # float32 [B, 3, H, W]
            labels = labels.to(ctx.device, non_blocking=True)
            last_micro = micro == self.accum - 1
            with engine.micro_context(last_micro):
                with self._autocast():
                    embeddings = engine(images)  # [B, D]
                    loss, stats = self.partial_fc(embeddings, labels)
                if not torch.isfinite(loss):
                    if micro > 0 and engine.name == "deepspeed":
                        # DeepSpeed already counted the earlier micro-batches towards its
                        # accumulation boundary and holds their gradients; dropping them
                        # would leave every later step out of step with the classifier's.
                        raise TrainingError(
                            f"non-finite loss on micro-batch {micro + 1} of "
                            f"{self.accum} at step {self.step + 1}: under DeepSpeed only a "
                            "step whose first micro-batch fails can be skipped; resume from "
                            "the last checkpoint (--resume auto), or lower optimizer.lr"
                        )
                    # Drop what earlier micro-batches accumulated, and the rest of this step.
                    for _ in range(self.accum - 1 - micro):
                        next(batches)
                    engine.zero_grad()
                    self.opt_fc.zero_grad(set_to_none=True)
                    self.forward_buffers.restore()
                    return loss.detach(), stats, False
                engine.backward(loss / self.accum, last_micro)
            total += loss.detach() / self.accum
        max_norm = self.config.partialfc.clip_grad_norm
        self.grad_norm = engine.step(
            self.opt_fc,
            self.partial_fc.parameters(),
            None if max_norm is None else lambda: self.partial_fc.clip_grad_norm_(max_norm),
        )
        self.partial_fc.num_steps.add_(1)  # what step-annealed heads (SphereFace) read
        self.sched_backbone.step()
        self.sched_fc.step()
        return total, stats, True

    def _count_nonfinite(self, finite: bool, log: RunLog) -> None:
        """After step ``self.step``: count it if it was skipped (non-finite loss); raise
        TrainingError after ``train.max_nonfinite_steps`` in a row."""
        if finite:
            self.nonfinite_streak = 0
            return
        self.nonfinite_total += 1
        self.nonfinite_streak += 1
        log.message(
            f"[step {self.step}] non-finite loss: step skipped "
            f"({self.nonfinite_streak} in a row, {self.nonfinite_total} in all)"
        )
        if self.nonfinite_streak >= self.config.train.max_nonfinite_steps:
            raise TrainingError(
                f"loss was non-finite for {self.nonfinite_streak} consecutive steps "
                f"(train.max_nonfinite_steps) at step {self.step}: lower optimizer.lr, "
                "check the margin settings or the data"
            )
