"""Memory per rank of a run, from its config: what ``facetrain train --dry-run`` prints.

The model adds up what one rank holds at the peak of a training step (bytes):

- **classifier state**: the shard's class centres ``[C_r * K, D]`` and their optimizer state
  (SGD momentum, or AdamW's two moments and a float32 step count per row), in
  ``partialfc.storage_dtype``; per-class tensors of the head (a bias, center loss's centres)
  in float32, with optimizer state for the trainable ones.
- **classifier step**: the step's working memory, by backend. Plain core, at its
  backward's peak: the sampled rows ``[S * K, D]`` in the storage dtype (none at rate 1: the
  shard is used as it is) and their gradient in the same dtype, and ``PLAIN_LOGIT_BUFFERS``
  float32 ``[N, S]`` tensors (cosines, logits, softmax and the backward's temporaries).
  cpu_fused: one ``[S, D]`` buffer (rows, then their gradient) and one ``[N, S]`` buffer,
  reused across steps. Both: the sampling keys ``[C_r]``, the gathered batch ``[N, D]`` and
  small temporaries (``STEP_OVERHEAD_BYTES``).
- **backbone**: float32 parameters, gradients and optimizer state (SGD momentum, AdamW's
  two moments); DDP adds its gradient buckets (a second copy of the gradients) when W > 1;
  DeepSpeed keeps 16-bit parameters and gradients and a float32 master copy under bf16 /
  fp16, and ZeRO partitions the optimizer state (and master copy) over W from stage 1, the
  gradients from stage 2, the parameters at stage 3 (its communication buckets are not
  modelled).
- **activations**: the tensors autograd saves in one forward of a per-rank micro-batch,
  measured on the meta device (``backbones.profile.training_footprint``), plus twice the
  largest of them (gradients in flight during backward), autocast's 16-bit weight copies
  and the uint8 input batch.
- **heap slack** (CPU): glibc keeps the pages of freed tensors below its mmap limit
  (32 MiB) for reuse; across steps the heap holds ``HEAP_RETENTION`` of the activations
  saved in such tensors beyond the live ones (measured).
- **process baseline**: on CPU the resident size of a rank that holds none of the above
  (interpreter, torch, gloo, the loader; measured on this machine, ``CPU_BASELINE_BYTES``);
  on CUDA the context (``CUDA_CONTEXT_BYTES``, an assumption: not measured on a GPU here).
- **eval sets**: ``data.val`` decoded (host memory; part of the total on CPU only).

N is the global batch (``train.batch_size * W``), C_r = ceil(C / W) the largest shard, S =
``round(sample_rate * C_r)`` (at least the N positives a rank could hold, at most C_r).
``bench/memory_plan_check.py`` compares the total with the peak resident size of real
training runs on this machine (BENCHMARKS.md).

The functions here are pure: the facts that need the backbone and the head
(:class:`MemoryFacts`) are gathered once by :func:`trainer.memory_report.memory_facts`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from trainer.config import Config, ConfigError

GIB = 2**30
MIB = 2**20

CPU_BASELINE_BYTES = 460 * MIB
"""Resident size of a training rank on CPU without its model, classifier and batches:
interpreter, torch and its libraries, gloo, the loader (measured, see BENCHMARKS.md)."""
CUDA_CONTEXT_BYTES = 1 * GIB
"""Device memory of the CUDA context, cuBLAS / cuDNN workspaces and allocator slack per
rank: an assumption (typical of an H100 / A100), not measured on a GPU here."""
PLAIN_LOGIT_BUFFERS = 3
"""float32 ``[N, S]`` tensors alive at the plain core's peak (fitted on this machine)."""
STEP_OVERHEAD_BYTES = {"plain": 64 * MIB, "cpu_fused": 16 * MIB}
"""The step's small temporaries by backend: the shard optimizer's float32 chunks (2M
elements each), the sampling's, the softmax's (fitted on this machine)."""
HEAP_MMAP_LIMIT = 32 * MIB
"""glibc's largest mmap threshold: on CPU a freed tensor below it goes back to the heap,
which keeps its pages; larger ones are unmapped at once."""
HEAP_RETENTION = 0.25
"""Fraction of the saved activations held in tensors below ``HEAP_MMAP_LIMIT`` that the CPU
heap keeps resident beyond the live tensors (fragmentation across steps; fitted on this
machine, see BENCHMARKS.md). CUDA's caching allocator is not modelled."""

STORAGE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class MemoryFacts:
    """What the model needs beyond the config (see :func:`memory_facts`)."""

    num_classes: int
    image_size: tuple[int, int]
    device: str
    """"cpu" (totals are per-rank resident sizes) or "cuda" (per-device memory)."""
    backend: str
    """The classifier backend the trainer will use: "plain" or "cpu_fused"."""
    backbone_params: int
    backbone_trainable: int
    activation_bytes: int
    """Saved for backward by one forward of a per-rank micro-batch."""
    largest_activation_bytes: int
    heap_activation_bytes: int = 0
    """The part of ``activation_bytes`` in tensors below ``HEAP_MMAP_LIMIT``."""
    num_subcenters: int = 1
    uses_classifier: bool = True
    head_param_bytes_per_class: int = 0
    """float32 trainable per-class tensors of the head (a bias), per class."""
    head_buffer_bytes_per_class: int = 0
    """Per-class state without optimizer (center loss's centres), per class."""
    eval_bytes: int = 0
    """data.val decoded: host memory."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank (the rank with the most classes) at the peak of a training step."""

    device: str
    backend: str
    world_size: int
    num_classes: int
    rows_per_rank: int
    sampled_per_rank: int
    global_batch: int
    classifier_state: int
    classifier_step: int
    backbone: int
    activations: int
    heap_slack: int
    """CPU only: freed heap memory the allocator keeps (``HEAP_RETENTION``)."""
    baseline: int
    eval_sets: int
    """Host memory: counted in ``total`` on CPU only."""

    @property
    def total(self) -> int:
        on_host = self.eval_sets if self.device == "cpu" else 0
        return (
            self.classifier_state
            + self.classifier_step
            + self.backbone
            + self.activations
            + self.heap_slack
            + self.baseline
            + on_host
        )


def _optimizer_slots(config: Config) -> int:
    """Tensors of optimizer state per parameter tensor."""
    if config.optimizer.name == "adamw":
        return 2
    return 1 if config.optimizer.momentum > 0 else 0


def sampled_rows(num_local: int, sample_rate: float, global_batch: int) -> int:
    """S: the classes a rank's step uses (every positive kept: up to N of them)."""
    if sample_rate >= 1.0:
        return num_local
    return min(num_local, max(round(sample_rate * num_local), global_batch, 1))


def _classifier_state(config: Config, facts: MemoryFacts, c_r: int) -> int:
    d, sb = config.model.embedding_size, STORAGE_BYTES[config.partialfc.storage_dtype]
    slots = _optimizer_slots(config)
    rows = c_r * facts.num_subcenters if facts.uses_classifier else 0
    centres = rows * d * sb * (1 + slots)
    steps = 4 * rows if config.optimizer.name == "adamw" else 0  # AdamW's per-row step
    head = c_r * (
        facts.head_param_bytes_per_class * (1 + slots) + facts.head_buffer_bytes_per_class
    )
    return centres + steps + head


def _classifier_step(config: Config, facts: MemoryFacts, c_r: int, s: int, n: int) -> int:
    d, sb = config.model.embedding_size, STORAGE_BYTES[config.partialfc.storage_dtype]
    k = facts.num_subcenters
    common = 4 * c_r * 2 + 4 * n * d * 4 + STEP_OVERHEAD_BYTES[facts.backend]
    if not facts.uses_classifier:
        return common
    rows = s * k * d  # elements of the sampled rows (the shard at rate 1)
    if facts.backend == "cpu_fused":
        # One [S, D] buffer: the rows, then their gradient; under 16-bit products a fresh
        # gradient and the rows' 16-bit copy beside it. One [N, S] buffer, except at rate 1
        # with float32 products and 4N <= 3D, where the logits live in the gradient buffer.
        low = config.train.precision != "fp32"
        work = 4 * rows + (6 * rows if low else 0)
        in_grad = s == c_r and not low and 4 * n <= 3 * d
        return common + work + (0 if in_grad else 4 * n * s * k)
    # Plain core: at the backward's peak the gathered rows (none at rate 1: the shard is used
    # as it is) and their gradient, both in the storage dtype (16-bit rows are widened to
    # float32 block by block only).
    work = sb * rows * (1 if s == c_r else 2)
    logits = 4 * n * s * (k + PLAIN_LOGIT_BUFFERS - 1)
    return common + work + logits


def _backbone(config: Config, facts: MemoryFacts, world: int) -> int:
    p, t = facts.backbone_params, facts.backbone_trainable
    slots = _optimizer_slots(config)
    if config.dist.engine == "ddp":
        buckets = 4 * t if world > 1 else 0
        return 4 * p + 4 * t + 4 * t * slots + buckets
    stage = config.deepspeed.zero_stage
    half = config.train.precision != "fp32"
    param_b, grad_b, master_b = (2, 2, 4) if half else (4, 4, 0)
    params = param_b * p / (world if stage >= 3 else 1)
    grads = grad_b * t / (world if stage >= 2 else 1)
    state = (4 * t * slots + master_b * t) / (world if stage >= 1 else 1)
    return int(params + grads + state)


def _activations(config: Config, facts: MemoryFacts) -> int:
    h, w = facts.image_size
    batch = config.train.batch_size
    autocast_copies = 0
    if config.train.precision != "fp32" and config.dist.engine == "ddp":
        autocast_copies = 2 * facts.backbone_params  # 16-bit weights saved by each layer
    inputs = batch * h * w * 3  # the uint8 batch
    return facts.activation_bytes + 2 * facts.largest_activation_bytes + autocast_copies + inputs


def plan_memory(
    config: Config, world_size: int, facts: MemoryFacts, sample_rate: float | None = None
) -> MemoryPlan:
    """The per-rank memory of ``config`` on ``world_size`` ranks (see the module docstring);
    ``sample_rate`` replaces ``partialfc.sample_rate`` (for :func:`largest_sample_rate`)."""
    c_r = math.ceil(facts.num_classes / world_size)
    n = config.train.batch_size * world_size
    rate = config.partialfc.sample_rate if sample_rate is None else sample_rate
    s = sampled_rows(c_r, rate, n)
    return MemoryPlan(
        device=facts.device,
        backend=facts.backend,
        world_size=world_size,
        num_classes=facts.num_classes,
        rows_per_rank=c_r,
        sampled_per_rank=s,
        global_batch=n,
        classifier_state=_classifier_state(config, facts, c_r),
        classifier_step=_classifier_step(config, facts, c_r, s, n),
        backbone=_backbone(config, facts, world_size),
        activations=_activations(config, facts),
        heap_slack=int(HEAP_RETENTION * facts.heap_activation_bytes)
        if facts.device == "cpu"
        else 0,
        baseline=CPU_BASELINE_BYTES if facts.device == "cpu" else CUDA_CONTEXT_BYTES,
        eval_sets=facts.eval_bytes,
    )


# ------------------------------------------------------------------------------ fitting
def _largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """The largest x in [low, high] with ``fits(x)`` (``fits`` monotone: true, then false)."""
    if not fits(low):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


def largest_num_classes(
    config: Config, world_size: int, facts: MemoryFacts, budget: int
) -> int | None:
    """The most classes whose plan fits ``budget`` bytes per rank at the configured sample
    rate (None: not even one class per rank fits)."""

    def fits(classes: int) -> bool:
        plan = plan_memory(config, world_size, dataclasses.replace(facts, num_classes=classes))
        return plan.total <= budget

    high = world_size
    while fits(high) and high < 2**50:
        high *= 2
    return _largest(fits, world_size, high)


def largest_sample_rate(
    config: Config, world_size: int, facts: MemoryFacts, budget: int
) -> float | None:
    """The largest ``partialfc.sample_rate`` whose plan fits ``budget`` bytes per rank at the
    configured class count, rounded down to 4 decimals where that still samples a row (None:
    not even the positives fit)."""
    c_r = math.ceil(facts.num_classes / world_size)

    def fits(rows: int) -> bool:
        return plan_memory(config, world_size, facts, rows / c_r).total <= budget

    best = _largest(fits, 1, c_r)
    if best is None:
        return None
    rate = best / c_r
    floored = math.floor(rate * 1e4) / 1e4
    return floored if floored > 0 else rate


# ------------------------------------------------------------------------------ sizes
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str, what: str = "--gpu-mem") -> int:
    """Bytes of ``"80GB"`` (decimal: KB MB GB TB), ``"80GiB"`` or ``"80G"`` (binary: KiB /
    K, MiB / M, GiB / G, TiB / T) or a plain number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(
            f"{what}: {text!r} is not a size; write e.g. 80GB (10^9 bytes), 80GiB or 80G (2^30)"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"{what}: {text!r} must be more than 0 bytes")
    return size
