"""The compute kernels of Partial FC: cosine matrix, distributed softmax CE, row gathers.

Two paths compute the loss of a step:

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
  (``partialfc.cpu_kernels``), elsewhere a few torch ops (see BENCHMARKS.md). The product
  ``E @ B`` of the embeddings' gradient runs while the softmax's collective is in flight.
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
from partialfc.collectives import ProcessGroup, all_reduce_inplace, start_all_gather_stack

__all__ = [
    "NORM_EPS",
    "Workspace",
    "distributed_cross_entropy",
    "fused_cosine",
    "fused_softmax_ce",
    "gather_rows",
    "normalize_rows",
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
    workspace still keeps peak memory to one ``[N, S]`` buffer and one ``[S, D]`` buffer: the
    gathered rows, which the backward overwrites with the rows' gradient. A separate
    gradient buffer (``"grad"``) is used without sampling (the rows are the shard itself) and
    when the rows were converted to another dtype; under low-precision products the gradient
    is a fresh tensor and the rows stay (their backward still reads them). Without sampling,
    when ``N <= 3D/4`` and a gradient is wanted, the logits are stored transposed at the end
    of the ``"grad"`` buffer instead of in a ``"logits"`` buffer (``_exps_t_times_into``).
    Safety: a tensor saved for backward that is overwritten by the next step's forward (or by
    the backward itself) makes autograd raise ("modified by an inplace operation") instead of
    silently using wrong values; run one backward per forward, before the next forward. A
    buffer that becomes a gradient (``get_unshared``) is reused only when no tensor outside
    the workspace still references it.
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

    def drop(self, name: str) -> None:
        """Release buffer ``name`` (if any)."""
        self._buffers.pop(name, None)

    def nbytes(self) -> int:
        """Bytes held by the workspace."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def clear(self) -> None:
        """Drop every buffer (they are re-created on the next step)."""
        self._buffers.clear()
        self.row_cache = None


# ------------------------------------------------------------------------------ normalisation


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


class DeferredGrad:
    """The shard's gradient, computed after its autograd node, when the caller chooses.

    ``_FusedCosine``'s backward leaves the centres' gradient (a matrix product and a sweep
    over ``[S, D]``) here instead of computing it; the embeddings' all-gather runs it
    (``run``) while the embeddings' gradient travels between the ranks, and the node of
    ``shard_handle`` hands the result to autograd (``take``; it runs it itself if nobody
    did, e.g. with one rank). Without this the exchange would wait for the product.

    The gradient passes from node to node outside autograd's edges, so autograd's stream
    synchronisation does not cover it: the nodes of one step must run on one CUDA stream
    (PartialFC records them all on the current stream). When a backward only asks for the
    embeddings' gradient, the gather's backward still computes the deferred gradient and it
    is kept (here) until the graph is freed.
    """

    def __init__(self) -> None:
        self._fn: Any = None
        self._result: torch.Tensor | None = None

    def defer(self, fn: Any) -> None:
        """Keep ``fn() -> gradient`` for later."""
        self._fn = fn
        self._result = None

    def run(self) -> None:
        """Compute the deferred gradient now (no-op when there is none)."""
        if self._fn is not None:
            fn, self._fn = self._fn, None
            self._result = fn()

    def take(self) -> torch.Tensor | None:
        """The gradient (computed now if still pending); None when nothing was deferred."""
        self.run()
        out, self._result = self._result, None
        return out


class _ShardHandle(torch.autograd.Function):
    """A 0-dim stand-in for the shard in the graph; its backward delivers the shard's
    gradient from a ``DeferredGrad``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, deferred: DeferredGrad) -> torch.Tensor:  # type: ignore[override]
        ctx.deferred = deferred
        return weight.new_zeros(())

    @staticmethod
    def backward(ctx: Any, _grad: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        return ctx.deferred.take(), None


def shard_handle(weight: torch.Tensor, deferred: DeferredGrad) -> torch.Tensor:
    """A 0-dim tensor standing for ``weight`` in ``fused_cosine`` (with ``deferred``): the
    gradient ``fused_cosine`` computes for ``weight`` reaches it through this handle's node,
    as late as autograd runs that node. Create the handle before the embeddings' all-gather:
    autograd runs later-created nodes first, so the gather's backward (and the exchange it
    overlaps with the deferred product) comes before the handle's."""
    return _ShardHandle.apply(weight, deferred)


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
