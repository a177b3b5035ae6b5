"""train.compile and train.channels_last: the compiled (and channels-last) backbone step gives
eager's loss and gradients; checkpoints, resume and ONNX export work from a compiled run; a
second start loads the compiled kernels from the cache instead of compiling them again.

One tiny model is compiled once in this process (a module fixture); the two-process runs at
the end reuse its cache folder. Tolerances: inductor fuses and reorders float32 reductions
(BatchNorm statistics, sums in the backward), so results agree to rounding, not to the bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from backbones import create_backbone
from dataio.loading import to_model_input
from launcher.env import INDUCTOR_CACHE_VAR, compile_cache_dir
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config
from trainer.context import DistContext
from trainer.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"

# A compile on a loaded 2-core machine can take minutes; the limits only stop a hang.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(1200)]

# 24 images, 5 per batch: 4 full batches an epoch, the last 4 images dropped (drop_last).
BATCH = 5
BASE = {
    "data.val": "[]",
    "data.workers": "0",
    "train.batch_size": str(BATCH),
    "train.log_every": "1",
    "train.progress": "false",
    "train.eval_at_start": "false",
    "schedule.warmup_steps": "2",
    "wandb.mode": "disabled",
    "export.onnx": "false",
    "eval.pixel_baseline": "false",
    "partialfc.sample_rate": "1.0",
    # The old defaults, whatever the demo recipe now says: each test names what it turns on.
    "train.compile": "false",
    "train.channels_last": "false",
    "train.precision": "fp32",
}


def _sets(tiny_dataset: Path, out: Path, *extra: str) -> list[str]:
    items = {**BASE, "data.train": str(tiny_dataset / "train"), "run.output_dir": str(out)}
    return [f"{k}={v}" for k, v in items.items()] + list(extra)


def _trainer(tiny_dataset: Path, out: Path, *extra: str) -> Trainer:
    config = load_config(DEMO, [*_sets(tiny_dataset, out, "dist.nproc=1"), *extra])
    return Trainer(config, DistContext.single())


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """One compile cache folder for this module: the in-process compile fills it, the
    two-process runs read it (as the launcher points every rank at one folder)."""
    folder = tmp_path_factory.mktemp("inductor")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(INDUCTOR_CACHE_VAR, str(folder))
        yield folder


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory, cache: Path):
    """An eager and a compiled trainer of the same seed (the compiled one compiles once)."""
    out = tmp_path_factory.mktemp("compile_runs")
    eager = _trainer(tiny_dataset, out, "run.name=eager")
    compiled = _trainer(tiny_dataset, out, "run.name=compiled", "train.compile=true")
    return eager, compiled


def _grads(trainer: Trainer) -> list[torch.Tensor]:
    return [p.grad.clone() for p in trainer.backbone.parameters() if p.grad is not None]


def _forward_backward(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor):
    trainer.engine.model.train()
    trainer.engine.zero_grad()
    trainer.opt_fc.zero_grad(set_to_none=True)
    embeddings = trainer.engine(images)
    loss, _ = trainer.partial_fc(embeddings, labels)
    loss.backward()
    return loss.detach(), embeddings.detach(), _grads(trainer)


def _assert_close_lists(got: list[torch.Tensor], want: list[torch.Tensor], rtol: float) -> None:
    """Each tensor within ``rtol``, absolutely within ``rtol`` of the largest entry of them
    all: some gradients are ~0 in exact arithmetic (a BatchNorm's bias before another
    BatchNorm), and there only the rounding of the larger terms is left."""
    assert len(got) == len(want)
    scale = max(float(w.detach().abs().max()) for w in want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale)


def test_compile_setting_is_checked(tiny_dataset: Path, tmp_path: Path) -> None:
    for value, want in (("true", True), ("max-autotune", "max-autotune"), ("false", False)):
        config = load_config(DEMO, [*_sets(tiny_dataset, tmp_path), f"train.compile={value}"])
        assert config.train.compile == want
    with pytest.raises(ConfigError, match="train.compile"):
        load_config(DEMO, [*_sets(tiny_dataset, tmp_path), "train.compile=fastest"])
    deepspeed_bf16 = ["train.compile=true", "dist.engine=deepspeed", "train.precision=bf16"]
    with pytest.raises(ConfigError, match="only at train.precision fp32"):
        load_config(DEMO, [*_sets(tiny_dataset, tmp_path), *deepspeed_bf16])


def test_compile_cache_folder_is_stable_and_can_be_chosen() -> None:
    env: dict[str, str] = {}
    default = compile_cache_dir(env)
    assert default == Path("~/.cache/facetrain/inductor").expanduser()
    assert env[INDUCTOR_CACHE_VAR] == str(default)  # what inductor and child processes read
    env = {INDUCTOR_CACHE_VAR: "/shared/cache"}
    assert compile_cache_dir(env) == Path("/shared/cache")


def test_compiled_step_equals_eager(runs: tuple[Trainer, Trainer]) -> None:
    eager, compiled = runs
    assert compiled.engine.model is not compiled.engine.module  # the wrapper, not the module
    (images, labels), (images_c, _) = next(eager._batches()), next(compiled._batches())
    assert torch.equal(images, images_c)  # both loaders move on together
    x = to_model_input(images, "cpu")
    want = _forward_backward(eager, x, labels)
    got = _forward_backward(compiled, x, labels)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)  # loss
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-4)  # embeddings
    _assert_close_lists(got[2], want[2], rtol=1e-3)  # every backbone gradient
    _assert_close_lists(
        list(compiled.backbone.buffers()), list(eager.backbone.buffers()), rtol=1e-4
    )  # BatchNorm running statistics


def test_compiled_training_follows_eager_without_recompiling(
    runs: tuple[Trainer, Trainer],
) -> None:
    """Two optimizer steps give eager's weights and loss; then on to six, across an epoch end
    whose last partial batch the loader drops: the compiled step never meets a new shape.

    Further steps are not compared: at batch 5 (BatchNorm over 5 images) rounding grows
    about 10x a step, in eager runs too (weights perturbed by 1e-7 differ by 1e-3 in the
    loss after six steps)."""
    eager, compiled = runs
    batches_e, batches_c = eager._batches(), compiled._batches()
    with torch.compiler.set_stance("fail_on_recompile"):
        for step in range(6):
            loss_c, _, _ = compiled._one_step(batches_c)
            if step < 2:
                loss_e, _, _ = eager._one_step(batches_e)
                torch.testing.assert_close(loss_c, loss_e, rtol=1e-3, atol=0)
            if step == 0:
                _assert_close_lists(
                    list(compiled.backbone.parameters()),
                    list(eager.backbone.parameters()),
                    rtol=1e-3,
                )
    assert compiled.epoch == 1  # 4 steps an epoch (+1 batch before): crossed


def test_checkpoint_resume_and_export_from_a_compiled_run(
    runs: tuple[Trainer, Trainer], tiny_dataset: Path
) -> None:
    _, compiled = runs
    compiled.step = 6
    step_dir = compiled.save_checkpoint()
    saved = ckpt.load_torch(step_dir / "backbone.pt")
    plain = create_backbone("iresnet_nano", **compiled.backbone_kwargs).state_dict()
    assert list(saved) == list(plain)  # no "_orig_mod." prefix: an eager module loads it

    out = compiled.run_dir.parent
    resumed = _trainer(tiny_dataset, out, "run.name=compiled", "run.resume=auto")
    resumed._maybe_resume()
    assert resumed.step == 6
    for name, value in resumed.backbone.state_dict().items():
        torch.testing.assert_close(value, compiled.backbone.state_dict()[name], rtol=0, atol=0)

    result = compiled.export(step_dir)  # ONNX from the checkpoint's plain module
    assert Path(result["path"]).is_file()
    assert result["max_abs_diff"] <= compiled.config.export.tolerance


def test_channels_last_step_equals_contiguous(tiny_dataset: Path, tmp_path: Path) -> None:
    plain = _trainer(tiny_dataset, tmp_path, "run.name=plain")
    nhwc = _trainer(tiny_dataset, tmp_path, "run.name=nhwc", "train.channels_last=true")
    conv = next(m for m in nhwc.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images, labels = next(plain._batches())
    x = to_model_input(images, "cpu")
    want = _forward_backward(plain, x, labels)
    got = _forward_backward(nhwc, x, labels)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    _assert_close_lists(got[2], want[2], rtol=1e-3)


def _train(tiny_dataset: Path, out: Path, cache: Path, *extra: str) -> str:
    cmd = [sys.executable, "-m", "launcher.cli", "train", str(DEMO)]
    for item in _sets(tiny_dataset, out, "run.name=ddp", "dist.nproc=2", *extra):
        cmd += ["--set", item]
    env = {**os.environ, INDUCTOR_CACHE_VAR: str(cache)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1100, cwd=out, env=env)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _cache_entries(cache: Path) -> set[Path]:
    """The compiled graphs inductor saved (its FX graph and AOT autograd caches): a miss
    adds one, a hit none."""
    return {
        p for sub in ("fxgraph", "aotautograd") for p in (cache / sub).rglob("*") if p.is_file()
    }


def test_two_ranks_compile_once_and_resume_from_the_cache(
    runs: tuple[Trainer, Trainer], tiny_dataset: Path, tmp_path: Path, cache: Path
) -> None:
    """DDP over 2 ranks, compiled: a first run (checkpoint at its end), then a resumed one.
    The second start compiles nothing: inductor's caches gain no entry."""
    _train(tiny_dataset, tmp_path, cache, "train.compile=true", "train.max_steps=2")
    after_first = _cache_entries(cache)
    assert after_first  # the compiled graphs were saved
    out = _train(
        tiny_dataset, tmp_path, cache, "train.compile=true", "train.max_steps=4", "run.resume=auto"
    )
    assert "resumed from step-2" in out, out
    assert _cache_entries(cache) == after_first
