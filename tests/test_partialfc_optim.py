"""The shard optimizer: torch-exact on dense gradients, row-lazy on row-sparse ones, and the
two update modes of PartialFC (dense vs sampled rows)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _backends import partial_fc

from partialfc import PartialFC, ShardOptimizer, build_margin, clip_grad_norm_


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


HP = {"lr": 0.05, "weight_decay": 0.01}


def _torch_opt(name: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, momentum=0.9, **HP)
    return torch.optim.AdamW(params, betas=(0.8, 0.95), eps=1e-6, **HP)


def _ours(name: str, params: list[torch.Tensor], chunk: int = 7, **kw) -> ShardOptimizer:
    if name == "sgd":
        return ShardOptimizer(params, "sgd", momentum=0.9, chunk_elements=chunk, **HP, **kw)
    return ShardOptimizer(
        params, "adamw", betas=(0.8, 0.95), eps=1e-6, chunk_elements=chunk, **HP, **kw
    )


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_dense_gradients_match_torch(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(9, 4), (9,), (1, 4)]
    ref = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_(True) for s in shapes]
    mine = [p.detach().clone().requires_grad_(True) for p in ref]
    opt_ref, opt_mine = _torch_opt(name, ref), _ours(name, mine)
    for _ in range(4):
        for a, b in zip(ref, mine, strict=True):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
            a.grad, b.grad = g.clone(), g.clone()
        opt_ref.step()
        opt_mine.step()
    for a, b in zip(ref, mine, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    for a, b in zip(ref, mine, strict=True):
        assert torch.equal(a.grad, b.grad)  # gradients are not used as scratch


def _numpy_lazy(name: str, w: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Each row is its own optimizer that steps only when the row has a gradient."""
    w = w.copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    t = np.zeros(w.shape[0])
    lr, wd = HP["lr"], HP["weight_decay"]
    for rows, grads in steps:
        for r, g in zip(rows, grads, strict=True):
            if name == "sgd":
                d = g + wd * w[r]
                m[r] = 0.9 * m[r] + d
                w[r] -= lr * m[r]
            else:
                b1, b2, eps = 0.8, 0.95, 1e-6
                t[r] += 1
                w[r] *= 1 - lr * wd
                m[r] = b1 * m[r] + (1 - b1) * g
                v[r] = b2 * v[r] + (1 - b2) * g * g
                denom = np.sqrt(v[r]) / np.sqrt(1 - b2 ** t[r]) + eps
                w[r] -= lr / (1 - b1 ** t[r]) * m[r] / denom
    return w


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_row_sparse_gradients_update_only_their_rows(name: str) -> None:
    gen = torch.Generator().manual_seed(1)
    w0 = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    p = w0.clone().requires_grad_(True)
    opt = _ours(name, [p], chunk=4)
    steps = []
    for step in range(4):
        rows = torch.randperm(10, generator=gen)[:4].sort().values
        grads = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        steps.append((rows.numpy(), grads.numpy()))
        if step == 2:  # an uncoalesced gradient (two contributions to one row)
            idx = torch.cat([rows, rows[:1]])
            vals = torch.cat([grads, torch.zeros(1, 3, dtype=torch.float64)])
            p.grad = torch.sparse_coo_tensor(idx[None], vals, (10, 3), check_invariants=True)
        else:
            p.grad = torch.sparse_coo_tensor(rows[None], grads, (10, 3), check_invariants=True)
        before = p.detach().clone()
        opt.step()
        untouched = torch.ones(10, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(p.detach()[untouched], before[untouched])
    expected = _numpy_lazy(name, w0.numpy(), steps)
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_and_scheduler() -> None:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(6, 2, generator=gen).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    opt_a = _ours("adamw", [a])
    opt_b = _ours("adamw", [b])
    sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda s: 0.5**s)
    sched_b = torch.optim.lr_scheduler.LambdaLR(opt_b, lambda s: 0.5**s)
    grads = [torch.randn(6, 2, generator=gen) for _ in range(4)]
    for i, g in enumerate(grads):
        a.grad = g.clone()
        opt_a.step()
        sched.step()
        if i == 1:  # b is restored from a checkpoint after two steps
            with torch.no_grad():
                b.copy_(a)
            opt_b.load_state_dict(opt_a.state_dict())
            sched_b.load_state_dict(sched.state_dict())
        elif i > 1:
            b.grad = g.clone()
            opt_b.step()
            sched_b.step()
    assert opt_a.param_groups[0]["lr"] == pytest.approx(HP["lr"] * 0.5**4)
    torch.testing.assert_close(b, a)
    assert opt_a.state[a]["step"].tolist() == [4.0] * 6


BACKENDS = pytest.mark.parametrize("fused", [True, False], ids=["cpu_fused", "plain"])


def _pfc(update: str, rate: float, seed: int = 0, fused: bool = True) -> PartialFC:
    head = build_margin("arcface", s=16.0)
    pfc = partial_fc(head, 8, 40, rate, 0, 1, seed=seed, update=update, fused=fused)
    with torch.no_grad():
        pfc.weight.normal_(0, 1, generator=torch.Generator().manual_seed(9))
    return pfc


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(12, 8, generator=gen), torch.randint(0, 40, (12,), generator=gen)


@BACKENDS
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_update_modes_agree_at_full_rate(name: str, fused: bool) -> None:
    dense, sampled = _pfc("dense", 1.0, fused=fused), _pfc("sampled", 1.0, fused=fused)
    opt_d = _torch_opt(name, list(dense.parameters()))
    opt_s = sampled.build_optimizer(name, momentum=0.9, betas=(0.8, 0.95), eps=1e-6, **HP)
    for step in range(3):
        x, labels = _data(step)
        for pfc, opt in ((dense, opt_d), (sampled, opt_s)):
            opt.zero_grad(set_to_none=True)
            pfc(x, labels)[0].backward()
            opt.step()
    torch.testing.assert_close(sampled.weight, dense.weight, rtol=1e-6, atol=1e-6)


@BACKENDS
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_sampled_update_freezes_unsampled_rows(name: str, fused: bool) -> None:
    """The shard's gradient holds the sampled rows only (row-sparse) and the optimizer moves
    those rows alone, on both backends."""
    pfc = _pfc("sampled", 0.25, fused=fused)
    opt = pfc.build_optimizer(name, momentum=0.9, **HP)
    nocache = _pfc("sampled", 0.25, fused=fused)
    opt_nocache = nocache.build_optimizer(name, momentum=0.9, **HP)
    opt_nocache.row_cache = None
    for step in range(3):
        x, labels = _data(step)
        before = pfc.weight.detach().clone()
        for module, optimizer in ((pfc, opt), (nocache, opt_nocache)):
            optimizer.zero_grad(set_to_none=True)
            loss, _ = module(x, labels)
            loss.backward()
            assert module.weight.grad.is_sparse
            optimizer.step()
        sampled = pfc.last_sampled_global
        frozen = torch.ones(40, dtype=torch.bool)
        frozen[sampled] = False
        assert torch.equal(pfc.weight.detach()[frozen], before[frozen])
        assert bool((pfc.weight.detach()[sampled] != before[sampled]).any(dim=1).all())
        state_key = "momentum_buffer" if name == "sgd" else "exp_avg"
        assert bool((opt.state[pfc.weight][state_key][frozen] == 0).all()) or step > 0
    # The forward's cached rows give exactly the same update as gathering them again.
    torch.testing.assert_close(pfc.weight, nocache.weight, rtol=0, atol=0)


@BACKENDS
def test_dense_update_moves_unsampled_rows(fused: bool) -> None:
    """The semantics the "sampled" mode avoids: momentum and decay touch every row."""
    pfc = _pfc("dense", 0.25, fused=fused)
    opt = torch.optim.SGD(pfc.parameters(), momentum=0.9, **HP)
    for step in range(2):
        x, labels = _data(step)
        before = pfc.weight.detach().clone()
        opt.zero_grad(set_to_none=True)
        pfc(x, labels)[0].backward()
        assert not pfc.weight.grad.is_sparse
        opt.step()
    frozen = torch.ones(40, dtype=torch.bool)
    frozen[pfc.last_sampled_global] = False
    assert bool((pfc.weight.detach()[frozen] != before[frozen]).all())


def test_optimizer_rejects_bad_arguments() -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="name"):
        ShardOptimizer(p, "adam")
    with pytest.raises(ValueError, match="lr"):
        ShardOptimizer(p, "sgd", lr=0.0)
    with pytest.raises(ValueError, match="momentum"):
        ShardOptimizer(p, "sgd", momentum=1.0)
    with pytest.raises(ValueError, match="betas"):
        ShardOptimizer(p, "adamw", betas=(0.9, 1.5))


def test_clip_grad_norm_handles_row_sparse_gradients() -> None:
    dense = torch.nn.Parameter(torch.zeros(3, 2))
    dense.grad = torch.full((3, 2), 1.0)
    sparse = torch.nn.Parameter(torch.zeros(5, 2))
    idx = torch.tensor([[1, 3, 1]])  # uncoalesced: row 1 twice
    sparse.grad = torch.sparse_coo_tensor(
        idx, torch.full((3, 2), 1.0), (5, 2), check_invariants=True
    )
    # norms: dense sqrt(6); sparse rows [2, 2] and [1, 1] -> sqrt(10); total 4
    total = clip_grad_norm_([dense, sparse], max_norm=2.0)
    assert total.item() == pytest.approx(4.0)
    scale = 2.0 / (4.0 + 1e-6)
    torch.testing.assert_close(dense.grad, torch.full((3, 2), scale))
    expected = torch.zeros(5, 2)
    expected[1], expected[3] = 2 * scale, scale
    torch.testing.assert_close(sparse.grad.to_dense(), expected)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([dense], 0.0)
