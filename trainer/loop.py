"""The training loop: backbone under DDP, Partial FC outside it, metrics, eval, checkpoint, ONNX.

One step on every rank::

    images [B,3,H,W], labels [B]  -> backbone (DDP)              -> embeddings [B, D]
    -> PartialFC (all-gather, sampled shard, margin, distributed CE) -> loss (global mean)
    -> backward -> clip -> backbone optimizer step + classifier optimizer step -> LR step
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from backbones import create_backbone
from dataio.loaders import DaliOptions, LoaderConfig, build_loader
from evaluation.onnx_export import export_onnx
from evaluation.verification import cosine_pixel_baseline
from partialfc import StepStats, build_margin, build_partial_fc, resolve_backend
from partialfc.rounding import storage_dtype
from trainer import checkpoint as ckpt
from trainer.config import Config, ConfigError
from trainer.context import DistContext
from trainer.engine import build_engine
from trainer.evaluate import evaluate_sets, load_eval_sets, track_best
from trainer.init_from import apply_init_from
from trainer.monitor import WandbRun, angle_histogram, flatten_metrics, step_metrics
from trainer.nonfinite import ForwardBuffers
from trainer.optim import build_optimizer, build_scheduler
from trainer.plan import pack_facts
from trainer.reporting import Reporting
from trainer.resume import Checkpointing
from trainer.run_log import Pace, RunLog
from trainer.run_status import RunStatus
from trainer.sample_record import SampleRecord
from trainer.step import Stepping
from trainer.stop import StopFlag


def _seed_everything(seed: int, rank: int) -> None:
    # Model init must be identical on all ranks (DDP also broadcasts it); data augmentation
    # randomness comes from the loader's own seeded generators.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer(Checkpointing, Stepping, Reporting):
    """Builds every part from the config on this rank and runs the job (checkpoints and
    resume: ``trainer.resume.Checkpointing``; one optimizer step: ``trainer.step.Stepping``;
    training.log, console, run.json: ``trainer.reporting.Reporting``)."""

    def __init__(self, config: Config, ctx: DistContext, stop: StopFlag | None = None) -> None:
        self.config = config
        self.ctx = ctx
        self.stop = stop or StopFlag()
        self.run_dir = config.run_dir
        torch.set_num_threads(config.train.threads_per_process)
        _seed_everything(config.run.seed, ctx.rank)

        self.facts = pack_facts(config)
        mcfg = config.model
        self.backbone_kwargs = {
            "embedding_size": mcfg.embedding_size,
            "input_size": list(self.facts.image_size),
            **mcfg.kwargs,
        }
        self.backbone = create_backbone(mcfg.backbone, **self.backbone_kwargs).to(ctx.device)

        pcfg = config.partialfc
        storage = storage_dtype(pcfg.storage_dtype)
        self.backend = resolve_backend(pcfg.backend, ctx.device, storage)
        margin = build_margin(pcfg.margin)
        self.partial_fc = build_partial_fc(
            self.backend,
            margin,
            embedding_size=mcfg.embedding_size,
            num_classes=self.facts.num_classes,
            sample_rate=pcfg.sample_rate,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=config.run.seed,
            init_std=pcfg.init_std,
            device=ctx.device,
            update=pcfg.update,
            storage_dtype=storage,
            rounding=pcfg.rounding,
        )
        self.partial_fc.count_steps = False  # _one_step counts optimizer steps instead
        self.grad_norm: torch.Tensor | None = None  # of the last step, where computed

        tcfg = config.train
        loader_config = LoaderConfig(
            batch_size=tcfg.batch_size,
            seed=config.run.seed,
            workers=config.data.workers,
            flip=config.data.flip,
            skip_corrupt=config.data.skip_corrupt,
            pixels="uint8",  # normalised on ctx.device by to_model_input
            dali=DaliOptions(cache_dir=config.cache_dir),  # the index: never in the pack
            with_keys=tcfg.record_samples,
        )
        self.loader = build_loader(
            config.data.loader,
            config.data.train,
            loader_config,
            rank=ctx.rank,
            world_size=ctx.world_size,
            device=ctx.device,
        )
        self.samples = SampleRecord(self.run_dir, ctx.rank, ctx.world_size, tcfg.record_samples)
        self.accum = tcfg.grad_accum_steps
        self.steps_per_epoch = len(self.loader) // self.accum
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size: {tcfg.batch_size} per rank x {ctx.world_size} ranks x "
                f"{self.accum} accumulation steps is more than the {self.facts.num_images} "
                f"images of {config.data.train}"
            )
        self.total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * self.steps_per_epoch))

        ocfg = config.optimizer
        self.opt_backbone = build_optimizer(self.backbone.parameters(), ocfg)
        # The shard's own row-sparse optimizer (required by update="sampled").
        self.opt_fc = self.partial_fc.build_optimizer(
            ocfg.name,
            lr=pcfg.lr or ocfg.lr,
            momentum=ocfg.momentum,
            weight_decay=ocfg.weight_decay if pcfg.weight_decay is None else pcfg.weight_decay,
            betas=ocfg.betas,
        )
        self.warmup_steps = config.schedule.resolve_warmup(self.steps_per_epoch)
        milestones = config.schedule.milestone_steps(self.steps_per_epoch)
        self.sched_backbone, self.sched_fc = (
            build_scheduler(opt, self.total_steps, config.schedule, self.warmup_steps, milestones)
            for opt in (self.opt_backbone, self.opt_fc)
        )
        apply_init_from(config, ctx, self.backbone, self.partial_fc)  # before the engine wraps
        # DDP or DeepSpeed around the backbone; it also steps the classifier (loss scaling).
        self.engine = build_engine(self.backbone, self.opt_backbone, ctx, config)
        self.backbone = self.engine.module
        self.forward_buffers = ForwardBuffers(self.backbone, self.partial_fc)  # trainer.step
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches of the current epoch already consumed
        self.nonfinite_total = 0
        self.nonfinite_streak = 0
        self.wandb_id: str | None = None
        self.resumed_from: Path | None = None
        self.resume_note = ""  # how it resumed: world sizes, re-sharding, skipped checkpoints
        self.best_accuracy: dict[str, float] = {}  # per verification set, across jobs
        self.pace = Pace()  # samples/s, ETA and training time (of earlier jobs too)
        self.run_log = RunLog(self.run_dir, enabled=False, progress=False)  # fit() opens it
        self.status = RunStatus(self.run_dir, enabled=False)
        self._loader_positioned = False  # True once a checkpoint's loader state was loaded
        self.eval_sets = load_eval_sets(config.data.val)

    # ------------------------------------------------------------------------------ running
    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps``; evaluate, checkpoint and export; return the summary.

        If the stop flag is raised (preemption signal), finish the step, save a checkpoint
        and return early with ``summary["stopped"]`` set; raised before the first step, it
        returns at once (nothing trained: no checkpoint).
        """
        cfg, ctx = self.config, self.ctx
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._open_report()  # training.log, the console, run.json
        summary: dict[str, Any] = {"derived": self.derived()}
        wandb_run: WandbRun | None = None
        try:
            self._maybe_resume()
            self._report_start()  # a resumed job says so first
            if self.resumed_from is not None:
                summary["resumed_from"] = str(self.resumed_from)
            if self._stop_requested():  # before the first step: nothing new to save
                summary["stopped"] = f"{self.stop.reason} before the first step"
                if self.resumed_from is not None:
                    summary["checkpoint"] = str(self.resumed_from)
                self._report_end("stopped", summary, summary["stopped"])
                return summary
            wandb_run = WandbRun(
                cfg.wandb,
                self.run_dir,
                cfg.run.name,
                {**cfg.model_dump(mode="json"), "derived": self.derived()},
                enabled=ctx.is_main,
                run_id=self.wandb_id,
                step=self.step,
            )
            self.wandb_id = wandb_run.id
            self.status.update(wandb_id=self.wandb_id)
            if cfg.train.eval_at_start and self.resumed_from is None:
                summary["eval_before"] = self.evaluate(wandb_run)
            summary["train"] = self._train_steps(wandb_run)
            self.run_log.close_bar()
            summary["checkpoint"] = str(self.save_checkpoint())
            if self.stop.is_set() and self.step < self.total_steps:
                summary["stopped"] = self.stop.reason or "stop requested"
                self._report_end("stopped", summary, summary["stopped"])
                return summary
            summary["eval_after"] = self.evaluate(wandb_run)
            if ctx.is_main:
                if cfg.eval.pixel_baseline:
                    summary["pixel_baseline"] = {
                        s.name: cosine_pixel_baseline(
                            s.images, s.issame, cfg.eval.nfolds
                        ).as_dict()["accuracy_mean"]
                        for s in self.eval_sets
                    }
                if cfg.export.onnx:
                    summary["onnx"] = self.export(Path(summary["checkpoint"]))
                summary["wandb_run"] = wandb_run.path
                wandb_run.summary(flatten_metrics("final", summary.get("eval_after", {})))
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            self._report_end("finished", summary)
        except BaseException as exc:
            state = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
            with contextlib.suppress(Exception):  # the error itself is what the caller needs
                self._report_end(state, summary, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.run_log.close()
            self.samples.close()
            if wandb_run is not None:
                wandb_run.finish()
        return summary

    def derived(self) -> dict[str, Any]:
        """Values computed from the config and the data (logged, never written back)."""
        return {
            "world_size": self.ctx.world_size,
            "num_classes": self.facts.num_classes,
            "num_images": self.facts.num_images,
            "image_size": list(self.facts.image_size),
            "global_batch_size": self.config.train.batch_size * self.ctx.world_size * self.accum,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "classifier_rows_this_rank": self.partial_fc.num_local,
            "classifier_backend": self.backend,
        }

    def _train_steps(self, wandb_run: WandbRun) -> dict[str, Any]:
        cfg, ctx = self.config, self.ctx
        tcfg = cfg.train
        global_batch = tcfg.batch_size * ctx.world_size * self.accum
        start_step = self.step
        last: dict[str, float] = {}
        steps_since_log = 0
        self.engine.model.train()
        batches = self._batches()
        self.run_log.start_bar(self.total_steps, self.step)
        self.pace.start(self.step)
        while self.step < self.total_steps:
            self.pace.step_started()
            loss, stats, finite = self._one_step(batches)
            self.pace.step_done()
            self.step += 1
            final = self.step == self.total_steps
            steps_since_log += 1
            self._count_nonfinite(finite, self.run_log)
            if self.step % tcfg.log_every == 0 or final:
                rate, eta = self.pace.report(self.step, self.total_steps, global_batch)
                last = self._log(loss, stats, rate)
                if tcfg.histogram_every and self.step % tcfg.histogram_every == 0:
                    last = {**last, **angle_histogram(stats if self.ctx.is_main else None)}
                wandb_run.log(last, step=self.step)
                self._report_step(last, eta, steps_since_log)
                steps_since_log = 0
            if tcfg.eval_every and self.step % tcfg.eval_every == 0 and not final:
                self.evaluate(wandb_run)  # the final one runs after the checkpoint
            if tcfg.stop_at_step is not None and self.step >= tcfg.stop_at_step:
                self.stop.set(f"train.stop_at_step={tcfg.stop_at_step} reached")
            if self._stop_requested():
                self.run_log.message(f"[step {self.step}] {self.stop.reason}: saving a checkpoint")
                break
            if (
                tcfg.checkpoint_every
                and self.step % tcfg.checkpoint_every == 0
                and self.step < self.total_steps
            ):
                self.save_checkpoint()
        elapsed = self.pace.seconds()
        done = self.step - start_step
        return {
            "steps": self.step,
            "start_step": start_step,
            "steps_this_run": done,
            "seconds": round(elapsed, 2),
            "seconds_total": round(self.pace.seconds_total(), 2),
            "samples_per_sec": round(done * global_batch / max(elapsed, 1e-9), 1),
            "final_loss": last.get("train/loss"),
            "nonfinite_steps": self.nonfinite_total,
        }

    def _stop_requested(self) -> bool:
        """True on every rank if any rank received a stop signal (one tiny all-reduce)."""
        flag = torch.tensor([1.0 if self.stop.is_set() else 0.0], device=self.ctx.device)
        if self.ctx.distributed and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and not self.stop.is_set():
            self.stop.set("stop requested on another rank")
        return flag.item() > 0

    def _log(
        self, loss: torch.Tensor, stats: StepStats | None, samples_per_sec: float
    ) -> dict[str, float]:
        # The distributed CE already returns the global-batch mean on every rank.
        out = {
            "train/loss": float(loss),
            "train/lr": self.sched_backbone.get_last_lr()[0],
            "train/samples_per_sec": samples_per_sec,
            "train/epoch": self.epoch,
            "train/nonfinite_steps": self.nonfinite_total,
        }
        if self.grad_norm is not None:
            out["train/grad_norm"] = float(self.grad_norm)
        if self.config.data.skip_corrupt:  # the same on every rank: the sum is collective
            out["data/skipped_records"] = self._skipped_records()
        return {**out, **step_metrics(stats)}

    def _skipped_records(self) -> int:
        """Corrupt records skipped so far by every rank's loader: those left out when the
        pack was opened once (every rank opens the whole pack), those met while reading
        summed over the ranks."""
        at_open = self.loader.num_skipped_at_open
        read = torch.tensor([self.loader.num_skipped - at_open], device=self.ctx.device)
        if self.ctx.distributed and dist.is_initialized():
            dist.all_reduce(read)
        return at_open + int(read.item())

    # ------------------------------------------------------------------- eval / save / export
    def evaluate(self, wandb_run: WandbRun) -> dict[str, dict[str, float]]:
        """The figures ``facetrain eval`` gives for the checkpoint of this step (see
        ``trainer.evaluate.evaluate_sets``) and the best accuracy so far of each set, logged
        and printed by rank 0."""
        results = evaluate_sets(
            self.eval_sets, self.backbone, self.config, self.ctx, self.engine.collective_forward
        )
        track_best(self.best_accuracy, results)
        for name, res in results.items():
            wandb_run.log({f"eval/{name}/{k}": v for k, v in res.items()}, step=self.step)
        self._report_eval(results)
        return results

    def export(self, step_dir: Path) -> dict[str, Any]:
        """Rank 0: ONNX export, with an onnxruntime parity check, of the backbone saved in
        ``step_dir``: a plain module rebuilt from its weights, whatever engine trained it
        (under ZeRO-3 the live module only holds this rank's partition)."""
        ecfg = self.config.export
        path = self.run_dir / "backbone.onnx"
        model = create_backbone(self.config.model.backbone, **self.backbone_kwargs)
        model.load_state_dict(ckpt.load_torch(step_dir / "backbone.pt"), strict=True)
        res = export_onnx(
            model,
            path,
            input_size=self.facts.image_size,
            opset=ecfg.opset,
            tolerance=ecfg.tolerance,
            seed=self.config.run.seed,
        )
        return {"path": str(res.path), "max_abs_diff": res.max_abs_diff, "opset": res.opset}

    def _barrier(self) -> None:
        if self.ctx.distributed and dist.is_initialized():
            dist.barrier()
