"""Class centres stored in bf16 / fp16 (``PartialFC(storage_dtype=...)``): rounding, the
optimizer's float32 update written back, training and resuming across dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from partialfc import PartialFC, ShardOptimizer, build_margin, resolve_backend
from partialfc.rounding import round_into, storage_dtype

NARROW = [torch.bfloat16, torch.float16]
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"


@pytest.mark.parametrize("dtype", NARROW)
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    value = torch.tensor([1.0 + 1e-3, -0.3337, 5e-3, 2.0]).repeat(100_000, 1).T.contiguous()
    out = round_into(value, dtype, "stochastic", gen)
    assert out.dtype == dtype
    lo_hi = torch.stack([value.to(dtype), value.to(dtype)])  # nearest and the other side
    toward = torch.where(lo_hi[0].float() < value, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(lo_hi[0], toward)
    assert bool(((out == lo_hi[0]) | (out == other)).all())  # only the two neighbours
    mean = out.float().mean(dim=1)
    ulp = (other.float() - lo_hi[0].float()).abs()[:, 0]
    # Unbiased: the mean is the value to within a few standard errors of the draws.
    assert torch.all((mean - value[:, 0]).abs() < 5 * ulp / (100_000**0.5) + 1e-12)
    assert torch.equal(out[3], value[3].to(dtype))  # exact values stay
    near = round_into(value, dtype, "nearest")
    assert torch.equal(near, value.to(dtype))


def test_storage_dtype_names() -> None:
    assert storage_dtype("bf16") == torch.bfloat16 and storage_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="storage dtype must be one of"):
        storage_dtype("int8")


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype", NARROW)
def test_nearest_update_is_the_float32_update_rounded(name: str, dtype: torch.dtype) -> None:
    """One step on bf16/fp16 rows equals the float32 optimizer's step on the same (widened)
    values, rounded to nearest: weights and state."""
    gen = torch.Generator().manual_seed(1)
    w32 = torch.randn(50, 8, generator=gen)
    narrow = torch.nn.Parameter(w32.to(dtype))
    wide = torch.nn.Parameter(narrow.detach().float())
    index = torch.tensor([3, 7, 20, 41])
    values = torch.randn(4, 8, generator=gen)
    hp = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4} if name == "sgd" else {"lr": 0.01}
    opts = [ShardOptimizer([p], name=name, rounding="nearest", **hp) for p in (narrow, wide)]
    for _ in range(2):
        for p, opt in zip((narrow, wide), opts, strict=True):
            grad_values = values.to(dtype).to(p.dtype)  # the same (rounded) gradient
            p.grad = torch.sparse_coo_tensor(index[None], grad_values, p.shape).coalesce()
            opt.step()
        # The float32 run continues from the rounded values, as the narrow one does.
        torch.testing.assert_close(narrow.detach(), wide.detach().to(dtype), rtol=0, atol=0)
        with torch.no_grad():
            wide.copy_(narrow.float())
        for key, state in opts[1].state[wide].items():
            narrow_state = opts[0].state[narrow][key]
            if key == "step":
                assert torch.equal(narrow_state, state)
                continue
            assert narrow_state.dtype == dtype
            torch.testing.assert_close(narrow_state, state.to(dtype), rtol=0, atol=0)
            state.copy_(narrow_state.float())
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(narrow.detach()[untouched], w32.to(dtype)[untouched])


def _train(dtype: torch.dtype, rounding: str, steps: int = 30) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    pfc = PartialFC(
        build_margin("arcface", s=16.0, m2=0.3), 16, 40, 0.5, 0, 1, seed=3,
        update="sampled", storage_dtype=dtype, rounding=rounding,
    )  # fmt: skip
    opt = pfc.build_optimizer("sgd", lr=0.5, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(5)
    centres = torch.nn.functional.normalize(torch.randn(40, 16, generator=gen), dim=1)
    loss = torch.zeros(())
    for _ in range(steps):
        labels = torch.randint(0, 40, (32,), generator=gen)
        x = centres[labels] + 0.3 * torch.randn(32, 16, generator=gen)
        opt.zero_grad()
        loss, _ = pfc(x, labels)
        loss.backward()
        opt.step()
    assert pfc.weight.dtype == dtype
    assert opt.state[pfc.weight]["momentum_buffer"].dtype == dtype
    return float(loss), pfc.weight.detach().float()


@pytest.mark.parametrize("dtype", NARROW)
def test_training_with_narrow_centres_follows_float32(dtype: torch.dtype) -> None:
    loss32, w32 = _train(torch.float32, "nearest")
    first, _ = _train(torch.float32, "nearest", steps=1)
    for rounding in ("nearest", "stochastic"):
        loss, w = _train(dtype, rounding)
        assert loss < 0.5 * first  # it learns
        assert abs(loss - loss32) < 0.1 * loss32
        assert (w - w32).norm() < 0.05 * w32.norm()


def test_stochastic_rounding_is_reproducible_per_step() -> None:
    a = _train(torch.bfloat16, "stochastic", steps=5)[1]
    b = _train(torch.bfloat16, "stochastic", steps=5)[1]
    assert torch.equal(a, b)


def test_fast_backend_refuses_narrow_storage_and_auto_picks_plain() -> None:
    from partialfc.fast import FusedPartialFC

    with pytest.raises(ValueError, match="float32 class centres"):
        FusedPartialFC(build_margin("arcface"), 8, 10, 1.0, 0, 1, storage_dtype=torch.bfloat16)
    assert resolve_backend("auto", "cpu", torch.bfloat16) == "plain"
    with pytest.raises(ValueError, match="float32 class centres"):
        resolve_backend("cpu_fused", "cpu", torch.float16)
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        PartialFC(build_margin("arcface"), 8, 10, 1.0, 0, 1, storage_dtype=torch.int8)
    with pytest.raises(ValueError, match="rounding must be one of"):
        PartialFC(build_margin("arcface"), 8, 10, 1.0, 0, 1, rounding="up")


def test_checkpoints_keep_the_stored_dtype_and_resume_into_another(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """From the CLI: bf16 centres at W=2 are checkpointed as bf16 (weights and momentum);
    resumed at W=1 into fp32 they are the same values (re-sharded, widened exactly); a
    float32 checkpoint resumed into bf16 storage is rounded to nearest."""
    from test_resume import _state, _train

    common = ("partialfc.sample_rate=1.0", "train.max_steps=3", "partialfc.backend=auto")
    narrow = ("dist.nproc=2", "partialfc.storage_dtype=bf16")
    _train(tiny_dataset, tmp_path, "narrow", *narrow, *common)
    saved = _state(tmp_path / "narrow" / "step-3", 2)
    assert saved["fc.weight"].dtype == saved["fc.momentum_buffer"].dtype == torch.bfloat16
    ckpt = str(tmp_path / "narrow" / "step-3")
    _train(tiny_dataset, tmp_path, "wide", "dist.nproc=1", *common, "--resume", ckpt)
    wide = _state(tmp_path / "wide" / "step-3", 1)
    assert wide["fc.weight"].dtype == torch.float32
    for key in ("fc.weight", "fc.momentum_buffer"):
        assert torch.equal(wide[key], saved[key].float()), key
    # And back: the float32 checkpoint into bf16 storage, rounded to nearest.
    wide_ckpt = str(tmp_path / "wide" / "step-3")
    extra = ("partialfc.storage_dtype=bf16", "--resume", wide_ckpt)
    _train(tiny_dataset, tmp_path, "again", "dist.nproc=1", *common, *extra)
    again = _state(tmp_path / "again" / "step-3", 1)
    assert torch.equal(again["fc.weight"], wide["fc.weight"].to(torch.bfloat16))


def test_cpu_fused_with_narrow_storage_is_a_config_error() -> None:
    from trainer.config import load_config

    with pytest.raises(Exception, match="cpu_fused keeps float32"):
        load_config(DEMO, ["partialfc.backend=cpu_fused", "partialfc.storage_dtype=fp16"])
