"""Checkpoints of a run and resuming from them: the ``Trainer``'s part that writes and reads
``step-N/`` folders (see ``trainer.checkpoint`` for the files, ``trainer.state`` for what a
classifier shard and the random state hold)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainer import checkpoint as ckpt
from trainer import state as train_state
from trainer.config import Config, dump_config
from trainer.nonfinite import first_nonfinite
from trainer.step import TrainingError

__all__ = ["Checkpointing", "continue_run"]


def continue_run(config: Config) -> Config:
    """The config of a restarted job (torchrun restarted its workers, or an elastic job's
    nodes changed): ``run.resume: auto`` when the run folder holds a checkpoint -- the run
    goes on from its latest one, not from where it first started -- else as configured."""
    if config.run.resume == "auto" or not ckpt.step_dirs(config.run_dir):
        return config
    return config.model_copy(update={"run": config.run.model_copy(update={"resume": "auto"})})


def _resume_note(saved_world: int, world: int, saved_batch: int | None, batch: int) -> str:
    """How a job continues a checkpoint, as its first line tells."""
    if saved_world != world:
        return f"world size {saved_world} -> {world}, classifier re-sharded"
    if saved_batch != batch:
        return f"world size {world}, batch size {saved_batch} -> {batch}"
    return f"world size {world}, exact continuation"


class Checkpointing:
    """Save, find and load checkpoints; mixed into ``trainer.loop.Trainer``, whose state
    (step, epoch, modules, optimizers, schedules, loader, wandb id) it reads and restores."""

    # Set by the Trainer.
    config: Any
    ctx: Any
    run_dir: Path

    def save_checkpoint(self) -> Path:
        """Every rank writes its part into step-N.tmp; rank 0 publishes it.

        State that is not finite is refused before anything is written (TrainingError). A
        write that fails -- a full disk -- removes step-N.tmp and raises, on every rank, one
        CheckpointWriteError naming the step, the cause and the last complete checkpoint,
        which stays as it was.
        """
        self._refuse_nonfinite()
        tmp = ckpt.tmp_dir_for(self.run_dir, self.step)
        failed: OSError | None = None
        try:
            if self.ctx.is_main:
                ckpt.fresh_tmp_dir(self.run_dir, self.step)
        except OSError as exc:
            failed = exc
        self._settle(tmp, failed)
        try:
            self.engine.save_extra(tmp)  # collective (DeepSpeed partitions)
        except OSError as exc:  # inside a collective: the other ranks fail in it
            shutil.rmtree(tmp, ignore_errors=True)
            raise ckpt.CheckpointWriteError(self._not_written(exc)) from exc
        backbone_state = self.engine.full_state_dict()  # collective under ZeRO-3
        try:
            r = self.ctx.rank
            pfc = self.partial_fc
            payload = train_state.classifier_payload(
                pfc, self.opt_fc, pfc.class_start, pfc.num_local
            )
            payload["scheduler"] = self.sched_fc.state_dict()
            ckpt.save_torch(payload, tmp / f"classifier-rank{r}.pt")
            ckpt.save_torch(
                {
                    "engine": self.engine.state_dict(),
                    "scheduler": self.sched_backbone.state_dict(),
                    "rng": train_state.capture_rng(),
                    "sample_generator": pfc.sample_generator.get_state(),
                    "loader": self.loader.state_dict(),
                },
                tmp / f"trainer-rank{r}.pt",
            )
            if self.ctx.is_main:
                ckpt.save_torch(backbone_state, tmp / "backbone.pt")
        except OSError as exc:
            failed = exc
        self._settle(tmp, failed)
        final = self.run_dir / f"step-{self.step}"
        try:
            if self.ctx.is_main:
                keep = self.config.train.keep_checkpoints
                final = ckpt.finalize(self.run_dir, self.step, self._meta(), keep)
        except OSError as exc:
            failed = exc
        self._settle(tmp, failed)
        return final

    def _meta(self) -> dict[str, Any]:
        """meta.json of the checkpoint of this step."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.ctx.world_size,
            "engine": self.engine.name,
            "batch_size": self.config.train.batch_size,
            "nonfinite_steps": self.nonfinite_total,
            "wandb_id": self.wandb_id,
            "best_accuracy": self.best_accuracy,
            "train_seconds": round(self.pace.seconds_total(), 3),
            "backbone": self.config.model.backbone,
            "backbone_kwargs": self.backbone_kwargs,
            "derived": self.derived(),
            "config": dump_config(self.config),
        }

    def _last_complete(self) -> str:
        found = ckpt.step_dirs(self.run_dir)
        if not found:
            return "there is no complete checkpoint yet"
        return f"the last complete checkpoint is {found[-1][1].name}"

    def _not_written(self, exc: OSError) -> str:
        """``checkpoint step-N not written: no space left on DIR; the last complete ...``."""
        if exc.errno == errno.ENOSPC:
            why = f"no space left on {self.run_dir}"
        else:
            why = f"{exc.strerror or exc}: {exc.filename or self.run_dir}"
        return f"checkpoint step-{self.step} not written: {why}; {self._last_complete()}"

    def _settle(self, tmp: Path, failed: OSError | None) -> None:
        """A barrier that also tells every rank whether a rank's write failed; then rank 0
        removes ``tmp`` (no rank writes into it any more) and every rank raises the same
        CheckpointWriteError. A rank that failed skips its writes up to its next ``_settle``,
        where its peers are."""
        line = self._first_of_ranks(None if failed is None else self._not_written(failed))
        if line is None:
            return
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ckpt.CheckpointWriteError(line)

    def _first_of_ranks(self, line: str | None) -> str | None:
        """Collective: the lowest rank's non-empty ``line``, the same on every rank."""
        if not (self.ctx.distributed and dist.is_initialized()):
            return line
        lines: list[str | None] = [None] * self.ctx.world_size
        dist.all_gather_object(lines, line)
        return next((x for x in lines if x), None)

    def _refuse_nonfinite(self) -> None:
        """TrainingError on every rank if a weight or buffer of any rank is not finite: a
        checkpoint that ``--resume`` would load only to train on NaN."""
        named = [
            (f"{what}.{name}", tensor)
            for what, module in (("backbone", self.backbone), ("classifier", self.partial_fc))
            for name, tensor in (*module.named_parameters(), *module.named_buffers())
        ]
        bad = first_nonfinite(named)
        line = self._first_of_ranks(
            None if bad is None else f"{bad} is not finite on rank {self.ctx.rank}"
        )
        if line is not None:
            raise TrainingError(
                f"step {self.step}: {line}: checkpoint step-{self.step} not written; "
                f"{self._last_complete()}; lower optimizer.lr (or check the data)"
            )

    def _maybe_resume(self) -> None:
        """Load ``run.resume``: "auto" = the newest complete checkpoint of this run that every
        rank can read (a truncated or missing file falls back to the one before), or a path.
        """
        spec = self.config.run.resume
        if spec is None:
            return
        if spec == "auto":
            candidates = [d for _, d in reversed(ckpt.step_dirs(self.run_dir))]
            if not candidates:
                return
        else:
            candidates = [ckpt.resolve_checkpoint(spec)]
        errors: list[str] = []
        skipped: list[str] = []  # what resumed_line tells
        for step_dir in candidates:
            try:
                self.load_checkpoint(step_dir)
                ok = 1.0
            except ckpt.CheckpointError as exc:
                errors.append(str(exc))
                ok = 0.0
            # Every rank must resume from the same checkpoint.
            flag = torch.tensor([ok], device=self.ctx.device)
            if self.ctx.distributed and dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() > 0:
                if skipped:
                    self.resume_note += "; cannot resume from " + ", ".join(skipped)
                return
            why = errors[-1] if ok == 0.0 else "another rank could not read its files"
            skipped.append(f"{step_dir.name} ({why})")
        tried = [str(c) for c in candidates]
        reason = errors or "another rank could not read its files"
        raise ckpt.CheckpointError(f"no usable checkpoint among {tried}: {reason}")

    def load_checkpoint(self, step_dir: Path) -> None:
        """Restore everything; the classifier is re-sharded if the world size changed."""
        meta = ckpt.read_meta(step_dir)
        saved_world = int(meta["world_size"])
        same_world = saved_world == self.ctx.world_size
        self.engine.load_weights(ckpt.load_torch(step_dir / "backbone.pt"))
        pfc = self.partial_fc
        train_state.load_classifier(
            step_dir, saved_world, pfc, self.opt_fc, pfc.class_start, pfc.num_local
        )
        fc_sched = ckpt.load_torch(step_dir / "classifier-rank0.pt")["scheduler"]
        own = step_dir / f"trainer-rank{self.ctx.rank if same_world else 0}.pt"
        trainer_state = ckpt.load_torch(own)
        same_engine = meta.get("engine", "ddp") == self.engine.name
        if same_engine and same_world:
            self.engine.load_state_dict(trainer_state["engine"])
        elif same_engine and self.engine.name == "ddp":
            # DDP's optimizer state is replicated: any rank's copy fits any world size.
            self.engine.load_state_dict(trainer_state["engine"])
        # DeepSpeed's own checkpoint: its optimizer partitions, re-partitioned on another world
        # size (trainer.ds_universal); what it says joins the resume line.
        engine_note = self.engine.load_extra(step_dir, same_world)
        self.sched_backbone.load_state_dict(trainer_state["scheduler"])
        self.sched_fc.load_state_dict(fc_sched)
        self.step = int(meta["step"])
        self.epoch = int(meta["epoch"])
        self.nonfinite_total = int(meta.get("nonfinite_steps", 0))
        self.wandb_id = meta.get("wandb_id")
        self.best_accuracy = dict(meta.get("best_accuracy") or {})
        self.pace.seconds_before = float(meta.get("train_seconds", 0.0))
        self.resume_note = _resume_note(
            saved_world, self.ctx.world_size, meta.get("batch_size"), self.config.train.batch_size
        )
        if engine_note:
            self.resume_note += f", {engine_note}"
        if same_world and meta.get("batch_size") == self.config.train.batch_size:
            # Exact: this rank's RNG streams and data position continue where they stopped.
            train_state.restore_rng(trainer_state["rng"])
            pfc.sample_generator.set_state(trainer_state["sample_generator"])
            self.batch_in_epoch = int(meta["batch_in_epoch"])
            if "loader" in trainer_state:
                # The loader's own position also carries what it skipped (corrupt records).
                # A loader that cuts the epoch differently now (another kind, seed or number
                # of images) cannot continue it: it starts the next epoch instead, and the
                # trainer follows, so no image of the saved epoch is seen twice.
                position = self.loader.load_state_dict(trainer_state["loader"], strict=False)
                self.epoch, self.batch_in_epoch = position
                self._loader_positioned = True
        else:
            # New world size: the same global number of samples of this epoch is skipped (to
            # within one global batch); per-rank random streams restart from a seed that
            # depends on (seed, rank, step) so the run stays reproducible.
            consumed = int(meta["batch_in_epoch"]) * int(meta["batch_size"]) * saved_world
            per_batch = self.config.train.batch_size * self.ctx.world_size
            self.batch_in_epoch = min(consumed // per_batch, len(self.loader))
            seed = hash((self.config.run.seed, self.ctx.rank, self.step)) & (2**63 - 1)
            pfc.sample_generator.manual_seed(seed)
            torch.manual_seed(seed)
        self.resumed_from = step_dir

    def resumed_line(self) -> str:
        """``resumed from step-N (world size 2 -> 1, classifier re-sharded)``: a resumed
        job's first line (a checkpoint of another run is named by its path)."""
        where = self.resumed_from
        own = where is not None and where.parent.resolve() == self.run_dir.resolve()
        return f"resumed from {where.name if own else where} ({self.resume_note})"
