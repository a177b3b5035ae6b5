"""Bad data found after the ranks have started (issue 20): without ``data.skip_corrupt`` every
rank stops and the console shows one line naming file, key and reason (exit 2); with it every
bad record is skipped and counted over all ranks. A ``property`` that disagrees with the
records is found before any process starts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _loaders import make_loader
from _packs import corrupt_record, write_recbuilder_pack
from _runs import LABELS, SIZE, first_batch_keys, run_train, write_run_pack

from dataio.layout import PROPERTY_NAME
from dataio.pack import PackError
from launcher import cli

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Clean packs of both layouts, copied by each test before it damages them."""
    root = tmp_path_factory.mktemp("midrun_packs")
    write_run_pack(root / "header")  # images: keys 1..32
    write_recbuilder_pack(root / "headerless", LABELS, size=SIZE)  # images: keys 0..31
    return {"header": root / "header", "headerless": root / "headerless"}


def _damaged(packs: dict[str, Path], tmp_path: Path, layout: str, *faults: tuple[int, str]):
    pack = tmp_path / layout
    shutil.copytree(packs[layout], pack)
    for key, kind in faults:
        corrupt_record(pack, key, kind)
    return pack


# (layout, key, kind, the reason's words); a headerless pack's labels are checked at open.
FAULTS = {
    "magic": ("header", 9, "magic", "wrong magic number"),
    "jpeg": ("header", 9, "jpeg", "cannot decode image"),
    "label": ("header", 9, "label", "disagrees with"),
    "label >= C": ("headerless", 31, "label", "is not a class id in [0, num_classes=8)"),
    "negative": ("headerless", 5, "negative", "label -1.0 is not a class id"),
    "truncated": ("headerless", 31, "truncate", "truncated record"),
}


@pytest.mark.parametrize("kind", ["torch", "dali"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_loader_error_is_one_line_naming_file_and_key(
    packs: dict[str, Path], tmp_path: Path, fault: str, kind: str
) -> None:
    """The loader's error is the record's own sentence, also from a decoding worker process
    (the DataLoader used to wrap it in that worker's traceback)."""
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    layout, key, damage, reason = FAULTS[fault]
    pack = _damaged(packs, tmp_path, layout, (key, damage))
    with pytest.raises(PackError) as err:
        loader = make_loader(
            kind, pack, batch_size=4, workers=1, seed=0, flip=False, cache_dir=tmp_path / "c"
        )
        loader.set_epoch(0)
        for _ in loader:
            pass
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith(f"{pack / 'train.rec'}: key {key}: "), message
    if kind == "torch" or layout == "headerless":  # DALI words its own reader's faults
        assert reason in message, message


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "failed" not in proc.stdout and "rror" not in proc.stdout, proc.stdout
    return lines[0]


@pytest.mark.parametrize("fault", ["magic", "negative"])
def test_bad_record_stops_every_rank_with_one_line(
    packs: dict[str, Path], tmp_path: Path, fault: str
) -> None:
    """2 ranks under torchrun: a record in rank 1's first batch (found when read), or a
    headerless pack's label (found as each rank opens the pack)."""
    layout, key, damage, reason = FAULTS[fault]
    if fault == "magic":
        key = first_batch_keys(packs[layout], rank=1)[0]
    pack = _damaged(packs, tmp_path, layout, (key, damage))
    proc = run_train(pack, tmp_path, "bad", "train.max_steps=3", "train.checkpoint_every=1")
    line = _one_error_line(proc)
    assert line.startswith(f"facetrain train: error: {pack / 'train.rec'}: key {key}: "), line
    assert reason in line
    run = tmp_path / "bad"
    assert not list(run.glob("step-*")), "nothing written after the bad record"


def test_skip_corrupt_skips_and_counts_on_every_rank(
    packs: dict[str, Path], tmp_path: Path
) -> None:
    """A headerless pack with a negative label and a truncated last record (left out as each
    rank opens the pack: counted once) and a JPEG that does not decode in rank 1's first batch
    (counted by rank 1): the run finishes, and wandb's data/skipped_records says 3."""
    from evaluation.wandb_offline import read_run_history

    pack = _damaged(packs, tmp_path, "headerless", (5, "negative"), (31, "truncate"))
    jpeg = first_batch_keys(pack, rank=1, skip_corrupt=True)[0]
    corrupt_record(pack, jpeg, "jpeg")
    proc = run_train(
        pack,
        tmp_path,
        "skip",
        "data.skip_corrupt=true",
        "train.max_steps=2",
        "wandb.mode=offline",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_run_history(tmp_path / "skip")
    counts = [row["data/skipped_records"] for row in rows if "data/skipped_records" in row]
    assert counts == [3, 3], counts


@pytest.mark.parametrize(
    ("prop", "words"),
    [
        ("12,32,32", ["says 12 classes", "lists 8 identity records"]),
        ("8,24,24", ["says 24x24 images", "key 1 is 32x32"]),
    ],
    ids=["classes", "image size"],
)
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_property_that_disagrees_is_one_line_before_launch(
    packs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_start: None,
    prop: str,
    words: list[str],
    dry_run: bool,
) -> None:
    pack = tmp_path / "p"
    shutil.copytree(packs["header"], pack)
    (pack / PROPERTY_NAME).write_text(prop + "\n")
    argv = ["train", str(Path(cli.__file__).parents[1] / "configs" / "demo_cpu.yaml")]
    argv += ["--set", f"data.train={pack}", "--set", f"run.output_dir={tmp_path}"]
    argv += ["--set", "data.val=[]", "--set", "train.batch_size=4"]
    assert cli.main(argv + (["--dry-run"] if dry_run else [])) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and not out, err
    assert lines[0].startswith(f"facetrain train: error: {pack / PROPERTY_NAME}: says ")
    for part in words:
        assert part in lines[0], lines[0]
