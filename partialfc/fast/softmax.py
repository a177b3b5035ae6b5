"""The fast backend's distributed softmax cross-entropy over the fused cosine's logits: one
all-gather of per-row statistics, the exponentials left in place for the backward, and
``E @ B`` computed while the statistics travel (see ``partialfc.fast.fused``)."""

from __future__ import annotations

import math
from typing import Any

import torch

from partialfc.collectives import ProcessGroup
from partialfc.fast import cpu_kernels
from partialfc.fast.collectives import start_all_gather_stack
from partialfc.fast.fused import FusedLink, _exps_times_rows

__all__ = ["fused_softmax_ce"]


def _local_exp_sums(
    z: torch.Tensor, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place ``z = exp(z * col_scale - shift) * col_scale`` per row (``col_scale`` [S]
    optional); returns (row max [N], shift [N], sum of the exponentials [N]) of the scaled
    logits.

    The row max is over this rank's columns only (-inf for a row without a finite value);
    the shift is that max where finite, else 0 (such a row is all zeros after exp). ``z`` may
    be row-major or a transposed view of a row-major ``[S, N]`` (logits kept in the gradient
    buffer). One sweep per row with the fused CPU kernel (two sweeps over the transposed
    layout), four to six torch passes otherwise.
    """
    n = z.shape[0]
    row_max = z.new_full((n,), -math.inf)
    row_sum = z.new_empty(n)
    kern = None
    if z.shape[1] > 0:
        # Row-major z, or z stored transposed (the logits in the gradient buffer).
        transposed = not z.is_contiguous()
        kern = cpu_kernels.usable(z.T if transposed else z, row_max, row_sum, col_scale)
    if kern is not None:
        if transposed:
            kern.softmax_cols_(z.T, col_scale, row_max, row_sum)
        else:
            kern.softmax_rows_(z, col_scale, row_max, row_sum)
        return row_max, _finite_or_zero(row_max), row_sum
    if col_scale is not None:
        z.mul_(col_scale)
    if z.shape[1] > 0:
        row_max = z.amax(dim=1)
    shift = _finite_or_zero(row_max)
    z.sub_(shift[:, None]).exp_()  # masked entries (-inf) -> 0
    row_sum = z.sum(dim=1)
    if col_scale is not None:
        z.mul_(col_scale)
    return row_max, shift, row_sum


def _finite_or_zero(values: torch.Tensor) -> torch.Tensor:
    """``values`` with every non-finite entry replaced by 0 (a row's exp shift)."""
    return torch.where(torch.isfinite(values), values, torch.zeros_like(values))


class _FusedSoftmaxCE(torch.autograd.Function):
    """Distributed softmax CE from masked non-target logits [N, S] and target logits [R].

    Forward, with one collective (an all-gather of per-row statistics): every rank turns its
    columns (``z * col_scale`` when a column scale is given) into ``exp(z - shift_r)`` with
    its own row maximum as the shift and sums them;
    adding its local target terms it has, per global row i, a local maximum ``m_ri`` and
    ``s_ri = sum exp(. - m_ri)`` over its logits (online softmax). From every rank's
    ``(m_r, s_r)``, the target logit ``f_i`` (from the one rank holding it) and the row maxima
    of the non-target logits (the hardest negative), each rank then computes
    ``M_i = max_r m_ri``, ``Z_i = sum_r s_ri exp(m_ri - M_i)`` and
    ``loss = mean_i (log Z_i + M_i - f_i)``. A ring all-reduce of the max and then of the sums
    would take four message rounds instead of one. While the statistics travel this rank
    computes ``E @ B`` for the embeddings' gradient (see ``FusedLink``): on a shared machine
    the wait for the slowest rank overlaps a matrix product instead of idling.

    ``z`` is overwritten in place by ``E = exp(z * col_scale - shift) * col_scale`` and kept
    for backward, which only reads it: no gradient for ``z`` is returned, its factor ``coef``
    [N] goes to the link.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: torch.Tensor,
        f: torch.Tensor,
        rows: torch.Tensor,
        group: ProcessGroup | None,
        extra: torch.Tensor | None,
        col_scale: torch.Tensor | None,
        link: FusedLink,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = z.shape[0]
        f_d = f.detach().to(z.dtype)  # [R]
        # [N] each; z = exp(z * col_scale - shift) * col_scale
        neg_max, shift, local_sum = _local_exp_sums(z, col_scale)
        # This rank's online-softmax pair (m, s) per row, its target terms included.
        m = neg_max.clone()
        m[rows] = torch.maximum(m[rows], f_d)
        has_exp = local_sum > 0
        scaled = torch.where(has_exp, local_sum * torch.exp(shift - m), torch.zeros_like(m))
        n_extra = 0 if extra is None else extra.numel()
        payload = z.new_zeros(4 * n + n_extra)
        stats = payload[: 4 * n].view(4, n)
        stats[0] = neg_max
        stats[1] = m
        stats[2] = scaled
        stats[2, rows] += torch.exp(f_d - m[rows])
        stats[3, rows] = f_d
        if extra is not None:
            payload[4 * n :] = extra.to(payload.dtype)
        pending = start_all_gather_stack(payload, group)  # [W, 4N + E]
        exps_mm = exps_b = None
        try:  # the collective is waited for even if this work fails (e.g. out of memory)
            if link.rows_mm is not None and (link.need_x_grad or link.need_w_grad):
                if link.mm_dtype != z.dtype:
                    exps_mm = z.to(link.mm_dtype)
                if link.need_x_grad:
                    exps_b = _exps_times_rows(z, exps_mm, link.rows_mm)  # [N, D]
        finally:
            link.rows_mm = None
            every = pending.wait()
        per_rank = every[:, : 4 * n].view(-1, 4, n)
        hardest = per_rank[:, 0].amax(dim=0)  # [N]
        row_max = per_rank[:, 1].amax(dim=0)  # [N]: finite (every row has its target)
        total = (per_rank[:, 2] * torch.exp(per_rank[:, 1] - row_max)).sum(dim=0)  # [N]
        target = per_rank[:, 3].sum(dim=0)  # [N]
        loss = (total.log() + row_max - target).mean()
        # Backward: softmax_ij = exp(z_ij - shift_i) * exp(shift_i - M_i) / Z_i on this rank.
        row_coef = torch.where(
            has_exp, torch.exp(shift - row_max) / total, torch.zeros_like(total)
        )  # [N]
        p_t = torch.exp(f_d - row_max[rows]) / total[rows]  # [R] softmax of the targets
        ctx.save_for_backward(z, row_coef, p_t, exps_mm, exps_b)
        ctx.n = n
        ctx.f_dtype = f.dtype
        ctx.link = link
        extra_out = every[:, 4 * n :].sum(dim=0)
        ctx.mark_non_differentiable(hardest, extra_out)
        return loss, hardest, extra_out

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_unused: Any) -> tuple[Any, ...]:
        exps, row_coef, p_t, exps_mm, exps_b = ctx.saved_tensors
        scale = grad_loss.to(exps.dtype) / ctx.n
        if ctx.needs_input_grad[0]:
            # dL/dz_ij = softmax_ij * scale = coef_i * E_ij (targets handled through f).
            link = ctx.link
            link.coef = row_coef * scale  # [N]
            link.exps, link.exps_mm, link.exps_b = exps, exps_mm, exps_b
        grad_f = (p_t - 1.0) * scale  # [R]
        return None, grad_f.to(ctx.f_dtype), None, None, None, None, None


def fused_softmax_ce(
    z: torch.Tensor,
    f: torch.Tensor,
    rows: torch.Tensor,
    group: ProcessGroup | None,
    link: FusedLink,
    extra: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, hardest non-target logit per row [N], extra summed over ranks)``.

    ``z``, ``col_scale`` and ``link`` come from ``fused_cosine``; the non-target logits are
    ``z * col_scale``. ``extra`` (optional, 1-D, no gradient) is summed over ranks in the
    same collective as the softmax statistics, so per-step statistics cost no collective of
    their own. See ``_FusedSoftmaxCE``.
    """
    return _FusedSoftmaxCE.apply(z, f, rows, group, extra, col_scale, link)
