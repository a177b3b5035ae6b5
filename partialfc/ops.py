"""The plain building blocks of a Partial FC step, on public torch APIs.

- ``gather_rows``: the sampled rows of the shard with a row-sparse gradient (only the rows
  that took part get a gradient, so the optimizer updates exactly those: the "sampled"
  update semantics), or a dense one.
- ``normalized_cosine``: the cosines of normalised embeddings with the shard's rows,
  normalised on the fly (the row norms scale the product's columns: no normalised copy of
  the rows is made).
- ``distributed_cross_entropy``: softmax cross-entropy whose classes are sharded over ranks
  (all-reduce of the row maxima, then of the sums).

The fast CPU backend (``partialfc.fast``) computes the same numbers with fused kernels.
"""

from __future__ import annotations

from typing import Any

import torch

from partialfc.collectives import ProcessGroup, all_reduce_inplace

__all__ = ["NORM_EPS", "distributed_cross_entropy", "gather_rows", "normalized_cosine"]

NORM_EPS = 1e-12
"""Smallest norm used to normalise a row (as ``F.normalize``): a zero row gives zero cosines."""


class _GatherRows(torch.autograd.Function):
    """``source[index]`` whose gradient is row-sparse (COO) or dense; see ``gather_rows``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, source: torch.Tensor, index: torch.Tensor, sparse: bool, unique: bool
    ) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.shape = source.shape
        ctx.sparse = sparse
        ctx.unique = unique
        return source.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (index,) = ctx.saved_tensors
        grad = grad.contiguous()
        if ctx.sparse:
            out = torch.sparse_coo_tensor(
                index[None],
                grad,
                ctx.shape,
                is_coalesced=True if ctx.unique else None,
                check_invariants=False,
            )
            if not ctx.unique:
                out = out.coalesce()
        else:
            out = grad.new_zeros(ctx.shape).index_add_(0, index, grad)
        return out, None, None, None


def gather_rows(
    source: torch.Tensor, index: torch.Tensor, sparse: bool, unique: bool = False
) -> torch.Tensor:
    """``source[index]`` [K, ...] with a row-sparse (``sparse=True``) or dense gradient.

    A row-sparse gradient is a COO tensor holding only the gathered rows: the optimizer can
    then update exactly those rows (see ``partialfc.optim``) and no ``[C_r, D]`` zero tensor
    is ever built. ``unique=True`` promises sorted, duplicate-free indices (skips coalescing).
    """
    return _GatherRows.apply(source, index, sparse, unique)


class _NormalizedCosine(torch.autograd.Function):
    """``cos = x @ w.T / |w|`` and its targets; see ``normalized_cosine`` for the maths.

    Written by hand (not ``x @ F.normalize(w).T`` under autograd) for memory: ``F.normalize``
    makes a normalised copy of the rows [S, D] and its backward two more [S, D] temporaries,
    where this function keeps the rows as they are and needs one [N, S] temporary; at
    sample_rate 1 the rows are the whole shard, as large as the weights themselves.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_hat: torch.Tensor,
        w: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        mm_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out_dtype = x_hat.dtype
        norms = torch.linalg.vector_norm(w, dim=1, dtype=out_dtype)  # [S]
        inv = norms.clamp_min(NORM_EPS).reciprocal_()  # [S]
        w_mm = w.to(mm_dtype)  # w itself unless the product runs in another dtype
        x_mm = x_hat.to(mm_dtype)
        cos = (x_mm @ w_mm.T).to(out_dtype).mul_(inv)  # [N, S]
        # The targets' cosines exactly in the output dtype, whatever the product's.
        target_cos = (x_hat[rows] * w[cols].to(out_dtype)).sum(dim=1) * inv[cols]  # [R]
        # Rows stored narrower than the product (bf16 / fp16 centres computed in float32)
        # are kept as they are and widened again block by block in backward: the widened
        # copy [S, D] lives only through this forward.
        ctx.widen = w.dtype != mm_dtype and w.element_size() < w_mm.element_size()
        kept = w if ctx.widen else w_mm
        # d|w|/dw is zero where the norm was clamped (as for F.normalize's clamp_min).
        ctx.save_for_backward(x_mm, kept, inv, norms >= NORM_EPS, cos, rows, cols)
        return cos, target_cos

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, grad_cos: torch.Tensor, grad_target: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        x_mm, w_mm, inv, unclamped, cos, rows, cols = ctx.saved_tensors
        # The target cosines are entries of cos computed exactly: their gradient joins it.
        g = grad_cos * inv  # [N, S], G / |w| column by column (new tensor)
        g.index_put_((rows, cols), grad_target * inv[cols], accumulate=True)
        need_x, need_w = ctx.needs_input_grad[:2]
        # d cos_ij / d w_j = x_i / |w_j| - cos_ij w_j / |w_j|^2
        radial = (g * cos).sum(dim=0).mul_(inv).mul_(unclamped) if need_w else None  # [S]
        if ctx.widen:
            grad_x, grad_w = _narrow_rows_backward(g, x_mm, w_mm, radial, need_x, need_w)
            grad_x = None if grad_x is None else grad_x.to(cos.dtype)
            return grad_x, grad_w, None, None, None
        grad_x = grad_w = None
        if need_x:
            grad_x = (g.to(x_mm.dtype) @ w_mm).to(cos.dtype)  # [N, D]
        if need_w:
            grad_w = (g.to(x_mm.dtype).T @ x_mm).to(cos.dtype)  # [S, D]
            grad_w.addcmul_(w_mm.to(cos.dtype), radial[:, None], value=-1.0)
        return grad_x, grad_w, None, None, None


WIDEN_BLOCK_ELEMENTS = 1 << 22
"""Elements of narrow rows widened at a time in ``normalized_cosine``'s backward (16 MB of
float32): a few blocks' temporaries instead of two float32 copies of the rows [S, D]."""


def _narrow_rows_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    radial: torch.Tensor | None,
    need_x: bool,
    need_w: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``normalized_cosine``'s gradients for rows ``w`` [S, D] stored narrower than the
    product's dtype (``x``'s), block of rows by block: each block is widened, used, and its
    gradient written into a ``w``-dtype tensor, which is what autograd would have rounded the
    float32 gradient to. The same formulas as the wide path; grad_x sums its blocks'
    products in order (rounding differs from one product by float32 round-off)."""
    grad_x = torch.zeros_like(x) if need_x else None  # [N, D]
    grad_w = torch.empty_like(w) if need_w else None  # [S, D], w's dtype
    g = g.to(x.dtype)
    step = max(1, WIDEN_BLOCK_ELEMENTS // max(1, w.shape[1]))
    for lo in range(0, w.shape[0], step):
        hi = min(w.shape[0], lo + step)
        w_block = w[lo:hi].to(x.dtype)  # [s, D]
        g_block = g[:, lo:hi]  # [N, s]
        if grad_x is not None:
            grad_x.addmm_(g_block, w_block)
        if grad_w is not None:
            block = g_block.T @ x  # [s, D]
            block.addcmul_(w_block, radial[lo:hi, None], value=-1.0)
            grad_w[lo:hi] = block
    return grad_x, grad_w


def normalized_cosine(
    x_hat: torch.Tensor,
    w: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    mm_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines of unit rows ``x_hat`` [N, D] with the rows of ``w`` [S, D], normalised here.

    Returns ``cos`` [N, S] with ``cos_ij = x_i . w_j / max(|w_j|, NORM_EPS)`` (the product in
    ``mm_dtype``, default ``x_hat``'s dtype; the result in ``x_hat``'s dtype) and the targets'
    cosines ``cos[rows, cols]`` [R], computed exactly in ``x_hat``'s dtype whatever the
    product's. Both are differentiable in ``x_hat`` and ``w``:
    ``d cos_ij / d w_j = x_i / |w_j| - cos_ij w_j / |w_j|^2``.
    """
    return _NormalizedCosine.apply(x_hat, w, rows, cols, mm_dtype or x_hat.dtype)


class _DistSoftmaxCE(torch.autograd.Function):
    """Softmax cross-entropy whose class dimension is split over ranks.

    Forward, per row i of the global batch (every rank holds all N rows, a slice of columns):
        m_i = max over all ranks' columns (all-reduce MAX, detached: it only stabilises exp)
        Z_i = sum over all ranks of sum_j exp(z_ij - m_i)                  (all-reduce SUM)
        t_i = z_iy - m_i on the one rank holding y, 0 elsewhere            (all-reduce SUM)
        loss = mean_i (log Z_i - t_i)
    Backward on the local columns: (softmax - onehot) / N * grad_loss.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None
    ) -> torch.Tensor:
        n = logits.shape[0]
        with torch.no_grad():
            row_max = logits.max(dim=1).values  # [N]
            all_reduce_inplace(row_max, "max", group)
            probs = (logits - row_max[:, None]).exp_()  # [N, S], exp(z - m)
            rows = torch.nonzero(target >= 0).squeeze(1)  # [R]
            cols = target[rows]  # [R]
            sums = logits.new_zeros(2, n)
            sums[0] = probs.sum(dim=1)
            sums[1, rows] = logits[rows, cols] - row_max[rows]
            all_reduce_inplace(sums, "sum", group)
            loss = (sums[0].log() - sums[1]).mean()
            probs.div_(sums[0][:, None])  # [N, S] softmax over the global columns
        ctx.save_for_backward(probs, rows, cols)
        ctx.n = n
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        probs, rows, cols = ctx.saved_tensors
        scale = grad_loss / ctx.n
        grad = probs * scale  # [N, S], new tensor: `probs` stays valid for retain_graph
        grad[rows, cols] -= scale
        return grad, None, None


def distributed_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Mean softmax cross-entropy over N rows whose columns are sharded over ``group``.

    ``logits`` [N, S_r] are this rank's columns, ``target`` [N] the column of each row's class
    on this rank or -1 when it lives elsewhere (exactly one rank must hold it). Every rank
    returns the same 0-dim loss. With no process group it equals ``F.cross_entropy``.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be [N, S] and target [N]; got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    return _DistSoftmaxCE.apply(logits, target, group)
