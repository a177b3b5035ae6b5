"""Config: YAML + --set overrides, validated before any process starts, errors name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, apply_overrides, load_config

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_demo_config_loads_with_its_values() -> None:
    cfg = load_config(DEMO)
    assert cfg.model.backbone == "iresnet_nano"
    assert (cfg.partialfc.margin.name, cfg.partialfc.margin.s, cfg.partialfc.margin.m2) == (
        "arcface",
        32.0,
        0.3,
    )
    assert 0 < cfg.partialfc.sample_rate < 1
    assert cfg.dist.nproc == 2
    assert cfg.wandb.mode == "offline"
    # The CPU step of the recipe: bf16 autocast, channels-last (issue 18), not compiled.
    assert (cfg.train.precision, cfg.train.channels_last, cfg.train.compile) == (
        "bf16",
        True,
        False,
    )


def test_deepspeed_16bit_on_the_cpu_is_refused_naming_the_key() -> None:
    """DeepSpeed's bf16 weights beside its float32 BatchNorm buffers fail on the CPU (in the
    first evaluation's forward): one line before launch instead."""
    with pytest.raises(ConfigError, match=r"train\.precision: bf16 with dist\.engine deepspeed"):
        load_config(DEMO, ["dist.engine=deepspeed"])
    assert load_config(DEMO, ["dist.engine=deepspeed", "train.precision=fp32"]).train.precision


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        DEMO,
        ["optimizer.lr=0.05", "train.max_steps=7", "data.val=[a.bin, b.bin]", "run.name=x"],
    )
    assert cfg.optimizer.lr == pytest.approx(0.05)
    assert cfg.train.max_steps == 7
    assert cfg.data.val == ["a.bin", "b.bin"]
    assert cfg.run.name == "x"


def test_misspelled_key_in_file_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "data: {train: x}\noptimizer: {lrr: 0.1}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "optimizer.lrr" in str(err.value)
    assert str(path) in str(err.value)


def test_misspelled_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="optimiser"):
        load_config(_write(tmp_path, "data: {train: x}\noptimiser: {lr: 0.1}\n"))


def test_wrong_type_is_named_with_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["train.batch_size=lots"])
    msg = str(err.value)
    assert "train.batch_size" in msg and "lots" in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("partialfc.sample_rate=1.5", "partialfc.sample_rate"),
        ("partialfc.sample_rate=0", "partialfc.sample_rate"),
        ("optimizer.name=lamb", "optimizer.name"),
        ("dist.nproc=0", "dist.nproc"),
        ("wandb.mode=sometimes", "wandb.mode"),
        ("train.bogus=1", "train.bogus"),
    ],
)
def test_bad_override_values(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DEMO, [override])


def test_override_syntax_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DEMO, ["optimizer.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"optimizer": {"lr": 0.1}}, ["optimizer.lr.x=1"])


def test_missing_required_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data"):
        load_config(_write(tmp_path, "run: {name: a}\n"))


def test_unreadable_and_non_mapping_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


def test_cli_rejects_bad_key_before_starting_processes(tmp_path: Path) -> None:
    """The CLI exits 2 with the key in the message, and never reaches torchrun."""
    proc = subprocess.run(
        [sys.executable, "-m", "launcher.cli", "train", str(DEMO), "--set", "optimizer.lrr=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 2
    assert "optimizer.lrr" in proc.stderr
    assert "torchrun" not in proc.stdout


def test_pack_facts_are_checked_against_config(tiny_pack: Path) -> None:
    from trainer.plan import pack_facts

    cfg = load_config(DEMO, [f"data.train={tiny_pack}"])
    facts = pack_facts(cfg)
    assert facts.num_classes == 6 and facts.num_images == 24
    assert facts.image_size == (112, 112)
    bad = load_config(DEMO, [f"data.train={tiny_pack}", "data.num_classes=7"])
    with pytest.raises(ConfigError, match="data.num_classes"):
        pack_facts(bad)
