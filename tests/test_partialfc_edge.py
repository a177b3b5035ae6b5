"""Edge cases of the sharded classifier that only show with several ranks: a rank holding
none of the batch's classes, the classifier clip across shards, optimizer state devices.

Each Partial FC test runs on both backends, the plain core and cpu_fused: the single-process
one through the ``backend`` fixture, the multi-process ones one backend after the other in
the same spawned workers (a spawn costs seconds, the steps milliseconds)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _backends import BACKENDS, build
from _dist import run_distributed

from partialfc import ShardOptimizer, build_margin

C, D = 4, 8


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The Partial FC backend under test: each test that takes it runs on both."""
    return request.param


def _steps(
    backend: str,
    rank: int,
    world: int,
    margin: str,
    kwargs: dict,
    rate: float,
    clip: float | None,
):
    torch.manual_seed(0)  # same embeddings on both ranks' halves of the batch
    head = build_margin(margin, **kwargs)
    pfc = build(backend, head, D, C, rate, rank, world, seed=1, update="sampled")
    opt = pfc.build_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
    norms = []
    for _ in range(3):
        x = torch.randn(6, D, requires_grad=True)
        labels = torch.tensor([0, 1, 0, 1, 1, 0])  # every class of the batch is on rank 0
        loss, _ = pfc(x, labels)
        assert torch.isfinite(loss), f"{backend}: loss {loss.item()}"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            norms.append(pfc.clip_grad_norm_(clip))
        opt.step()
    return pfc, norms


def _rank_without_classes(rank: int, world: int) -> None:
    # Rank 1 owns classes 2..3, absent from the batch; at rate 0.2 its budget rounds to 0.
    for backend in BACKENDS:
        for margin, kwargs, rate in (
            ("arcface", {}, 0.2),  # cpu_fused: fused path
            ("curricularface", {}, 0.2),  # cpu_fused: the plain core's path
            ("arcface", {"aux": {"center": {"weight": 0.1}}}, 1.0),  # centres without a gradient
        ):
            pfc, _ = _steps(backend, rank, world, margin, kwargs, rate, None)
            if rate < 1:
                assert pfc.last_sampled_global.numel() >= 1, f"{backend}, {margin}"


def test_a_rank_without_any_class_of_the_batch_still_steps() -> None:
    run_distributed(_rank_without_classes, 2)


def _clip_spans_shards(rank: int, world: int) -> None:
    for backend in BACKENDS:
        pfc, norms = _steps(backend, rank, world, "discface", {}, 1.0, 1e-3)
        # The same norm (hence scale) on every rank, so the replicated displacement stays equal.
        gathered = [torch.zeros(D) for _ in range(world)]
        dist.all_gather(gathered, pfc.margin.displacement.detach().reshape(D).contiguous())
        assert torch.equal(gathered[0], gathered[1]), f"{backend}: displacements differ"
        assert bool(gathered[0].abs().sum() > 0), f"{backend}: the displacement did not move"
        all_norms = [torch.zeros(3) for _ in range(world)]
        dist.all_gather(all_norms, torch.stack(norms))
        assert torch.equal(all_norms[0], all_norms[1]), f"{backend}: {all_norms}"


def test_classifier_clip_uses_one_norm_over_all_shards() -> None:
    run_distributed(_clip_spans_shards, 2)


def test_clip_norm_counts_shards_and_replicated_parameters_once(backend: str) -> None:
    """Single process: the returned norm is the plain L2 norm of every gradient."""
    pfc = build(backend, build_margin("discface"), D, C, 1.0, 0, 1, update="sampled")
    x = torch.randn(5, D)
    loss, _ = pfc(x, torch.tensor([0, 1, 2, 3, 0]))
    loss.backward()
    grads = [p.grad.to_dense() for p in pfc.parameters() if p.grad is not None]
    expected = torch.sqrt(sum(g.double().square().sum() for g in grads))
    assert torch.allclose(pfc.clip_grad_norm_(1e9).double(), expected, rtol=1e-6)


def test_adamw_step_counts_follow_the_parameter_device_on_load() -> None:
    """torch.optim leaves a loaded "step" on the CPU; the per-row counts must sit with the
    rows ("meta" stands in for a GPU here)."""
    cpu = torch.nn.Parameter(torch.ones(3, 2))
    opt = ShardOptimizer([cpu], name="adamw", lr=0.1)
    cpu.grad = torch.ones(3, 2)
    opt.step()
    moved = torch.nn.Parameter(torch.ones(3, 2, device="meta"))
    other = ShardOptimizer([moved], name="adamw", lr=0.1)
    other.load_state_dict(opt.state_dict())
    assert {k: v.device.type for k, v in other.state[moved].items()} == {
        "exp_avg": "meta",
        "exp_avg_sq": "meta",
        "step": "meta",
    }
