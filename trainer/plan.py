"""The run plan `facetrain train --dry-run` prints: what a config will do on a given world
size, computed from the config and the pack's own facts without starting any process.

Pack facts are read cheaply (``property``, the ``.idx``, record key 0 and the first image's
header, in any of the layouts of :mod:`dataio.layout`), so a plan for a 5.8M-image pack takes a
second and decodes no image.
"""

from __future__ import annotations

import math
from typing import Any

from dataio.decode import check_stored_size
from dataio.layout import PackFacts, read_pack_facts
from partialfc import class_range
from trainer.config import Config, ConfigError
from trainer.memory_plan import sampled_rows


def pack_facts(config: Config) -> PackFacts:
    """The training pack's facts (:func:`dataio.layout.read_pack_facts`: any layout, with
    ``data.skip_corrupt``; the first image's size checked against them), checked against the
    config (:func:`check_facts`)."""
    facts = read_pack_facts(config.data.train, skip_corrupt=config.data.skip_corrupt)
    check_stored_size(config.data.train, facts)  # the first image against property
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
    """Steps and classifier rows per rank for ``world_size`` ranks (the memory per rank:
    :mod:`trainer.memory_plan`)."""
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
    num_classes = facts["num_classes"]
    rows = [class_range(num_classes, r, world_size)[1] for r in range(world_size)]
    max_rows = max(rows)
    sampled = sampled_rows(max_rows, config.partialfc.sample_rate, tcfg.batch_size * world_size)
    return {
        "world_size": world_size,
        "pack": facts,
        "global_batch_size": per_step,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total,
        "warmup_steps": config.schedule.resolve_warmup(steps_per_epoch),
        "classifier_rows_per_rank": {"min": min(rows), "max": max_rows},
        "sampled_rows_per_rank": sampled,
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
    ]
    return "\n".join(lines)
