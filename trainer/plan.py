"""The run plan `facetrain train --dry-run` prints: what a config will do on a given world
size, computed from the config and the pack's own facts without starting any process.

Pack facts are read cheaply (``property``, the ``.idx`` and record key 0, in any of the
layouts of :mod:`dataio.layout`), so a plan for a 5.8M-image pack takes a second and needs no
decoding.
"""

from __future__ import annotations

import math
from typing import Any

from dataio.layout import PackFacts, read_pack_facts
from partialfc import class_range
from trainer.config import Config, ConfigError


def pack_facts(config: Config) -> PackFacts:
    """The training pack's facts (:func:`dataio.layout.read_pack_facts`: any layout, with
    ``data.skip_corrupt``), checked against the config (:func:`check_facts`)."""
    facts = read_pack_facts(config.data.train, skip_corrupt=config.data.skip_corrupt)
    check_facts(config, facts.as_dict())
    return facts


def check_facts(config: Config, facts: dict[str, Any]) -> None:
    """``data.num_classes`` / ``data.num_images``, where the config states them (the published
    recipes do), must be the pack's."""
    for key, expected, actual in (
        ("data.num_classes", config.data.num_classes, facts["num_classes"]),
        ("data.num_images", config.data.num_images, facts["num_images"]),
    ):
        if expected is not None and expected != actual:
            raise ConfigError(
                f"{key}: config says {expected} but the pack {config.data.train} has {actual}"
            )


def plan_run(config: Config, world_size: int, facts: dict[str, Any]) -> dict[str, Any]:
    """Steps, classifier rows and a memory estimate per rank for ``world_size`` ranks."""
    check_facts(config, facts)
    tcfg = config.train
    per_step = tcfg.batch_size * world_size * tcfg.grad_accum_steps
    steps_per_epoch = facts["num_images"] // per_step
    if steps_per_epoch < 1:
        raise ConfigError(
            f"train.batch_size: {per_step} images per step ({world_size} ranks) exceed the "
            f"{facts['num_images']} images of the pack"
        )
    total = tcfg.max_steps or max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    num_classes, dim = facts["num_classes"], config.model.embedding_size
    rows = [class_range(num_classes, r, world_size)[1] for r in range(world_size)]
    max_rows = max(rows)
    sampled = max(1, round(config.partialfc.sample_rate * max_rows))
    # Classifier: weight + gradient + optimizer state (1 tensor for SGD momentum, 2 for AdamW).
    opt_tensors = 1 if config.optimizer.name == "sgd" else 2
    classifier_bytes = max_rows * dim * 4 * (2 + opt_tensors)
    # Logits of the gathered batch against the sampled rows, fp32, with softmax and gradient.
    logits_bytes = tcfg.batch_size * world_size * sampled * 4 * 3
    return {
        "world_size": world_size,
        "pack": facts,
        "global_batch_size": per_step,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "warmup_steps": config.schedule.resolve_warmup(steps_per_epoch),
        "classifier_rows_per_rank": {"min": min(rows), "max": max_rows},
        "sampled_rows_per_rank": sampled,
        "classifier_memory_per_rank_gib": round(classifier_bytes / 2**30, 3),
        "logits_memory_per_rank_gib": round(logits_bytes / 2**30, 3),
    }


def format_plan(plan: dict[str, Any]) -> str:
    p = plan
    lines = [
        f"pack             : {p['pack']['num_images']} images, {p['pack']['num_classes']} classes, "
        f"{p['pack']['image_size'][0]}x{p['pack']['image_size'][1]}",
        f"world size       : {p['world_size']} ranks, global batch {p['global_batch_size']}",
        f"steps            : {p['steps_per_epoch']} per epoch, {p['total_steps']} in all, "
        f"{p['warmup_steps']} warmup",
        f"classifier/rank  : {p['classifier_rows_per_rank']['min']}-"
        f"{p['classifier_rows_per_rank']['max']} rows, {p['sampled_rows_per_rank']} sampled",
        f"memory/rank (est): classifier {p['classifier_memory_per_rank_gib']:.3f} GiB "
        f"(weight+grad+optimizer), logits {p['logits_memory_per_rank_gib']:.3f} GiB",
    ]
    return "\n".join(lines)
