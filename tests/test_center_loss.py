"""Center loss's centres follow Wen et al.'s update rule, sharded, and survive a resume.

Against a NumPy implementation of the rule (``delta c_j = sum_i [y_i = j] (c_j - x_i) /
(1 + n_j)``, ``c_j -= alpha * delta c_j`` over the global batch) over several optimizer steps
with repeated labels and classes absent from a step, for W = 3, 2 and 1 gloo processes (one
spawn of 3; W = 2 and 1 are sub-groups), with and without a classifier head. A checkpoint of
the W = 3 run is restored on W = 2 and W = 1 (centres by class id, then one more step). In a
single process: gradient accumulation pools the micro-batches of a step, and a step that is
not taken (zero_grad without step) moves no centre.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from partialfc import PartialFC, build_margin, class_range
from trainer.state import classifier_payload, load_classifier

C, D = 7, 4
ALPHA, LAMBDA = 0.5, 0.1
BATCHES = {1: [9], 2: [5, 4], 3: [3, 2, 4]}
# Repeated classes (n_j > 1) and classes absent from a step after they moved (0, 3, 5 at
# step 1); class 6 only from step 1 on.
LABELS = [
    [0, 0, 1, 3, 3, 3, 5, 2, 0],
    [1, 1, 4, 4, 2, 2, 2, 6, 1],
    [0, 5, 5, 3, 6, 6, 0, 0, 4],
    [2, 3, 3, 1, 1, 0, 6, 5, 5],
]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def embeddings(step: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(len(LABELS[step]), D, generator=gen, dtype=torch.float64) * 2 + 1


def np_center_step(centers: np.ndarray, x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """One update of Wen et al. (2016), eq. 4 and Algorithm 1, entry by entry."""
    new = centers.copy()
    for j in range(len(centers)):
        n_j = int((y == j).sum())
        delta = sum((centers[j] - x[i] for i in range(len(y)) if y[i] == j), np.zeros(D))
        new[j] = centers[j] - alpha * delta / (1 + n_j)
    return new


def np_centers(steps: int) -> list[np.ndarray]:
    """Centres before step 0, 1, ..., steps (from zeros)."""
    out = [np.zeros((C, D))]
    for step in range(steps):
        y = np.array(LABELS[step])
        out.append(np_center_step(out[-1], embeddings(step).numpy(), y, ALPHA))
    return out


def make(
    head: str, rank: int, world: int, group: object
) -> tuple[PartialFC, torch.optim.Optimizer]:
    aux = {"aux": {"center": {"weight": LAMBDA, "alpha": ALPHA}}}
    pfc = PartialFC(build_margin(head, **aux), D, C, 1.0, rank, world, group, ddp_scale=False)
    pfc = pfc.double()
    opt = pfc.build_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
    centers = pfc.margin.aux_losses["center"].centers
    assert all(p is not centers for g in opt.param_groups for p in g["params"])
    return pfc, opt


def centers_of(pfc: PartialFC) -> torch.Tensor:
    return pfc.margin.aux_losses["center"].centers.detach()


def run_step(pfc: PartialFC, opt: torch.optim.Optimizer, step: int, rank: int, world: int):
    """One optimizer step on this rank's rows of step ``step``; checks loss and gradient."""
    lo = sum(BATCHES[world][:rank])
    hi = lo + BATCHES[world][rank]
    x_all, y_all = embeddings(step), torch.tensor(LABELS[step])
    before = np.zeros((C, D))
    start, count = pfc.class_start, pfc.num_local
    before[start : start + count] = centers_of(pfc).detach().numpy()
    opt.zero_grad(set_to_none=True)
    x = x_all[lo:hi].clone().requires_grad_(True)
    loss, stats = pfc(x, y_all[lo:hi])
    loss.backward()
    opt.step()
    # The loss and its gradient use the centres before the step, held constant.
    ref = np_centers(step)[step]
    diff = x_all.numpy() - ref[y_all.numpy()]
    n = len(y_all)
    expected = 0.5 * (diff**2).sum() / n
    assert stats.losses["aux_center"].item() == pytest.approx(expected, rel=1e-10)
    if not pfc.margin.uses_classifier:
        np.testing.assert_allclose(x.grad.numpy(), LAMBDA * diff[lo:hi] / n, rtol=1e-10)
    # Own rows only are compared; absent classes keep their centre.
    now = centers_of(pfc).detach().numpy()
    absent = [j for j in range(start, start + count) if j not in LABELS[step]]
    np.testing.assert_array_equal(now[[j - start for j in absent]], before[absent])


def check_rule(rank: int, world: int, group: object, steps: int = 3) -> None:
    ref = np_centers(steps)
    start, count = class_range(C, rank, world)
    for head in ("none", "arcface"):
        pfc, opt = make(head, rank, world, group)
        for step in range(steps):
            run_step(pfc, opt, step, rank, world)
            np.testing.assert_allclose(
                centers_of(pfc).numpy(),
                ref[step + 1][start : start + count],
                rtol=1e-12,
                atol=1e-12,
                err_msg=f"{head} W={world} rank {rank} after step {step}",
            )
        assert np.abs(ref[steps][start : start + count]).sum() > 0  # the centres did move


def check_resume(rank: int, world: int, group: object, folder: Path, saved_world: int) -> None:
    ref = np_centers(4)
    start, count = class_range(C, rank, world)
    pfc, opt = make("arcface", rank, world, group)
    load_classifier(folder, saved_world, pfc, opt, start, count)
    # Exactly the saved rows, by global class id (each file holds its shard's range).
    saved = torch.zeros(C, D, dtype=torch.float64)
    for r in range(saved_world):
        shard = torch.load(folder / f"classifier-rank{r}.pt", weights_only=True)
        rows = shard["module"]["margin.aux_losses.center.centers"]
        saved[shard["class_start"] : shard["class_start"] + shard["num_local"]] = rows
    assert torch.equal(centers_of(pfc), saved[start : start + count])
    np.testing.assert_allclose(saved.numpy(), ref[3], rtol=1e-12, atol=1e-12)
    run_step(pfc, opt, 3, rank, world)
    np.testing.assert_allclose(
        centers_of(pfc).numpy(), ref[4][start : start + count], rtol=1e-12, atol=1e-12
    )


def _worker(rank: int, world: int, folder: str) -> None:
    assert world == 3
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    pair = dist.new_group([0, 1])
    check_rule(rank, 3, None)
    # Save a W = 3 checkpoint of the arcface + center run after 3 steps.
    pfc, opt = make("arcface", rank, 3, None)
    for step in range(3):
        run_step(pfc, opt, step, rank, 3)
    payload = classifier_payload(pfc, opt, pfc.class_start, pfc.num_local)
    assert "margin.aux_losses.center.centers" in payload["module"]
    torch.save(payload, Path(folder) / f"classifier-rank{rank}.pt")
    dist.barrier()
    if rank < 2:
        check_rule(rank, 2, pair)
        check_resume(rank, 2, pair, Path(folder), saved_world=3)
    if rank == 0:
        check_rule(0, 1, singles[0])
        check_resume(0, 1, singles[0], Path(folder), saved_world=3)
    dist.barrier()


@pytest.mark.timeout(1200)
def test_centres_follow_the_rule_sharded_and_resume_on_another_world_size(tmp_path) -> None:
    run_distributed(_worker, 3, str(tmp_path))


def test_accumulation_pools_micro_batches_and_a_skipped_step_moves_nothing() -> None:
    pfc, opt = make("arcface", 0, 1, None)
    x, y = embeddings(0), torch.tensor(LABELS[0])
    # A forward without backward, and a backward dropped by zero_grad: nothing recorded.
    pfc(x, y)
    loss, _ = pfc(x.clone().requires_grad_(True), y)
    loss.backward()
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert not bool(centers_of(pfc).any())
    # Two micro-batches then one step = one update on the union (n_j and sums pooled).
    for part in (slice(0, 4), slice(4, None)):
        loss, _ = pfc(x[part].clone().requires_grad_(True), y[part])
        (loss / 2).backward()
    opt.step()
    expected = np_centers(1)[1]
    np.testing.assert_allclose(centers_of(pfc).numpy(), expected, rtol=1e-12, atol=1e-12)
    # Forward, zero_grad, backward, step (gradients are made by the backward) updates too.
    x1, y1 = embeddings(1), torch.tensor(LABELS[1])
    loss, _ = pfc(x1.clone().requires_grad_(True), y1)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    np.testing.assert_allclose(centers_of(pfc).numpy(), np_centers(2)[2], rtol=1e-12, atol=1e-12)


def test_alpha_is_validated_with_its_key() -> None:
    for bad in (0.0, 1.5, -0.1, "fast"):
        with pytest.raises(ValueError, match=r"aux\.center\.alpha: "):
            build_margin("arcface", aux={"center": {"weight": 0.003, "alpha": bad}})
    assert build_margin("arcface", aux={"center": {}}).aux_losses["center"].alpha == 0.5


def test_the_training_loop_moves_centres_once_per_step_and_checkpoints_them(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """Through Trainer (engine step -> classifier optimizer): with 2 micro-batches of 4 per
    step, each of the 3 steps applies one update pooling 8 rows; the checkpoint has them."""
    from trainer.config import load_config
    from trainer.context import DistContext
    from trainer.loop import Trainer

    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml",
        [
            f"data.train={tiny_dataset / 'train'}",
            "data.val=[]",
            "data.workers=0",
            f"run.output_dir={tmp_path}",
            "train.batch_size=4",
            "train.grad_accum_steps=2",
            "train.max_steps=3",
            "train.progress=false",
            "train.eval_at_start=false",
            "wandb.mode=disabled",
            "export.onnx=false",
            "dist.nproc=1",
            "partialfc.margin={name: cosface, s: 16.0, aux: {center: {weight: 0.01, alpha: 0.5}}}",
        ],
    )
    trainer = Trainer(cfg, DistContext.single())
    center = trainer.partial_fc.margin.aux_losses["center"]
    pooled: list[float] = []
    apply = center.apply_update

    def counting() -> None:
        pooled.append(float(center._pending[2].sum()) if center._pending is not None else 0.0)
        apply()

    center.apply_update = counting
    trainer.fit()
    assert pooled == [8.0, 8.0, 8.0]
    assert bool(center.centers.abs().sum(dim=1).gt(0).any())
    saved = torch.load(tmp_path / "demo_cpu" / "step-3" / "classifier-rank0.pt", weights_only=True)
    assert torch.equal(saved["module"]["margin.aux_losses.center.centers"], center.centers)
