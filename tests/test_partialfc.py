"""PartialFC in one process: exactness against a plain softmax, gradcheck of the fused and
generic kernels, sampling, initialisation, mixed precision, workspace safety, bad input.

Every test of behaviour the two backends share runs on both, the plain core and cpu_fused
(the ``backend`` fixture); the tests of the fast backend's internals (its workspace buffers,
kernels, the logits kept in the gradient buffer) build ``"cpu_fused"`` by name and say so.
There is no default backend here (``_backends.build``), so a new test names the one it runs.

Multi-process tests (every head, W = 2, 3, 4) are in ``test_partialfc_dist.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _backends import BACKENDS, build

from partialfc import (
    PartialFC,
    StepStats,
    all_gather_no_grad,
    all_gather_with_grad,
    build_margin,
    distributed_cross_entropy,
    init_class_centers,
)
from partialfc.fast.rows import normalize_rows
from partialfc.ops import NORM_EPS


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP threads only add contention on the 2-core test machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The Partial FC backend under test: each test that takes it runs on both."""
    return request.param


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


def check_stats(stats: StepStats, ref: dict, num_sampled: int) -> None:
    assert_close(stats.angles.target_angle_mean_deg, ref["target_deg"].mean(), "target angle mean")
    assert_close(
        stats.angles.target_angle_std_deg,
        ref["target_deg"].std(correction=0),
        "target angle std",
        rtol=1e-4,
        atol=1e-4,
    )
    hardest = stats.angles.hardest_negative_angle_mean_deg
    assert_close(hardest, ref["neg_deg"].mean(), "hardest negative angle")
    assert stats.num_sampled == num_sampled


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
    [
        ("arcface", {}),
        ("cosface", {}),
        ("normface", {}),
        ("combined", {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2}),
    ],
)
@pytest.mark.parametrize(
    ("backend", "low_memory"),  # low_memory: cpu_fused's workspace, nothing to the plain core
    [("plain", True), ("cpu_fused", True), ("cpu_fused", False)],
)
def test_single_process_matches_reference(
    name: str, kwargs: dict, backend: str, low_memory: bool
) -> None:
    margin = build_margin(name, **kwargs)
    weight, x, labels = make_problem(11, [12], seed=1)
    pfc = build(backend, margin, D, 11, 1.0, rank=0, world_size=1, low_memory=low_memory)
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


GRADCHECK_HEADS = [
    ("arcface", {"s": 8.0}),
    ("cosface", {"s": 8.0}),
    ("combined", {"s": 8.0, "m1": 1.35, "m2": 0.1, "m3": 0.05}),
    ("magface", {"s": 8.0, "l_a": 0.5, "u_a": 3.0}),
    ("adaface", {"s": 8.0}),
    ("sphereface", {"s": 4.0}),
    ("curricularface", {"s": 8.0}),
    ("subcenter_arcface", {"s": 8.0, "k": 2}),
]


@pytest.mark.parametrize(("name", "kwargs"), GRADCHECK_HEADS)
def test_partialfc_gradcheck_float64(name: str, kwargs: dict, backend: str) -> None:
    """Both backends against finite differences (cpu_fused takes its fused kernels for the
    first five heads, the plain core's path for the rest), wrt embeddings and class centres,
    with target angles near 0 and near pi (theta + m > pi) in the batch."""
    head = build_margin(name, **kwargs)
    k = head.num_subcenters
    num_classes = 7
    weight, x, labels = make_problem(num_classes * k, [6], seed=2)
    labels = labels % num_classes
    centre = F.normalize(weight[labels * k], dim=1)
    x = x.clone()
    x[0] = 1.7 * centre[0] + 1e-3 * x[0]  # theta ~ 0
    x[1] = -2.3 * centre[1] + 1e-3 * x[1]  # theta ~ pi
    x[2] = -1.1 * centre[2] + 0.2 * x[2]  # theta + 0.5 > pi
    pfc = build(backend, head, D, num_classes, 1.0, 0, 1, low_memory=False, update="dense")
    pfc = pfc.double()
    pfc.eval()  # stateful heads must not move between the gradcheck evaluations
    with torch.no_grad():
        pfc.weight.copy_(weight.double())
    e = x.double().requires_grad_(True)
    if name != "adaface":  # AdaFace stops the gradient through the feature norm by design
        assert torch.autograd.gradcheck(lambda inp: pfc(inp, labels)[0], (e,), atol=1e-5)
    w0 = pfc.weight.detach().clone().requires_grad_(True)

    def loss_of_weight(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(pfc, {"weight": w}, (e.detach(), labels))[0]

    assert torch.autograd.gradcheck(loss_of_weight, (w0,), atol=1e-5)


def test_low_memory_backward_is_guarded() -> None:
    """cpu_fused only: its low_memory workspace (reused buffers a second backward or forward
    would overwrite); the plain core keeps no such buffers."""
    weight, x, labels = make_problem(9, [6 + D], seed=3)
    pfc = build("cpu_fused", build_margin("arcface"), D, 9, 1.0, 0, 1, low_memory=True)
    e = x.clone().requires_grad_(True)
    loss, _ = pfc(e, labels)
    loss.backward(retain_graph=True)
    once_e, once_w = e.grad.clone(), pfc.weight.grad.clone()
    # Without sampling and with N > 3D/4 the backward only reads the workspace: a second one
    # (retain_graph) accumulates the same gradient again, into a new buffer.
    loss.backward()
    torch.testing.assert_close(e.grad, 2 * once_e)
    torch.testing.assert_close(pfc.weight.grad, 2 * once_w)
    # With sampling the backward writes the gradient over the gathered rows, and without
    # sampling and N <= 3D/4 over the logits (kept in the gradient buffer): a second backward of
    # the same graph fails loudly instead of reading the gradient as rows or logits.
    for rate, rows in ((0.5, len(labels)), (1.0, 6)):
        e.grad = None
        one_pass = build("cpu_fused", build_margin("arcface"), D, 9, rate, 0, 1, low_memory=True)
        loss, _ = one_pass(e[:rows], labels[:rows])
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    e.grad = None
    pfc.weight.grad = None
    # A second forward reuses the workspace: backward of the first graph must fail loudly.
    first, _ = pfc(e, labels)
    pfc(e, labels)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()
    # The ordinary loop (forward, backward, forward, backward) is fine.
    for _ in range(2):
        loss, _ = pfc(e, labels)
        loss.backward()
    assert pfc.workspace is not None and pfc.workspace.nbytes() > 0


def test_variable_batch_size_and_stats(backend: str) -> None:
    """The last batch of an epoch is smaller; every step matches the reference."""
    margin = build_margin("arcface")
    weight, x, labels = make_problem(13, [10], seed=8)
    pfc = build(backend, margin, D, 13, 1.0, 0, 1, hist_size=4)
    with torch.no_grad():
        pfc.weight.copy_(weight)
    for n in (10, 3, 10):
        e = x[:n].clone().requires_grad_(True)
        loss, stats = pfc(e, labels[:n])
        loss.backward()
        ref = reference(margin, weight, x[:n], labels[:n])
        assert_close(loss.detach(), ref["loss"], f"loss with B={n}")
        assert_close(e.grad, ref["x_grad"], f"x grad with B={n}")
        check_stats(stats, ref, num_sampled=13)
        assert_close(stats.embedding_norm_mean, x[:n].norm(dim=1).mean(), "embedding norm")
        q = torch.quantile(ref["target_deg"], torch.tensor([0.1, 0.5, 0.9]))
        for key, value in zip(("p10", "p50", "p90"), q, strict=True):
            got = getattr(stats.angles, f"target_angle_{key}_deg")
            assert_close(got, value, key, rtol=1e-4, atol=1e-4)
        assert 1 <= stats.angles.target_angles_deg.numel() <= 4
        pfc.weight.grad = None
    assert int(pfc.num_steps) == 3
    pfc.eval()
    pfc(x, labels)
    assert int(pfc.num_steps) == 3  # evaluation does not advance the step


def test_init_identical_for_every_world_size(backend: str) -> None:
    num_classes = 3000  # spans several INIT_BLOCK_ROWS blocks
    full = build(backend, build_margin("arcface"), D, num_classes, 1.0, 0, 1, seed=7).weight
    full = full.detach()
    assert full.shape == (num_classes, D)
    assert abs(full.std().item() - 0.01) < 5e-4
    torch.testing.assert_close(full, init_class_centers(0, num_classes, D, seed=7, std=0.01))
    for world in (2, 3, 8):
        shards = [
            build(backend, build_margin("arcface"), D, num_classes, 1.0, r, world, seed=7).weight
            for r in range(world)
        ]
        assert torch.equal(torch.cat([s.detach() for s in shards]), full)
    other = build(backend, build_margin("arcface"), D, num_classes, 1.0, 0, 1, seed=8).weight
    assert not torch.equal(other.detach(), full)
    # Sub-centres: row class * K + k, the same matrix for every world size too.
    head = build_margin("subcenter_arcface", k=3)
    sub = build(backend, head, D, 1001, 1.0, 0, 1, seed=7).weight
    assert sub.shape == (3003, D)
    shards = [
        build(backend, build_margin("subcenter_arcface", k=3), D, 1001, 1.0, r, 3, seed=7).weight
        for r in range(3)
    ]
    assert torch.equal(torch.cat([s.detach() for s in shards]), sub.detach())


def test_sampling_single_process(backend: str) -> None:
    num_classes, rate = 60, 0.25
    margin = build_margin("arcface")
    weight, x, labels = make_problem(num_classes, [10], seed=4)
    positives = labels.unique()

    def run(seed: int, steps: int) -> list[torch.Tensor]:
        pfc = build(backend, margin, D, num_classes, rate, rank=0, world_size=1, seed=seed)
        with torch.no_grad():
            pfc.weight.copy_(weight)
        sampled = []
        for _ in range(steps):
            e = x.clone().requires_grad_(True)
            loss, stats = pfc(e, labels)
            loss.backward()
            cols = pfc.last_sampled_global.clone()
            sampled.append(cols)
            assert stats.num_sampled == max(round(rate * num_classes), positives.numel())
            assert cols.numel() == stats.num_sampled
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


def test_sampling_keeps_all_positives_when_they_exceed_the_rate(backend: str) -> None:
    weight, x, labels = make_problem(20, [16], seed=5)
    labels = torch.arange(16)  # 16 positives > round(0.1 * 20) = 2
    pfc = build(backend, build_margin("cosface"), D, 20, 0.1, rank=0, world_size=1)
    _, stats = pfc(x, labels)
    assert stats.num_sampled == 16
    assert torch.equal(pfc.last_sampled_global, torch.arange(16))


@pytest.mark.parametrize("name", ["arcface", "circleloss"])
def test_autocast_bf16_logits_low_precision_softmax_fp32(name: str, backend: str) -> None:
    weight, x, labels = make_problem(13, [9], seed=6)

    def make(compute_dtype: torch.dtype | None) -> PartialFC:
        pfc = build(backend, build_margin(name), D, 13, 1.0, 0, 1, compute_dtype=compute_dtype)
        with torch.no_grad():
            pfc.weight.copy_(weight)
        return pfc

    fp32, _ = make(None)(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e = x.clone().requires_grad_(True)
        auto, _ = make(None)(e.bfloat16(), labels)  # a bf16 backbone output
    auto.backward()
    explicit, _ = make(torch.bfloat16)(x.bfloat16(), labels)
    assert auto.dtype == torch.float32
    assert torch.isfinite(auto) and torch.isfinite(e.grad).all()
    torch.testing.assert_close(auto, explicit, rtol=1e-6, atol=1e-6)  # autocast dtype was used
    assert auto.item() != fp32.item()  # ... and it really computed in bf16
    assert abs(auto.item() - fp32.item()) < 0.05 * abs(fp32.item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a CUDA device")
def test_autocast_fp16_cuda(backend: str) -> None:
    weight, x, labels = make_problem(13, [9], seed=6)
    pfc = build(backend, build_margin("arcface"), D, 13, 0.5, 0, 1, device="cuda")
    with torch.no_grad():
        pfc.weight.copy_(weight.cuda())
    fp32, _ = pfc(x.cuda(), labels.cuda())
    e = x.cuda().requires_grad_(True)
    with torch.autocast("cuda", dtype=torch.float16):
        loss, _ = pfc(e.half(), labels.cuda())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(e.grad).all() and torch.isfinite(pfc.weight.grad).all()
    assert abs(loss.item() - fp32.item()) < 0.05 * abs(fp32.item())


def test_partialfc_rejects_bad_input(backend: str) -> None:
    margin = build_margin("arcface")
    with pytest.raises(ValueError, match="sample_rate"):
        build(backend, margin, D, 10, 0.0, 0, 1)
    with pytest.raises(ValueError, match="sample_rate"):
        build(backend, margin, D, 10, 1.5, 0, 1)
    with pytest.raises(ValueError, match="num_classes"):
        build(backend, margin, D, 2, 1.0, 0, 3)
    with pytest.raises(ValueError, match="rank"):
        build(backend, margin, D, 10, 1.0, 3, 3)
    with pytest.raises(ValueError, match="embedding_size"):
        build(backend, margin, 0, 10, 1.0, 0, 1)
    pfc = build(backend, margin, D, 10, 1.0, 0, 1)
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
    sharded = build(backend, margin, D, 10, 1.0, 0, 2)
    with pytest.raises(RuntimeError, match="process group"):
        sharded(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="update"):
        build(backend, margin, D, 10, 1.0, 0, 1, update="lazy")
    with pytest.raises(ValueError, match="MarginHead"):
        build(backend, torch.nn.Identity(), D, 10, 1.0, 0, 1)
    with pytest.raises(ValueError, match="stats_columns"):
        build(backend, margin, D, 10, 1.0, 0, 1, stats_columns=0)


@pytest.mark.parametrize(
    ("n", "k", "num_pos"),
    [(10, 3, 0), (10, 10, 2), (1000, 999, 5), (1000, 100, 100), (50_000, 5_000, 256), (7, 1, 0)],
)
def test_largest_sorted_is_the_sorted_top_k(n: int, k: int, num_pos: int) -> None:
    """The thresholded selection used for sampling picks exactly topk's set, in order."""
    from partialfc.sampling import _largest_sorted

    gen = torch.Generator().manual_seed(n + k)
    keys = torch.rand(n, generator=gen)
    keys[torch.randperm(n, generator=gen)[:num_pos]] = 2.0
    expected = torch.topk(keys, k).indices.sort().values
    assert torch.equal(_largest_sorted(keys, k, num_pos), expected)


@pytest.mark.parametrize("update", ["sampled", "dense"])
@pytest.mark.parametrize("rate", [1.0, 0.5])
def test_reused_gradient_buffer_never_overwrites_a_held_gradient(
    update: str, rate: float, backend: str
) -> None:
    """Accumulating two backwards sums them, and a cleared gradient the caller still holds
    stays intact, on both backends. cpu_fused keeps the centres' gradient in a workspace
    buffer reused across steps (at rate < 1 the gathered rows' buffer): the checks of that
    reuse are its alone. (Accumulation itself may update ``.grad`` in place: torch's own
    semantics.)"""
    torch.manual_seed(0)
    pfc = build(backend, build_margin("arcface"), 16, 40, rate, 0, 1, update=update)
    x1, x2 = torch.randn(6, 16), torch.randn(6, 16)
    y1, y2 = torch.randint(0, 40, (6,)), torch.randint(0, 40, (6,))
    draws = {}  # the same sampled rows every time a batch comes back

    def backward(x: torch.Tensor, y: torch.Tensor, key: int) -> None:
        draws.setdefault(key, pfc.sample_generator.get_state())
        pfc.sample_generator.set_state(draws[key])
        pfc(x, y)[0].backward()

    def grad_of(x: torch.Tensor, y: torch.Tensor, key: int) -> torch.Tensor:
        pfc.weight.grad = None
        backward(x, y, key)
        return pfc.weight.grad.to_dense().clone()

    g1, g2 = grad_of(x1, y1, 1), grad_of(x2, y2, 2)
    pfc.weight.grad = None
    backward(x1, y1, 1)
    backward(x2, y2, 2)
    torch.testing.assert_close(pfc.weight.grad.to_dense(), g1 + g2, rtol=1e-5, atol=1e-6)
    kept = pfc.weight.grad
    kept_before = kept.to_dense().clone()
    pfc.weight.grad = None  # cleared, but the caller still holds the tensor
    backward(x1, y1, 1)
    assert torch.equal(kept.to_dense(), kept_before)
    torch.testing.assert_close(pfc.weight.grad.to_dense(), g1, rtol=1e-5, atol=1e-6)
    if backend == "plain":
        return  # no workspace
    # With nothing holding the last gradient, the next step reuses the same buffer: the
    # gathered rows' (rate < 1) or the gradient's, which at rate 1 (N <= 3D/4) also holds the
    # logits (no separate logits buffer).
    assert pfc.workspace is not None
    name = "rows" if rate < 1 else "grad"
    before = pfc.workspace._buffers[name].data_ptr()
    pfc.weight.grad = None
    kept = None
    backward(x2, y2, 2)
    assert pfc.workspace._buffers[name].data_ptr() == before
    assert ("logits" in pfc.workspace._buffers) == (rate < 1)


@pytest.mark.parametrize("batch", [16, 40, 56])
def test_logits_in_the_gradient_buffer_match_the_generic_path(batch: int) -> None:
    """Without sampling and with N <= 3D/4 the logits are kept transposed in the tail of the
    centres' gradient buffer, which the backward fills block by block (here two blocks and a
    copied rest at N = 16, more at N = 40; N = 56 > 48 takes the separate logits buffer):
    loss and gradients equal the generic autograd path (1e-5) and are as close to a float64
    run of it, and the gradient is that buffer. cpu_fused's internals, with the plain core
    (float32 and float64) as the reference."""
    d, classes = 64, 3000
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, d, generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)
    results = []
    runs = (("cpu_fused", torch.float32), ("plain", torch.float32), ("plain", torch.float64))
    for backend, dtype in runs:
        torch.manual_seed(0)
        pfc = build(backend, build_margin("arcface"), d, classes, 1.0, 0, 1).to(dtype)
        e = x.clone().to(dtype).requires_grad_(True)
        loss, _ = pfc(e, labels)
        loss.backward()
        results.append((loss.detach(), e.grad, pfc.weight.grad))
        if backend == "cpu_fused":
            assert pfc.workspace is not None
            buffers = pfc.workspace._buffers
            in_grad = 4 * batch <= 3 * d
            assert ("logits" in buffers) != in_grad
            if in_grad:
                assert pfc.weight.grad.data_ptr() == buffers["grad"].data_ptr()
    for what, new, generic, exact in zip(("loss", "x grad", "w grad"), *results, strict=True):
        assert_close(new, generic, what)
        err_new = (new.double() - exact).abs().max()
        err_generic = (generic.double() - exact).abs().max()
        ulp = torch.finfo(torch.float32).eps * exact.abs().max()
        assert err_new <= 2 * err_generic + 4 * ulp, f"{what}: {err_new:.3g} vs {err_generic:.3g}"


def test_exps_t_times_into_reads_every_block_before_overwriting_it() -> None:
    """``out = E^T-block products`` with E^T in out's own tail, for N / D from 1/8 to 15/16,
    against the product of a copy; misuse (operand before out, not contiguous) raises."""
    from partialfc.fast.fused import _exps_t_times_into

    gen = torch.Generator().manual_seed(4)
    for s, d, n in [(5000, 64, 8), (3000, 64, 32), (2000, 64, 60), (100, 8, 4), (1, 8, 7)]:
        buf = torch.randn(s * d, generator=gen, dtype=torch.float64)
        out = buf.view(s, d)
        exps_t = buf[s * (d - n) :].view(s, n)
        expected = exps_t.clone() @ (rhs := torch.randn(n, d, generator=gen, dtype=torch.float64))
        _exps_t_times_into(out, exps_t, rhs)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    buf = torch.zeros(64)
    with pytest.raises(ValueError, match="contiguous"):
        _exps_t_times_into(buf[8:].view(7, 8), buf[:16].view(4, 4), torch.zeros(4, 8))
    with pytest.raises(ValueError, match="contiguous"):
        _exps_t_times_into(buf.view(8, 8), buf.view(8, 8)[:, 4:], torch.zeros(4, 8))


def test_normalize_rows_matches_autograd_of_the_plain_expression() -> None:
    """The fused row normalisation (values and both gradients) against autograd through
    ``x / max(|x|, eps)`` and ``|x|``, with a zero row and a row below eps; gradcheck on
    regular rows."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    x[1] = 0.0
    x[3] = 1e-14  # |x| ~ 2.6e-14 < NORM_EPS: only scaled
    g_hat = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    g_norm = torch.randn(5, generator=gen, dtype=torch.float64)

    def grads(fn) -> tuple[torch.Tensor, ...]:
        leaf = x.clone().requires_grad_(True)
        x_hat, norms = fn(leaf)
        only_hat = torch.autograd.grad((x_hat * g_hat).sum(), leaf, retain_graph=True)[0]
        only_norm = torch.autograd.grad((norms * g_norm).sum(), leaf, retain_graph=True)[0]
        both = torch.autograd.grad((x_hat * g_hat).sum() + (norms * g_norm).sum(), leaf)[0]
        return x_hat.detach(), norms.detach(), only_hat, only_norm, both

    def plain(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norms = torch.linalg.vector_norm(t, dim=1)
        return t / norms.clamp_min(NORM_EPS)[:, None], norms

    for got, want in zip(grads(normalize_rows), grads(plain), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    regular = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(normalize_rows, (regular,))
    # Double backward (e.g. a gradient penalty on the embeddings through the generic path).
    assert torch.autograd.gradgradcheck(normalize_rows, (regular,))


def test_fused_forward_without_grad_skips_the_backward_product(monkeypatch) -> None:
    """Under no_grad the fused softmax computes no E @ B for a backward that cannot come
    (custom Functions see needs_input_grad even then); with grad it does, once. cpu_fused
    only: its kernel is what is counted."""
    from partialfc.fast import softmax

    calls = []
    real = softmax._exps_times_rows
    monkeypatch.setattr(softmax, "_exps_times_rows", lambda *a: calls.append(1) or real(*a))
    weight, x, labels = make_problem(9, [6], seed=5)
    pfc = build("cpu_fused", build_margin("arcface"), D, 9, 1.0, 0, 1)
    with torch.no_grad():
        no_grad_loss, _ = pfc(x.clone().requires_grad_(True), labels)
    assert calls == []
    loss, _ = pfc(x.clone().requires_grad_(True), labels)
    assert calls == [1]
    torch.testing.assert_close(loss.detach(), no_grad_loss)
    loss.backward()
    assert calls == [1]  # the backward used the forward's product


def test_a_held_gradient_keeps_its_buffer_and_the_logits_take_a_fresh_one() -> None:
    """Gradient accumulation at rate 1 with the logits in the gradient buffer: the held
    gradient's buffer is never overwritten by the next forward's logits (a fresh gradient
    buffer takes them, and this step's gradient), the accumulated gradient is the sum, and no
    separate logits buffer is ever made (the one left by a no_grad forward is released).
    cpu_fused only: the buffers are its workspace's (the plain core's accumulation is checked
    by test_reused_gradient_buffer_never_overwrites_a_held_gradient)."""
    torch.manual_seed(0)
    pfc = build("cpu_fused", build_margin("arcface"), 32, 500, 1.0, 0, 1)
    e = torch.randn(8, 32, requires_grad=True)
    labels = torch.randint(0, 500, (8,))
    assert pfc.workspace is not None
    buffers = pfc.workspace._buffers
    with torch.no_grad():
        pfc(e, labels)  # no gradient wanted: the logits take their own buffer
    assert "logits" in buffers
    pfc(e, labels)[0].backward()
    first = pfc.weight.grad.clone()
    held = pfc.weight.grad
    assert "logits" not in buffers and held.data_ptr() == buffers["grad"].data_ptr()
    loss, _ = pfc(e, labels)  # the first gradient is still held
    assert buffers["grad"].data_ptr() != held.data_ptr()
    assert torch.equal(held, first)  # not overwritten by the logits
    loss.backward()
    assert pfc.weight.grad is held
    assert_close(pfc.weight.grad, 2 * first, "accumulated")
    assert "logits" not in buffers


def test_backends_agree_under_low_precision_products() -> None:
    """bf16 products: both backends take the exact target cosine in float32, so the margin
    sees the same angles; the non-target logits differ only by the products' rounding."""
    weight, x, labels = make_problem(13, [8], seed=4)
    runs = []
    for backend in ("cpu_fused", "plain"):
        pfc = build(
            backend, build_margin("arcface"), D, 13, 1.0, 0, 1, compute_dtype=torch.bfloat16
        )
        with torch.no_grad():
            pfc.weight.copy_(weight)
        loss, stats = pfc(x.clone(), labels)
        runs.append((loss.detach(), stats.angles.target_angle_mean_deg))
    (loss_f, angle_f), (loss_p, angle_p) = runs
    assert_close(angle_f, angle_p, "target angle", rtol=1e-6, atol=1e-5)
    assert_close(loss_f, loss_p, "loss", rtol=5e-3, atol=0.0)


def test_resolve_backend() -> None:
    from partialfc import build_partial_fc, resolve_backend
    from partialfc.fast import FusedPartialFC, cpu_kernels

    expected = "cpu_fused" if cpu_kernels.available() else "plain"
    assert resolve_backend("auto", "cpu") == expected
    assert resolve_backend("auto", "cuda") == "plain"
    assert resolve_backend("plain", "cpu") == "plain"
    with pytest.raises(ValueError, match="cpu_fused runs on the CPU"):
        resolve_backend("cpu_fused", "cuda")
    with pytest.raises(ValueError, match="backend must be"):
        resolve_backend("fast", "cpu")
    head = build_margin("arcface")
    assert type(build_partial_fc("plain", head, D, 7, 1.0, 0, 1)) is PartialFC
    assert isinstance(
        build_partial_fc("cpu_fused", build_margin("arcface"), D, 7, 1.0, 0, 1), FusedPartialFC
    )
