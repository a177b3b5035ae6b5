"""The memory part of ``facetrain train --dry-run`` / ``submit --dry-run``: the facts the model
of :mod:`trainer.memory_plan` needs (the backbone run once on the meta device, the head bound
to a meta shard, the verification sets counted), and the printed breakdown with, for a
``--gpu-mem`` budget, the largest class count and sample rate that fit.
"""

from __future__ import annotations

from typing import Any

from trainer.config import Config
from trainer.memory_plan import (
    CPU_BASELINE_BYTES,
    CUDA_CONTEXT_BYTES,
    GIB,
    HEAP_MMAP_LIMIT,
    HEAP_RETENTION,
    MemoryFacts,
    MemoryPlan,
    largest_num_classes,
    largest_sample_rate,
    plan_memory,
)

_PROBE_ROWS = 1009
"""Rows of the meta shard the head is bound to (a prime: per-class tensors are multiples)."""


def _head_facts(config: Config) -> dict[str, Any]:
    """Sub-centres, whether the head has class centres, and its per-class tensors in bytes
    per class (trainable ones, which get optimizer state, apart)."""
    import torch

    from partialfc import build_margin
    from partialfc.context import ShardSpec

    head = build_margin(config.partialfc.margin)
    spec = ShardSpec(
        num_classes=_PROBE_ROWS,
        class_start=0,
        num_local=_PROBE_ROWS,
        embedding_size=config.model.embedding_size,
        rank=0,
        world_size=1,
        seed=0,
        device=torch.device("meta"),
    )
    head.bind(spec)

    def per_class(tensors: Any) -> int:
        total = sum(
            t.numel() * t.element_size()
            for t in tensors
            if t.dim() > 0 and t.shape[0] % _PROBE_ROWS == 0 and t.shape[0] > 0
        )
        return total // _PROBE_ROWS

    return {
        "num_subcenters": int(head.num_subcenters),
        "uses_classifier": bool(head.uses_classifier),
        "head_param_bytes_per_class": per_class(p for p in head.parameters() if p.requires_grad),
        "head_buffer_bytes_per_class": per_class(
            [*head.buffers(), *(p for p in head.parameters() if not p.requires_grad)]
        ),
    }


def _eval_bytes(paths: list[str]) -> int:
    """``data.val`` decoded, as the trainer holds it (uint8 images)."""
    from dataio.verification_bin import load_bin

    total = 0
    for path in paths:
        vs = load_bin(path)
        h, w = vs.image_size
        total += len(vs) * h * w * 3
    return total


def run_device(config: Config) -> str:
    """ "cuda" or "cpu": where the run's ranks will train (``dist.device``; auto: CUDA when
    this machine has it)."""
    import torch

    if config.dist.device != "auto":
        return config.dist.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def memory_facts(config: Config, pack: dict[str, Any], device: str) -> MemoryFacts:
    """The facts of :class:`MemoryFacts` for ``config`` on its pack (``pack``: the dict of
    ``trainer.plan.pack_facts``) and ``device`` ("cpu" or "cuda"): the backbone runs once
    on the meta device at the per-rank batch (a second or two, no memory)."""
    import torch

    from backbones.profile import training_footprint
    from partialfc import resolve_backend
    from partialfc.rounding import storage_dtype

    pcfg, mcfg = config.partialfc, config.model
    backend = resolve_backend(pcfg.backend, device, storage_dtype(pcfg.storage_dtype))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    image_size = (int(pack["image_size"][0]), int(pack["image_size"][1]))
    footprint = training_footprint(
        mcfg.backbone,
        config.train.batch_size,
        image_size,
        dtype[config.train.precision],
        embedding_size=mcfg.embedding_size,
        **mcfg.kwargs,
    )
    return MemoryFacts(
        num_classes=int(pack["num_classes"]),
        image_size=image_size,
        device=device,
        backend=backend,
        backbone_params=footprint.params,
        backbone_trainable=footprint.trainable_params,
        activation_bytes=footprint.activation_bytes,
        largest_activation_bytes=footprint.largest_activation_bytes,
        heap_activation_bytes=sum(x for x in footprint.activation_sizes if x < HEAP_MMAP_LIMIT),
        eval_bytes=_eval_bytes(config.data.val),
        **_head_facts(config),
    )


def _gib(size: int) -> str:
    return f"{size / GIB:8.3f} GiB"


def format_memory(config: Config, plan: MemoryPlan, facts: MemoryFacts) -> str:
    """The per-rank breakdown, one term a line."""
    p, d = plan, config.model.embedding_size
    opt = config.optimizer.name
    slots = {"adamw": "AdamW moments", "sgd": "SGD momentum"}[opt]
    storage = config.partialfc.storage_dtype
    where = (
        "per-rank resident size (CPU)"
        if p.device == "cpu"
        else "per-GPU memory (CUDA; host memory not counted)"
    )
    engine = config.dist.engine
    if engine == "deepspeed":
        engine = f"DeepSpeed ZeRO-{config.deepspeed.zero_stage}"
    baseline = (
        f"interpreter, torch, gloo, loader (measured here: {CPU_BASELINE_BYTES / GIB:.2f} GiB)"
        if p.device == "cpu"
        else f"CUDA context and workspaces (assumed {CUDA_CONTEXT_BYTES / GIB:.1f} GiB, "
        "not measured on a GPU)"
    )
    lines = [
        f"memory/rank (est): {where}; {p.world_size} ranks, classifier backend {p.backend}",
        f"  classifier state : {_gib(p.classifier_state)}  {p.rows_per_rank:,} classes x {d} "
        f"{storage}: centres + {slots}",
        f"  classifier step  : {_gib(p.classifier_step)}  {p.sampled_per_rank:,} sampled rows "
        f"+ gradient, logits [{p.global_batch} x {p.sampled_per_rank:,}]",
        f"  backbone         : {_gib(p.backbone)}  {facts.backbone_params / 1e6:.2f}M params: "
        f"weights, gradients, {slots} ({engine})",
        f"  activations      : {_gib(p.activations)}  batch {config.train.batch_size} per rank, "
        f"{config.train.precision}, saved for backward",
    ]
    if p.heap_slack:
        lines.append(
            f"  heap slack       : {_gib(p.heap_slack)}  freed activations the CPU heap keeps "
            f"({HEAP_RETENTION:.0%} of those below {HEAP_MMAP_LIMIT >> 20} MiB, measured)"
        )
    lines.append(f"  process baseline : {_gib(p.baseline)}  {baseline}")
    if p.eval_sets:
        note = "" if p.device == "cpu" else " (host memory, not in the total)"
        lines.append(f"  eval sets        : {_gib(p.eval_sets)}  data.val decoded{note}")
    lines.append(f"  total            : {_gib(p.total)}")
    return "\n".join(lines)


def format_fit(config: Config, plan: MemoryPlan, facts: MemoryFacts, budget: int) -> str:
    """What fits in ``budget`` bytes per rank (``--gpu-mem``): the configured run, the largest
    class count at the configured sample rate and the largest sample rate at its classes."""
    world, rate = plan.world_size, config.partialfc.sample_rate
    verdict = "fits" if plan.total <= budget else "does NOT fit"
    classes = largest_num_classes(config, world, facts, budget)
    best_rate = largest_sample_rate(config, world, facts, budget)
    lines = [
        f"--gpu-mem {budget / GIB:.2f} GiB per rank: this run {verdict} "
        f"({plan.total / GIB:.2f} GiB per rank)",
        "  largest class count at sample_rate "
        f"{rate:g}: " + (f"{classes:,}" if classes else "none (the rest of the run alone is over)"),
        f"  largest sample rate at {plan.num_classes:,} classes: "
        + (f"{best_rate:g}" if best_rate else "none (the class centres alone do not fit)")
        + (" (every class in every step)" if best_rate == 1 else ""),
    ]
    return "\n".join(lines)


def memory_report(
    config: Config, world_size: int, pack: dict[str, Any], device: str, budget: int | None
) -> str:
    """The breakdown for ``world_size`` ranks on ``device``; with ``budget`` (bytes per rank)
    what fits."""
    facts = memory_facts(config, pack, device)
    plan = plan_memory(config, world_size, facts)
    text = format_memory(config, plan, facts)
    if budget is not None:
        text += "\n" + format_fit(config, plan, facts, budget)
    return text
