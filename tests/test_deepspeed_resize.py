"""DeepSpeed ZeRO 1-3 resumed on another world size (CPU, gloo): the backbone's fp32 master
weights and optimizer state are re-partitioned through the universal checkpoint layout
(trainer/ds_universal.py), 2 -> 3 and 3 -> 2, and training goes on from them."""

from __future__ import annotations

import shutil
import types
from pathlib import Path

import pytest
import torch
from test_resume import _assert_identical, _state, _train

# Several DeepSpeed runs per test, each a few processes: on a loaded 2-core machine one run
# can take minutes, so the per-test limit is generous (a hang still ends).
pytestmark = pytest.mark.timeout(2400)

FULL = "partialfc.sample_rate=1.0"  # 6 classes on 3 ranks: every row takes part


@pytest.fixture(autouse=True)
def _ds_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    # DeepSpeed's files unpickle DeepSpeed objects: its accelerator must be the CPU here.
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def _resume(
    tiny: Path, tmp: Path, name: str, src: Path, nproc: int, steps: int, *extra: str
) -> str:
    """Run ``name`` on ``nproc`` ranks to ``steps``, resuming from the checkpoint ``src``."""
    args = (f"train.max_steps={steps}", f"dist.nproc={nproc}", "--resume", str(src))
    return _train(tiny, tmp, name, *extra, *args)


def _full(step_dir: Path) -> dict[str, dict]:
    """Every parameter's full fp32 weights and optimizer state from the DeepSpeed partitions."""
    from trainer.ds_universal import gather_full_state

    return gather_full_state(step_dir / "deepspeed" / "state")[0]


def _assert_same_state(a: dict[str, dict], b: dict[str, dict]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            same = torch.equal(torch.as_tensor(a[name][key]), torch.as_tensor(b[name][key]))
            assert same, f"{name} {key} differs"


def _ds_to_universal(step_dir: Path, out: Path) -> Path:
    """DeepSpeed's own converter (Adam states only), as an independent reading of the files."""
    from deepspeed.checkpoint.ds_to_universal import main

    args = types.SimpleNamespace(
        input_folder=str(step_dir / "deepspeed" / "state"),
        output_folder=str(out / "state"),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # facetrain's backbone has no tensor-parallel patterns
    )
    main(args)
    return out / "state" / "zero"


@pytest.mark.parametrize(("stage", "opt"), [(1, "sgd"), (2, "adamw"), (3, "adamw")])
def test_zero_state_is_repartitioned_2_to_3_to_2(
    tiny_dataset: Path, tmp_path: Path, stage: int, opt: str
) -> None:
    ds = ("dist.engine=deepspeed", f"deepspeed.zero_stage={stage}", f"optimizer.name={opt}", FULL)
    _train(tiny_dataset, tmp_path, "a", *ds, "train.max_steps=2")
    # Resume with the same number of steps: nothing trains, the checkpoint is re-written by
    # the new world size -> its optimizer partitions gather to exactly the saved state.
    a = tmp_path / "a" / "step-2"
    out = _resume(tiny_dataset, tmp_path, "b", a, 3, 2, *ds)
    note = f"(world size 2 -> 3, classifier re-sharded, ZeRO-{stage} optimizer state re-partitioned"
    assert note in out, out
    b = tmp_path / "b" / "step-2"
    _resume(tiny_dataset, tmp_path, "c", b, 2, 2, *ds)
    c = tmp_path / "c" / "step-2"
    saved = _full(a)
    moment = "momentum_buffer" if opt == "sgd" else "exp_avg"
    assert {"fp32", moment} <= saved["conv1.weight"].keys()
    _assert_same_state(saved, _full(b))  # 2 -> 3
    _assert_same_state(saved, _full(c))  # 3 -> 2
    _assert_identical(_state(a, 2), _state(b, 3))
    _assert_identical(_state(a, 2), _state(c, 2))
    # The gathered master weights are the weights (fp32 training): the reading is right.
    backbone = torch.load(a / "backbone.pt", weights_only=True)
    for name, state in saved.items():
        assert torch.equal(state["fp32"], backbone[name]), name
    # The universal folder written once into the checkpoint is DeepSpeed's layout: for Adam,
    # DeepSpeed's own converter reads the same values from the same partitions.
    mine = a / "universal" / "state" / "zero"
    assert (mine / "optimizer_state.pt").is_file() and not (a / "universal.tmp").exists()
    if opt == "adamw":
        theirs = _ds_to_universal(a, tmp_path / "ds_universal")
        for name in saved:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                ours = torch.load(mine / name / f"{key}.pt", weights_only=False)["param"]
                ref = torch.load(theirs / name / f"{key}.pt", weights_only=False)
                ref = ref["param"] if isinstance(ref, dict) else ref
                assert torch.equal(ours, ref.view(ours.shape)), f"{name} {key}"


def test_training_continues_after_resize(tiny_dataset: Path, tmp_path: Path) -> None:
    """ZeRO-3 with SGD, 2 -> 3 ranks, one more step: the same update as DDP's (whose optimizer
    state is whole on every rank) after the same resize; without the momentum it is not."""
    sgd = ("optimizer.name=sgd", FULL)
    _train(tiny_dataset, tmp_path, "ddp_a", *sgd, "train.max_steps=2")
    _resume(tiny_dataset, tmp_path, "ddp_b", tmp_path / "ddp_a" / "step-2", 3, 3, *sgd)
    ds = ("dist.engine=deepspeed", "deepspeed.zero_stage=3", *sgd)
    _train(tiny_dataset, tmp_path, "ds_a", *ds, "train.max_steps=2")
    src = tmp_path / "ds_a" / "step-2"
    _resume(tiny_dataset, tmp_path, "ds_b", src, 3, 3, *ds)
    reference = _state(tmp_path / "ddp_b" / "step-3", 3)
    resized = _state(tmp_path / "ds_b" / "step-3", 3)
    # DeepSpeed and DDP reduce in another order: the last bits differ (~1e-5 here).
    for key, ref in reference.items():
        torch.testing.assert_close(resized[key], ref, rtol=1e-3, atol=1e-3, msg=key)
    # A checkpoint whose partitions cannot be read keeps the weights only, and says so.
    lost = tmp_path / "lost" / "step-2"
    shutil.copytree(src, lost, ignore=shutil.ignore_patterns("universal", "*optim_states.pt"))
    out = _resume(tiny_dataset, tmp_path, "ds_c", lost, 3, 3, *ds)
    assert "backbone weights only, its optimizer starts afresh (" in out, out
    fresh = _state(tmp_path / "ds_c" / "step-3", 3)
    gap = max((fresh[k] - reference[k]).abs().max().item() for k in reference)
    assert gap > 1e-2  # the tolerance above tells a restored momentum from a lost one
