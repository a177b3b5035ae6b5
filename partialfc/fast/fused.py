"""The fast CPU backend's step: fused cosine matrix (here) and distributed softmax CE
(``partialfc.fast.softmax``).

It computes what the plain core (``partialfc.partial_fc``) computes, faster on a CPU:

- **fused** (heads whose non-target logits are ``s * cos``: ArcFace, CosFace, NormFace,
  combined margins, AdaFace, MagFace, DiscFace): ``_FusedCosine`` computes the product
  ``u = s * x_hat . W_j`` of the sampled columns (local target entries masked to -inf), the
  column scale ``1 / |W_j|`` and the exact target cosines ``[R]``; the head turns those into
  target logits ``[R]`` (plain autograd); ``_FusedSoftmaxCE`` applies the column scale and
  finishes the distributed softmax cross-entropy with one all-gather of per-row statistics.
  No ``[N, S]`` tensor ever enters autograd and none is built for the gradient: the
  softmax's gradient is ``coef_i * E_ij`` with ``E`` the exponentials it left in place, and
  ``coef`` [N] is folded into the ``[N, D]`` operands of the two backward products (see
  ``FusedLink``). With a ``Workspace`` the whole step touches one ``[N, S]`` buffer (product
  -> exp, in place) and, when sampling, one ``[S, D]`` buffer of gathered rows that the
  backward overwrites with their gradient (see ``Workspace``), reused across steps; without
  sampling and with ``N <= 3D/4`` the ``[N, S]`` buffer is the tail of the shard's gradient
  buffer (logits stored transposed), so a step needs no memory beyond the state. Beyond
  the three matrix products a step sweeps ``[N, S]``
  once and ``[S, D]`` a few times; on CPU each sweep is one fused kernel
  (``partialfc.fast.cpu_kernels``), elsewhere a few torch ops (see BENCHMARKS.md). The product
  ``E @ B`` of the embeddings' gradient runs while the softmax's collective is in flight.
- every other head takes the plain core's path.

Numerics: the class centres enter the product unnormalised and the column scale
``1 / |W_j|`` is applied to the ``[N, S]`` result (cheaper than normalising ``[S, D]`` rows
when N < D); under float16 the rows are normalised first, because raw rows with small norms
would lose precision in float16's narrow range. The softmax is always in float32 or wider.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from partialfc.fast.buffers import DeferredGrad, Workspace
from partialfc.fast.rows import _gather_rows_inv_norm, _project_out_radial, _weight_grad
from partialfc.ops import NORM_EPS

__all__ = ["FusedLink", "fused_cosine"]


class FusedLink:
    """What the two halves of the fused loss (``_FusedCosine``, then the head, then
    ``_FusedSoftmaxCE``) hand each other besides autograd's tensors.

    The gradient of the product ``u`` is never materialised as an ``[N, S]`` tensor: it is
    ``dL/du_ij = coef_i * E_ij`` off the targets, with ``E = exp(u * col_scale - shift) *
    col_scale`` the buffer the softmax leaves in place, so ``_FusedSoftmaxCE``'s backward
    passes ``coef`` [N] (and ``E``) here instead of a gradient for ``u``, and
    ``_FusedCosine``'s backward folds ``coef`` into the ``[N, D]`` operands. The cosine half
    also lends its ``[S, D]`` operand, so that the softmax half computes ``E @ B`` (the bulk of
    the embeddings' gradient) while its collective is in flight: a forward with grad enabled
    pays for that product even if no backward follows (evaluate under ``torch.no_grad()``).
    Like ``DeferredGrad`` it passes tensors outside autograd's edges (one CUDA stream).
    """

    def __init__(self) -> None:
        self.rows_mm: torch.Tensor | None = None  # [S, D] B of u = x_s . B_j, in mm dtype
        self.mm_dtype: torch.dtype | None = None
        self.grad_enabled = torch.is_grad_enabled()  # made outside autograd's forward
        self.need_x_grad = False
        self.need_w_grad = False
        self.exps: torch.Tensor | None = None  # [N, S] E, from the softmax's backward
        self.exps_mm: torch.Tensor | None = None  # E in mm dtype (low precision only)
        self.exps_b: torch.Tensor | None = None  # [N, D] E @ B
        self.coef: torch.Tensor | None = None  # [N]

    def take_backward(self) -> tuple[torch.Tensor | None, ...]:
        """(coef, E, E in mm dtype, E @ B), released here (one read per backward)."""
        out = (self.coef, self.exps, self.exps_mm, self.exps_b)
        self.coef = self.exps = self.exps_mm = self.exps_b = None
        return out


class _FusedCosine(torch.autograd.Function):
    """``u = scale * x_hat . W_j`` [N, S] with local targets masked to -inf, the column scale
    ``1 / |W_j|`` [S] that turns it into ``scale * cos``, and the target cosines [R].

    Inputs: ``x_hat`` [N, D] normalised gathered embeddings, ``weight`` [C_r, D] the shard,
    ``index`` [S] sorted sampled rows (None: all rows). Its only consumer is
    ``_FusedSoftmaxCE``, which applies the column scale inside its own sweep over ``u`` and
    gives ``u``'s gradient back through the ``FusedLink`` (factored, see there); the
    dependence of the column scale on ``W`` is this backward's radial projection. Under
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
        link: FusedLink,
        handle: torch.Tensor | None,
        deferred: DeferredGrad | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        ctx.set_materialize_grads(False)
        out_dtype = x_hat.dtype
        n, d = x_hat.shape
        w = weight.detach()
        inv = None
        if index is None:
            w_rows = w  # [C_r, D]
        else:
            if workspace is not None:
                # The backward may turn this buffer into the rows' gradient: reused only when
                # the previous step's gradient no longer holds it.
                workspace.row_cache = None
                w_rows = workspace.get_unshared("rows", (index.numel(), d), w.dtype, w.device)
                inv = _gather_rows_inv_norm(w, index, w_rows, out_dtype)  # [S, D], [S]
            else:
                w_rows = w.index_select(0, index)  # [S, D]
        s_cols = w_rows.shape[0]
        w_f = w_rows if w_rows.dtype == out_dtype else w_rows.to(out_dtype)
        if inv is None:
            inv = torch.linalg.vector_norm(w_f, dim=1).clamp_min_(NORM_EPS).reciprocal_()  # [S]
        low = mm_dtype != out_dtype
        prenorm = mm_dtype == torch.float16
        x_s = x_hat * scale  # [N, D]
        link.need_w_grad = link.grad_enabled and _needs_weight_grad(ctx)
        ctx.grad_buffer = None
        if workspace is not None and _logits_fit_in_grad(index, low, link.need_w_grad, n, d):
            # Without sampling the logits live, transposed, in the tail of the shard's gradient
            # buffer [C_r, D] (N <= 3D/4: they fit), which the backward fills block by block
            # behind the exponentials it has read (_exps_t_times_into): peak memory is the
            # state alone instead of the state plus an [N, C_r] buffer. A gradient that still
            # holds the buffer (accumulation) keeps it: this step's gradient, which must exist
            # beside it anyway, gets a fresh one, so the logits cost nothing there either;
            # clear .grad before the forward (not between forward and backward) to reuse it.
            workspace.drop("logits")
            ctx.grad_buffer = workspace.get_unshared("grad", (s_cols, d), out_dtype, w.device)
            # (detach(): a view of the buffer would keep a reference to it, and autograd
            # would then copy the gradient instead of taking the buffer as .grad.)
            z_t = ctx.grad_buffer.detach().view(-1)[s_cols * (d - n) :].view(s_cols, n)
            torch.mm(w_f, x_s.T, out=z_t)  # [S, N]; times col_scale = scale * cos
            z = z_t.T.detach()  # [N, S] (detach(): see below)
        elif workspace is not None:
            # detach(): a non-differentiable alias (autograd forbids modifying views returned
            # by a custom Function in place) that still shares the buffer's version counter.
            z = workspace.get("logits", (n, s_cols), out_dtype, x_hat.device).detach()
        else:
            z = torch.empty((n, s_cols), dtype=out_dtype, device=x_hat.device)
        b_low = None
        if low:
            b_low = (w_f * inv[:, None]).to(mm_dtype) if prenorm else w_f.to(mm_dtype)
            z.copy_(torch.mm(x_s.to(mm_dtype), b_low.T))  # [N, S] from low precision
        elif ctx.grad_buffer is None:
            torch.mm(x_s, w_f.T, out=z)  # [N, S]; times col_scale = scale * cos
        # Exact target cosines in the output precision (O(R * D)), whatever the matmul dtype.
        c_t = (x_hat[rows] * w_f[cols]).sum(dim=1) * inv[cols]  # [R]
        z.index_put_((rows, cols), torch.tensor(-math.inf, dtype=out_dtype, device=z.device))
        # The backward reuses the gathered rows' buffer for their gradient (one [S, D] buffer
        # fewer); the projection then reads the rows from the shard itself (saved, so that
        # autograd checks it is unchanged).
        ctx.rows_buffer = workspace is not None and index is not None and w_f is w_rows and not low
        if workspace is not None and index is not None and not ctx.rows_buffer:
            # The optimizer may reuse the gathered rows (``PartialFC._cached_rows``).
            workspace.row_cache = (weight, index, w_rows, weight._version, w_rows._version)
        ctx.save_for_backward(x_s, w_f, inv, rows, cols, b_low, index, weight)
        ctx.scale = float(scale)
        ctx.low = low
        ctx.prenorm = prenorm
        ctx.mm_dtype = mm_dtype
        ctx.sparse_grad = sparse_grad
        ctx.weight_shape = weight.shape
        ctx.weight_dtype = weight.dtype
        ctx.workspace = workspace
        ctx.link = link
        ctx.deferred = deferred
        link.rows_mm = b_low if low else w_f
        link.mm_dtype = mm_dtype
        # (needs_input_grad is also set under no_grad: the wrapper records the grad mode.)
        link.need_x_grad = link.grad_enabled and bool(ctx.needs_input_grad[0])
        col_scale = None if prenorm else inv
        if col_scale is not None:
            ctx.mark_non_differentiable(col_scale)
        return z, c_t, col_scale

    @staticmethod
    def backward(
        ctx: Any, gz: torch.Tensor | None, gct: torch.Tensor | None, _g_scale: Any
    ) -> tuple[Any, ...]:
        if gz is not None:
            raise RuntimeError(
                "the fused cosine product may only feed fused_softmax_ce (its gradient "
                "comes back through the FusedLink)"
            )
        x_s, w_f, inv, rows, cols, b_low, index, weight = ctx.saved_tensors
        coef, exps, exps_mm, exps_b = ctx.link.take_backward()
        n, d, s_cols = x_s.shape[0], x_s.shape[1], w_f.shape[0]
        scale = ctx.scale
        # dL/du at the targets: the target entries' only path is c_t.
        t_val = x_s.new_zeros(rows.numel()) if gct is None else gct.to(x_s.dtype) / scale
        b_t = w_f[cols]  # [R, D]: the targets' rows of B (u = x_s . B_j)
        if ctx.prenorm:
            b_t = b_t * inv[cols, None]
        else:
            t_val = t_val * inv[cols]
        # Off the targets dL/du_ij = coef_i * E_ij (E is 0 at the masked targets), so
        # dL/dx_s = coef * (E @ B) + targets and dL/dB = E^T (coef * x_s) + targets.
        grad_x = None
        if ctx.needs_input_grad[0]:
            if coef is None:
                grad_x = x_s.new_zeros(n, d)
            else:
                if exps_b is None:
                    exps_b = _exps_times_rows(exps, exps_mm, b_low if ctx.low else w_f)
                grad_x = exps_b * coef[:, None]
            grad_x.index_add_(0, rows, b_t * t_val[:, None]).mul_(scale)  # [N, D]
        if not _needs_weight_grad(ctx):
            return grad_x, None, None, None, None, None, None, None, None, None, None, None

        def weight_grad() -> torch.Tensor:
            if ctx.low and coef is not None:
                bm = torch.mm(exps_mm.T, (x_s * coef[:, None]).to(ctx.mm_dtype)).to(x_s.dtype)
            else:
                exps_in_bm = ctx.grad_buffer is not None
                if exps_in_bm:
                    # Its tail holds E transposed. Not kept on ctx: autograd hands a gradient
                    # nobody else references to .grad as is, and copies it otherwise.
                    bm, ctx.grad_buffer = ctx.grad_buffer, None
                elif ctx.rows_buffer:
                    bm = w_f  # the gathered rows are not read after this point
                elif ctx.workspace is not None:
                    # Fresh [S, D] memory would cost its page faults every step (on CPU as
                    # much as a third of the product itself at S = 50k).
                    bm = ctx.workspace.get_unshared("grad", (s_cols, d), x_s.dtype, x_s.device)
                else:
                    bm = x_s.new_empty(s_cols, d)
                if coef is None:
                    bm.zero_()
                elif exps_in_bm:
                    _exps_t_times_into(bm, exps.T, x_s * coef[:, None])  # [S, D]
                else:
                    torch.mm(exps.T, x_s * coef[:, None], out=bm)  # [S, D]
            bm.index_add_(0, cols, x_s[rows] * t_val[:, None])
            if ctx.prenorm:
                _project_out_radial(bm, w_f * inv[:, None], torch.ones_like(inv))
                bm.mul_(inv[:, None])
            elif ctx.rows_buffer:
                _project_out_radial(bm, weight.detach(), inv * inv, index)
            else:
                # dL/dW_j = b_j - (b_j . W_j) W_j / |W_j|^2 : project out the radial part.
                _project_out_radial(bm, w_f, inv * inv)
            return _weight_grad(bm.to(ctx.weight_dtype), index, ctx.weight_shape, ctx.sparse_grad)

        if ctx.deferred is None:
            grad_w, grad_handle = weight_grad(), None
        else:
            ctx.deferred.defer(weight_grad)
            grad_w = None
            grad_handle = torch.zeros((), dtype=ctx.weight_dtype, device=x_s.device)
        return grad_x, grad_w, None, None, None, None, None, None, None, None, grad_handle, None


def _logits_fit_in_grad(
    index: torch.Tensor | None, low: bool, need_w_grad: bool, n: int, d: int
) -> bool:
    """Whether ``_FusedCosine`` may keep the logits in the tail of the shard's gradient buffer:
    no sampling (the gradient covers the whole shard), a gradient is wanted, products in the
    output dtype, and ``N <= 3D / 4`` (``[S, N]`` fits in ``[S, D]`` with room to write ahead:
    each block of ``_exps_t_times_into`` is at least a quarter of the rows left)."""
    return index is None and not low and need_w_grad and 0 < 4 * n <= 3 * d


EXPS_T_MIN_BLOCK_ROWS = 256
"""Smallest block of ``_exps_t_times_into``; the rows left below it are copied out first."""


def _exps_t_times_into(out: torch.Tensor, exps_t: torch.Tensor, rhs: torch.Tensor) -> None:
    """``out = exps_t @ rhs`` [S, D] where ``exps_t`` [S, N] (N < D) lies at the end of
    ``out``'s own memory.

    Row blocks in order: block ``[j0, j1)`` of ``out`` ends at or before the first
    exponential still unread (that of row ``j0``), so a product never overwrites its own or a
    later block's operand. Each block is ``(D - N) / D`` of the rows left (half of them at
    ``N = D / 2``); once that is below ``EXPS_T_MIN_BLOCK_ROWS`` rows, the exponentials of
    the rows left (fewer than ``EXPS_T_MIN_BLOCK_ROWS * D / (D - N)``: 1,024 at
    ``N = 3D / 4``) are copied out and multiplied last.
    """
    s, d = out.shape
    n = exps_t.shape[1]
    offset = exps_t.storage_offset() - out.storage_offset()  # elements
    same = exps_t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    if not (same and offset >= 0 and out.is_contiguous() and exps_t.is_contiguous()):
        raise ValueError("exps_t must be contiguous and lie at or after out's start in its memory")
    j0 = 0
    while j0 < s:
        j1 = min(s, (offset + n * j0) // d)  # out[:j1] ends where the unread exps begin
        if j1 - j0 < EXPS_T_MIN_BLOCK_ROWS:
            torch.mm(exps_t[j0:].clone(), rhs, out=out[j0:])
            return
        torch.mm(exps_t[j0:j1], rhs, out=out[j0:j1])
        j0 = j1


def _needs_weight_grad(ctx: Any) -> bool:
    """Whether ``_FusedCosine``'s backward must produce the shard's gradient (for the shard
    itself or for its ``shard_handle``)."""
    return bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[10])


def _exps_times_rows(
    exps: torch.Tensor, exps_mm: torch.Tensor | None, rows_mm: torch.Tensor
) -> torch.Tensor:
    """``E @ B`` [N, D] in the output dtype, from E in the product's dtype."""
    if exps_mm is None:
        return torch.mm(exps, rows_mm)
    return torch.mm(exps_mm, rows_mm).to(exps.dtype)


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
    handle: torch.Tensor | None = None,
    deferred: DeferredGrad | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, FusedLink]:
    """``(u [N, S] with local targets = -inf, column scale [S] or None, target cos [R],
    link)``: ``u * column scale = scale * cos``; see ``_FusedCosine`` and the module doc.

    Only ``fused_softmax_ce`` may consume ``u``, with the column scale and the link. With
    ``handle`` and ``deferred`` (``shard_handle``) the gradient for ``weight`` is left in
    ``deferred`` and reaches ``weight`` through the handle.
    """
    if (handle is None) != (deferred is None):
        raise ValueError("pass both handle and deferred (shard_handle), or neither")
    link = FusedLink()
    u, c_t, col_scale = _FusedCosine.apply(
        x_hat,
        weight,
        index,
        rows,
        cols,
        scale,
        mm_dtype,
        sparse_grad,
        workspace,
        link,
        handle,
        deferred,
    )
    return u, col_scale, c_t, link
