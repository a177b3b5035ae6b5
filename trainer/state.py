"""What a checkpoint holds beyond weights: RNG states, and classifier shards that can be
re-sharded onto a different world size.

Classifier shard files store every tensor of the Partial FC module and of its optimizer
together with the shard's global class range ``[class_start, class_start + num_local)``.
A tensor is *row-sharded* when its first dimension is a whole multiple ``k`` of the shard's
rows (k = 1 for the class centres, K for K sub-centres per class) -- it is cut and pasted by
global class id when the world size changes; every other tensor (scalars, running statistics
of a head, the optimizer's step count) is the same on all ranks and is taken from any file.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainer.checkpoint import CheckpointError, load_torch

# ------------------------------------------------------------------------------------ RNG


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch CPU generator states, in weights_only-loadable types."""
    np_state = np.random.get_state()
    return {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            has_gauss,
            cached,
        )
    )
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------------- classifier shards


def _row_multiple(tensor: torch.Tensor, rows: int) -> int | None:
    if tensor.dim() == 0 or rows <= 0 or tensor.shape[0] % rows:
        return None
    return tensor.shape[0] // rows


def classifier_payload(
    module: nn.Module, optimizer: torch.optim.Optimizer, class_start: int, num_local: int
) -> dict[str, Any]:
    """Everything of one rank's classifier, keyed by name (optimizer state by param name)."""
    names = {id(p): n for n, p in module.named_parameters()}
    opt_state = optimizer.state_dict()
    by_name: dict[str, dict[str, Any]] = {}
    flat_params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(flat_params):
        if index in opt_state["state"]:
            by_name[names[id(param)]] = opt_state["state"][index]
    return {
        "class_start": int(class_start),
        "num_local": int(num_local),
        "module": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer_state": by_name,
        "optimizer_groups": opt_state["param_groups"],
    }


def _rows_per_class(
    current: torch.Tensor, count: int, first: torch.Tensor, saved: int
) -> int | None:
    """k when ``current`` (``count`` classes) and the first saved shard's copy (``saved``
    classes) both hold k rows per class; None for a tensor replicated on every rank."""
    k = _row_multiple(current, count)
    return k if k is not None and _row_multiple(first, saved) == k else None


def _reshard_tensor(
    name: str,
    current: torch.Tensor,
    shards: list[dict[str, Any]],
    get: Any,
    start: int,
    count: int,
) -> torch.Tensor:
    """Assemble ``current``'s rows for classes [start, start+count) from the saved shards."""
    first = get(shards[0])
    k = _rows_per_class(current, count, first, shards[0]["num_local"])
    if k is None:
        # Replicated tensor: identical on every rank, take it from the first file.
        if first.shape != current.shape:
            raise CheckpointError(
                f"classifier tensor {name}: saved shape {tuple(first.shape)} does not match "
                f"the current {tuple(current.shape)}"
            )
        return first.clone()
    out = torch.empty_like(current, device="cpu")
    filled = 0
    for shard in shards:
        s0, c0 = shard["class_start"], shard["num_local"]
        lo, hi = max(start, s0), min(start + count, s0 + c0)
        if lo >= hi:
            continue
        src = get(shard)
        if src.shape[1:] != current.shape[1:]:
            raise CheckpointError(
                f"classifier tensor {name}: saved rows of shape {tuple(src.shape[1:])}, the "
                f"current model has {tuple(current.shape[1:])}"
            )
        out[(lo - start) * k : (hi - start) * k] = src[(lo - s0) * k : (hi - s0) * k]
        filled += hi - lo
    if filled != count:
        raise CheckpointError(
            f"classifier tensor {name}: the saved shards cover {filled} of the {count} classes "
            f"[{start}, {start + count}) this rank needs"
        )
    return out


def _saved_shards(
    step_dir: Path, saved_world_size: int, class_start: int, num_local: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every saved shard, and those overlapping classes [class_start, class_start+num_local)."""
    shards = [load_torch(step_dir / f"classifier-rank{r}.pt") for r in range(saved_world_size)]
    needed = [
        s
        for s in shards
        if s["class_start"] < class_start + num_local
        and class_start < s["class_start"] + s["num_local"]
    ] or shards[:1]
    return shards, needed


def load_class_rows(
    step_dir: Path, saved_world_size: int, module: nn.Module, class_start: int, num_local: int
) -> list[str]:
    """Only the per-class tensors (the class centres, an auxiliary loss's per-class centres)
    of this rank's classes, re-sharded from any saved world size; the optimizer state, the
    step count and a head's running statistics stay as they are (``model.init_classifier``).
    Returns the names of the tensors taken."""
    shards, needed = _saved_shards(step_dir, saved_world_size, class_start, num_local)
    state = module.state_dict()
    taken = []
    for name, tensor in state.items():
        saved = shards[0]["module"].get(name)
        if saved is None:
            raise CheckpointError(f"{step_dir}: classifier tensor {name} is not in the checkpoint")
        if _rows_per_class(tensor, num_local, saved, shards[0]["num_local"]) is None:
            continue
        state[name] = _reshard_tensor(
            name, tensor, needed, lambda s, n=name: s["module"][n], class_start, num_local
        )
        taken.append(name)
    module.load_state_dict(state, strict=True)
    return taken


def load_classifier(
    step_dir: Path,
    saved_world_size: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    class_start: int,
    num_local: int,
) -> None:
    """Load this rank's classifier rows and optimizer state from any saved world size."""
    shards, needed = _saved_shards(step_dir, saved_world_size, class_start, num_local)
    current = module.state_dict()
    new_state = {}
    for name, tensor in current.items():
        if name not in shards[0]["module"]:
            raise CheckpointError(f"{step_dir}: classifier tensor {name} is not in the checkpoint")
        new_state[name] = _reshard_tensor(
            name, tensor, needed, lambda s, n=name: s["module"][n], class_start, num_local
        )
    module.load_state_dict(new_state, strict=True)

    params = dict(module.named_parameters())
    flat_params = [p for group in optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in params.items()}
    opt_state: dict[int, dict[str, Any]] = {}
    for index, param in enumerate(flat_params):
        pname = names[id(param)]
        if pname not in shards[0]["optimizer_state"]:
            continue
        entry = {}
        saved_rows = shards[0]["module"][pname].shape[0] if shards[0]["module"][pname].dim() else 0
        for key, value in shards[0]["optimizer_state"][pname].items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                # State with one entry per row of the parameter (momentum [rows, D], a
                # per-row Adam step count [rows]) is cut like the parameter's rows.
                per_row = value.shape[0] == saved_rows and param.dim() > 0
                template = (
                    torch.empty((param.shape[0], *value.shape[1:]), dtype=value.dtype)
                    if per_row
                    else value
                )
                value = _reshard_tensor(
                    f"{pname}/{key}",
                    template,
                    needed,
                    lambda s, n=pname, k=key: s["optimizer_state"][n][k],
                    class_start,
                    num_local,
                )
            entry[key] = value
        opt_state[index] = entry
    groups = shards[0]["optimizer_groups"]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
