"""The compute kernels of Partial FC: cosine matrix, distributed softmax CE, row gathers.

Two paths compute the loss of a step:

- **fused** (heads whose non-target logits are ``s * cos``: ArcFace, CosFace, NormFace,
  combined margins, AdaFace, MagFace, DiscFace): ``_FusedCosine`` computes the product
  ``u = s * x_hat . W_j`` of the sampled columns (local target entries masked to -inf), the
  column scale ``1 / |W_j|`` and the exact target cosines ``[R]``; the head turns those into
  target logits ``[R]`` (plain autograd); ``_FusedSoftmaxCE`` applies the column scale and
  finishes the distributed softmax cross-entropy with one all-gather of per-row statistics.
  No ``[N, S]`` tensor ever enters autograd, and with a ``Workspace`` the whole step touches
  one ``[N, S]`` buffer (product -> exp -> gradient, in place), one ``[S, D]`` buffer of
  gathered rows and one ``[S, D]`` gradient buffer, all reused across steps. Beyond the three
  matrix products a step sweeps ``[N, S]`` twice and ``[S, D]`` a few times; on CPU each
  sweep is one fused kernel (``partialfc.cpu_kernels``), elsewhere a few torch ops (see
  BENCHMARKS.md).
- **generic** (every other head): ``gather_rows`` + plain autograd for the cosine, the head's
  ``logits(ctx)`` and ``_DistSoftmaxCE``.

Numerics: the class centres enter the product unnormalised and the column scale
``1 / |W_j|`` is applied to the ``[N, S]`` result (cheaper than normalising ``[S, D]`` rows
when N < D); under float16 the rows are normalised first, because raw rows with small norms
would lose precision in float16's narrow range. The softmax is always in float32 or wider.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from partialfc import cpu_kernels
from partialfc.collectives import ProcessGroup, all_gather_stack, all_reduce_inplace

__all__ = [
    "NORM_EPS",
    "Workspace",
    "distributed_cross_entropy",
    "fused_cosine",
    "fused_softmax_ce",
    "gather_rows",
]

NORM_EPS = 1e-12
"""Smallest norm used to normalise a row (as ``F.normalize``): a zero row gives zero cosines."""


def _storage_users(tensor: torch.Tensor) -> int:
    """Number of tensors (and other owners) sharing ``tensor``'s storage; a large number
    when this torch build cannot tell (then a buffer is never assumed free)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return 1 << 30
    return int(count(tensor.untyped_storage()._cdata))


_FREE_STORAGE_USERS = _storage_users(torch.empty(1))
"""The count ``_storage_users`` reports for a storage referenced by one tensor only."""


class Workspace:
    """Scratch buffers kept across steps, so the big per-step tensors are not re-allocated.

    On CPU every large allocation is a fresh ``mmap`` whose pages fault in one by one (about
    1 ms per MB on the development machine); on GPU the caching allocator hides that, but the
    workspace still keeps peak memory to one ``[N, S]`` buffer and two ``[S, D]`` buffers
    (gathered rows, the rows' gradient). Safety: the buffers are views of one base, so a
    tensor saved for backward that is overwritten by the next step's forward makes autograd
    raise ("modified by an inplace operation") instead of silently using wrong values; run
    each forward's backward before the next forward. The gradient buffer (``get_unshared``)
    is reused only when no tensor outside the workspace still references it.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.row_cache: tuple[Any, ...] | None = None

    def get(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A ``shape`` view of buffer ``name``, grown (re-allocated) when too small."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    def get_unshared(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """Like ``get``, for a result that outlives the step (a gradient): when any tensor
        outside the workspace still references the buffer (``weight.grad`` not yet cleared,
        gradient accumulation, a kept reference), that holder keeps it and a new buffer is
        made; otherwise the old one is reused and overwritten."""
        buf = self._buffers.get(name)
        if buf is not None and _storage_users(buf) > _FREE_STORAGE_USERS:
            del self._buffers[name]
        return self.get(name, shape, dtype, device)

    def nbytes(self) -> int:
        """Bytes held by the workspace."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (they are re-created on the next step)."""
        self._buffers.clear()
        self.row_cache = None


# ------------------------------------------------------------------------------ row gathers


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


def _project_out_radial(grad: torch.Tensor, w: torch.Tensor, coef: torch.Tensor) -> None:
    """In place: ``grad_j -= coef_j * (grad_j . w_j) * w_j`` for every row j of [S, D].

    One sweep with the fused CPU kernel; else chunked torch ops (a whole-matrix
    ``(grad * w).sum(1)`` would allocate an [S, D] temporary).
    """
    kern = cpu_kernels.usable(grad, w, coef)
    if kern is not None:
        kern.project_radial_(grad, w, coef)
        return
    for lo in range(0, grad.shape[0], PROJECT_CHUNK_ROWS):
        g = grad[lo : lo + PROJECT_CHUNK_ROWS]
        wc = w[lo : lo + PROJECT_CHUNK_ROWS]
        dots = (g * wc).sum(dim=1)  # [chunk]
        g.addcmul_(wc, (-dots * coef[lo : lo + PROJECT_CHUNK_ROWS])[:, None])


class _FusedCosine(torch.autograd.Function):
    """``u = scale * x_hat . W_j`` [N, S] with local targets masked to -inf, the column scale
    ``1 / |W_j|`` [S] that turns it into ``scale * cos``, and the target cosines [R].

    Inputs: ``x_hat`` [N, D] normalised gathered embeddings, ``weight`` [C_r, D] the shard,
    ``index`` [S] sorted sampled rows (None: all rows). Its only consumer is
    ``_FusedSoftmaxCE``, which applies the column scale inside its own sweep over ``u`` and
    hands back ``dL/du`` (the column scale applied again) in a buffer this backward reuses in
    place; the dependence of the scale on ``W`` is this backward's radial projection. Under
    float16 the rows are normalised before the product and the column scale is None.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x_hat: torch.Tensor,
        weight: torch.Tensor,
        index: torch.Tensor | None,
        rows: torch.Tensor,
        cols: torch.Tensor,
        scale: float,
        mm_dtype: torch.dtype,
        sparse_grad: bool,
        workspace: Workspace | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out_dtype = x_hat.dtype
        n, d = x_hat.shape
        w = weight.detach()
        inv = None
        if index is None:
            w_rows = w  # [C_r, D]
        else:
            if workspace is not None:
                w_rows = workspace.get("rows", (index.numel(), d), w.dtype, w.device)
                inv = _gather_rows_inv_norm(w, index, w_rows, out_dtype)  # [S, D], [S]
                workspace.row_cache = (weight, index, w_rows, weight._version, w_rows._version)
            else:
                w_rows = w.index_select(0, index)  # [S, D]
        s_cols = w_rows.shape[0]
        w_f = w_rows if w_rows.dtype == out_dtype else w_rows.to(out_dtype)
        if inv is None:
            inv = torch.linalg.vector_norm(w_f, dim=1).clamp_min_(NORM_EPS).reciprocal_()  # [S]
        low = mm_dtype != out_dtype
        prenorm = mm_dtype == torch.float16
        x_s = x_hat * scale  # [N, D]
        if workspace is not None:
            # detach(): a non-differentiable alias (autograd forbids modifying views returned
            # by a custom Function in place) that still shares the buffer's version counter.
            z = workspace.get("logits", (n, s_cols), out_dtype, x_hat.device).detach()
        else:
            z = torch.empty((n, s_cols), dtype=out_dtype, device=x_hat.device)
        b_low = None
        if low:
            b_low = (w_f * inv[:, None]).to(mm_dtype) if prenorm else w_f.to(mm_dtype)
            z.copy_(torch.mm(x_s.to(mm_dtype), b_low.T))  # [N, S] from low precision
        else:
            torch.mm(x_s, w_f.T, out=z)  # [N, S]; times col_scale = scale * cos
        # Exact target cosines in the output precision (O(R * D)), whatever the matmul dtype.
        c_t = (x_hat[rows] * w_f[cols]).sum(dim=1) * inv[cols]  # [R]
        z.index_put_((rows, cols), torch.tensor(-math.inf, dtype=out_dtype, device=z.device))
        ctx.save_for_backward(x_s, w_f, inv, rows, cols, b_low, index)
        ctx.scale = float(scale)
        ctx.low = low
        ctx.prenorm = prenorm
        ctx.mm_dtype = mm_dtype
        ctx.sparse_grad = sparse_grad
        ctx.weight_shape = weight.shape
        ctx.weight_dtype = weight.dtype
        ctx.workspace = workspace
        col_scale = None if prenorm else inv
        if col_scale is not None:
            ctx.mark_non_differentiable(col_scale)
        return z, c_t, col_scale

    @staticmethod
    def backward(
        ctx: Any, gz: torch.Tensor | None, gct: torch.Tensor | None, _g_scale: Any
    ) -> tuple[Any, ...]:
        x_s, w_f, inv, rows, cols, b_low, index = ctx.saved_tensors
        n, s_cols = x_s.shape[0], w_f.shape[0]
        scale = ctx.scale
        # v[i, j] = dL/du_ij = dL/dz_ij * (1/|W_j|), from _FusedSoftmaxCE (its fresh buffer).
        v = gz if gz is not None else x_s.new_zeros(n, s_cols)  # [N, S]
        if not v.is_contiguous():
            v = v.contiguous()
        t_grad = gct if gct is not None else x_s.new_zeros(rows.numel())
        t_val = t_grad.to(v.dtype) / scale
        if not ctx.prenorm:
            t_val = t_val * inv[cols]
        v.index_put_((rows, cols), t_val)  # the target entries' only path is c_t
        grad_x = grad_w = None
        if ctx.low:
            vl = v.to(ctx.mm_dtype)
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(vl, b_low).to(x_s.dtype).mul_(scale)  # [N, D]
            if ctx.needs_input_grad[1]:
                bm = torch.mm(vl.T, x_s.to(ctx.mm_dtype)).to(x_s.dtype)  # [S, D]
        else:
            if ctx.needs_input_grad[0]:
                grad_x = torch.mm(v, w_f).mul_(scale)  # [N, D]
            if ctx.needs_input_grad[1]:
                if ctx.workspace is not None:
                    # Fresh [S, D] memory would cost its page faults every step (on CPU as
                    # much as a third of the product itself at S = 50k).
                    bm = ctx.workspace.get_unshared(
                        "grad", (s_cols, x_s.shape[1]), x_s.dtype, x_s.device
                    )
                    torch.mm(v.T, x_s, out=bm)
                else:
                    bm = torch.mm(v.T, x_s)  # [S, D]
        if ctx.needs_input_grad[1]:
            if ctx.prenorm:
                _project_out_radial(bm, w_f * inv[:, None], torch.ones_like(inv))
                bm.mul_(inv[:, None])
            else:
                # dL/dW_j = b_j - (b_j . W_j) W_j / |W_j|^2 : project out the radial part.
                _project_out_radial(bm, w_f, inv * inv)
            grad_w = _weight_grad(bm.to(ctx.weight_dtype), index, ctx.weight_shape, ctx.sparse_grad)
        return grad_x, grad_w, None, None, None, None, None, None, None


def fused_cosine(
    x_hat: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
    scale: float,
    mm_dtype: torch.dtype,
    sparse_grad: bool,
    workspace: Workspace | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(u [N, S] with local targets = -inf, column scale [S] or None, target cos [R])``:
    ``u * column scale = scale * cos``; see ``_FusedCosine`` and the module doc.

    Only ``fused_softmax_ce`` may consume ``u``, with the column scale (its backward
    buffer is reused and it returns ``dL/du``).
    """
    u, c_t, col_scale = _FusedCosine.apply(
        x_hat, weight, index, rows, cols, scale, mm_dtype, sparse_grad, workspace
    )
    return u, col_scale, c_t


def _local_exp_sums(
    z: torch.Tensor, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place ``z = exp(z * col_scale - shift)`` per row (``col_scale`` [S] optional);
    returns (row max [N], shift [N], sum [N]) of the scaled logits.

    The row max is over this rank's columns only (-inf for a row without a finite value);
    the shift is that max where finite, else 0 (such a row is all zeros after exp). One sweep
    per row with the fused CPU kernel, four or five torch passes otherwise.
    """
    n = z.shape[0]
    row_max = z.new_full((n,), -math.inf)
    row_sum = z.new_empty(n)
    kern = cpu_kernels.usable(z, row_max, row_sum, col_scale) if z.shape[1] > 0 else None
    if kern is not None:
        kern.softmax_rows_(z, col_scale, row_max, row_sum)
        return row_max, _finite_or_zero(row_max), row_sum
    if col_scale is not None:
        z.mul_(col_scale)
    if z.shape[1] > 0:
        row_max = z.amax(dim=1)
    shift = _finite_or_zero(row_max)
    z.sub_(shift[:, None]).exp_()  # masked entries (-inf) -> 0
    return row_max, shift, z.sum(dim=1)


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
    would take four message rounds instead of one. ``z`` is overwritten in place by
    ``exp(z - shift)`` and kept for backward; with ``in_place`` the backward turns it into
    the gradient in place too (one backward per forward).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: torch.Tensor,
        f: torch.Tensor,
        rows: torch.Tensor,
        group: ProcessGroup | None,
        in_place: bool,
        extra: torch.Tensor | None,
        col_scale: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = z.shape[0]
        f_d = f.detach().to(z.dtype)  # [R]
        # [N] each; z = exp(z * col_scale - shift)
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
        every = all_gather_stack(payload, group)  # [W, 4N + E]
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
        ctx.save_for_backward(z, row_coef, p_t, col_scale)
        ctx.n = n
        ctx.in_place = in_place
        ctx.used = False
        ctx.f_dtype = f.dtype
        extra_out = every[:, 4 * n :].sum(dim=0)
        ctx.mark_non_differentiable(hardest, extra_out)
        return loss, hardest, extra_out

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_unused: Any) -> tuple[Any, ...]:
        if ctx.in_place:
            if ctx.used:
                raise RuntimeError(
                    "PartialFC(low_memory=True) supports one backward per forward; build it "
                    "with low_memory=False for retain_graph / double backward / gradcheck"
                )
            ctx.used = True
        exps, row_coef, p_t, col_scale = ctx.saved_tensors
        scale = grad_loss.to(exps.dtype) / ctx.n
        coef = row_coef * scale  # [N]
        grad_f = (p_t - 1.0) * scale  # [R]
        # dL/dz_ij = softmax_ij * coef_i (targets handled through f); times the column scale
        # this is dL/d(input), in one sweep where the kernel applies.
        if not ctx.in_place:
            grad_z = exps * coef[:, None]
            if col_scale is not None:
                grad_z.mul_(col_scale)
        elif col_scale is None:
            grad_z = exps.mul_(coef[:, None])
        else:
            grad_z = exps
            kern = cpu_kernels.usable(exps, coef, col_scale)
            if kern is not None:
                kern.scale_rows_cols_(exps, coef, col_scale)
            else:
                exps.mul_(coef[:, None]).mul_(col_scale)
        return grad_z, grad_f.to(ctx.f_dtype), None, None, None, None, None


def fused_softmax_ce(
    z: torch.Tensor,
    f: torch.Tensor,
    rows: torch.Tensor,
    group: ProcessGroup | None,
    in_place: bool,
    extra: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, hardest non-target logit per row [N], extra summed over ranks)``.

    The non-target logits are ``z * col_scale`` (``col_scale`` [S] optional, no gradient:
    the gradient returned for ``z`` then includes it). ``extra`` (optional, 1-D, no
    gradient) is summed over ranks in the same collective as the softmax statistics, so
    per-step statistics cost no collective of their own. See ``_FusedSoftmaxCE``.
    """
    return _FusedSoftmaxCE.apply(z, f, rows, group, in_place, extra, col_scale)


# ---------------------------------------------------------------------------- generic path


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
