"""The training loop: backbone under DDP, Partial FC outside it, metrics, eval, checkpoint, ONNX.

One step on every rank::

    images [B,3,H,W], labels [B]  -> backbone (DDP)              -> embeddings [B, D]
    -> PartialFC (all-gather, sampled shard, margin, distributed CE) -> loss (global mean)
    -> backward -> clip -> backbone optimizer step + classifier optimizer step -> LR step
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from backbones import create_backbone
from dataio.pack import FacePack
from dataio.torch_loader import build_train_loader
from dataio.verification_bin import VerificationSet, load_bin
from evaluation.onnx_export import export_onnx
from evaluation.verification import cosine_pixel_baseline, extract_embeddings, kfold_verification
from partialfc import PartialFC, build_margin
from trainer import checkpoint as ckpt
from trainer.config import Config, ConfigError, dump_config
from trainer.context import DistContext
from trainer.monitor import Progress, Throughput, WandbRun
from trainer.optim import build_optimizer, build_scheduler


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stayed non-finite)."""


@dataclasses.dataclass
class PackFacts:
    """What the training pack says about itself (never typed by hand in the config)."""

    num_classes: int
    num_images: int
    image_size: tuple[int, int]


def read_pack_facts(config: Config) -> PackFacts:
    """Open the training pack, read its facts and check them against the config."""
    with FacePack(config.data.train) as pack:
        facts = PackFacts(pack.num_classes, pack.num_images, tuple(pack.image_size))
    for key, expected, actual in (
        ("data.num_classes", config.data.num_classes, facts.num_classes),
        ("data.num_images", config.data.num_images, facts.num_images),
    ):
        if expected is not None and expected != actual:
            raise ConfigError(
                f"{key}: config says {expected} but the pack {config.data.train} has {actual}"
            )
    return facts


def _seed_everything(seed: int, rank: int) -> None:
    # Model init must be identical on all ranks (DDP also broadcasts it); data augmentation
    # randomness comes from the loader's own seeded generators.
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclasses.dataclass
class EvalSet:
    name: str
    images: np.ndarray  # [2N, H, W, 3] uint8
    issame: np.ndarray  # [N] bool


def _load_eval_sets(paths: list[str]) -> list[EvalSet]:
    sets = []
    for path in paths:
        vs: VerificationSet = load_bin(path)
        sets.append(EvalSet(Path(path).stem, vs.decode(), np.asarray(vs.issame, dtype=bool)))
    return sets


class Trainer:
    """Builds every part from the config on this rank and runs the job."""

    def __init__(self, config: Config, ctx: DistContext) -> None:
        self.config = config
        self.ctx = ctx
        self.run_dir = config.run_dir
        self.group = None
        torch.set_num_threads(config.train.threads_per_process)
        _seed_everything(config.run.seed, ctx.rank)

        self.facts = read_pack_facts(config)
        mcfg = config.model
        self.backbone_kwargs = {
            "embedding_size": mcfg.embedding_size,
            "input_size": list(self.facts.image_size),
            **mcfg.kwargs,
        }
        self.backbone = create_backbone(mcfg.backbone, **self.backbone_kwargs).to(ctx.device)
        self.model: nn.Module = self.backbone
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.backbone, device_ids=ids)

        pcfg = config.partialfc
        margin = build_margin(pcfg.margin, **pcfg.margin_kwargs)
        self.partial_fc = PartialFC(
            margin,
            embedding_size=mcfg.embedding_size,
            num_classes=self.facts.num_classes,
            sample_rate=pcfg.sample_rate,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=config.run.seed,
            init_std=pcfg.init_std,
            device=ctx.device,
        )

        tcfg = config.train
        self.loader = build_train_loader(
            config.data.train,
            rank=ctx.rank,
            world_size=ctx.world_size,
            batch_size=tcfg.batch_size,
            seed=config.run.seed,
            workers=config.data.workers,
            flip=config.data.flip,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size: {tcfg.batch_size} per rank x {ctx.world_size} ranks is more "
                f"than the {self.facts.num_images} images of {config.data.train}"
            )
        self.total_steps = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * self.steps_per_epoch))

        ocfg = config.optimizer
        self.opt_backbone = build_optimizer(self.backbone.parameters(), ocfg)
        self.opt_fc = build_optimizer(
            self.partial_fc.parameters(), ocfg, lr=pcfg.lr, weight_decay=pcfg.weight_decay
        )
        self.sched_backbone = build_scheduler(self.opt_backbone, self.total_steps, config.schedule)
        self.sched_fc = build_scheduler(self.opt_fc, self.total_steps, config.schedule)
        self.step = 0
        self.epoch = 0
        self.eval_sets = _load_eval_sets(config.data.val) if ctx.is_main else []

    # ------------------------------------------------------------------------------ running
    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps``; evaluate, checkpoint and export; return the summary."""
        cfg, ctx = self.config, self.ctx
        self.run_dir.mkdir(parents=True, exist_ok=True)
        wandb_run = WandbRun(
            cfg.wandb,
            self.run_dir,
            cfg.run.name,
            {**cfg.model_dump(mode="json"), "derived": self.derived()},
            enabled=ctx.is_main,
        )
        summary: dict[str, Any] = {"derived": self.derived()}
        progress = Progress(self.total_steps, self.step, ctx.is_main and cfg.train.progress)
        try:
            if cfg.train.eval_at_start:
                summary["eval_before"] = self.evaluate(wandb_run, progress)
            summary["train"] = self._train_steps(wandb_run, progress)
            progress.close()
            summary["checkpoint"] = str(self.save_checkpoint())
            summary["eval_after"] = self.evaluate(wandb_run, progress)
            if ctx.is_main:
                if cfg.eval.pixel_baseline:
                    summary["pixel_baseline"] = {
                        s.name: cosine_pixel_baseline(
                            s.images, s.issame, cfg.eval.nfolds
                        ).as_dict()["accuracy_mean"]
                        for s in self.eval_sets
                    }
                if cfg.export.onnx:
                    summary["onnx"] = self.export()
                summary["wandb_run"] = wandb_run.path
                wandb_run.summary(_flatten("final", summary.get("eval_after", {})))
                (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        finally:
            progress.close()
            wandb_run.finish()
        return summary

    def derived(self) -> dict[str, Any]:
        """Values computed from the config and the data (logged, never written back)."""
        return {
            "world_size": self.ctx.world_size,
            "num_classes": self.facts.num_classes,
            "num_images": self.facts.num_images,
            "image_size": list(self.facts.image_size),
            "global_batch_size": self.config.train.batch_size * self.ctx.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "classifier_rows_this_rank": self.partial_fc.num_local,
        }

    def _train_steps(self, wandb_run: WandbRun, progress: Progress) -> dict[str, Any]:
        cfg, ctx = self.config, self.ctx
        tcfg = cfg.train
        global_batch = tcfg.batch_size * ctx.world_size
        meter = Throughput()
        start_time = time.perf_counter()
        last = {"loss": float("nan")}
        steps_since_log = 0
        self.model.train()
        while self.step < self.total_steps:
            self.loader.set_epoch(self.epoch)
            for images, labels in self.loader:
                images = images.to(ctx.device, non_blocking=True)
                labels = labels.to(ctx.device, non_blocking=True)
                embeddings = self.model(images)  # [B, D]
                loss, stats = self.partial_fc(embeddings, labels)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"step {self.step}: loss is {loss.item()} (check lr / margin settings)"
                    )
                self.opt_backbone.zero_grad(set_to_none=True)
                self.opt_fc.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = nn.utils.clip_grad_norm_(self.backbone.parameters(), max_norm=5.0)
                self.opt_backbone.step()
                self.opt_fc.step()
                self.sched_backbone.step()
                self.sched_fc.step()
                self.step += 1
                steps_since_log += 1
                if self.step % tcfg.log_every == 0 or self.step == self.total_steps:
                    last = self._log(loss, stats, grad_norm, meter, global_batch, steps_since_log)
                    wandb_run.log(last, step=self.step)
                    progress.update(
                        steps_since_log,
                        loss=f"{last['train/loss']:.3f}",
                        lr=f"{last['train/lr']:.4f}",
                        ips=f"{last['train/samples_per_sec']:.0f}",
                        epoch=self.epoch,
                    )
                    steps_since_log = 0
                if tcfg.eval_every and self.step % tcfg.eval_every == 0:
                    self.evaluate(wandb_run, progress)
                if tcfg.checkpoint_every and self.step % tcfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
            else:
                self.epoch += 1
        elapsed = time.perf_counter() - start_time
        return {
            "steps": self.step,
            "seconds": round(elapsed, 2),
            "samples_per_sec": round(self.step * global_batch / max(elapsed, 1e-9), 1),
            "final_loss": last.get("train/loss"),
        }

    def _log(
        self,
        loss: torch.Tensor,
        stats: dict[str, Any],
        grad_norm: torch.Tensor,
        meter: Throughput,
        global_batch: int,
        steps: int,
    ) -> dict[str, float]:
        # The distributed CE already returns the global-batch mean on every rank.
        out = {
            "train/loss": float(loss.detach()),
            "train/lr": self.opt_backbone.param_groups[0]["lr"],
            "train/samples_per_sec": meter.rate(steps * global_batch),
            "train/grad_norm": float(grad_norm),
            "train/epoch": self.epoch,
        }
        for key in (
            "target_angle_mean_deg",
            "target_angle_std_deg",
            "hardest_negative_angle_mean_deg",
        ):
            if key in stats:
                out[f"angles/{key}"] = float(stats[key])
        return out

    # ------------------------------------------------------------------- eval / save / export
    def evaluate(self, wandb_run: WandbRun, progress: Progress) -> dict[str, dict[str, float]]:
        """Rank 0 evaluates every verification set; the others wait at a barrier."""
        results: dict[str, dict[str, float]] = {}
        if self.ctx.is_main:
            for s in self.eval_sets:
                emb = extract_embeddings(
                    self.backbone, s.images, self.config.eval.batch_size, self.ctx.device
                )
                res = kfold_verification(emb, s.issame, nfolds=self.config.eval.nfolds)
                d = res.as_dict()
                results[s.name] = {
                    "accuracy": d["accuracy_mean"],
                    "accuracy_std": d["accuracy_std"],
                    "best_threshold": d["best_threshold"],
                    "val_at_far_1e-3": d["val_mean"],
                }
                wandb_run.log(
                    {f"eval/{s.name}/{k}": v for k, v in results[s.name].items()}, step=self.step
                )
                progress.write(
                    f"[eval step {self.step}] {s.name}: accuracy "
                    f"{100 * d['accuracy_mean']:.2f}% +- {100 * d['accuracy_std']:.2f}"
                )
        self._barrier()
        return results

    def save_checkpoint(self) -> Path:
        """Every rank writes its part into step-N.tmp; rank 0 publishes it."""
        tmp = ckpt.tmp_dir_for(self.run_dir, self.step)
        if self.ctx.is_main:
            tmp.mkdir(parents=True, exist_ok=True)
        self._barrier()
        r = self.ctx.rank
        pfc = self.partial_fc
        ckpt.save_torch(
            {
                "class_start": pfc.class_start,
                "num_local": pfc.num_local,
                "num_classes": self.facts.num_classes,
                "weight": pfc.weight.detach().cpu(),
                "optimizer": self.opt_fc.state_dict(),
                "scheduler": self.sched_fc.state_dict(),
            },
            tmp / f"classifier-rank{r}.pt",
        )
        ckpt.save_torch(
            {
                "optimizer": self.opt_backbone.state_dict(),
                "scheduler": self.sched_backbone.state_dict(),
            },
            tmp / f"trainer-rank{r}.pt",
        )
        if self.ctx.is_main:
            ckpt.save_torch(self.backbone.state_dict(), tmp / "backbone.pt")
        self._barrier()
        final = self.run_dir / f"step-{self.step}"
        if self.ctx.is_main:
            meta = {
                "step": self.step,
                "epoch": self.epoch,
                "world_size": self.ctx.world_size,
                "backbone": self.config.model.backbone,
                "backbone_kwargs": self.backbone_kwargs,
                "derived": self.derived(),
                "config": dump_config(self.config),
            }
            final = ckpt.finalize(self.run_dir, self.step, meta, self.config.train.keep_checkpoints)
        self._barrier()
        return final

    def export(self) -> dict[str, Any]:
        """Rank 0: ONNX export of the backbone with an onnxruntime parity check."""
        ecfg = self.config.export
        path = self.run_dir / "backbone.onnx"
        res = export_onnx(
            self.backbone,
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


def _flatten(prefix: str, tree: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            out.update(_flatten(name, value))
        else:
            out[name] = value
    return out
