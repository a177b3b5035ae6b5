"""Every published recipe validates in --dry-run against a fake pack with the dataset's facts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dataio.layout import read_pack_facts
from dataio.pack import IDX_NAME, PROPERTY_NAME, REC_NAME, PackError
from dataio.recordio import IRHeader, RecordWriter, pack_record
from trainer.config import ConfigError, load_config
from trainer.plan import plan_run

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "demo_cpu.yaml")


def fake_pack(folder: Path, num_classes: int, num_images: int) -> Path:
    """A pack with only the insightface header record: enough for the dataset's facts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROPERTY_NAME).write_text(f"{num_classes},112,112")
    first_identity = num_images + 1
    header = IRHeader(0, [first_identity, first_identity + num_classes], 0, 0)
    with RecordWriter(str(folder / REC_NAME), str(folder / IDX_NAME)) as writer:
        writer.write(0, pack_record(header, b""))
    return folder


def test_recipe_names_state_dataset_backbone_rate_and_gpus() -> None:
    assert len(RECIPES) >= 9
    pattern = re.compile(r"^(ms1mv2|ms1mv3|glint360k|wf42m)_[a-z0-9]+_pfc[0-9.]+_\d+gpu\.yaml$")
    for recipe in RECIPES:
        assert pattern.match(recipe.name), recipe.name


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_against_its_dataset(recipe: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(recipe.read_text())
    classes, images = raw["data"]["num_classes"], raw["data"]["num_images"]
    pack = fake_pack(tmp_path / "pack", classes, images)
    config = load_config(recipe, [f"data.train={pack}"])
    gpus = int(re.search(r"_(\d+)gpu", recipe.stem).group(1))
    assert gpus % config.dist.nproc == 0
    facts = {"num_classes": classes, "num_images": images, "image_size": [112, 112]}
    if images < 2**24:  # float32 header labels are exact; bigger packs count their index
        assert read_pack_facts(pack).as_dict() == facts
    plan = plan_run(config, gpus, facts)
    assert plan["steps_per_epoch"] == images // (
        config.train.batch_size * gpus * config.train.grad_accum_steps
    )
    assert plan["total_steps"] == round(config.train.epochs * plan["steps_per_epoch"])
    from backbones import list_backbones

    assert config.model.backbone in list_backbones(include_aliases=True)
    # The wrong dataset under the recipe is caught, naming the key.
    with pytest.raises(ConfigError, match="data.num_classes"):
        plan_run(config, gpus, {**facts, "num_classes": classes + 1})


def test_dry_run_cli_prints_plan_for_two_nodes(tmp_path: Path) -> None:
    recipe = REPO / "configs" / "ms1mv2_r100_pfc1.0_8gpu.yaml"
    pack = fake_pack(tmp_path / "ms1mv2", 85742, 5822653)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "train",
            str(recipe),
            "--dry-run",
            "--set",
            f"data.train={pack}",
            "--set",
            "data.val=[]",  # the recipe's verification sets are not on this machine
            "--nnodes",
            "2",
            "--node-rank",
            "1",
            "--rdzv",
            "head:29500",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "world size       : 16 ranks" in proc.stdout
    assert "5822653 images, 85742 classes" in proc.stdout
    # 85742 = 16 x 5358 + 14: 14 ranks own 5359 rows, 2 own 5358; all sampled at rate 1.
    assert "classifier/rank  : 5358-5359 rows, 5359 sampled" in proc.stdout
    assert "2843 per epoch, 56860 in all" in proc.stdout


def test_light_facts_of_a_large_pack_count_the_index(tmp_path: Path) -> None:
    """Above 2**24 images the float32 header is not trusted; the index must list them all."""
    pack = fake_pack(tmp_path / "big", 3, 2**24 + 3)
    with pytest.raises(PackError, match="train.idx"):
        read_pack_facts(pack)
