"""Typed run configuration: YAML file + ``--set a.b=value`` overrides, validated up front.

Every section is a pydantic model with ``extra="forbid"``, so a misspelled key or a value of
the wrong type fails when the config is loaded -- before any process starts -- with a message
naming the file and the dotted key. Facts the dataset knows (number of classes and images,
image size) are not configured: the trainer reads them from the pack and, where the config
states them anyway, checks that they agree. The error messages are worded by
:mod:`trainer.config_errors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from common.config_model import StrictModel
from partialfc.config import PartialFCConfig
from trainer.config_errors import did_you_mean, format_validation_errors
from trainer.dist_config import DeepSpeedConfig, DistConfig


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the key."""


class _Section(StrictModel):
    """Base of every section (common.config_model: unknown keys and non-finite floats fail)."""


class RunConfig(_Section):
    name: str = "run"
    """Run name: the wandb run name and the folder under ``output_dir``."""
    output_dir: str = "output"
    """Root folder for runs; the run writes to ``output_dir/name``."""
    seed: int = 0
    """Seed of model init, classifier sampling, data order and augmentation."""
    resume: str | None = None
    """"auto" (latest complete checkpoint of this run, if any), a checkpoint path, or null."""


class DataConfig(_Section):
    train: str
    """Folder of the training pack (train.rec, train.idx, property)."""
    val: list[str] = Field(default_factory=list)
    """Verification sets (insightface .bin) evaluated during and after training."""
    loader: Literal["torch", "dali"] = "torch"
    """Training data loader: PyTorch workers, or NVIDIA DALI (GPU decode on CUDA, CPU otherwise)."""
    workers: int = Field(1, ge=0)
    """Decoding worker processes per rank (0 decodes in the training process)."""
    flip: bool = True
    """Random horizontal flip of training images."""
    skip_corrupt: bool = False
    """Skip (and count in the logs) records that fail to decode or carry a bad label, instead
    of stopping with an error naming the file and record key."""
    num_classes: int | None = Field(None, ge=1)
    """Optional: the number of classes you expect. Read from the pack; if set, must agree."""
    num_images: int | None = Field(None, ge=1)
    """Optional: the number of images you expect. Read from the pack; if set, must agree."""
    cache_dir: str | None = None
    """Folder of the DALI loader's index of the pack (~20 bytes per image; runs may share one);
    null: the run's ``cache/``. Never the pack's folder, which may be read-only."""


class ModelConfig(_Section):
    backbone: str = "iresnet50"
    """Registered backbone name (see ``backbones.list_backbones()``)."""
    embedding_size: int = Field(512, ge=2)
    """Dimension of the face embedding."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments of the backbone builder (e.g. dropout, widths)."""
    init_from: str | None = None
    """Fine-tuning: start the backbone from these weights -- a facetrain checkpoint (step-N
    folder, run folder or its ``latest``) or a weights file holding a backbone state_dict
    (arcface_torch's ``torch.save(backbone.state_dict(), path)``, the files users download).
    Keys and shapes must fit backbone / embedding_size / kwargs. Optimizers, schedule, step
    and data start afresh. Ignored when the run resumes (run.resume): the checkpoint wins."""
    init_classifier: bool = False
    """Also take the class centres of the init_from checkpoint (same identities: its number
    of classes must be the pack's), re-sharded onto this world size; false: a fresh classifier
    for the pack's identities."""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, name: str) -> str:
        """A misspelled backbone fails at load time, not in every rank."""
        from backbones import list_backbones

        known = list_backbones(include_aliases=True)
        if name not in known:
            hint = did_you_mean(name, known)
            raise ValueError(f"unknown backbone {name!r}{hint}; known: {', '.join(known)}")
        return name

    @model_validator(mode="after")
    def _classifier_needs_source(self) -> ModelConfig:
        if self.init_classifier and self.init_from is None:
            raise ValueError("model.init_classifier: needs model.init_from (a checkpoint)")
        return self


class OptimizerConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0.0)
    """Peak learning rate (after warmup), for the global batch."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD momentum."""
    nesterov: bool = False
    """Nesterov momentum for the backbone's SGD (the classifier shard uses plain momentum)."""
    weight_decay: float = Field(5e-4, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""


class ScheduleConfig(_Section):
    kind: Literal["polynomial", "linear", "cosine", "step", "constant"] = "polynomial"
    """Decay after warmup: polynomial (power below) to 0, linear (power 1) to 0, cosine to 0,
    step (times gamma at each milestone), or constant."""
    power: float = Field(2.0, gt=0.0)
    """Exponent of the polynomial decay (1 = linear)."""
    milestones: list[float] = Field(default_factory=list)
    """kind=step: epochs at which the rate is multiplied by gamma (fractions allowed)."""
    gamma: float = Field(0.1, gt=0.0)
    """kind=step: the factor applied at each milestone."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 over this many optimizer steps."""
    warmup_epochs: float | None = Field(None, ge=0.0)
    """Warmup length in epochs instead (converted with the data's steps per epoch)."""

    @model_validator(mode="after")
    def _one_warmup(self) -> ScheduleConfig:
        if self.warmup_epochs is not None and self.warmup_steps:
            raise ValueError("schedule.warmup_steps and schedule.warmup_epochs: set only one")
        if self.kind == "step" and not self.milestones:
            raise ValueError("schedule.milestones: kind=step needs at least one milestone epoch")
        if any(m <= 0 for m in self.milestones) or self.milestones != sorted(self.milestones):
            raise ValueError("schedule.milestones: must be increasing epochs > 0")
        return self

    def milestone_steps(self, steps_per_epoch: int) -> list[int]:
        """The step milestones in optimizer steps for ``steps_per_epoch`` steps per epoch."""
        return [round(m * steps_per_epoch) for m in self.milestones]

    def resolve_warmup(self, steps_per_epoch: int) -> int:
        """Warmup in optimizer steps for a run with ``steps_per_epoch`` steps per epoch."""
        if self.warmup_epochs is not None:
            return round(self.warmup_epochs * steps_per_epoch)
        return self.warmup_steps


class TrainConfig(_Section):
    batch_size: int = Field(128, ge=1)
    """Images per rank per step."""
    epochs: float = Field(20.0, gt=0.0)
    """Length of the run in epochs (fractions allowed); the step count is derived."""
    max_steps: int | None = Field(None, ge=1)
    """If set, stop after this many steps (overrides epochs)."""
    stop_at_step: int | None = Field(None, ge=1)
    """Stop (checkpoint, exit as if preempted) once this step is done, keeping the schedule of
    the full run: for jobs split into time-limited stages. null: run to the end."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step (the loss is divided by this number)."""
    clip_grad_norm: float | None = Field(5.0, gt=0.0)
    """Clip the backbone's gradient norm; null: no clipping."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision of backbone and logits (softmax stays fp32); weights, gradients and
    optimizer state stay fp32. fp16 needs CUDA; bf16 runs on the CPU too (oneDNN)."""
    compile: bool | Literal["max-autotune"] = False
    """torch.compile (inductor) the backbone's training forward and backward, under DDP or
    DeepSpeed: true, or "max-autotune" (also tunes convolution / matmul kernels: a longer
    first compile); false: eager. Kernels are cached across runs and restarts."""
    channels_last: bool = False
    """Backbone weights and images in channels-last memory order (NHWC), the layout oneDNN
    and cuDNN convolutions prefer; the same model and numbers to float tolerance."""
    max_nonfinite_steps: int = Field(10, ge=1)
    """Abort after this many consecutive steps with a non-finite loss (each one is skipped)."""
    histogram_every: int = Field(100, ge=0)
    """Steps between wandb histograms of target angles (0: never)."""
    log_every: int = Field(10, ge=1)
    """Steps between metric logs."""
    eval_every: int = Field(0, ge=0)
    """Steps between evaluations on data.val (0: only before and after training)."""
    eval_at_start: bool = True
    """Evaluate the untrained model, to show what training bought."""
    checkpoint_every: int = Field(0, ge=0)
    """Steps between checkpoints (0: only at the end)."""
    keep_checkpoints: int = Field(2, ge=1)
    """How many step-N checkpoints to keep."""
    threads_per_process: int = Field(1, ge=1)
    """torch intra-op threads per process on CPU."""
    progress: bool = True
    """Rank 0's console shows the step lines of training.log: as a progress bar on a terminal,
    as plain lines (no carriage returns) elsewhere, e.g. in a Slurm log. false: only the other
    lines (start, resume, evaluations, end). training.log always has every line."""
    record_samples: bool = False
    """Each rank records, per micro-batch, the record keys of the images it trained on, in
    the run's ``samples/`` folder (a line per batch; see trainer.sample_record): to audit
    which images a resumed or elastically re-sized run saw."""


class WandbConfig(_Section):
    mode: Literal["online", "offline", "disabled"] = "offline"
    """online needs WANDB_API_KEY in the environment; offline writes a local run to sync later."""
    project: str = "facetrain"
    entity: str | None = None
    tags: list[str] = Field(default_factory=list)


class ExportConfig(_Section):
    onnx: bool = True
    """Export the backbone to ONNX at the end of training and check onnxruntime parity."""
    opset: int = Field(18, ge=17)
    """18 is the exporter's own opset; 17 (e.g. for TensorRT 8.x) is converted down from it."""
    tolerance: float = Field(1e-4, gt=0.0)
    """Largest accepted |onnxruntime - torch| on a random batch."""


class EvalConfig(_Section):
    batch_size: int = Field(128, ge=1)
    nfolds: int = Field(10, ge=2)
    pixel_baseline: bool = True
    """Also report the verification accuracy of raw-pixel cosine similarity."""


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    partialfc: PartialFCConfig = Field(default_factory=PartialFCConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Config:
        if self.dist.backend == "nccl" and self.dist.device == "cpu":
            raise ValueError("dist.backend: nccl needs dist.device cuda (or auto on a GPU machine)")
        deepspeed_16bit = self.dist.engine == "deepspeed" and self.train.precision != "fp32"
        if self.train.compile and deepspeed_16bit:
            # DeepSpeed casts the module to 16 bits; compiled under autocast, a matmul then
            # meets float32 and bf16 operands (torch 2.13, DeepSpeed 0.19.8, on the CPU).
            raise ValueError(
                f"train.compile: with dist.engine deepspeed only at train.precision fp32 "
                f"(not {self.train.precision}); use dist.engine ddp to compile a 16-bit step"
            )
        check_step_device(self.train, self.dist.engine, self.dist.device)
        if self.partialfc.backend == "cpu_fused" and self.dist.device == "cuda":
            raise ValueError("partialfc.backend: cpu_fused runs on the CPU; use plain or auto")
        if self.partialfc.backend == "cpu_fused" and self.partialfc.storage_dtype != "fp32":
            raise ValueError(
                f"partialfc.backend: cpu_fused keeps float32 class centres; storage_dtype "
                f"{self.partialfc.storage_dtype} needs plain (or auto)"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    @property
    def cache_dir(self) -> Path:
        return Path(self.data.cache_dir) if self.data.cache_dir else self.run_dir / "cache"


def check_step_device(train: TrainConfig, engine: str, device: str) -> None:
    """Raise ValueError, naming the key, for a step that needs CUDA on ``device`` "cpu" (the
    config's dist.device; the launcher checks again once "auto" is resolved)."""
    if device != "cpu":
        return
    if train.precision == "fp16":
        raise ValueError("train.precision: fp16 needs CUDA; use bf16 on the CPU")
    if engine == "deepspeed" and train.precision != "fp32":
        # DeepSpeed 16-bit weights beside its float32 buffers: the CPU's BatchNorm refuses.
        raise ValueError(
            f"train.precision: {train.precision} with dist.engine deepspeed needs CUDA "
            f"(on the CPU use fp32, or dist.engine ddp for a bf16 step)"
        )


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optimizer.lr=0.05")
    # YAML parsing gives numbers, booleans, lists ([a, b]) and null the obvious types.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from exc
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        path, value = _parse_override(item)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"--set {item!r}: {where} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_errors(source, exc, Config)) from exc


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a YAML config, apply ``--set`` overrides, validate. Raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections, got {type(raw).__name__}"
        )
    apply_overrides(raw, overrides or [])
    return config_from_dict(raw, source=str(path))


def dump_config(config: Config) -> str:
    """The resolved config as YAML (what a checkpoint stores and `--dry-run` prints)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
