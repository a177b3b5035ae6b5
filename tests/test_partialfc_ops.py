"""The plain core's hand-written cosine (partialfc.ops.normalized_cosine): float64
gradcheck, equality with ``x @ F.normalize(w).T`` under autograd, and its targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from partialfc.ops import NORM_EPS, normalized_cosine


def _inputs(n: int, s: int, d: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=1)
    w = torch.randn(s, d, generator=gen, dtype=dtype) * 3.0
    target = torch.randint(-1, s, (n,), generator=gen)
    rows = torch.nonzero(target >= 0).squeeze(1)
    return x, w, rows, target[rows]


def test_gradcheck_float64() -> None:
    x, w, rows, cols = _inputs(6, 5, 4, torch.float64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: normalized_cosine(a, b, rows, cols), (x, w), eps=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_autograd_through_normalize(dtype: torch.dtype) -> None:
    x, w, rows, cols = _inputs(9, 13, 8, dtype, seed=1)
    w[4] = 0.0  # a zero row: cosines 0, no radial derivative (F.normalize's clamp_min)
    ref_x, ref_w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ref_cos = ref_x @ F.normalize(ref_w, dim=1, eps=NORM_EPS).T
    ref_t = ref_cos[rows, cols]
    x.requires_grad_(True)
    w.requires_grad_(True)
    cos, t = normalized_cosine(x, w, rows, cols)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(cos, ref_cos, **tol)
    torch.testing.assert_close(t, ref_t, **tol)
    g_cos = torch.randn(cos.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
    g_t = torch.linspace(-1.0, 2.0, t.numel(), dtype=dtype)
    torch.autograd.backward((cos, t), (g_cos, g_t))
    torch.autograd.backward((ref_cos, ref_t), (g_cos, g_t))
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    torch.testing.assert_close(w.grad, ref_w.grad, **tol)


def test_targets_exact_under_a_narrow_product() -> None:
    x, w, rows, cols = _inputs(16, 32, 64, torch.float32, seed=3)
    cos, t = normalized_cosine(x, w, rows, cols, torch.bfloat16)
    exact = (x[rows] * F.normalize(w, dim=1)[cols]).sum(dim=1)
    torch.testing.assert_close(t, exact, rtol=1e-6, atol=1e-6)
    assert cos.dtype == torch.float32
    assert (cos[rows, cols] - exact).abs().max() > 1e-5  # the product itself was rounded
    torch.testing.assert_close(cos, x @ F.normalize(w, dim=1).T, rtol=0, atol=3e-2)


def test_no_gradient_asked() -> None:
    x, w, rows, cols = _inputs(4, 6, 3, torch.float32)
    w.requires_grad_(True)
    cos, _ = normalized_cosine(x, w, rows, cols)
    cos.sum().backward()
    assert x.grad is None and w.grad is not None


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
def test_narrow_rows_equal_their_widened_copy(narrow: torch.dtype, monkeypatch) -> None:
    """16-bit rows (bf16 / fp16 class centres) are widened block by block in backward, not
    kept as a float32 copy: the cosines equal those of the widened rows exactly, the rows'
    gradient is the float32 one rounded to the rows' dtype, the embeddings' gradient equals
    it to float32 round-off. Small blocks, so that several (and a ragged last one) run."""
    monkeypatch.setattr("partialfc.ops.WIDEN_BLOCK_ELEMENTS", 3 * 8)  # 3 rows a block
    x, w, rows, cols = _inputs(9, 13, 8, torch.float32, seed=2)
    w = w.to(narrow)
    w[4] = 0.0
    up = torch.randn(9, 13, generator=torch.Generator().manual_seed(3))
    grads = []
    for rows_in in (w.clone(), w.float()):  # narrow, then its widened copy
        xi = x.clone().requires_grad_(True)
        wi = rows_in.requires_grad_(True)
        cos, t = normalized_cosine(xi, wi, rows, cols)
        (cos * up).sum().add(t.sum() * 0.5).backward()
        grads.append((cos.detach(), t.detach(), xi.grad, wi.grad))
    (cos_n, t_n, gx_n, gw_n), (cos_w, t_w, gx_w, gw_w) = grads
    assert cos_n.dtype == torch.float32 and gw_n.dtype == narrow
    assert torch.equal(cos_n, cos_w) and torch.equal(t_n, t_w)
    torch.testing.assert_close(gw_n, gw_w.to(narrow), rtol=0, atol=0)
    torch.testing.assert_close(gx_n, gx_w, rtol=1e-6, atol=1e-6)
