"""A DeepSpeed ZeRO checkpoint resumed on another world size, through DeepSpeed's universal
checkpoint layout.

ZeRO 1-3 save the backbone's fp32 master weights and optimizer state as flat partitions, one
file per rank, cut for that number of ranks. ``ensure_universal`` gathers them once, on rank 0,
into DeepSpeed's universal layout inside the checkpoint (``step-N/universal/state/``: per
parameter ``zero/<name>/fp32.pt`` and one file per optimizer state -- ``momentum_buffer.pt``
for SGD, ``exp_avg.pt`` and ``exp_avg_sq.pt`` for AdamW -- plus ``step.pt``; the optimizer's
hyperparameters and loss scale in ``zero/optimizer_state.pt``), and ``load_universal`` cuts
every rank's new partition from it.

Why not DeepSpeed's own converter (``deepspeed.checkpoint.ds_to_universal``, 0.19.8): it
reads Adam's two moments only (SGD's momentum raises ``KeyError: 'exp_avg'``), and so does
ZeRO-3's universal loader. The layout written here is the same (the tests compare it with
``ds_to_universal``'s for AdamW). ZeRO 1-2 then load through DeepSpeed's universal loading
(``checkpoint.load_universal``), which takes any state file; ZeRO-3 through DeepSpeed's
per-parameter API (``safe_set_local_fp32_param`` / ``safe_set_local_optimizer_state``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.noise import LogNoise, quiet

__all__ = ["UniversalUnsupported", "ensure_universal", "gather_full_state", "load_universal"]

TAG = "state"  # the DeepSpeed tag the engine saves under (step-N/deepspeed/state)
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


# Said once per rank on every universal load: facetrain has no tensor parallelism.
_LOAD_NOISE = (LogNoise("DeepSpeed", "MPU is not provided, setting tp size to 1"),)


class UniversalUnsupported(RuntimeError):
    """The saved DeepSpeed checkpoint has a layout this conversion does not read."""


def _load(path: Path) -> Any:
    # DeepSpeed's own files (this run's checkpoint) hold its objects, not only tensors.
    return torch.load(path, map_location="cpu", weights_only=False)


def _optim_files(tag_dir: Path) -> list[Path]:
    found: dict[int, Path] = {}
    for path in tag_dir.iterdir():
        m = _OPTIM_FILE.match(path.name)
        if m is None:
            continue
        if int(m.group(2)) != 0:
            raise UniversalUnsupported("model-parallel (mp_rank > 0) partitions")
        found[int(m.group(1))] = path
    if not found:
        raise UniversalUnsupported(f"{tag_dir}: no ZeRO optimizer partitions")
    if sorted(found) != list(range(len(found))):
        raise UniversalUnsupported(f"{tag_dir}: partitions {sorted(found)} are not 0..W-1")
    return [found[r] for r in range(len(found))]


def _model_states(stage: int) -> str:
    """Rank 0's model-states file: parameter shapes, the engine's counters, the module."""
    return f"{'zero_pp_rank_0_' if stage == 3 else ''}mp_rank_00_model_states.pt"


def _shapes(tag_dir: Path, stage: int) -> list[dict[str, torch.Size]]:
    return list(_load(tag_dir / _model_states(stage))["param_shapes"])


def _add(pieces: dict[str, dict[str, list]], name: str, key: str, value: Any) -> None:
    pieces.setdefault(name, {}).setdefault(key, []).append(value)


def _pieces_stage12(optim: dict, pieces: dict[str, dict[str, list]]) -> None:
    """One rank's ZeRO-1/2 partition: per parameter group a flat fp32 slice, the optimizer's
    flat state and where each parameter's fragment lies in them."""
    states = optim["base_optimizer_state"]
    if not isinstance(states, dict):
        raise UniversalUnsupported("zero_optimization.elastic_checkpoint layout")
    for g, mappings in enumerate(optim["param_slice_mappings"]):
        flats = {"fp32": optim["single_partition_of_fp32_groups"][g], **states["state"][g]}
        for name, frag in mappings.items():
            for key, flat in flats.items():
                if torch.is_tensor(flat) and flat.dim() == 1:
                    _add(pieces, name, key, flat.narrow(0, frag.start, frag.numel).clone())
                else:  # the step count, the same for every fragment
                    _add(pieces, name, key, flat)


def _pieces_stage3(optim: dict, rank: int, shapes: list[dict], pieces: dict) -> None:
    """One rank's ZeRO-3 partition: each parameter takes ceil(numel / W) elements of every
    rank's flat sub-group (the last rank's share padded)."""
    if optim.get("ds_zero_partition_groups"):
        raise UniversalUnsupported("ZeRO-3 expert partition groups")
    world = int(optim["partition_count"])
    for i, sub_shapes in enumerate(shapes):
        flats = {"fp32": optim["fp32_flat_groups"][i], **optim["optimizer_state_dict"]["state"][i]}
        offset = 0
        for name, shape in sub_shapes.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            own = max(0, min(part, numel - rank * part))
            for key, flat in flats.items():
                if torch.is_tensor(flat) and flat.dim() == 1:
                    _add(pieces, name, key, flat.narrow(0, offset, own).clone())
                else:
                    _add(pieces, name, key, flat)
            offset += part


def gather_full_state(tag_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any], int]:
    """Every parameter's full fp32 weights and optimizer state from a DeepSpeed ZeRO 1-3
    checkpoint (one tag folder): ``({name: {"fp32": t, "momentum_buffer": t, "step": s}},
    the optimizer's global state (hyperparameters, loss scale), ZeRO stage)``."""
    files = _optim_files(tag_dir)
    pieces: dict[str, dict[str, list]] = {}
    global_state: dict[str, Any] = {}
    stage = -1
    shapes: list[dict[str, torch.Size]] = []
    for rank, path in enumerate(files):
        optim = _load(path)["optimizer_state_dict"]
        stage = int(optim["zero_stage"])
        if stage == 3:
            shapes = shapes or _shapes(tag_dir, 3)
            _pieces_stage3(optim, rank, shapes, pieces)
            inner = optim["optimizer_state_dict"]
            sharded = ("fp32_flat_groups", "optimizer_state_dict")
        elif stage in (1, 2):
            _pieces_stage12(optim, pieces)
            inner = optim["base_optimizer_state"]
            sharded = ("base_optimizer_state", "single_partition_of_fp32_groups")
            sharded += ("param_slice_mappings",)
        else:
            raise UniversalUnsupported(f"ZeRO stage {stage}")
        if rank == 0:
            global_state = {k: v for k, v in optim.items() if k not in sharded}
            global_state["param_groups"] = inner["param_groups"]
    shapes_by_name = {n: s for group in _shapes(tag_dir, stage) for n, s in group.items()}
    full: dict[str, dict[str, Any]] = {}
    for name, by_key in pieces.items():
        full[name] = {}
        for key, parts in by_key.items():
            if torch.is_tensor(parts[0]) and parts[0].dim() == 1:
                full[name][key] = torch.cat(parts).view(shapes_by_name[name])
            else:
                full[name][key] = parts[0]
    return full, global_state, stage


def _write_universal(src: Path, out: Path) -> None:
    """DeepSpeed's universal layout of the checkpoint in ``src`` (a tag folder) under ``out``."""
    full, global_state, stage = gather_full_state(src)
    zero = out / "zero"
    for name, by_key in full.items():
        (zero / name).mkdir(parents=True, exist_ok=True)
        for key, value in by_key.items():
            payload = value if key == "step" else {"param": value, "cat_dim": 0}
            torch.save(payload, zero / name / f"{key}.pt")
    torch.save(global_state, zero / "optimizer_state.pt")
    # The engine reads its counters (and, ZeRO 1-2, the module) from the model-states file.
    shutil.copy2(src / _model_states(stage), out / _model_states(stage))


def ensure_universal(ds_dir: Path, is_main: bool, distributed: bool) -> Path:
    """The universal form of ``ds_dir`` (a checkpoint's ``deepspeed`` folder), written once by
    rank 0 beside it (``step-N/universal``, through a temporary folder and a rename) and reused
    when present. Collective; raises ``UniversalUnsupported`` on every rank when it cannot be
    made."""
    target = ds_dir.parent / "universal"
    error = ""
    if is_main and not target.is_dir():
        tmp = ds_dir.parent / "universal.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a conversion that died half-way
            _write_universal(ds_dir / TAG, tmp / TAG)
            os.replace(tmp, target)
        except UniversalUnsupported as exc:
            error = str(exc)
        except Exception as exc:  # unreadable file, unwritable folder: every rank must hear it
            error = f"{type(exc).__name__}: {exc}"
        if error:
            shutil.rmtree(tmp, ignore_errors=True)
    if distributed and dist.is_initialized():
        box = [error]
        dist.broadcast_object_list(box, src=0)  # also the barrier before anyone reads it
        error = box[0]
    if error:
        raise UniversalUnsupported(error)
    return target


def load_universal(engine: Any, zero_stage: int, universal: Path) -> None:
    """Load ``universal`` (from :func:`ensure_universal`) into a DeepSpeed engine of any world
    size: fp32 master weights and optimizer state, each rank its new partition."""
    if zero_stage == 3:
        _load_zero3(engine, universal / TAG)
        return
    # DeepSpeed's universal loading, switched on for this load only (the engine reads the
    # flag from its config each time; a same-world resume loads the saved partitions).
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        with quiet(_LOAD_NOISE):
            engine.load_checkpoint(str(universal), tag=TAG, load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = before


def _zero3_partition(full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """This rank's ZeRO-3 share of ``full``: ceil(numel / W) elements, the last rank's padded."""
    group = param.ds_process_group
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    part = param.ds_tensor.numel()
    flat = nn.functional.pad(full.reshape(-1), (0, part * world - full.numel()))
    return flat.narrow(0, rank * part, part)


def _load_zero3(engine: Any, tag_dir: Path) -> None:
    """ZeRO-3 through DeepSpeed's per-partition setters (the module's weights are loaded
    already, from backbone.pt). Each rank cuts its partition as ZeRO-3 does: ceil(numel / W)
    elements per rank, the last one padded (DeepSpeed's full-tensor setter does not pad)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    zero = tag_dir / "zero"
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    first = zero / named[0][0]
    keys = sorted(p.stem for p in first.glob("*.pt") if p.stem not in ("fp32", "step"))
    step = _load(first / "step.pt") if (first / "step.pt").is_file() else None
    optimizer = engine.optimizer
    # The optimizer creates its state at the first step; here it is filled before that.
    for flat in optimizer.fp32_partitioned_groups_flat:
        state = optimizer.optimizer.state[flat]
        for key in keys:
            state[key] = torch.zeros_like(flat)
        if step is not None:
            state["step"] = step.clone() if torch.is_tensor(step) else step
    for name, param in named:
        for key in ("fp32", *keys):
            full = _load(zero / name / f"{key}.pt")["param"]
            part = _zero3_partition(full, param)
            if key == "fp32":
                safe_set_local_fp32_param(param, part)
            else:
                safe_set_local_optimizer_state(param, part, key)
    saved_groups = _load(zero / "optimizer_state.pt")["param_groups"]
    for group, saved in zip(optimizer.optimizer.param_groups, saved_groups, strict=True):
        group.update({k: v for k, v in saved.items() if k != "params"})
    counters = _load(tag_dir / _model_states(3))
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
