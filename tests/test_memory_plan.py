"""The memory planner (trainer.memory_plan): each term scales as the run it describes, the
--gpu-mem search finds the edge, and `facetrain train / submit --dry-run` print it. Also the
two memory fixes it brought: the plain core frees a step's tensors at once (no reference
cycle) and 16-bit class centres are initialised without a float32 copy."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest
import torch
from _packs import write_test_pack

from launcher.cli import main
from trainer.config import ConfigError, config_from_dict
from trainer.memory_plan import (
    HEAP_RETENTION,
    MemoryFacts,
    largest_num_classes,
    largest_sample_rate,
    parse_size,
    plan_memory,
)

GIB = 2**30
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"
FACTS = MemoryFacts(
    num_classes=1_000_000,
    image_size=(112, 112),
    device="cuda",
    backend="plain",
    backbone_params=43_000_000,
    backbone_trainable=43_000_000,
    activation_bytes=2 * GIB,
    largest_activation_bytes=100 * 2**20,
)


def _config(**sections: dict):
    raw = {"data": {"train": "unused"}, "model": {"embedding_size": 512}, **sections}
    return config_from_dict(raw)


def _plan(world: int = 1, facts: MemoryFacts = FACTS, **sections: dict):
    return plan_memory(_config(**sections), world, facts)


def test_classifier_state_scales_with_classes_world_and_storage() -> None:
    base = _plan()
    assert base.classifier_state == 1_000_000 * 512 * 4 * 2  # centres + SGD momentum, fp32
    doubled = plan_memory(_config(), 1, dataclasses.replace(FACTS, num_classes=2_000_000))
    assert doubled.classifier_state == 2 * base.classifier_state
    assert _plan(world=4).classifier_state == base.classifier_state // 4  # C_r = C / W
    bf16 = _plan(partialfc={"storage_dtype": "bf16"})
    assert bf16.classifier_state * 2 == base.classifier_state  # bf16 halves the state
    adamw = _plan(optimizer={"name": "adamw"})
    assert adamw.classifier_state == 1_000_000 * (512 * 4 * 3 + 4)  # two moments, row steps
    # The rest of the run does not depend on how the centres are stored.
    assert (bf16.backbone, bf16.activations) == (base.backbone, base.activations)


def test_step_buffers_follow_the_sampled_rows_and_the_batch() -> None:
    full, tenth = _plan(), _plan(partialfc={"sample_rate": 0.1})
    assert (full.sampled_per_rank, tenth.sampled_per_rank) == (1_000_000, 100_000)
    assert tenth.classifier_step < full.classifier_step / 4
    assert tenth.classifier_state == full.classifier_state  # every centre is kept
    big_batch = _plan(partialfc={"sample_rate": 0.1}, train={"batch_size": 512})
    growth = big_batch.classifier_step - tenth.classifier_step
    assert growth >= 3 * 4 * (512 - 128) * 100_000  # [N, S] float32 buffers
    # 16-bit centres keep their gathered rows and gradient [S, D] in 16 bits (widened to
    # float32 block by block only): those two buffers halve.
    narrow = _plan(partialfc={"sample_rate": 0.1, "storage_dtype": "bf16"})
    assert tenth.classifier_step - narrow.classifier_step == 2 * 2 * 100_000 * 512
    fused = plan_memory(_config(), 1, dataclasses.replace(FACTS, backend="cpu_fused"))
    assert fused.classifier_step < full.classifier_step  # one reused [S, D] / [N, S] buffer


def test_backbone_terms_ddp_and_zero_stages() -> None:
    p = FACTS.backbone_params
    assert _plan().backbone == 4 * p * 3  # weights, gradients, SGD momentum
    assert _plan(world=4).backbone == 4 * p * 4  # + DDP's gradient buckets
    assert _plan(optimizer={"name": "adamw"}).backbone == 4 * p * 4

    def zero(stage: int, precision: str = "fp32") -> int:
        return _plan(
            world=4,
            dist={"engine": "deepspeed"},
            deepspeed={"zero_stage": stage},
            train={"precision": precision},
        ).backbone

    assert zero(0) == 4 * p * 3
    assert zero(1) == 4 * p * 2 + 4 * p // 4  # the optimizer state partitioned
    assert zero(2) == 4 * p + 4 * p // 4 * 2  # + the gradients
    assert zero(3) == 4 * p * 3 // 4  # + the parameters
    # bf16: 16-bit weights and gradients, a float32 master copy partitioned with the state.
    assert zero(1, "bf16") == 2 * p + 2 * p + (4 * p + 4 * p) // 4


def test_activations_scale_with_the_per_rank_batch() -> None:
    from backbones.profile import profile_backbone, training_footprint

    small = training_footprint("iresnet_nano", 4, 112, embedding_size=64)
    large = training_footprint("iresnet_nano", 8, 112, embedding_size=64)
    assert small.params == profile_backbone("iresnet_nano", 112, embedding_size=64).params
    assert large.activation_bytes == pytest.approx(2 * small.activation_bytes, rel=0.01)
    assert large.largest_activation_bytes == 2 * small.largest_activation_bytes
    assert small.activation_bytes > 4 * 3 * 112 * 112 * 4  # at least the input, kept by conv 1
    half = training_footprint("iresnet_nano", 8, 112, torch.bfloat16, embedding_size=64)
    assert half.activation_bytes == pytest.approx(large.activation_bytes / 2, rel=0.02)
    assert sum(large.activation_sizes) == large.activation_bytes
    plan = _plan(train={"precision": "bf16"})
    assert plan.activations - _plan().activations == 2 * FACTS.backbone_params  # autocast
    # On CPU the heap keeps part of the freed small activations; CUDA's allocator: none.
    cpu = dataclasses.replace(FACTS, device="cpu", heap_activation_bytes=GIB)
    assert _plan().heap_slack == 0
    assert plan_memory(_config(), 1, cpu).heap_slack == int(HEAP_RETENTION * GIB)


def test_head_tensors_per_class() -> None:
    from trainer.memory_report import _head_facts

    plain = _head_facts(_config())
    assert plain == {
        "num_subcenters": 1,
        "uses_classifier": True,
        "head_param_bytes_per_class": 0,
        "head_buffer_bytes_per_class": 0,
    }
    softmax = _head_facts(_config(partialfc={"margin": {"name": "softmax"}}))
    assert softmax["head_param_bytes_per_class"] == 4  # the per-class bias
    center = {"name": "arcface", "aux": {"center": {"weight": 0.003}}}
    assert _head_facts(_config(partialfc={"margin": center}))["head_buffer_bytes_per_class"] == (
        512 * 4
    )  # center loss's centres
    sub = _head_facts(_config(partialfc={"margin": {"name": "subcenter_arcface", "k": 3}}))
    assert sub["num_subcenters"] == 3
    facts = dataclasses.replace(FACTS, **sub)
    assert plan_memory(_config(), 1, facts).classifier_state == 3 * _plan().classifier_state


def test_gpu_mem_search_finds_the_edge() -> None:
    config = _config(partialfc={"sample_rate": 0.1})
    budgets = [10 * GIB, 20 * GIB, 40 * GIB, 80 * GIB]
    found = [largest_num_classes(config, 8, FACTS, b) for b in budgets]
    assert all(c is not None for c in found) and found == sorted(found)  # monotone
    for budget, classes in zip(budgets, found, strict=True):
        at = dataclasses.replace(FACTS, num_classes=classes)
        over = dataclasses.replace(FACTS, num_classes=int(classes * 1.01))
        assert plan_memory(config, 8, at).total <= budget < plan_memory(config, 8, over).total
    assert largest_num_classes(config, 8, FACTS, GIB) is None  # the baseline alone is over

    rates = [largest_sample_rate(config, 1, FACTS, b) for b in (8 * GIB, 10 * GIB, 12 * GIB)]
    assert rates == sorted(rates) and 0 < rates[0] < rates[-1] <= 1
    for budget, rate in zip((8 * GIB, 10 * GIB), rates[:2], strict=True):
        assert plan_memory(config, 1, FACTS, rate).total <= budget
        assert plan_memory(config, 1, FACTS, rate + 0.01).total > budget
    assert largest_sample_rate(config, 1, FACTS, 100 * GIB) == 1.0
    assert largest_sample_rate(config, 1, FACTS, 4 * GIB) is None  # the fixed terms alone: 7.5 GiB


def test_parse_size_units() -> None:
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("80GiB") == parse_size("80G") == parse_size("80 gib") == 80 * GIB
    assert parse_size("1.5TB") == 1_500_000_000_000
    assert parse_size("512MiB") == 512 * 2**20
    for bad in ("80 parsecs", "-1GB", "0", "GB"):
        with pytest.raises(ConfigError, match="--gpu-mem"):
            parse_size(bad)


def test_plain_core_frees_a_step_without_the_cyclic_gc() -> None:
    """A reference cycle would keep each step's gathered rows and cosines alive until
    Python's cyclic collector ran -- steps later, an [S, D] and an [N, S] tensor each."""
    from partialfc import build_margin, build_partial_fc

    pfc = build_partial_fc(
        "plain", build_margin("arcface"), embedding_size=16, num_classes=100,
        sample_rate=0.5, rank=0, world_size=1, update="sampled",
    )  # fmt: skip
    opt = pfc.build_optimizer("sgd")
    emb = torch.randn(8, 16, requires_grad=True)
    labels = torch.arange(8) * 7
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        loss, stats = pfc(emb, labels)
        loss.backward()
        opt.step()
        del loss, stats
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert leaked == []


def test_16bit_centres_are_initialised_without_a_float32_copy() -> None:
    from partialfc import init_class_centers

    wide = init_class_centers(5, 3000, 64, seed=3)
    narrow = init_class_centers(5, 3000, 64, seed=3, dtype=torch.bfloat16)
    assert narrow.dtype == torch.bfloat16 and torch.equal(narrow, wide.to(torch.bfloat16))


def test_dry_run_prints_the_breakdown_and_what_fits(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pack = tmp_path / "pack"
    write_test_pack(pack, list(range(64)), num_classes=2_000_000, size=(112, 112))
    sets = ["--set", f"data.train={pack}", "--set", "data.val=[]", "--set", "train.batch_size=4"]
    argv = ["train", str(DEMO), "--dry-run", "--gpu-mem", "8GiB", *sets]
    argv += ["--set", "partialfc.storage_dtype=bf16", "--set", "partialfc.sample_rate=0.1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for term in (
        "classifier state",
        "classifier step",
        "backbone",
        "activations",
        "process baseline",
        "total",
    ):
        assert f"  {term}" in out, term
    assert "2 ranks, classifier backend plain" in out
    assert "1,000,000 classes x 128 bf16: centres + SGD momentum" in out
    assert "--gpu-mem 8.00 GiB per rank: this run fits" in out
    assert "largest class count at sample_rate 0.1: " in out
    assert "largest sample rate at 2,000,000 classes: " in out

    # submit: the script, then the breakdown for its GPUs as comment lines.
    argv = ["submit", str(DEMO), "--nodes", "2", "--gpus-per-node", "4", "--dry-run", *sets]
    argv += ["--set", "dist.device=auto"]
    assert main([*argv, "--gpu-mem", "80GB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!")
    assert "# memory/rank (est): per-GPU memory (CUDA" in out and "8 ranks" in out
    assert "# --gpu-mem 74.51 GiB per rank: this run fits" in out

    assert main(["train", str(DEMO), "--gpu-mem", "80GB", *sets]) == 2  # needs --dry-run
    assert "--gpu-mem: only with --dry-run" in capsys.readouterr().err
