"""Row operations of the fast backend: row normalisation with one fused backward, the
sampled rows' gather with their inverse norms, the radial projection of their gradient, and
the shard's gradient from the sampled rows' (the sweeps run as C++ kernels where usable)."""

from __future__ import annotations

from typing import Any

import torch

from partialfc.fast import cpu_kernels
from partialfc.ops import NORM_EPS

__all__ = ["normalize_rows"]


class _NormalizeRows(torch.autograd.Function):
    """``(x / max(|x|, eps), |x|)`` per row, with one fused backward (autograd's generic
    version of the same expression runs a handful of ``[N, D]`` passes). The backward is
    built from the saved outputs with differentiable ops, so double backward works too."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        norms = torch.linalg.vector_norm(x, dim=1)  # [N]
        x_hat = x * norms.clamp_min(NORM_EPS).reciprocal()[:, None]
        ctx.save_for_backward(x_hat, norms)
        return x_hat, norms

    @staticmethod
    def backward(
        ctx: Any, g_hat: torch.Tensor | None, g_norm: torch.Tensor | None
    ) -> torch.Tensor | None:
        x_hat, norms = ctx.saved_tensors
        inv = norms.clamp_min(NORM_EPS).reciprocal()  # [N]
        # dx = g_hat / max(|x|, eps) + c x_hat, with c = -(g_hat . x_hat) / |x| where
        # |x| > eps (below, the clamped norm is a constant: no radial term) plus
        # g_norm / (|x| inv) from d|x| = x / |x| (0 at x = 0).
        c = torch.zeros_like(norms)
        if g_hat is not None:
            c = torch.where(norms > NORM_EPS, -(g_hat * x_hat).sum(dim=1) * inv, c)
        if g_norm is not None:
            c = c + torch.where(norms > 0, g_norm / (norms * inv), torch.zeros_like(c))
        grad = x_hat * c[:, None]
        if g_hat is not None:
            grad = grad + g_hat * inv[:, None]
        return grad


def normalize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / max(|x_i|, NORM_EPS), |x_i|)`` for the rows of ``x`` [N, D]: the normalised
    rows and their norms [N], both differentiable (as ``F.normalize`` and
    ``torch.linalg.vector_norm``)."""
    return _NormalizeRows.apply(x)


def _weight_grad(
    grad_rows: torch.Tensor, index: torch.Tensor | None, shape: torch.Size, sparse: bool
) -> torch.Tensor:
    """Gradient of the whole shard from the gradient of its sampled rows [S, D]."""
    if index is None:
        return grad_rows
    if sparse:
        return torch.sparse_coo_tensor(
            index[None], grad_rows, shape, is_coalesced=True, check_invariants=False
        )
    return grad_rows.new_zeros(shape).index_copy_(0, index, grad_rows)


# ------------------------------------------------------------------------------ fused path


PROJECT_CHUNK_ROWS = 1024
"""Rows per chunk of the radial projection: keeps its temporaries small and cache-resident."""


def _gather_rows_inv_norm(
    weight: torch.Tensor, index: torch.Tensor, out: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor | None:
    """``out[:] = weight[index]``; returns ``1 / max(|row|, NORM_EPS)`` [S] when the fused CPU
    kernel did the gather (one sweep), else None (the caller takes the norms itself)."""
    plain = out.dtype != out_dtype or index.dtype != torch.long or not index.is_contiguous()
    kern = None if plain else cpu_kernels.usable(weight, out)
    if kern is None:
        torch.index_select(weight, 0, index, out=out)
        return None
    inv = out.new_empty(index.numel())
    kern.gather_rows_inv_norm(weight, index, out, inv, NORM_EPS)
    return inv


def _project_out_radial(
    grad: torch.Tensor, w: torch.Tensor, coef: torch.Tensor, index: torch.Tensor | None = None
) -> None:
    """In place: ``grad_j -= coef_j * (grad_j . w_j) * w_j`` for every row j of [S, D], with
    ``w_j`` row j of ``w`` [S, D], or row ``index[j]`` of ``w`` [C, D] when ``index`` is given.

    One sweep with the fused CPU kernel; else chunked torch ops (a whole-matrix
    ``(grad * w).sum(1)`` would allocate an [S, D] temporary).
    """
    plain_index = index is None or (index.dtype == torch.long and index.is_contiguous())
    kern = cpu_kernels.usable(grad, w, coef) if plain_index else None
    if kern is not None:
        if index is None:
            kern.project_radial_(grad, w, coef)
        else:
            kern.project_radial_rows_(grad, w, index, coef)
        return
    for lo in range(0, grad.shape[0], PROJECT_CHUNK_ROWS):
        hi = lo + PROJECT_CHUNK_ROWS
        g = grad[lo:hi]
        wc = w[lo:hi] if index is None else w.index_select(0, index[lo:hi])
        dots = (g * wc).sum(dim=1)  # [chunk]
        g.addcmul_(wc, (-dots * coef[lo:hi])[:, None])
