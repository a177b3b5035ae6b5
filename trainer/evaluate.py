"""Verification during training: the figures ``facetrain eval`` prints for the checkpoint
saved at the same step, computed by every rank together."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dataio.verification_bin import VerificationSet, load_bin
from evaluation.roc import tar_at_far
from evaluation.verification import extract_embeddings, kfold_verification, pair_roc
from partialfc import all_gather_no_grad
from trainer import compiling
from trainer.config import Config
from trainer.context import DistContext

__all__ = ["TAR_FARS", "EvalSet", "evaluate_sets", "load_eval_sets", "track_best"]

TAR_FARS = {"1e-4": 1e-4, "1e-3": 1e-3}
"""The FARs at which the in-training evaluation reads the TAR (``tar_at_far_<key>``)."""


@dataclasses.dataclass
class EvalSet:
    """A verification set, decoded once at start."""

    name: str
    images: np.ndarray  # [2N, H, W, 3] uint8
    issame: np.ndarray  # [N] bool


def load_eval_sets(paths: list[str]) -> list[EvalSet]:
    """``data.val``'s .bin sets, decoded."""
    sets = []
    for path in paths:
        vs: VerificationSet = load_bin(path)
        sets.append(EvalSet(Path(path).stem, vs.decode(), np.asarray(vs.issame, dtype=bool)))
    return sets


def evaluate_sets(
    sets: list[EvalSet],
    backbone: nn.Module,
    config: Config,
    ctx: DistContext,
    collective_forward: bool,
) -> dict[str, dict[str, float]]:
    """The figures ``facetrain eval`` gives for the checkpoint of this step, to the bit.

    Every rank embeds whole batches of ``eval.batch_size`` images (the batches ``eval``
    makes of the set: a batch's composition can change a conv's floating-point result)
    with the module state the checkpoint saves: rank 0's, whose BatchNorm statistics are
    copied to every rank first (each rank's own drift with its own batches). Rank 0 scores
    the gathered embeddings. Splitting the work keeps every rank busy for the same short
    time, so none waits in a collective for long (a rank-0-only evaluation of a large set
    can hit the collective timeout of the others).

    ``collective_forward``: every forward is a collective (ZeRO-3), so every rank must run
    as many. Returns ``{set: {accuracy, accuracy_std, best_threshold, val_at_far_1e-3,
    roc_auc, tar_at_far_1e-4, tar_at_far_1e-3}}`` on rank 0, ``{}`` elsewhere: the k-fold
    figures, then the area under the pairs' ROC and the TAR at each of :data:`TAR_FARS`
    (``evaluation.roc.tar_at_far``'s conservative reading; at zero false accepts where the
    set has too few negative pairs), as ``facetrain eval`` reports them.
    """
    world, rank = ctx.world_size, ctx.rank
    distributed = ctx.distributed and dist.is_initialized()
    if distributed:
        for buffer in backbone.buffers():
            dist.broadcast(buffer, src=0)
    batch = config.eval.batch_size
    results: dict[str, dict[str, float]] = {}
    for s in sets:
        n = len(s.images)
        batches = math.ceil(n / batch)
        first = [batches * r // world for r in range(world + 1)]  # rank r's first batch
        cuts = [min(n, batch * b) for b in first]
        mine = s.images[cuts[rank] : cuts[rank + 1]]
        with compiling.eager():  # a compiled backbone (train.compile) evaluates eager
            if len(mine):
                emb = extract_embeddings(backbone, mine, batch, ctx.device)
            else:  # fewer batches than ranks
                emb = np.zeros((0, config.model.embedding_size), np.float32)
            if collective_forward and first[rank + 1] - first[rank] < math.ceil(batches / world):
                # Ranks hold ceil or floor of batches / world; one with fewer embeds one more
                # (discarded) so that every rank runs as many (collective) forwards.
                extract_embeddings(backbone, s.images[:batch], batch, ctx.device)
        emb_t = torch.from_numpy(emb).to(ctx.device)
        if distributed:
            sizes = [cuts[r + 1] - cuts[r] for r in range(world)]
            emb_t = all_gather_no_grad(emb_t, sizes=sizes)
        if not ctx.is_main:
            continue
        emb_np = emb_t.cpu().numpy()
        d = kfold_verification(emb_np, s.issame, nfolds=config.eval.nfolds).as_dict()
        curve = pair_roc(emb_np, s.issame)
        tars = tar_at_far(curve, list(TAR_FARS.values()))
        results[s.name] = {
            "accuracy": d["accuracy_mean"],
            "accuracy_std": d["accuracy_std"],
            "best_threshold": d["best_threshold"],
            "val_at_far_1e-3": d["val_mean"],
            "roc_auc": curve.auc(),
            **{f"tar_at_far_{key}": row.tar for key, row in zip(TAR_FARS, tars, strict=True)},
        }
    return results


def track_best(best: dict[str, float], results: dict[str, dict[str, float]]) -> None:
    """Add ``best_accuracy`` to each set's ``results``: the highest accuracy of this and every
    earlier evaluation, which ``best`` (set name -> accuracy) carries, and is updated."""
    for name, res in results.items():
        best[name] = max(best.get(name, res["accuracy"]), res["accuracy"])
        res["best_accuracy"] = best[name]
