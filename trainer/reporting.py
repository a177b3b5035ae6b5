"""What a job tells about its run, on rank 0: the ``Trainer``'s part that writes the lines of
``training.log`` and the console (``trainer.run_log``) and the run folder's ``config.yaml``
and ``run.json`` (``trainer.run_status``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import dump_config
from trainer.run_log import (
    Pace,
    RunLog,
    eval_line,
    format_eta,
    format_rate,
    run_counts,
    step_line,
)
from trainer.run_status import RunStatus, read_status, write_config

__all__ = ["Reporting"]


class Reporting:
    """Open the run's log and status, then report the start, each progress line and
    evaluation, and the end; mixed into ``trainer.loop.Trainer``, whose position (step,
    epoch), plan and resume state it reads."""

    # Set by the Trainer.
    config: Any
    ctx: Any
    run_dir: Path
    run_log: RunLog
    status: RunStatus
    pace: Pace
    best_accuracy: dict[str, float]

    def _open_report(self) -> None:
        """training.log, the console and run.json (written by rank 0 only)."""
        main, cfg = self.ctx.is_main, self.config
        self.run_log = RunLog(self.run_dir, main, cfg.train.progress)
        self.status = RunStatus(
            self.run_dir, main, name=cfg.run.name, world_size=self.ctx.world_size
        )

    def _report_start(self) -> None:
        """After resuming: a resumed job says so first, then what this job runs; the resolved
        config goes to ``config.yaml``; run.json says running."""
        if self.resumed_from is not None:
            self.run_log.message(self._restart_line(self.resumed_line()))
        if self.ctx.is_main:
            config_file = write_config(self.run_dir, dump_config(self.config))
            world, batch = self.ctx.world_size, self.config.train.batch_size
            verb = "continuing" if self.resumed_from is not None else "started"
            self.run_log.message(
                f"{verb} run {self.config.run.name}: step {self.step}/{self.total_steps}, "
                f"epoch {self.epoch}, world size {world} x batch {batch} (global "
                f"{batch * world * self.accum}), {self.steps_per_epoch} steps per epoch; "
                f"resolved config {config_file}"
            )
        self.status.update(
            step=self.step,
            total_steps=self.total_steps,
            wandb_id=self.wandb_id,
            best_accuracy=self.best_accuracy,
        )

    def _restart_line(self, resumed: str) -> str:
        """The resumed line of an elastic job's restart: ``node lost: world size 2 -> 1,
        resumed from step-4 (...); steps 5..7 run again`` (or ``node joined``, ``workers
        restarted``): the previous job's world size and the steps it ran past the checkpoint
        come from its run.json, read before this job rewrites it."""
        before = read_status(self.run_dir)
        if self.config.dist.elastic is None or "world_size" not in before:
            return resumed
        old, new = int(before["world_size"]), self.ctx.world_size
        what = "node lost" if new < old else "node joined" if new > old else "workers restarted"
        line = f"{what}: world size {old} -> {new}, {resumed}"
        reached = int(before.get("step") or 0)
        if reached > self.step:
            line += f"; steps {self.step + 1}..{reached} run again"
        return line

    def _report_step(self, metrics: dict[str, Any], eta: float, steps: int) -> None:
        """A progress line (after ``steps`` more steps): training.log, the console (a line,
        or the bar on a terminal), run.json."""
        line = step_line(self.step, self.total_steps, self.epoch, metrics, eta)
        self.run_log.step(
            steps,
            line,
            loss=f"{metrics['train/loss']:.3f}",
            lr=f"{metrics['train/lr']:.4f}",
            ips=format_rate(metrics["train/samples_per_sec"]),
            eta=format_eta(eta),
        )
        self.status.update(step=self.step, loss=metrics["train/loss"], epoch=self.epoch)

    def _report_eval(self, results: dict[str, dict[str, float]]) -> None:
        """One line per verification set, with the best accuracy so far."""
        for name, res in results.items():
            self.run_log.message(eval_line(self.step, name, res))
        if results:
            self.status.update(best_accuracy=self.best_accuracy)

    def _report_end(self, state: str, summary: dict[str, Any], reason: str | None = None) -> None:
        """The job's last line (this job's steps and time, and the run's) and run.json's
        final state: finished, stopped or failed."""
        line = f"{state} at step {self.step}/{self.total_steps}"
        if reason:
            line += f" ({reason})"
        if "checkpoint" in summary:
            line += f"; checkpoint {Path(summary['checkpoint']).name}"
        if "train" in summary:
            line += f"; {run_counts(summary['train'])}"
        # A failure's line on the console is the launcher's (launcher.failure) or a traceback.
        self.run_log.message(line, console=state != "failed")
        self.status.update(state=state, reason=reason, step=self.step)
