"""Every head (and auxiliary loss) through PartialFC against a single-process full softmax.

For each head, in 1 (this process), 2, 3 and 4 gloo processes with C not divisible by W and
uneven per-rank batches: loss, the gradient wrt the embeddings, the class centres and every
head parameter, the head's state and the angle statistics equal a plain single-process
reference (normalise, matmul, ``head.logits`` on the full cosine matrix, ``F.cross_entropy``)
within 1e-5, at sample_rate 1 and, at sample_rate < 1, against the reference restricted to
the union of the sampled columns. Both backends are checked: the plain core and the fast
CPU backend (``FusedPartialFC``; its fused path for heads that have one), which also equal
each other under gradient accumulation. One spawn of 4 processes covers W = 4, 3 and 2
(sub-groups of the first ranks), so the whole file pays for a single set of interpreter
starts.

Stateful heads (CurricularFace's t, AdaFace's norm statistics, SphereFace's step, DiscFace's
displacement) give the same losses, states and weights for W = 1 and W = 3 over several
optimizer steps.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _backends import BACKENDS, build, partial_fc
from _dist import run_distributed

from partialfc import (
    MarginContext,
    ShardSpec,
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_inplace,
    all_reduce_value,
    build_margin,
    class_range,
    sync_grad,
)
from partialfc.fast import cpu_kernels
from partialfc.fast.collectives import GatherCapacity, all_gather_batch

D = 16
NUM_CLASSES = 23  # 23 % 2, 23 % 3, 23 % 4 != 0
BATCHES = {1: [11], 2: [7, 4], 3: [5, 3, 6], 4: [4, 5, 0, 6]}  # a rank with no rows at W=4
RATE = 0.5

HEADS: list[tuple[str, dict]] = [
    ("arcface", {}),
    ("arcface", {"easy_margin": True, "s": 32.0}),
    ("cosface", {}),
    ("normface", {"s": 16.0}),
    ("combined", {"s": 64.0, "m1": 1.2, "m2": 0.2, "m3": 0.1}),
    ("sphereface_arccos", {}),
    ("interclass_filtering", {"interclass_filtering_threshold": 0.3}),
    ("softmax", {}),
    ("sphereface", {}),
    ("lsoftmax", {"m": 2}),
    ("mv_softmax", {}),
    ("mv_arc_softmax", {}),
    ("curricularface", {}),
    ("npcface", {}),
    ("circleloss", {"s": 32.0}),
    ("adaface", {}),
    ("magface", {}),
    ("subcenter_arcface", {"k": 3}),
    ("discface", {}),
    (
        "arcface",
        {
            "aux": {
                "triplet": {"weight": 0.5},
                "center": {"weight": 0.01},
                "intra": {"weight": 0.3},
                "inter": {"weight": 0.2},
            }
        },
    ),
    (
        "cosface",
        {
            "aux": {
                "contrastive": {"weight": 0.5},
                "angular_triplet": {"weight": 0.5, "mining": "batch_hard"},
            }
        },
    ),
    ("none", {"aux": {"triplet": {"mining": "batch_hard"}, "center": {"weight": 0.1}}}),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP threads only add contention on the 2-core test machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-5
) -> None:
    """``torch.allclose`` with a readable message (torch.testing is slow to import in workers)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True):
        diff = (actual - expected).abs().max().item()
        raise AssertionError(f"{what}: max abs difference {diff:.3g}")


def make_problem(k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full centres [C*K, D], embeddings [N, D] (norms 2..60) and labels [N] (with repeats)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(NUM_CLASSES * k, D, generator=gen)
    classes = torch.randperm(NUM_CLASSES, generator=gen)[:7]  # few classes: positives repeat
    labels = classes[torch.randint(0, 7, (n,), generator=gen)]
    x = torch.randn(n, D, generator=gen)
    centre = F.normalize(weight[labels * k], dim=1)
    x = F.normalize(x + 2.5 * centre * torch.rand(n, 1, generator=gen), dim=1)
    x = x * (2.0 + 58.0 * torch.rand(n, 1, generator=gen))
    return weight, x, labels


def _bind(head: torch.nn.Module, group: object) -> None:
    head.bind(ShardSpec(NUM_CLASSES, 0, NUM_CLASSES, D, 0, 1, 0, torch.device("cpu"), group))


def reference(
    name: str,
    kw: dict,
    weight: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    columns: torch.Tensor | None,
    group: object,
    steps_before: int = 0,
) -> dict:
    """Single-process full (or column-restricted) softmax with the head, plain autograd."""
    head = build_margin(name, **kw)
    _bind(head, group)
    k = head.num_subcenters
    w = weight.clone().requires_grad_(True)
    e = x.clone().requires_grad_(True)
    norms = e.norm(dim=1)
    xh = e / norms[:, None]
    out: dict = {"head": head}
    loss = torch.zeros(())
    if head.uses_classifier:
        cls = torch.arange(NUM_CLASSES) if columns is None else columns
        rows_idx = (cls[:, None] * k + torch.arange(k)).reshape(-1)
        wu = w[rows_idx]
        wn = wu.norm(dim=1)
        wh = wu / wn[:, None]
        cos = xh @ wh.T
        if k > 1:
            cos = cos.view(len(x), -1, k).amax(dim=2)
        lookup = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
        lookup[cls] = torch.arange(cls.numel())
        target = lookup[labels]
        assert bool((target >= 0).all()), "a positive class was not sampled"
        rows = torch.arange(len(x))
        bias = head.bias[cls] if head.needs_bias else None
        ctx = MarginContext(
            target=target,
            rows=rows,
            cols=target,
            target_cos=cos[rows, target],
            labels=labels,
            cos=cos,
            feature_norms=norms,
            weight_norms=wn if k == 1 else None,
            bias=bias,
            embeddings=e,
            normalized=xh,
            step=torch.tensor(steps_before),
            training=True,
            group=group,
            target_centers_fn=lambda: wh[target],
            sampled_centers_fn=lambda: wh,
            gather_rows=lambda p, i: p[i],
        )
        loss = F.cross_entropy(head.logits(ctx), target)
        c = cos.detach()
        t_cos = c[rows, target]
        neg = c.clone()
        neg[rows, target] = -2.0
        out["target_deg"] = torch.rad2deg(torch.acos(t_cos.clamp(-1, 1)))
        out["hardest_deg"] = torch.rad2deg(torch.acos(neg.max(dim=1).values.clamp(-1, 1)))
        mask = neg > -1.5
        out["neg_deg"] = torch.rad2deg(torch.acos(c.clamp(-1, 1)))[mask].mean()
    else:
        empty = torch.zeros(0, dtype=torch.long)
        ctx = MarginContext(
            target=torch.full_like(labels, -1),
            rows=empty,
            cols=empty,
            target_cos=torch.zeros(0),
            labels=labels,
            feature_norms=norms,
            embeddings=e,
            normalized=xh,
            training=True,
            group=group,
            gather_rows=lambda p, i: p[i],
        )
    reg = head.regularizer(ctx)
    if reg is not None:
        loss = loss + reg
    for aux_name, fn in head.aux_losses.items():
        loss = loss + head.aux_weights[aux_name] * fn(ctx)
    loss.backward()
    out.update(loss=loss.detach(), x_grad=e.grad, w_grad=w.grad)
    out["param_grads"] = {n: p.grad for n, p in head.named_parameters()}
    return out


def _dense(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if grad is None:
        return torch.zeros_like(like)
    return grad.to_dense() if grad.is_sparse else grad


SHARDED_PARAMS = ("bias", "centers")  # per-class head parameters / buffers (shard rows)


def check_heads(
    rank: int, world: int, group: object, single: object, both_paths: bool = True
) -> None:
    """Every head at rate 1 and RATE on the fast CPU backend ("fused": heads with a fused
    path) and, with both_paths, on the plain core, vs the reference."""
    batches = BATCHES[world]
    n = sum(batches)
    lo = sum(batches[:rank])
    hi = lo + batches[rank]
    start, count = class_range(NUM_CLASSES, rank, world)
    for case, (name, kw) in enumerate(HEADS):
        for rate in (1.0, RATE):
            probe = build_margin(name, **kw)
            fused_options = [True, False] if both_paths else [True]
            for fused in fused_options:
                backend = "cpu_fused" if fused else "plain"
                where = f"{name} {kw} rate={rate} {backend} rank {rank}/{world}"
                k = probe.num_subcenters
                weight, x, labels = make_problem(k, n, seed=100 + case)
                head = build_margin(name, **kw)
                pfc = partial_fc(
                    head,
                    D,
                    NUM_CLASSES,
                    rate,
                    rank,
                    world,
                    group=group,
                    seed=case,
                    update="sampled" if rate < 1 else "dense",
                    fused=fused,
                    low_memory=fused,
                )
                if head.uses_classifier:
                    with torch.no_grad():
                        pfc.weight.copy_(weight[start * k : (start + count) * k])
                e = x[lo:hi].clone().requires_grad_(True)
                my_labels = labels[lo:hi].clone()
                loss, stats = pfc(e, my_labels)
                loss.backward()
                assert torch.equal(my_labels, labels[lo:hi]), f"{where}: labels modified"
                # The mean embedding norm is the global batch's (every rank's rows).
                assert_close(
                    stats.embedding_norm_mean, x.norm(dim=1).mean(), f"{where}: embedding norm"
                )
                columns = None
                if rate < 1 and head.uses_classifier:
                    columns = all_gather_no_grad(pfc.last_sampled_global, group)
                    assert torch.equal(columns, columns.sort().values)
                ref = reference(name, kw, weight, x, labels, columns, single)
                assert_close(loss.detach(), ref["loss"], f"{where}: loss")
                assert_close(_dense(e.grad, e), world * ref["x_grad"][lo:hi], f"{where}: x grad")
                if head.uses_classifier:
                    assert_close(
                        _dense(pfc.weight.grad, pfc.weight),
                        ref["w_grad"][start * k : (start + count) * k],
                        f"{where}: weight grad",
                    )
                    assert_close(
                        stats.angles.target_angle_mean_deg,
                        ref["target_deg"].mean(),
                        f"{where}: target angle",
                    )
                    assert_close(
                        stats.angles.target_angle_p50_deg,
                        ref["target_deg"].quantile(0.5),
                        f"{where}: target angle p50",
                    )
                    assert_close(
                        stats.angles.hardest_negative_angle_mean_deg,
                        ref["hardest_deg"].mean(),
                        f"{where}: hardest negative angle",
                    )
                    assert_close(
                        stats.angles.negative_angle_mean_deg, ref["neg_deg"], f"{where}: neg angle"
                    )
                    assert stats.angles.target_angles_deg.shape == (n,)
                for pname, param in head.named_parameters():
                    rgrad = ref["param_grads"][pname]
                    if pname.endswith(SHARDED_PARAMS):
                        rgrad = rgrad[start : start + count]
                    assert_close(_dense(param.grad, param), rgrad, f"{where}: grad of {pname}")
                for bname, buf in head.named_buffers():
                    rbuf = ref["head"].get_buffer(bname)
                    if bname.endswith(SHARDED_PARAMS):
                        rbuf = rbuf[start : start + count]
                    assert_close(buf.double(), rbuf.double(), f"{where}: {bname}")


def check_stateful_same_for_w1(rank: int, world: int, group: object, single: object) -> None:
    """Several optimizer steps of stateful heads: W = world equals W = 1 (singleton group), on
    both backends."""
    cases = [
        ("curricularface", {}),
        ("adaface", {}),
        ("sphereface", {}),
        ("discface", {}),
        ("magface", {}),
        ("arcface", {"aux": {"center": {"weight": 0.1}}}),
    ]
    batches = BATCHES[world]
    lo = sum(batches[:rank])
    hi = lo + batches[rank]
    start, count = class_range(NUM_CLASSES, rank, world)
    for (name, kw), backend in itertools.product(cases, BACKENDS):
        weight, _, _ = make_problem(1, sum(batches), seed=7)
        sharded = build(backend, build_margin(name, **kw), D, NUM_CLASSES, 1.0, rank, world, group)
        whole = build(backend, build_margin(name, **kw), D, NUM_CLASSES, 1.0, 0, 1, single)
        with torch.no_grad():
            sharded.weight.copy_(weight[start : start + count])
            whole.weight.copy_(weight)
        opt_s = sharded.build_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
        opt_w = whole.build_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
        for step in range(3):
            _, x, labels = make_problem(1, sum(batches), seed=50 + step)
            losses = []
            for pfc, opt, rows in ((sharded, opt_s, slice(lo, hi)), (whole, opt_w, slice(None))):
                opt.zero_grad(set_to_none=True)
                loss, _ = pfc(x[rows].clone().requires_grad_(True), labels[rows])
                loss.backward()
                opt.step()
                losses.append(loss.detach())
            where = f"{name} ({backend}) step {step}"
            assert_close(losses[0], losses[1], f"{where}: loss W={world} vs W=1")
        name = f"{name} ({backend})"
        assert_close(sharded.weight.detach(), whole.weight.detach()[start : start + count], name)
        for bname, buf in sharded.margin.named_buffers():
            other = whole.margin.get_buffer(bname)
            if bname.endswith(SHARDED_PARAMS):
                other = other[start : start + count]
            assert_close(buf.double(), other.double(), f"{name} {bname}")
        assert int(sharded.num_steps) == int(whole.num_steps) == 3
        for pname, param in sharded.margin.named_parameters():
            other = whole.margin.get_parameter(pname).detach()
            if pname.endswith(SHARDED_PARAMS):
                other = other[start : start + count]
            assert_close(param.detach(), other, f"{name} {pname}")


def check_all_gather(rank: int, world: int, group: object) -> None:
    """Variable sizes, row order and the backward sum (with and without DDP scaling)."""
    sizes = [r + 1 for r in range(world)]
    offset = sum(sizes[:rank])
    local = (torch.arange(sizes[rank], dtype=torch.float32) + offset).requires_grad_(True)
    n = sum(sizes)
    for ddp_scale in (False, True):
        out = all_gather_with_grad(local[:, None] * 1.0, group, ddp_scale=ddp_scale)  # [N, 1]
        assert torch.equal(out[:, 0], torch.arange(n, dtype=torch.float32))
        # Each rank weights the rows differently; the true gradient is the sum over ranks.
        coeff = torch.arange(n, dtype=torch.float32) * (rank + 1)
        (out[:, 0] * coeff).sum().backward()
        total = torch.arange(n, dtype=torch.float32) * sum(r + 1 for r in range(world))
        expected = total[offset : offset + sizes[rank]] * (world if ddp_scale else 1)
        assert torch.equal(local.grad, expected), f"ddp_scale={ddp_scale}: {local.grad}"
        local.grad = None
    labels = torch.full((sizes[rank],), rank, dtype=torch.long)
    gathered = all_gather_no_grad(labels, group)
    assert gathered.tolist() == [r for r in range(world) for _ in range(sizes[r])]
    # Embeddings and labels in one collective: bit-exact labels (large ids, and bit patterns
    # that are NaNs when read as bf16), the embeddings' gradient as above; a rank may have
    # no rows (sizes 0).
    big = (1 << 40) + 0x7FC0 + rank
    for dtype in (torch.float32, torch.bfloat16):
        rows = sizes[rank] - 1 if rank == 0 else sizes[rank]  # rank 0 sends nothing
        emb = (torch.arange(rows, dtype=dtype) + rank)[:, None].repeat(1, 3).requires_grad_(True)
        ids = torch.full((rows,), big, dtype=torch.long)
        out, out_ids = all_gather_batch(emb, ids, group, ddp_scale=False)
        counts = [sizes[r] - 1 if r == 0 else sizes[r] for r in range(world)]
        assert out_ids.tolist() == [
            (1 << 40) + 0x7FC0 + r for r in range(world) for _ in range(counts[r])
        ]
        expected_rows = torch.cat([torch.arange(c, dtype=dtype) + r for r, c in enumerate(counts)])
        assert torch.equal(out[:, 0], expected_rows) and out.dtype == dtype
        (out.float().sum(dim=1) * (rank + 1)).sum().backward()
        assert torch.equal(emb.grad, torch.full_like(emb, float(sum(range(1, world + 1)))))
    # With a GatherCapacity the size exchange is skipped once the largest batch is known;
    # a batch above it makes every rank exchange sizes again (one extra collective).
    capacity, calls = GatherCapacity(), []
    real_all_gather = dist.all_gather

    def counting(*args, **kwargs):
        calls.append(1)
        return real_all_gather(*args, **kwargs)

    dist.all_gather = counting
    try:
        for step, (grow, expected_calls) in enumerate([(0, 2), (0, 1), (-1, 1), (2, 2), (0, 1)]):
            rows = max(0, sizes[rank] + (grow if rank == world - 1 else 0))
            emb = torch.randn(rows, 4)
            ids = torch.arange(rows) + 100 * rank + step
            calls.clear()
            out, out_ids = all_gather_batch(emb, ids, group, capacity=capacity)
            assert len(calls) == expected_calls, (step, len(calls))
            counts = [sizes[r] + (grow if r == world - 1 else 0) for r in range(world)]
            assert out_ids.tolist() == [
                i + 100 * r + step for r in range(world) for i in range(max(0, counts[r]))
            ]
            assert out.shape == (sum(max(0, c) for c in counts), 4)
        assert capacity.rows == world + 2  # the last rank's grown batch
    finally:
        dist.all_gather = real_all_gather
    # all_reduce_value: value summed, gradient local; sync_grad: gradient summed.
    x = torch.tensor([float(rank + 1)], requires_grad=True)
    y = all_reduce_value(x * 2.0, group)
    assert y.item() == 2.0 * sum(range(1, world + 1))
    y.backward()
    assert x.grad.item() == 2.0
    p = torch.ones(2, requires_grad=True)
    (sync_grad(p, group) * (rank + 1)).sum().backward()
    assert p.grad.tolist() == [float(sum(range(1, world + 1)))] * 2


def check_sampling(rank: int, world: int, group: object, single: object) -> None:
    """Seeded, reproducible sampling; positives kept; sizes; no-DDP-scaling gradients."""
    batches = BATCHES[world]
    n = sum(batches)
    lo = sum(batches[:rank])
    hi = lo + batches[rank]
    start, count = class_range(NUM_CLASSES, rank, world)
    weight, x, labels = make_problem(1, n, seed=11)
    local_pos = labels[(labels >= start) & (labels < start + count)].unique()

    def run(seed: int, steps: int) -> list[torch.Tensor]:
        pfc = partial_fc(
            build_margin("arcface"),
            D,
            NUM_CLASSES,
            RATE,
            rank,
            world,
            group,
            seed=seed,
            ddp_scale=False,
        )
        with torch.no_grad():
            pfc.weight.copy_(weight[start : start + count])
        sampled = []
        for _ in range(steps):
            e = x[lo:hi].clone().requires_grad_(True)
            loss, stats = pfc(e, labels[lo:hi])
            loss.backward()
            mine = pfc.last_sampled_global.clone()
            sampled.append(mine)
            assert mine.numel() == max(round(RATE * count), local_pos.numel())
            assert mine.numel() == stats.num_sampled
            assert bool(((mine >= start) & (mine < start + count)).all())
            assert bool(torch.isin(local_pos, mine).all()), "a positive was not sampled"
            union = all_gather_no_grad(mine, group)
            ref = reference("arcface", {}, weight, x, labels, union, single)
            assert_close(loss.detach(), ref["loss"], "sampled loss")
            assert_close(e.grad, ref["x_grad"][lo:hi], "embedding grad without DDP scaling")
        return sampled

    first = run(seed=0, steps=2)
    again = run(seed=0, steps=2)
    other = run(seed=1, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # The generator advances every step, and the seed matters (on some rank: a small shard
    # whose positives fill the budget has nothing left to choose).
    differs = torch.tensor(
        [float(not torch.equal(first[0], first[1])), float(not torch.equal(first[0], other[0]))]
    )
    all_reduce_inplace(differs, "max", group)
    assert differs.tolist() == [1.0, 1.0]


def check_backends_accumulate_alike(rank: int, world: int, group: object) -> None:
    """Two micro-batches accumulated into one gradient: the fast CPU backend equals the plain
    core (loss of each micro-batch, the embeddings' and the centres' accumulated gradients),
    with and without sampling."""
    batches = BATCHES[world]
    lo, hi = sum(batches[:rank]), sum(batches[: rank + 1])
    for rate in (1.0, RATE):
        weight, x, labels = make_problem(1, 2 * sum(batches), seed=33)
        results = []
        for fused in (True, False):
            pfc = partial_fc(
                build_margin("arcface"), D, NUM_CLASSES, rate, rank, world, group, seed=2,
                update="sampled" if rate < 1 else "dense", fused=fused,
            )  # fmt: skip
            start = pfc.class_start
            with torch.no_grad():
                pfc.weight.copy_(weight[start : start + pfc.num_local])
            e = x.clone().requires_grad_(True)
            losses = []
            for micro in (0, 1):  # rows [lo, hi) of each half of the batch
                off = micro * sum(batches)
                loss, _ = pfc(e[off + lo : off + hi], labels[off + lo : off + hi])
                (loss / 2).backward()
                losses.append(loss.detach())
            results.append((torch.stack(losses), e.grad, _dense(pfc.weight.grad, pfc.weight)))
        where = f"accumulation rate={rate} rank {rank}/{world}"
        for what, fast, plain in zip(("loss", "x grad", "weight grad"), *results, strict=True):
            assert_close(fast, plain, f"{where}: {what}")


def _worker(rank: int, world: int, kernels: bool) -> None:
    assert world == 4
    cpu_kernels.set_enabled(kernels)
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    subgroups = {4: None, 3: dist.new_group([0, 1, 2]), 2: dist.new_group([0, 1])}
    for w in (4, 3, 2):
        if rank < w:
            group = subgroups[w]
            check_all_gather(rank, w, group)
            # The plain core with the kernels' run; the torch-op run checks the fast backend.
            check_heads(rank, w, group, singles[rank], both_paths=kernels)
            check_backends_accumulate_alike(rank, w, group)
            check_sampling(rank, w, group, singles[rank])
            if w == 3:
                check_stateful_same_for_w1(rank, w, group, singles[rank])
        dist.barrier()


def test_single_process_heads_match_reference() -> None:
    check_heads(0, 1, None, None)
    check_backends_accumulate_alike(0, 1, None)
    check_sampling(0, 1, None, None)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("kernels", [True, False], ids=["fused-cpu-kernels", "torch-ops"])
def test_distributed_heads_match_reference(kernels: bool) -> None:
    """W = 4, 3 and 2 (sub-groups of one 4-process spawn): every head on the plain core and
    on the fast CPU backend with its fused kernels, and the fast backend on torch ops."""
    run_distributed(_worker, 4, kernels)


def test_discface_displacement_and_fused_paths_agree() -> None:
    """Fused and generic paths give the same step; DiscFace's displacement learns."""
    weight, x, labels = make_problem(1, 11, seed=3)
    results = []
    for fused in (True, False):
        pfc = partial_fc(build_margin("discface"), D, NUM_CLASSES, 1.0, 0, 1, fused=fused)
        with torch.no_grad():
            pfc.weight.copy_(weight)
        opt = pfc.build_optimizer("sgd", lr=1.0, momentum=0.0, weight_decay=0.0)
        for _ in range(2):
            opt.zero_grad()
            loss, stats = pfc(x, labels)
            loss.backward()
            opt.step()
        xi = pfc.margin.displacement.detach()
        results.append((loss.detach(), xi.clone(), pfc.weight.detach().clone()))
        assert xi.abs().sum() > 0 and stats.losses["regularizer"] > 0
    assert_close(results[0][0], results[1][0], "loss")
    assert_close(results[0][1], results[1][1], "displacement")
    assert_close(results[0][2], results[1][2], "weights")
    assert math.isfinite(float(results[0][0]))


def _overlap_worker(rank: int, world: int) -> None:
    """The centres' gradient is computed inside the embeddings' gather backward (while the
    all-to-all is in flight), before the shard handle's node asks for it; the gradients are
    the same as without the deferral."""
    import partialfc.fast.partial_fc as pfc_module
    from partialfc.fast.buffers import DeferredGrad

    order: list[str] = []

    class Recording(DeferredGrad):
        def run(self) -> None:
            if self._fn is not None:
                order.append("run")
            super().run()

        def take(self) -> torch.Tensor | None:
            order.append("take")
            return super().take()

    weight, x, labels = make_problem(1, 7 * world, seed=21)
    grads = []
    for deferral in (True, False):
        pfc = partial_fc(build_margin("arcface"), D, NUM_CLASSES, 0.5, rank, world, seed=3)
        with torch.no_grad():
            pfc.weight.copy_(weight[pfc.class_start : pfc.class_start + pfc.num_local])
        e = x[7 * rank : 7 * (rank + 1)].clone().requires_grad_(True)
        # The same sampled rows both times; without deferral the direct gradient.
        pfc.sample_generator.manual_seed(5 + rank)
        saved = pfc_module.DeferredGrad, pfc_module.shard_handle
        pfc_module.DeferredGrad = Recording if deferral else lambda: None
        if not deferral:
            pfc_module.shard_handle = lambda weight, deferred: None
        try:
            pfc(e, labels[7 * rank : 7 * (rank + 1)])[0].backward()
        finally:
            pfc_module.DeferredGrad, pfc_module.shard_handle = saved
        grads.append((e.grad.clone(), pfc.weight.grad.to_dense().clone()))
    assert order == ["run", "take"], order
    assert_close(grads[0][0], grads[1][0], "embedding gradient")
    assert_close(grads[0][1], grads[1][1], "centre gradient")


def test_centre_gradient_overlaps_the_embedding_exchange() -> None:
    run_distributed(_overlap_worker, 2)
