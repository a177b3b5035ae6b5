"""The classifier shard's optimizer: SGD (momentum) or AdamW, dense or row-sparse gradients.

Update semantics for rows that were not sampled (``PartialFC(update=...)``):

- ``"dense"``: the shard's gradient is a dense ``[C_r, D]`` tensor with zeros in unsampled
  rows, so momentum and weight decay keep moving every row every step (insightface's Partial
  FC v2). Works with any ``torch.optim`` optimizer.
- ``"sampled"``: the gradient is row-sparse (COO, only the sampled rows), and ``ShardOptimizer``
  updates only those rows: a row that did not take part in a step is frozen for that step,
  weights, momentum, Adam moments and its Adam step count alike (insightface's Partial FC v1
  and the "lazy" sparse optimizers). Each row behaves exactly like its own optimizer that
  steps whenever the row is sampled; at ``sample_rate = 1`` both modes are the same update.

``ShardOptimizer`` follows ``torch.optim.SGD`` (dampening 0, no Nesterov) and
``torch.optim.AdamW`` (no amsgrad) formulas exactly, including for dense gradients, and works
row chunk by row chunk so it never allocates a temporary of the shard's size. The fast CPU
backend (``partialfc.fast``) hands it a fused kernel for the row-sparse SGD update (one sweep:
read momentum, gradient and weight, write momentum and weight) and the rows its forward
already gathered.
It is a regular ``torch.optim.Optimizer``: LR schedulers, ``state_dict`` and GradScaler
work unchanged.

A parameter stored in bf16 / fp16 (``PartialFC(storage_dtype=...)``) keeps its optimizer
state in the same dtype; each update reads the rows it touches into float32, computes there
and writes weights and state back rounded (``partialfc.rounding``: nearest or stochastic).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from partialfc.collectives import all_reduce_inplace
from partialfc.rounding import Rounding, round_into
from partialfc.sampling import mixed_seed

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "ShardOptimizer", "clip_grad_norm_"]

DEFAULT_CHUNK_ELEMENTS = 1 << 21
"""Elements updated per chunk (8 MB of float32): bounds the optimizer's temporaries to a few
chunks, small enough for the C allocator to recycle them instead of mapping fresh pages."""


def _rows_of(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index [S], values [S, ...]) of a row-sparse COO gradient, without duplicates.

    Autograd drops the "coalesced" flag when it stores a sparse gradient, so sorted unique
    indices (what PartialFC produces) are recognised by one O(S) check instead of paying for
    ``coalesce()`` (a sort and a copy of the values).
    """
    index = grad._indices()[0]
    if grad.is_coalesced() or bool((index[1:] > index[:-1]).all()):
        return index, grad._values()
    grad = grad.coalesce()
    return grad._indices()[0], grad._values()


RowCache = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]
SgdRows = Callable[..., bool]
"""``(weight, momentum, index, grad_rows, lr, momentum_factor, weight_decay) -> done``."""


class ShardOptimizer(torch.optim.Optimizer):
    """SGD with momentum or AdamW that updates only the rows present in a row-sparse gradient.

    Args:
        params: parameters (the shard, and any head parameters).
        name: ``"sgd"`` or ``"adamw"``.
        lr, momentum, weight_decay, betas, eps: as in ``torch.optim.SGD`` / ``AdamW``.
            ``weight_decay`` is coupled (added to the gradient) for SGD, decoupled for AdamW.
        chunk_elements: elements per update chunk (``DEFAULT_CHUNK_ELEMENTS``).
        row_cache: optional ``(param, row_index) -> rows [S, ...] or None``: the current
            values of ``param[row_index]`` if the caller still holds them (the fast backend's
            forward gathered them already), saving one gather per step. The rows may be
            overwritten.
        sgd_rows: optional row-sparse SGD update in one call (the fast backend's kernel);
            it returns False where it does not apply (then the torch ops run).
        after_step: optional callable run at the end of every ``step`` (PartialFC applies
            its head's rule-based state updates there, e.g. center loss's centres).
        after_zero_grad: optional callable run by ``zero_grad`` (PartialFC drops those
            updates with the gradients: a step that is not taken moves nothing).
        rounding: how float32 results are written into a bf16 / fp16 parameter and its
            state: ``"nearest"`` or ``"stochastic"`` (see ``partialfc.rounding``).
        rounding_seed: seed of the stochastic rounding's draws; step t of a run draws from
            ``mixed_seed("round", rounding_seed, t)`` (t is kept in the param group, so a
            resumed run draws what the uninterrupted run would have).

    State per parameter: ``momentum_buffer`` (SGD, momentum > 0) or ``exp_avg``,
    ``exp_avg_sq`` and ``step`` (AdamW; ``step`` is per row, float32 ``[rows]``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        name: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        row_cache: RowCache | None = None,
        sgd_rows: SgdRows | None = None,
        after_step: Callable[[], None] | None = None,
        after_zero_grad: Callable[[], None] | None = None,
        rounding: Rounding = "stochastic",
        rounding_seed: int = 0,
    ) -> None:
        if name not in ("sgd", "adamw"):
            raise ValueError(f"name must be 'sgd' or 'adamw', got {name!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "betas": tuple(betas),
            "eps": eps,
        }
        super().__init__(params, defaults)
        self.name = name
        self.chunk_elements = int(chunk_elements)
        self.row_cache = row_cache
        self.sgd_rows = sgd_rows
        self.after_step = after_step
        self.after_zero_grad = after_zero_grad
        self.rounding = rounding
        self.rounding_seed = int(rounding_seed)
        self._generator: torch.Generator | None = None  # this step's draws (stochastic)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        if self.after_zero_grad is not None:
            self.after_zero_grad()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; tensors are copied, so the source optimizer stays independent
        (``torch.optim`` would alias same-dtype, same-device tensors, and this optimizer
        updates its state in place)."""
        state = {
            key: {
                name: value.clone() if isinstance(value, torch.Tensor) else value
                for name, value in entry.items()
            }
            for key, entry in state_dict["state"].items()
        }
        super().load_state_dict({**state_dict, "state": state})
        # torch.optim keeps a loaded "step" where it was (a scalar count belongs on the CPU);
        # here it is a per-row tensor used with the rows' indices on the parameter's device.
        for group in self.param_groups:
            for p in group["params"]:
                step = self.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device != p.device:
                    self.state[p]["step"] = step.to(p.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One update of every parameter with a gradient (row-sparse: only its rows)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._generator = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                if _narrow(p) and self.rounding == "stochastic" and self._generator is None:
                    t = group["rounding_step"] = group.get("rounding_step", 0) + 1
                    seed = mixed_seed("round", self.rounding_seed, t)
                    self._generator = torch.Generator(p.device).manual_seed(seed)
                grad = p.grad
                if grad.is_sparse:
                    index, values = _rows_of(grad)  # [S], [S, ...]
                    if index.numel() == 0:
                        continue  # no row of this parameter took part in the step
                else:
                    index, values = None, grad
                if self.name == "sgd":
                    self._sgd(p, index, values, group)
                else:
                    self._adamw(p, index, values, group)
        if self.after_step is not None:
            self.after_step()
        return loss

    def _cached_rows(self, p: torch.Tensor, index: torch.Tensor) -> torch.Tensor | None:
        if self.row_cache is None:
            return None
        return self.row_cache(p, index)

    def _chunks(self, values: torch.Tensor) -> Iterable[slice]:
        n = values.shape[0] if values.dim() > 0 else 1
        row = max(1, values[0].numel()) if values.dim() > 0 else 1
        step = max(1, self.chunk_elements // row)
        for lo in range(0, n, step):
            yield slice(lo, min(n, lo + step))

    def _sgd(
        self, p: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor, group: dict
    ) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        state = self.state[p]
        if mu > 0 and "momentum_buffer" not in state:
            # Zeros equal torch's "first step copies the gradient" when dampening is 0.
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf = state.get("momentum_buffer")
        data = p.data
        narrow = _narrow(p)
        if index is not None and self.sgd_rows is not None and not narrow:
            if self.sgd_rows(data, buf, index, values, lr, mu, wd):
                return
        cached = self._cached_rows(p, index) if index is not None and wd else None
        for sl in self._chunks(values):
            g = values[sl].float() if narrow else values[sl]
            idx = None if index is None else index[sl]
            w = None
            if wd or narrow:
                w = cached[sl] if cached is not None else self._load(data, idx, sl)
            if mu > 0:
                # buf = mu * buf + g + wd * w, in place on the (gathered) momentum rows.
                m = self._load(buf, idx, sl)
                torch.add(g, m, alpha=mu, out=m)  # one pass: m = g + mu * m
                if wd:
                    m.add_(w, alpha=wd)
                self._store(buf, idx, sl, m)
                upd = m
            else:
                upd = g if not wd else g.add(w, alpha=wd)
            if narrow:
                self._store(data, idx, sl, w.add_(upd, alpha=-lr))
            elif idx is None:
                data[sl].add_(upd, alpha=-lr)
            else:
                data.index_add_(0, idx, upd, alpha=-lr)

    def _load(self, t: torch.Tensor, idx: torch.Tensor | None, sl: slice) -> torch.Tensor:
        """Rows ``sl`` of the chunk (``idx``: the gathered rows) to compute on: a view of
        ``t`` for dense float32 rows, else a copy (float32 for a narrow ``t``)."""
        rows = t[sl] if idx is None else t.index_select(0, idx)
        return rows.float() if _narrow(t) else rows

    def _store(
        self, t: torch.Tensor, idx: torch.Tensor | None, sl: slice, value: torch.Tensor
    ) -> None:
        """Write a chunk computed by ``_load``'s rows back into ``t`` (rounded if narrow)."""
        if _narrow(t):
            value = round_into(value, t.dtype, self.rounding, self._generator)
        elif idx is None:
            return  # computed in place on the view
        if idx is None:
            t[sl].copy_(value)
        else:
            t.index_copy_(0, idx, value)

    def _adamw(
        self, p: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor, group: dict
    ) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            rows = p.shape[0] if p.dim() > 0 else 1
            state["step"] = torch.zeros(rows, dtype=torch.float32, device=p.device)
        m_all, v_all, steps = state["exp_avg"], state["exp_avg_sq"], state["step"]
        data = p.data
        if p.dim() == 0:  # a scalar parameter (a head's): one "row"
            data, m_all, v_all, values = (t.view(1) for t in (data, m_all, v_all, values))
        narrow = _narrow(p)
        cached = self._cached_rows(p, index) if index is not None and not narrow else None
        for sl in self._chunks(values):
            g = values[sl].float() if narrow else values[sl]
            idx = None if index is None else index[sl]
            w = cached[sl] if cached is not None else self._load(data, idx, sl)
            m, v = self._load(m_all, idx, sl), self._load(v_all, idx, sl)
            if idx is None:
                t = steps[sl].add_(1.0)
            else:
                t = steps.index_select(0, idx).add_(1.0)
                steps.index_copy_(0, idx, t)
            w.mul_(1.0 - lr * wd)
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            t64 = t.double()
            bc1 = 1.0 - torch.pow(beta1, t64)  # [rows]
            bc2_sqrt = (1.0 - torch.pow(beta2, t64)).sqrt()
            shape = (-1,) + (1,) * (g.dim() - 1)
            step_size = (lr / bc1).to(w.dtype).view(shape)
            denom = (v.sqrt() / bc2_sqrt.to(w.dtype).view(shape)).add_(eps)
            w.sub_(m.div(denom).mul_(step_size))
            for target, value in ((m_all, m), (v_all, v), (data, w)):
                self._store(target, idx, sl, value)


def _narrow(t: torch.Tensor) -> bool:
    """A 16-bit float tensor: updated through float32 and rounded back."""
    return t.dtype in (torch.float16, torch.bfloat16)


@torch.no_grad()
def clip_grad_norm_(
    params: Iterable[torch.Tensor],
    max_norm: float,
    group: Any = None,
    replicated: Iterable[torch.Tensor] = (),
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) for a sharded classifier, sparse gradients too.

    The norm is the whole classifier's: the squared norms of this rank's gradients are summed
    over the ranks of ``group`` (identity without a process group), with the ``replicated``
    parameters (identical on every rank, e.g. DiscFace's displacement) counted once. Every
    rank therefore scales by the same factor, and replicated parameters stay identical.
    torch's version has no sparse kernel for the norm; this one takes the norm of a sparse
    gradient's (de-duplicated) values and scales them in place. Returns the total norm before
    clipping. With ``max_norm <= 0`` a ValueError names the argument.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    params = list(params)
    shared = {id(p) for p in replicated}
    sharded, once = [], []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            if not p.grad.is_coalesced():
                p.grad = p.grad.coalesce()
            values = p.grad._values()
        else:
            values = p.grad
        (once if id(p) in shared else sharded).append(values)
    device = params[0].device if params else torch.device("cpu")
    sumsq = torch.zeros((), dtype=torch.float64, device=device)
    for v in sharded:
        sumsq += torch.linalg.vector_norm(v.double()) ** 2
    sumsq = all_reduce_inplace(sumsq, "sum", group)
    for v in once:
        sumsq += torch.linalg.vector_norm(v.double()) ** 2
    total = sumsq.sqrt().float()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for v in sharded + once:
        v.mul_(scale.to(v.dtype))
    return total
