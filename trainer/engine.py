"""Backbone engines: how the replicated backbone is wrapped, back-propagated and stepped.

Partial FC is never inside an engine: its shard differs on every rank, so it must not be
averaged like a replicated model. Each engine therefore also steps the classifier optimizer,
because the two share loss scaling:

* ``DDPEngine``: torch DDP; with fp16 (CUDA) one GradScaler scales the loss and unscales both
  optimizers, and skips both steps on overflow; bf16 and fp32 need no scaling.
* ``DeepSpeedEngine``: a DeepSpeed engine (ZeRO stage 0-3, extra DeepSpeed keys passed
  through). With fp16 DeepSpeed scales the loss by its dynamic loss scale; the classifier's
  gradients are divided by that scale here and its step is skipped when DeepSpeed reports an
  overflow.

With ``train.compile`` the training call is compiled (``trainer.compiling``): DDP's wrapper,
or DeepSpeed's module through DeepSpeed's ``compile``; ``engine.module`` is the plain module
either way. ``train.channels_last`` turns every input batch channels-last, and under DDP the
weights too.

One optimizer step = ``accum`` micro-batches; the caller divides each micro-batch loss by
``accum`` and calls ``backward(loss, last_micro)``, then ``step(...)`` once.

Engines register under their ``dist.engine`` name with ``@register_engine`` (as backbones
and heads do); ``build_engine`` builds the configured one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer import compiling, ds_universal
from trainer.config import Config
from trainer.context import DistContext

_EngineT = TypeVar("_EngineT", bound=type)

# dist.engine name -> engine class; filled only by the decorator below.
_ENGINES: dict[str, type] = {}


def register_engine(name: str) -> Callable[[_EngineT], _EngineT]:
    """Register an engine class, built as ``cls(backbone, optimizer, ctx, config)``, under
    ``name`` (its ``dist.engine`` value; also set as the class's ``name``). A name registered
    twice raises ``ValueError``."""
    if not name:
        raise ValueError("engine names must be non-empty strings")

    def decorator(cls: _EngineT) -> _EngineT:
        if name in _ENGINES:
            raise ValueError(f"engine name {name!r} is already registered")
        cls.name = name
        _ENGINES[name] = cls
        return cls

    return decorator


def engine_names() -> list[str]:
    """The registered engine names, sorted."""
    return sorted(_ENGINES)


def _clip(params: Any, max_norm: float | None) -> torch.Tensor | None:
    if max_norm is None:
        return None
    return nn.utils.clip_grad_norm_(params, max_norm)


def _all_ranks_finite(tensors: list[torch.Tensor], ctx: DistContext) -> bool:
    """Whether every tensor is finite on every rank: the classifier's shards differ between
    ranks, and a step skipped on some ranks only would split the replicas apart."""
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else None
    flag = torch.ones((), device=ctx.device) if ok is None else ok.to(ctx.device).float()
    if ctx.distributed and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() > 0)


def _grad_values(p: torch.Tensor) -> torch.Tensor:
    """The stored values of a gradient: a row-sparse one's rows, a dense one itself."""
    return p.grad._values() if p.grad.is_sparse else p.grad


@register_engine("ddp")
class DDPEngine:
    """The backbone under DistributedDataParallel (or bare in a single process)."""

    name: str  # the registered name, set by @register_engine
    collective_forward = False
    """Whether a forward is a collective that every rank must run as often (ZeRO-3's is)."""

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: torch.optim.Optimizer,
        ctx: DistContext,
        config: Config,
    ) -> None:
        self.module = compiling.to_memory_format(backbone, config.train.channels_last)
        self.ctx = ctx
        self.optimizer = optimizer
        self.ddp: DistributedDataParallel | None = None
        if ctx.distributed:
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(backbone, device_ids=ids)
        # Compiled around DDP (torch's documented order: DDP's buckets split the graph, so
        # gradient all-reduces still overlap the backward); the module itself stays plain.
        self.model: nn.Module = compiling.compiled(self.ddp or backbone, config.train.compile)
        self.input_format = compiling.memory_format(config.train.channels_last)
        # fp16 autocast needs loss scaling; one scaler covers both optimizers. The config
        # allows fp16 on CUDA only; the device string is the only GPU-specific part.
        fp16 = config.train.precision == "fp16"
        self.scaler = torch.amp.GradScaler(ctx.device.type) if fp16 else None
        self.clip = config.train.clip_grad_norm

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.contiguous(memory_format=self.input_format))

    def micro_context(self, last_micro: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        if self.ddp is not None and not last_micro:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(
        self,
        fc_optimizer: torch.optim.Optimizer,
        fc_params: Any,
        fc_clip: Callable[[], torch.Tensor] | None,
    ) -> torch.Tensor | None:
        """Unscale (fp16), clip, step both optimizers. Returns the backbone grad norm.

        With fp16 an inf/NaN in either model's gradients skips both steps (GradScaler alone
        would only skip the optimizer whose own gradients overflowed, leaving the backbone
        and the classifier one step apart) and lowers the scale.
        """
        fc_params = list(fc_params)
        finite = True
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
            self.scaler.unscale_(fc_optimizer)
            params = (*self.module.parameters(), *fc_params)
            grads = [_grad_values(p) for p in params if p.grad is not None]
            finite = _all_ranks_finite(grads, self.ctx)
        grad_norm = _clip(self.module.parameters(), self.clip)
        if fc_clip is not None:
            fc_clip()  # the classifier's own clip (collective: the norm spans every shard)
        if self.scaler is not None:
            if finite:
                self.scaler.step(self.optimizer)
                self.scaler.step(fc_optimizer)
            self.scaler.update()  # lowers the scale if either unscale_ found an inf
        else:
            self.optimizer.step()
            fc_optimizer.step()
        return grad_norm

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def save_extra(self, folder: Path) -> None:
        """Nothing beyond the per-rank trainer file for DDP."""

    def load_extra(self, folder: Path, same_world: bool) -> str:
        """Nothing beyond the per-rank trainer file for DDP."""
        return ""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)


@register_engine("deepspeed")
class DeepSpeedEngine:
    """The backbone inside a DeepSpeed engine (ZeRO 0-3)."""

    name: str  # the registered name, set by @register_engine

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: torch.optim.Optimizer,
        ctx: DistContext,
        config: Config,
    ) -> None:
        import deepspeed  # the launcher set DS_ACCELERATOR before this import

        tcfg, dcfg = config.train, config.deepspeed
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": tcfg.batch_size,
            "gradient_accumulation_steps": tcfg.grad_accum_steps,
            "zero_optimization": {"stage": dcfg.zero_stage},
            # Plain SGD is not on DeepSpeed's list of ZeRO-tested optimizers; it works.
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": tcfg.precision == "bf16"},
            "fp16": {"enabled": tcfg.precision == "fp16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        # Explicit 0 when off: DeepSpeed's own default would otherwise apply.
        ds_config["gradient_clipping"] = tcfg.clip_grad_norm or 0.0
        ds_config = _merge(ds_config, dcfg.config)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=backbone, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        mode = compiling.compile_mode(tcfg.compile)
        if mode is not None:
            # DeepSpeed's own API, which compiles its module in place (nn.Module.compile):
            # state_dict keys stay plain; evaluation runs it eager (trainer.evaluate).
            self.engine.compile(backend="inductor", compile_kwargs={"mode": mode, "dynamic": False})
        # Channels-last images only: DeepSpeed broadcasts every parameter viewed as bytes,
        # which needs a unit last stride (channels-last weights fail in deepspeed.initialize).
        self.input_format = compiling.memory_format(tcfg.channels_last)
        self.module = self.engine.module
        self.ctx = ctx
        self.model = self.engine
        self.zero_stage = dcfg.zero_stage
        self.collective_forward = dcfg.zero_stage == 3  # parameters gathered in each forward
        self.fp16 = tcfg.precision == "fp16"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images.contiguous(memory_format=self.input_format))

    def micro_context(self, last_micro: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # DeepSpeed tracks accumulation boundaries itself

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        # The caller already divided by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last_micro:
            self.engine.step()  # a no-op step that advances DeepSpeed's micro-step counter

    def zero_grad(self) -> None:
        """DeepSpeed zeroes the backbone gradients itself after each boundary step."""

    def step(
        self,
        fc_optimizer: torch.optim.Optimizer,
        fc_params: Any,
        fc_clip: Callable[[], torch.Tensor] | None,
    ) -> torch.Tensor | None:
        """DeepSpeed steps the backbone; the classifier's gradients are divided by DeepSpeed's
        loss scale (fp16) and its step is skipped when DeepSpeed reports an overflow or its
        own gradients are not finite. DeepSpeed decides the backbone's step from the
        backbone's gradients alone; they carry the same loss, so an overflow shows in both."""
        fc_params = [p for p in fc_params if p.grad is not None]
        overflow = False
        if self.fp16:
            scale = float(self.optimizer.cur_scale)
            for p in fc_params:
                p.grad.div_(scale)
            overflow = not _all_ranks_finite([_grad_values(p) for p in fc_params], self.ctx)
        self.engine.step()
        overflow = overflow or bool(getattr(self.optimizer, "overflow", False))
        if fc_clip is not None:
            fc_clip()  # the classifier's own clip (collective: the norm spans every shard)
        if not overflow:
            fc_optimizer.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else torch.as_tensor(float(norm))

    def state_dict(self) -> dict[str, Any]:
        return {}  # DeepSpeed's own checkpoint holds the optimizer (partitioned under ZeRO)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See :meth:`load_extra`."""

    def save_extra(self, folder: Path) -> None:
        """Collective: every rank writes its ZeRO partition under ``folder/deepspeed``."""
        self.engine.save_checkpoint(str(folder / "deepspeed"), tag=ds_universal.TAG)

    def load_extra(self, folder: Path, same_world: bool) -> str:
        """Restore DeepSpeed's fp32 master weights and optimizer state (collective); returns
        what the resume line adds about them ("" when nothing needs saying).

        On the saved world size (or without ZeRO, whose optimizer state is whole on every
        rank) the saved files load as they are. ZeRO 1-3 partitions are cut for the saved
        number of ranks: on another world size they are gathered once into DeepSpeed's
        universal layout (``trainer.ds_universal``) and every rank takes its new partition.
        A checkpoint that cannot be converted keeps the weights from backbone.pt, and the
        backbone optimizer starts afresh, which the resume line says.
        """
        ds_dir = folder / "deepspeed"
        if not ds_dir.is_dir():
            return ""  # a DDP checkpoint: the weights from backbone.pt
        if same_world or self.zero_stage == 0:
            self.engine.load_checkpoint(
                str(ds_dir), tag=ds_universal.TAG, load_lr_scheduler_states=False
            )
            return ""
        try:
            universal = ds_universal.ensure_universal(
                ds_dir, self.ctx.is_main, self.ctx.distributed
            )
        except ds_universal.UniversalUnsupported as exc:
            return f"backbone weights only, its optimizer starts afresh ({exc})"
        ds_universal.load_universal(self.engine, self.zero_stage, universal)
        return f"ZeRO-{self.zero_stage} optimizer state re-partitioned from {folder.name}/universal"

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Load full backbone weights; collective under ZeRO-3 (the partitioned parameters
        are gathered, filled on every rank, and re-partitioned from rank 0's copy)."""
        if self.zero_stage != 3:
            self.module.load_state_dict(state, strict=True)
            return
        import deepspeed

        params = list(self.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            self.module.load_state_dict(state, strict=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective under ZeRO-3 (parameters are gathered); a plain state_dict otherwise."""
        if self.zero_stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.module.state_dict()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_engine(
    backbone: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext, config: Config
) -> DDPEngine | DeepSpeedEngine:
    """The engine registered under ``config.dist.engine``, around ``backbone``."""
    engine = _ENGINES.get(config.dist.engine)
    if engine is None:
        raise ValueError(
            f"dist.engine: unknown engine {config.dist.engine!r}; known: {engine_names()}"
        )
    return engine(backbone, optimizer, ctx, config)
