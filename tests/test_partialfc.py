"""Margin heads, collectives and PartialFC against unsharded references (1, 2 and 3 processes).

The multi-process tests spawn gloo workers (see ``_dist.py``); every worker builds the same
full class-centre matrix and global batch from fixed seeds, runs PartialFC on its own slice and
compares with a single-process reference computed locally, so no results need to travel back.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _dist import run_distributed

from partialfc import (
    CombinedMargin,
    PartialFC,
    all_gather_no_grad,
    all_gather_with_grad,
    build_margin,
    class_range,
    distributed_cross_entropy,
    init_class_centers,
)
from partialfc.margins import DEFAULT_EPS

TOL = {"rtol": 1e-5, "atol": 1e-5}
D = 16


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-5
) -> None:
    """``torch.allclose`` with a readable message.

    Used instead of ``torch.testing.assert_close`` because, once a process group exists, the
    latter imports torch.distributed.tensor (about 2 s per spawned worker on the test machine).
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        diff = (actual - expected).abs().max().item()
        raise AssertionError(f"{what}: max abs difference {diff:.3g} (rtol={rtol}, atol={atol})")


# ----------------------------------------------------------------------------------------------
# Margin heads
# ----------------------------------------------------------------------------------------------


def numpy_margin(
    cos: np.ndarray,
    target: np.ndarray,
    s: float,
    m1: float,
    m2: float,
    m3: float,
    easy_margin: bool = False,
    eps: float = DEFAULT_EPS,
) -> np.ndarray:
    """Independent float64 reference, one entry at a time."""
    out = s * cos.astype(np.float64)
    th = math.cos(math.pi - m2)
    for i, t in enumerate(target):
        if t < 0:
            continue
        c = float(cos[i, t])
        if m1 == 1.0 and m2 == 0.0:
            val = c - m3
        else:
            theta = math.acos(min(max(c, -1.0 + eps), 1.0 - eps))
            val = math.cos(m1 * theta + m2) - m3
            if m1 == 1.0 and m3 == 0.0:  # ArcFace
                if easy_margin:
                    val = val if c > 0 else c
                elif c <= th:
                    val = c - m2 * math.sin(m2)
        out[i, t] = s * val
    return out


# Cosines covering the ArcFace fallback region (theta + 0.5 > pi <=> cos < -0.8776).
COS_POINTS = [0.97, 0.5, 0.1, -0.05, -0.6, -0.86, -0.9, -0.95, -0.999]


def _cos_matrix(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos [10, 4] with the target cosines of rows 0..8 set to COS_POINTS; row 9 has no target."""
    gen = torch.Generator().manual_seed(3)
    cos = torch.rand(10, 4, generator=gen, dtype=torch.float64) * 2 - 1
    target = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, -1])
    for i, c in enumerate(COS_POINTS):
        cos[i, target[i]] = c
    return cos.to(dtype), target


MARGIN_CASES = [
    ("arcface", {}, dict(s=64.0, m1=1.0, m2=0.5, m3=0.0)),
    ("arcface", {"s": 30.0, "m2": 0.3}, dict(s=30.0, m1=1.0, m2=0.3, m3=0.0)),
    ("arcface", {"easy_margin": True}, dict(s=64.0, m1=1.0, m2=0.5, m3=0.0, easy_margin=True)),
    ("cosface", {}, dict(s=64.0, m1=1.0, m2=0.0, m3=0.4)),
    ("normface", {"s": 16.0}, dict(s=16.0, m1=1.0, m2=0.0, m3=0.0)),
    (
        "combined",
        {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2},
        dict(s=64.0, m1=1.0, m2=0.3, m3=0.2),
    ),
    (
        "combined",
        {"s": 32.0, "m1": 1.35, "m2": 0.0, "m3": 0.0},
        dict(s=32.0, m1=1.35, m2=0.0, m3=0.0),
    ),
    (
        "combined",
        {"s": 64.0, "m1": 1.2, "m2": 0.2, "m3": 0.1},
        dict(s=64.0, m1=1.2, m2=0.2, m3=0.1),
    ),
]


@pytest.mark.parametrize(("name", "kwargs", "ref"), MARGIN_CASES)
def test_margin_matches_numpy(name: str, kwargs: dict, ref: dict) -> None:
    head = build_margin(name, **kwargs)
    cos, target = _cos_matrix(torch.float32)
    cos_before, target_before = cos.clone(), target.clone()
    out = head(cos, target)
    assert out.dtype == torch.float32 and out.shape == cos.shape
    expected = numpy_margin(cos.double().numpy(), target.numpy(), **ref)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-4)
    # Inputs untouched.
    assert torch.equal(cos, cos_before) and torch.equal(target, target_before)


def test_arcface_fallback_beyond_pi() -> None:
    head = build_margin("arcface", s=64.0, m2=0.5)
    cos = torch.tensor([[-0.95, 0.2], [-0.85, 0.2]], dtype=torch.float64)
    out = head(cos, torch.tensor([0, 0]))
    # theta(-0.95) + 0.5 > pi -> fallback cos - m*sin(m); theta(-0.85) + 0.5 < pi -> margin.
    assert out[0, 0].item() == pytest.approx(64 * (-0.95 - 0.5 * math.sin(0.5)), abs=1e-9)
    assert out[1, 0].item() == pytest.approx(64 * math.cos(math.acos(-0.85) + 0.5), abs=1e-9)
    assert out[0, 1].item() == pytest.approx(64 * 0.2, abs=1e-12)
    # The fallback keeps the target logit monotone in cos (the raw formula is not, past pi).
    grid = torch.linspace(-1, 1, 2001, dtype=torch.float64)[:, None]
    logit = head(grid, torch.zeros(2001, dtype=torch.long))[:, 0]
    assert bool((logit[1:] >= logit[:-1]).all())


@pytest.mark.parametrize(("name", "kwargs", "ref"), MARGIN_CASES)
def test_margin_gradcheck_float64(name: str, kwargs: dict, ref: dict) -> None:
    head = build_margin(name, **kwargs)
    cos, target = _cos_matrix(torch.float64)
    cos[0, 0] = 0.9999  # near 1
    cos[8, 0] = -0.9999  # near -1 (and theta + m > pi for ArcFace)
    cos.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: head(c, target), (cos,), eps=1e-7, atol=1e-5)


@pytest.mark.parametrize(("name", "kwargs", "ref"), MARGIN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_margin_gradient_finite_at_plus_minus_one(
    name: str, kwargs: dict, ref: dict, dtype: torch.dtype
) -> None:
    head = build_margin(name, **kwargs)
    cos = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]], dtype=dtype, requires_grad=True)
    out = head(cos, torch.tensor([0, 0, -1]))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all()


def test_margin_half_input_gives_float32() -> None:
    head = build_margin("arcface")
    cos, target = _cos_matrix(torch.float32)
    out = head(cos.half(), target)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, head(cos.half().float(), target))


def test_build_margin_errors_and_defaults() -> None:
    with pytest.raises(ValueError, match="arcface.*combined.*cosface.*normface"):
        build_margin("sphereface2")
    with pytest.raises(ValueError, match="m3"):
        build_margin("combined", s=64.0, m1=1.0, m2=0.5)
    with pytest.raises(ValueError, match="m3"):
        build_margin("arcface", m3=0.1)
    with pytest.raises(ValueError, match="easy_margin"):
        CombinedMargin(s=64.0, m3=0.4, easy_margin=True)
    with pytest.raises(ValueError, match="s must be > 0"):
        build_margin("normface", s=0.0)
    with pytest.raises(ValueError, match="m2"):
        build_margin("arcface", m2=4.0)
    arc = build_margin("arcface")
    assert (arc.s, arc.m1, arc.m2, arc.m3, arc.easy_margin) == (64.0, 1.0, 0.5, 0.0, False)
    cosface = build_margin("cosface")
    assert (cosface.s, cosface.m1, cosface.m2, cosface.m3) == (64.0, 1.0, 0.0, 0.4)
    head = build_margin("arcface")
    with pytest.raises(ValueError, match="target"):
        head(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        head(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------
# Shared problem + unsharded reference
# ----------------------------------------------------------------------------------------------


def make_problem(
    num_classes: int, batch_sizes: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full W [C, D], global embeddings x [N, D] and labels [N], identical on every process."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(batch_sizes)
    weight = torch.randn(num_classes, D, generator=gen)
    x = torch.randn(n, D, generator=gen)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    # Pull some embeddings towards their centre so target angles vary and some are small.
    x = x + 2.0 * F.normalize(weight[labels], dim=1) * torch.rand(n, 1, generator=gen)
    return weight, x, labels


def reference(
    margin: torch.nn.Module,
    weight: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    columns: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Plain single-process loss and gradients, optionally restricted to `columns` (sorted)."""
    w = weight.clone().requires_grad_(True)
    e = x.clone().requires_grad_(True)
    if columns is None:
        w_used, lab = w, labels
    else:
        w_used = w[columns]
        lookup = torch.full((weight.shape[0],), -1, dtype=torch.long)
        lookup[columns] = torch.arange(columns.numel())
        lab = lookup[labels]
        assert bool((lab >= 0).all()), "a positive class was not sampled"
    cos = F.normalize(e, dim=1) @ F.normalize(w_used, dim=1).T
    loss = F.cross_entropy(margin(cos, lab), lab)
    loss.backward()
    cos = cos.detach()
    t_cos = cos[torch.arange(len(lab)), lab]
    neg = cos.clone()
    neg[torch.arange(len(lab)), lab] = -2.0
    return {
        "loss": loss.detach(),
        "x_grad": e.grad,
        "w_grad": w.grad,
        "target_deg": torch.rad2deg(torch.acos(t_cos)),
        "neg_deg": torch.rad2deg(torch.acos(neg.max(dim=1).values)),
    }


def check_stats(stats: dict, ref: dict, num_sampled: int) -> None:
    assert_close(stats["target_angle_mean_deg"], ref["target_deg"].mean(), "target angle mean")
    assert_close(
        stats["target_angle_std_deg"],
        ref["target_deg"].std(correction=0),
        "target angle std",
        rtol=1e-4,
        atol=1e-4,
    )
    assert_close(
        stats["hardest_negative_angle_mean_deg"], ref["neg_deg"].mean(), "hardest negative angle"
    )
    assert stats["num_sampled"] == num_sampled


# ----------------------------------------------------------------------------------------------
# Single process (no process group)
# ----------------------------------------------------------------------------------------------


def test_collectives_are_identities_without_group() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    out = all_gather_with_grad(x)
    out.sum().backward()
    assert out is x and torch.equal(x.grad, torch.ones(4, 3))
    labels = torch.arange(4)
    assert all_gather_no_grad(labels) is labels


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("arcface", {}), ("cosface", {}), ("normface", {}), ("combined", MARGIN_CASES[5][1])],
)
def test_single_process_matches_reference(name: str, kwargs: dict) -> None:
    margin = build_margin(name, **kwargs)
    weight, x, labels = make_problem(11, [12], seed=1)
    pfc = PartialFC(margin, D, 11, 1.0, rank=0, world_size=1)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    e = x.clone().requires_grad_(True)
    labels_before = labels.clone()
    loss, stats = pfc(e, labels)
    loss.backward()
    ref = reference(margin, weight, x, labels)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, ref["loss"], **TOL)
    torch.testing.assert_close(e.grad, ref["x_grad"], **TOL)
    torch.testing.assert_close(pfc.weight.grad, ref["w_grad"], **TOL)
    check_stats(stats, ref, num_sampled=11)
    assert torch.equal(labels, labels_before)
    assert torch.equal(pfc.last_sampled_global, torch.arange(11))


def test_distributed_cross_entropy_equals_torch_without_group() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(6, 9, generator=gen) * 20).requires_grad_(True)
    target = torch.randint(0, 9, (6,), generator=gen)
    ours = distributed_cross_entropy(logits, target)
    (g_ours,) = torch.autograd.grad(ours * 3.0, logits)
    theirs = F.cross_entropy(logits, target)
    (g_theirs,) = torch.autograd.grad(theirs * 3.0, logits)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(g_ours, g_theirs, **TOL)


def test_partialfc_gradcheck_float64() -> None:
    """The custom softmax-CE backward against finite differences, wrt embeddings and weights."""
    weight, x, labels = make_problem(7, [5], seed=2)
    pfc = PartialFC(build_margin("arcface", s=8.0), D, 7, 1.0, rank=0, world_size=1).double()
    with torch.no_grad():
        pfc.weight.copy_(weight.double())
    e = x.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: pfc(inp, labels)[0], (e,))
    w0 = pfc.weight.detach().clone().requires_grad_(True)

    def loss_of_weight(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(pfc, {"weight": w}, (e.detach(), labels))[0]

    assert torch.autograd.gradcheck(loss_of_weight, (w0,))


def test_init_identical_for_every_world_size() -> None:
    num_classes = 3000  # spans several INIT_BLOCK_ROWS blocks
    full = PartialFC(build_margin("arcface"), D, num_classes, 1.0, 0, 1, seed=7).weight.detach()
    assert full.shape == (num_classes, D)
    assert abs(full.std().item() - 0.01) < 5e-4
    torch.testing.assert_close(full, init_class_centers(0, num_classes, D, seed=7, std=0.01))
    for world in (2, 3, 8):
        shards = [
            PartialFC(build_margin("arcface"), D, num_classes, 1.0, r, world, seed=7).weight
            for r in range(world)
        ]
        assert torch.equal(torch.cat([s.detach() for s in shards]), full)
    other = PartialFC(build_margin("arcface"), D, num_classes, 1.0, 0, 1, seed=8).weight
    assert not torch.equal(other.detach(), full)


def test_sampling_single_process() -> None:
    num_classes, rate = 60, 0.25
    margin = build_margin("arcface")
    weight, x, labels = make_problem(num_classes, [10], seed=4)
    positives = labels.unique()

    def run(seed: int, steps: int) -> list[torch.Tensor]:
        pfc = PartialFC(margin, D, num_classes, rate, rank=0, world_size=1, seed=seed)
        with torch.no_grad():
            pfc.weight.copy_(weight)
        sampled = []
        for _ in range(steps):
            e = x.clone().requires_grad_(True)
            loss, stats = pfc(e, labels)
            loss.backward()
            cols = pfc.last_sampled_global.clone()
            sampled.append(cols)
            assert stats["num_sampled"] == max(round(rate * num_classes), positives.numel())
            assert cols.numel() == stats["num_sampled"]
            assert torch.equal(cols, cols.sort().values)
            assert bool(torch.isin(positives, cols).all())
            ref = reference(margin, weight, x, labels, columns=cols)
            torch.testing.assert_close(loss, ref["loss"], **TOL)
            torch.testing.assert_close(e.grad, ref["x_grad"], **TOL)
            torch.testing.assert_close(pfc.weight.grad, ref["w_grad"], **TOL)
            unsampled = torch.ones(num_classes, dtype=torch.bool)
            unsampled[cols] = False
            assert bool((pfc.weight.grad[unsampled] == 0).all())
            pfc.weight.grad = None
        return sampled

    first = run(seed=0, steps=2)
    again = run(seed=0, steps=2)
    other = run(seed=1, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])  # the generator advances every step
    assert not torch.equal(first[0], other[0])


def test_sampling_keeps_all_positives_when_they_exceed_the_rate() -> None:
    weight, x, labels = make_problem(20, [16], seed=5)
    labels = torch.arange(16)  # 16 positives > round(0.1 * 20) = 2
    pfc = PartialFC(build_margin("cosface"), D, 20, 0.1, rank=0, world_size=1)
    _, stats = pfc(x, labels)
    assert stats["num_sampled"] == 16
    assert torch.equal(pfc.last_sampled_global, torch.arange(16))


def test_autocast_matmul_dtype() -> None:
    weight, x, labels = make_problem(13, [9], seed=6)
    margin = build_margin("arcface")

    def build(compute_dtype: torch.dtype | None) -> PartialFC:
        pfc = PartialFC(margin, D, 13, 1.0, 0, 1, compute_dtype=compute_dtype)
        with torch.no_grad():
            pfc.weight.copy_(weight)
        return pfc

    fp32, _ = build(None)(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = build(None)(x, labels)
    explicit, _ = build(torch.bfloat16)(x, labels)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)  # autocast dtype was used
    assert auto.item() != fp32.item()  # ... and it really computed in bf16
    assert abs(auto.item() - fp32.item()) < 0.05 * abs(fp32.item())


def test_partialfc_rejects_bad_input() -> None:
    margin = build_margin("arcface")
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(margin, D, 10, 0.0, 0, 1)
    with pytest.raises(ValueError, match="sample_rate"):
        PartialFC(margin, D, 10, 1.5, 0, 1)
    with pytest.raises(ValueError, match="num_classes"):
        PartialFC(margin, D, 2, 1.0, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        PartialFC(margin, D, 10, 1.0, 3, 3)
    with pytest.raises(ValueError, match="embedding_size"):
        PartialFC(margin, 0, 10, 1.0, 0, 1)
    pfc = PartialFC(margin, D, 10, 1.0, 0, 1)
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match=r"labels.*got 10"):
        pfc(x, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match=r"labels.*got -1"):
        pfc(x, torch.tensor([0, -1, 3, 2]))
    with pytest.raises(ValueError, match="labels"):
        pfc(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="labels"):
        pfc(x, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="embeddings"):
        pfc(torch.randn(4, D + 1), torch.tensor([0, 1, 2, 3]))
    sharded = PartialFC(margin, D, 10, 1.0, 0, 2)
    with pytest.raises(RuntimeError, match="process group"):
        sharded(x, torch.tensor([0, 1, 2, 3]))


# ----------------------------------------------------------------------------------------------
# Multi-process (gloo, spawn)
# ----------------------------------------------------------------------------------------------

# (num_classes, per-rank batch sizes, margin name, ddp_scale); C is never divisible by W.
EXACT_CASES_2 = [
    (11, [8, 8], "arcface", True),
    (11, [8, 5], "cosface", False),
    (7, [3, 8], "combined", True),
]
EXACT_CASES_3 = [
    (10, [8, 8, 8], "arcface", True),
    (10, [8, 3, 6], "arcface", False),
    (11, [2, 8, 5], "normface", True),
    (10, [5, 0, 7], "cosface", True),  # a rank with an empty batch
]


def _margin(name: str) -> torch.nn.Module:
    if name == "combined":
        return build_margin("combined", s=64.0, m1=1.0, m2=0.3, m3=0.2)
    return build_margin(name)


def _check_all_gather(rank: int, world: int) -> None:
    """Variable sizes, row order and the backward sum (with and without ddp scaling)."""
    sizes = [rank + 1 for rank in range(world)]
    offset = sum(sizes[:rank])
    local = (torch.arange(sizes[rank], dtype=torch.float32) + offset).requires_grad_(True)
    n = sum(sizes)
    for ddp_scale in (False, True):
        out = all_gather_with_grad(local[:, None] * 1.0, ddp_scale=ddp_scale)  # [N, 1]
        assert torch.equal(out[:, 0], torch.arange(n, dtype=torch.float32))
        # Each rank weights the rows differently; the true gradient is the sum over ranks.
        coeff = torch.arange(n, dtype=torch.float32) * (rank + 1)
        (out[:, 0] * coeff).sum().backward()
        total = torch.arange(n, dtype=torch.float32) * sum(r + 1 for r in range(world))
        expected = total[offset : offset + sizes[rank]] * (world if ddp_scale else 1)
        assert torch.equal(local.grad, expected), (
            f"ddp_scale={ddp_scale}: {local.grad} != {expected}"
        )
        local.grad = None
    labels = torch.full((sizes[rank],), rank, dtype=torch.long)
    gathered = all_gather_no_grad(labels)
    assert gathered.tolist() == [r for r in range(world) for _ in range(sizes[r])]


def _worker_exact(rank: int, world: int, cases: list) -> None:
    _check_all_gather(rank, world)
    for num_classes, batch_sizes, margin_name, ddp_scale in cases:
        margin = _margin(margin_name)
        weight, x, labels = make_problem(num_classes, batch_sizes, seed=num_classes)
        start, count = class_range(num_classes, rank, world)
        lo = sum(batch_sizes[:rank])
        hi = lo + batch_sizes[rank]
        pfc = PartialFC(margin, D, num_classes, 1.0, rank, world, ddp_scale=ddp_scale)
        assert (pfc.class_start, pfc.num_local) == (start, count)
        with torch.no_grad():
            pfc.weight.copy_(weight[start : start + count])
        e = x[lo:hi].clone().requires_grad_(True)
        my_labels = labels[lo:hi].clone()
        loss, stats = pfc(e, my_labels)
        loss.backward()
        assert torch.equal(my_labels, labels[lo:hi])  # caller's labels untouched

        ref = reference(margin, weight, x, labels)
        case = f"rank {rank}/{world}, C={num_classes}, B={batch_sizes}, {margin_name}"
        assert_close(loss, ref["loss"], f"{case}: loss")
        assert_close(pfc.weight.grad, ref["w_grad"][start : start + count], f"{case}: weight grad")
        scale = world if ddp_scale else 1
        assert_close(e.grad, scale * ref["x_grad"][lo:hi], f"{case}: embedding grad")
        check_stats(stats, ref, num_sampled=count)
        assert torch.equal(pfc.last_sampled_global, torch.arange(start, start + count))


def _worker_sampled(rank: int, world: int, num_classes: int, batch_sizes: list[int]) -> None:
    rate = 0.4
    margin = build_margin("arcface")
    weight, x, labels = make_problem(num_classes, batch_sizes, seed=11)
    start, count = class_range(num_classes, rank, world)
    lo = sum(batch_sizes[:rank])
    hi = lo + batch_sizes[rank]
    local_pos = labels[(labels >= start) & (labels < start + count)].unique()

    def run(seed: int, steps: int) -> list[torch.Tensor]:
        pfc = PartialFC(margin, D, num_classes, rate, rank, world, seed=seed)
        with torch.no_grad():
            pfc.weight.copy_(weight[start : start + count])
        sampled = []
        for _ in range(steps):
            e = x[lo:hi].clone().requires_grad_(True)
            loss, stats = pfc(e, labels[lo:hi])
            loss.backward()
            mine = pfc.last_sampled_global.clone()
            sampled.append(mine)
            assert (
                mine.numel() == max(round(rate * count), local_pos.numel()) == stats["num_sampled"]
            )
            assert bool(((mine >= start) & (mine < start + count)).all())
            assert bool(torch.isin(local_pos, mine).all()), "a positive was not sampled"
            union = all_gather_no_grad(mine)  # sorted per rank, ranks in class order
            assert torch.equal(union, union.sort().values)
            ref = reference(margin, weight, x, labels, columns=union)
            assert_close(loss, ref["loss"], "sampled loss")
            assert_close(pfc.weight.grad, ref["w_grad"][start : start + count], "weight grad")
            assert_close(e.grad, world * ref["x_grad"][lo:hi], "embedding grad")
            check_stats(stats, ref, num_sampled=mine.numel())
            pfc.weight.grad = None
        return sampled

    first = run(seed=0, steps=2)
    again = run(seed=0, steps=2)
    other = run(seed=1, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], other[0])


@pytest.mark.timeout(120)
def test_two_processes_match_reference() -> None:
    run_distributed(_worker_exact, 2, EXACT_CASES_2)


def _worker_exact_then_sampled(rank: int, world: int) -> None:
    _worker_exact(rank, world, EXACT_CASES_3)
    _worker_sampled(rank, world, 100, [8, 3, 6])


@pytest.mark.timeout(120)
def test_three_processes_match_reference() -> None:
    # One spawn for both checks: starting 3 interpreters costs more than the checks.
    run_distributed(_worker_exact_then_sampled, 3)


@pytest.mark.timeout(120)
def test_two_processes_sampled_match_restricted_reference() -> None:
    run_distributed(_worker_sampled, 2, 101, [8, 6])
