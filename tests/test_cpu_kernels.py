"""The fused CPU kernels (partialfc/fast/csrc/cpu_kernels.cpp) against the torch-op path.

Each kernel is compared with an independent torch computation on random data with the edge
cases the step produces (masked -inf logits, rows without a finite value, float64), and a
whole PartialFC step (loss, gradients, optimizer update) is run with the kernels switched on
and off (``cpu_kernels.set_enabled``). test_partialfc_dist.py runs its multi-process reference
comparison both ways too.
"""

from __future__ import annotations

import math

import pytest
import torch
from _backends import partial_fc

from partialfc import build_margin
from partialfc.fast import cpu_kernels
from partialfc.fast.rows import _project_out_radial
from partialfc.fast.softmax import _local_exp_sums
from partialfc.ops import NORM_EPS


@pytest.fixture
def switch():
    """``switch(flag)`` turns the kernels on or off for this test; restored afterwards."""
    before = cpu_kernels.enabled()
    yield cpu_kernels.set_enabled
    cpu_kernels.set_enabled(before)


@pytest.fixture(scope="module")
def kern():
    module = cpu_kernels.kernels()
    assert module is not None, "the fused CPU kernels must build here (g++ and ninja)"
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_rows_inv_norm(kern, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 37, generator=gen, dtype=dtype)
    weight[5] = 0.0  # a zero row: inverse norm 1 / eps
    index = torch.tensor([0, 5, 6, 120, 299])
    out = torch.empty(5, 37, dtype=dtype)
    inv = torch.empty(5, dtype=dtype)
    kern.gather_rows_inv_norm(weight, index, out, inv, NORM_EPS)
    assert torch.equal(out, weight[index])
    expected = 1.0 / torch.linalg.vector_norm(weight[index], dim=1).clamp_min(NORM_EPS)
    torch.testing.assert_close(inv, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_rows_matches_torch(kern, dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(9, 2500, generator=gen) * 30).to(dtype)  # exp arguments down to ~-250
    z[0, :7] = -math.inf  # masked targets
    z[1] = -math.inf  # a row with no finite value
    z[2, 3] = 80.0  # a large logit
    init = torch.full((9,), -math.inf, dtype=dtype)
    init[4] = 1e3  # a target logit above every column: exp(z - 1000) underflows to 0
    ref_max = torch.maximum(z.amax(dim=1), init)
    shift = torch.where(torch.isfinite(ref_max), ref_max, torch.zeros_like(ref_max))
    arg = z - shift[:, None]  # rounded in dtype, as the kernel does
    ref = arg.double().exp()
    out, row_max, row_sum = z.clone(), init.clone(), torch.empty(9, dtype=dtype)
    kern.softmax_rows_(out, None, row_max, row_sum)
    assert torch.equal(row_max, ref_max)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and float(row_sum[1]) == 0.0
    # Within 2 ulp of exp where exp is a normal float; 0 where it would be subnormal.
    tiny = torch.finfo(dtype).tiny
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref.where(ref >= tiny, 0.0), rtol=2 * ulp, atol=0)
    torch.testing.assert_close(row_sum.double(), ref.sum(dim=1), rtol=1e-6, atol=0)
    nan = torch.tensor([[0.0, math.nan, -1.0]], dtype=dtype)
    kern.softmax_rows_(
        nan, None, torch.full((1,), -math.inf, dtype=dtype), torch.empty(1, dtype=dtype)
    )
    assert bool(torch.isnan(nan[0, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_rows_column_scale(kern, dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    z = (torch.randn(6, 3001, generator=gen) * 10).to(dtype)  # rows span several sum blocks
    z[2, 4] = -math.inf
    col = (torch.rand(3001, generator=gen) + 0.5).to(dtype)
    scaled = z * col
    expected_max = scaled.amax(dim=1)
    exps = (scaled - expected_max[:, None]).exp()
    out, row_max, row_sum = z.clone(), torch.full((6,), -math.inf, dtype=dtype), z.new_empty(6)
    kern.softmax_rows_(out, col, row_max, row_sum)
    torch.testing.assert_close(row_max, expected_max, rtol=1e-6, atol=0)
    # The exponentials are written times the column scale; the sum is of the exponentials.
    torch.testing.assert_close(out, exps * col, rtol=1e-5, atol=1e-30)
    assert float(out[2, 4]) == 0.0
    torch.testing.assert_close(row_sum, exps.sum(dim=1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_scale", [False, True])
def test_softmax_cols_is_softmax_rows_of_the_transpose(kern, dtype, with_scale) -> None:
    """The kernel for logits stored transposed ([S, N]) against the row kernel on the same
    logits: same maxima and exponentials, sums within float rounding (other summation
    order), with masked entries, a row with no finite value, a starting maximum above every
    logit, a NaN, columns spanning several sum blocks, on one thread and on two (the
    columns split into tiles whose maxima and sums are combined)."""
    gen = torch.Generator().manual_seed(6)
    n, s = 150, 2100
    z = (torch.randn(n, s, generator=gen) * 25).to(dtype)
    z[0, :9] = -math.inf
    z[1] = -math.inf
    z[7, 100] = math.nan
    col = (torch.rand(s, generator=gen) + 0.5).to(dtype) if with_scale else None
    init = torch.full((n,), -math.inf, dtype=dtype)
    init[4] = 1e3
    rows, rows_max, rows_sum = z.clone(), init.clone(), z.new_empty(n)
    kern.softmax_rows_(rows, col, rows_max, rows_sum)
    threads = torch.get_num_threads()
    try:
        for num_threads in (1, 2):
            torch.set_num_threads(num_threads)
            cols, cols_max, cols_sum = z.T.contiguous(), init.clone(), z.new_empty(n)
            kern.softmax_cols_(cols, col, cols_max, cols_sum)
            assert torch.equal(cols_max, rows_max)
            torch.testing.assert_close(cols.T, rows, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(cols_sum, rows_sum, rtol=1e-6, atol=0, equal_nan=True)
            assert float(cols_sum[1]) == 0.0 and float(cols_sum[4]) == 0.0
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(RuntimeError, match="softmax_cols_"):
        kern.softmax_cols_(cols, col, cols_max[:-1], cols_sum)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
def test_local_exp_sums_agree_with_and_without_kernels(switch, with_scale, transposed) -> None:
    """Row-major logits and logits stored transposed (a ``.T`` view, as in the gradient
    buffer), each with the kernel and with torch ops."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(16, 700, generator=gen) * 20
    z[3] = -math.inf
    z[5, ::2] = -math.inf
    col = torch.rand(700, generator=gen) + 0.5 if with_scale else None
    results = []
    for flag in (True, False):
        switch(flag)
        out = z.T.contiguous().T if transposed else z.clone()
        assert out.is_contiguous() != transposed
        results.append((out, *_local_exp_sums(out, col)))
    # The kernel path really ran the kernel for its layout: bit-identical to calling it.
    direct = z.T.contiguous() if transposed else z.clone()
    switch(True)
    kern = cpu_kernels.kernels()
    (kern.softmax_cols_ if transposed else kern.softmax_rows_)(
        direct, col, torch.full((16,), -math.inf), torch.empty(16)
    )
    assert torch.equal(results[0][0], direct.T if transposed else direct)
    # torch's exp keeps subnormal results (< 1.2e-38, times a column scale < 1.5) that the
    # kernel flushes to 0.
    for a, b in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1.5 * torch.finfo(z.dtype).tiny)


def test_project_radial_matches_torch(kern) -> None:
    gen = torch.Generator().manual_seed(3)
    grad, rows = torch.randn(2 * 64 + 5, 512, generator=gen), torch.randn(133, 512, generator=gen)
    coef = torch.rand(133, generator=gen)
    expected = grad - ((grad * rows).sum(dim=1) * coef)[:, None] * rows
    out = grad.clone()
    kern.project_radial_(out, rows, coef)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # The module's helper takes the kernel for contiguous float tensors only.
    strided = grad.clone().T.contiguous().T  # same values, column-major
    _project_out_radial(strided, rows, coef)
    torch.testing.assert_close(strided, expected, rtol=1e-5, atol=1e-5)
    # Rows read from a larger matrix through an index: kernel and chunked torch ops.
    shard = torch.randn(2000, 512, generator=gen)
    index = torch.randperm(2000, generator=gen)[:133].sort().values
    shard[index] = rows
    out = grad.clone()
    kern.project_radial_rows_(out, shard, index, coef)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    strided = grad.clone().T.contiguous().T
    _project_out_radial(strided, shard, coef, index)
    torch.testing.assert_close(strided, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="out of range"):
        kern.project_radial_rows_(grad.clone(), shard, index + 2000 - int(index[-1]), coef)


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_sgd_rows_matches_the_formula(kern, momentum) -> None:
    gen = torch.Generator().manual_seed(4)
    weight, buf = torch.randn(50, 24, generator=gen), torch.randn(50, 24, generator=gen)
    index = torch.tensor([1, 7, 8, 49])
    grad = torch.randn(4, 24, generator=gen)
    lr, wd = 0.1, 5e-4
    w_rows = weight[index]
    step = grad + wd * w_rows
    if momentum:
        step = step + momentum * buf[index]
    expected_w, expected_buf = weight.clone(), buf.clone()
    expected_w[index] = w_rows - lr * step
    if momentum:
        expected_buf[index] = step
    kern.sgd_rows_(weight, buf if momentum else None, index, grad, lr, momentum, wd)
    torch.testing.assert_close(weight, expected_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(buf, expected_buf, rtol=1e-6, atol=1e-7)


def test_kernels_reject_indices_out_of_range(kern) -> None:
    weight, grad = torch.zeros(10, 4), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        kern.sgd_rows_(weight, None, torch.tensor([3, 10]), grad, 0.1, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="out of range"):
        kern.gather_rows_inv_norm(weight, torch.tensor([-1, 2]), grad, torch.zeros(2), 1e-12)


def test_usable_refuses_what_the_kernels_do_not_take(kern, switch) -> None:
    x = torch.zeros(4, 4)
    assert cpu_kernels.usable(x, torch.zeros(4)) is kern
    assert cpu_kernels.usable(x, None) is kern  # an absent optional operand
    assert cpu_kernels.usable(x.T) is None  # not contiguous
    assert cpu_kernels.usable(x, torch.zeros(4, dtype=torch.float64)) is None  # mixed dtypes
    assert cpu_kernels.usable(x.half()) is None
    assert cpu_kernels.usable(x.to("meta")) is None
    switch(False)
    assert cpu_kernels.usable(x) is None


@pytest.mark.parametrize("rate", [1.0, 0.3])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_partialfc_steps_agree_with_and_without_kernels(switch, rate, opt_name) -> None:
    """Three full steps (fused ArcFace, sampled update): same losses, embedding gradients
    and class centres either way. (AdamW with a large eps: Adam's g / sqrt(v) would turn
    float noise in near-zero gradients into full-size steps.)"""
    runs = []
    for flag in (True, False):
        switch(flag)
        torch.manual_seed(0)
        pfc = partial_fc(build_margin("arcface"), 64, 500, rate, 0, 1, update="sampled")
        hp = {"lr": 0.5, "momentum": 0.9} if opt_name == "sgd" else {"lr": 0.05, "eps": 0.1}
        opt = pfc.build_optimizer(opt_name, weight_decay=5e-4, **hp)
        x = torch.randn(32, 64, requires_grad=True)
        labels = torch.randint(0, 500, (32,))
        losses, grads = [], []
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            x.grad = None
            loss, _ = pfc(x, labels)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            grads.append(x.grad.clone())
        runs.append((torch.stack(losses), torch.stack(grads), pfc.weight.detach().clone()))
    # Both are float32 computations of one formula in different orders (each is ~2e-5 away
    # from a float64 run after three steps, with centres growing to ~15): an element's
    # tolerance is relative to the tensor's largest magnitude, not only to its own.
    for a, b in zip(runs[0], runs[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=max(1e-6, 2e-6 * float(b.abs().max())))
