"""The three pack layouts users have -- insightface's face2rec2 (header written after the
images), insightface's header-less RecBuilder, and ours -- read alike by every reader: the
cheap facts of --dry-run, FacePack, inspect, both loaders and the trainer."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _loaders import make_loader
from _packs import write_face2rec2_pack, write_recbuilder_pack, write_test_pack

from dataio.inspect_pack import inspect_pack
from dataio.layout import PackError, read_pack_facts, read_property
from dataio.pack import FacePack
from dataio.record_reader import RecordReader, read_index

REPO = Path(__file__).resolve().parents[1]
SIZE = (112, 112)  # the trainer's backbone needs the ArcFace crop size
SORTED = [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 3, 3]  # 12 images of 4 classes
SHUFFLED = [2, 0, 3, 1, 1, 0, 2, 3, 1, 0, 1, 1]


def _ours(path: Path, labels: list[int], with_header: bool) -> None:
    write_test_pack(path, labels, size=SIZE, seed=2, with_header=with_header)


def _recbuilder(path: Path) -> None:
    write_recbuilder_pack(path, SHUFFLED, size=SIZE)


# name: (writer, labels in key order, expected layout, first image key)
LAYOUTS = {
    "face2rec2": (lambda p: write_face2rec2_pack(p, SORTED, size=SIZE), SORTED, "header", 1),
    "recbuilder": (_recbuilder, SHUFFLED, "headerless", 0),
    "ours": (lambda p: _ours(p, SORTED, True), SORTED, "header", 1),
    "ours_no_header": (lambda p: _ours(p, SHUFFLED, False), SHUFFLED, "headerless", 0),
}  # fmt: skip


@pytest.fixture(scope="module")
def packs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, (write, _, _, _) in LAYOUTS.items():
        out[name] = tmp_path_factory.mktemp(name)
        write(out[name])
    return out


def test_face2rec2_fixture_has_the_tools_byte_layout(packs: dict[str, Path]) -> None:
    """Key 0 is written after the images (not the index's first line); images carry the
    2-float label [class, aligned] in front of the JPEG, as mx.recordio.pack of a list."""
    pack = packs["face2rec2"]
    keys, offsets = read_index(pack / "train.idx")
    n, c = len(SORTED), 4
    assert keys == [*range(1, n + 1), 0, *range(n + 1, n + 1 + c)]
    assert offsets[0] > offsets[n]  # the header lies after the last image in the file
    raw = (pack / "train.rec").read_bytes()
    body = raw[offsets[1] + 8 :]  # past magic + lrecord
    flag, label, rid, rid2 = struct.unpack_from("<IfQQ", body, 0)
    assert (flag, label, rid, rid2) == (2, 0.0, 1, 0)
    assert np.frombuffer(body, "<f4", 2, 24).tolist() == [0.0, 1.0]
    assert body[32:35] == b"\xff\xd8\xff"  # the JPEG follows the label
    head = raw[offsets[0] + 8 :]
    assert struct.unpack_from("<IfQQ", head, 0)[0] == 2
    assert np.frombuffer(head, "<f4", 2, 24).tolist() == [n + 1, n + 1 + c]
    assert (pack / "property").read_text() == "4,112,112\n"


def test_recbuilder_fixture_has_the_tools_files(packs: dict[str, Path]) -> None:
    pack = packs["recbuilder"]
    assert (pack / "property").read_text() == "4,112,112\n12\n"
    assert (pack / "train.meta").is_file()
    assert read_index(pack / "train.idx")[0] == list(range(12))
    prop = read_property(pack / "property")
    assert (prop.num_classes, prop.image_size, prop.num_images) == (4, SIZE, 12)


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_reader_agrees_on_count_and_labels(packs: dict[str, Path], name: str) -> None:
    _, labels, layout, first_key = LAYOUTS[name]
    pack = packs[name]
    facts = read_pack_facts(pack)
    assert (facts.layout, facts.num_images, facts.num_classes) == (layout, 12, 4)
    assert facts.as_dict() == {"num_classes": 4, "num_images": 12, "image_size": [112, 112]}
    with FacePack(pack) as fp:
        assert fp.layout == layout and fp.num_images == 12
        assert fp.image_keys.tolist() == list(range(first_key, first_key + 12))
        assert fp.labels.tolist() == labels
        assert fp.read(0)[1] == labels[0]
    report = inspect_pack(pack, workers=0, progress=False)
    assert report.ok and report.num_images == 12 and report.has_header == (layout == "header")
    assert (report.label_min, report.label_max, report.identities_with_images) == (0, 3, 4)


@pytest.mark.parametrize("kind", ["torch", "dali"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_loaders_read_every_image_once_with_its_label(
    packs: dict[str, Path], name: str, kind: str, tmp_path: Path
) -> None:
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    _, labels, _, first_key = LAYOUTS[name]
    expected = {first_key + i: label for i, label in enumerate(labels)}
    seen: dict[int, int] = {}
    for rank in range(2):
        extra = {"cache_dir": tmp_path} if kind == "dali" else {}
        loader = make_loader(
            kind, packs[name], rank, 2, batch_size=3, seed=1, workers=0 if kind == "torch" else 1,
            flip=False, with_keys=True, **extra,
        )  # fmt: skip
        loader.set_epoch(0)
        for _, y, k in loader:
            for key, label in zip(k.tolist(), y.tolist(), strict=True):
                assert key not in seen
                seen[key] = label
    assert seen == expected


@pytest.mark.parametrize("name", ["face2rec2", "recbuilder"])
def test_dry_run_counts_the_images_of_insightface_packs(packs: dict[str, Path], name: str) -> None:
    """A recipe that states data.num_images (as the published ones do) starts on such packs."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "launcher.cli", "train", str(REPO / "configs" / "demo_cpu.yaml"),
            "--dry-run", "--set", f"data.train={packs[name]}", "--set", "data.num_images=12",
            "--set", "data.num_classes=4", "--set", "data.val=[]", "--set", "train.batch_size=2",
        ],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "12 images, 4 classes, 112x112" in proc.stdout


@pytest.mark.parametrize("name", LAYOUTS)
def test_trainer_trains_on_every_layout(packs: dict[str, Path], name: str, tmp_path: Path) -> None:
    from trainer.config import load_config
    from trainer.context import DistContext
    from trainer.loop import Trainer

    _, labels, _, _ = LAYOUTS[name]
    cfg = load_config(
        REPO / "configs" / "demo_cpu.yaml",
        [
            f"data.train={packs[name]}", "data.val=[]", "data.workers=0", "data.num_images=12",
            f"run.output_dir={tmp_path}", "train.batch_size=4", "train.progress=false",
            "train.eval_at_start=false", "wandb.mode=disabled", "export.onnx=false",
            "dist.nproc=1",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg, DistContext.single())
    assert trainer.derived()["num_images"] == 12 and trainer.derived()["num_classes"] == 4
    assert trainer.steps_per_epoch == 3
    batches = trainer._batches()
    got = torch.cat([next(batches)[1] for _ in range(3)])  # one epoch of labels
    assert sorted(got.tolist()) == sorted(labels)
    loss, _, finite = trainer._one_step(trainer._batches())
    assert finite and torch.isfinite(loss)


def test_recbuilder_image_count_must_match(packs: dict[str, Path], tmp_path: Path) -> None:
    pack = tmp_path / "rb"
    write_recbuilder_pack(pack, SHUFFLED, size=(16, 16))
    (pack / "property").write_text("4,16,16\n13\n")
    with pytest.raises(PackError, match=r"property: says 13 images .* headerless layout has 12"):
        read_pack_facts(pack)
    with pytest.raises(PackError, match="says 13 images"):
        FacePack(pack)
    (pack / "property").write_text("4,16,16\n12\nextra\n")
    with pytest.raises(PackError, match="optionally an image count on a second line"):
        read_pack_facts(pack)


def test_header_is_found_by_key_wherever_the_index_lists_it(tmp_path: Path) -> None:
    """The index's first line is an image (key 1): reading it as the header would make the
    pack header-less and count the header and identity records as images (12 + 1 + 4)."""
    pack = tmp_path / "f2r"
    write_face2rec2_pack(pack, SORTED, size=(16, 16))
    with RecordReader(pack / "train.rec", pack / "train.idx") as reader:
        assert reader.keys[0] == 1 and len(reader) == 17
    assert read_pack_facts(pack).num_images == 12


def _trainer(pack: Path, out: Path, *overrides: str):
    from trainer.config import load_config
    from trainer.context import DistContext
    from trainer.loop import Trainer

    cfg = load_config(
        REPO / "configs" / "demo_cpu.yaml",
        [
            f"data.train={pack}", "data.val=[]", "data.workers=0", f"run.output_dir={out}",
            "train.batch_size=4", "train.progress=false", "train.eval_at_start=false",
            "wandb.mode=disabled", "export.onnx=false", "dist.nproc=1", *overrides,
        ],
    )  # fmt: skip
    return Trainer(cfg, DistContext.single())


@pytest.mark.parametrize("key", [0, 5])
def test_skip_corrupt_trains_past_a_bad_record_of_a_recbuilder_pack(
    tmp_path: Path, key: int
) -> None:
    """Key 0 of a header-less pack is an image like any other: damaged, it is skipped."""
    from _packs import corrupt_record

    pack = tmp_path / "rb"
    write_recbuilder_pack(pack, SHUFFLED, size=SIZE)
    corrupt_record(pack, key, "magic")
    with pytest.raises(PackError, match=f"key {key}"):
        FacePack(pack)
    facts = read_pack_facts(pack, skip_corrupt=True)  # the layout's count, as the property's
    assert (facts.layout, facts.num_images) == ("headerless", 12)
    with FacePack(pack, skip_corrupt=True) as fp:
        assert list(fp.bad_keys) == [key] and fp.num_images == 11
    trainer = _trainer(pack, tmp_path / "out", "data.skip_corrupt=true", "data.num_images=12")
    loss, _, finite = trainer._one_step(trainer._batches())
    assert finite and torch.isfinite(loss)


@pytest.mark.parametrize("fault", ["unindexed", "damaged"])
def test_a_header_pack_that_lost_its_header_is_refused(tmp_path: Path, fault: str) -> None:
    """Read as header-less, its identity records would pass for (bad) images."""
    from _packs import corrupt_record

    pack = tmp_path / "f2r"
    write_face2rec2_pack(pack, SORTED, size=(16, 16))
    if fault == "unindexed":
        idx = pack / "train.idx"
        idx.write_text("".join(x for x in idx.read_text().splitlines(True) if x.split()[0] != "0"))
    else:
        corrupt_record(pack, 0, "magic")
    lost = r"key 16 is an identity record but key 0, the insightface header, is missing"
    for skip in (False, True):
        # Without skip_corrupt a damaged key 0 is reported as what it is.
        match = r"wrong magic number .* key 0" if fault == "damaged" and not skip else lost
        with pytest.raises(PackError, match=match):
            read_pack_facts(pack, skip_corrupt=skip)
        with pytest.raises(PackError, match=match):
            FacePack(pack, skip_corrupt=skip)


def test_facts_past_float32_exact_count_the_index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Past 2**24 the header's float32 range may be rounded: the index count less the header
    and one identity record per class is used (here with the bound lowered to 4 images)."""
    import dataio.layout

    pack = tmp_path / "f2r"
    write_face2rec2_pack(pack, SORTED, size=(16, 16))
    facts = read_pack_facts(pack)
    monkeypatch.setattr(dataio.layout, "FLOAT32_EXACT", 4)
    assert read_pack_facts(pack) == facts  # 17 records - header - 4 identities = 12
    idx = pack / "train.idx"
    idx.write_text(idx.read_text() + "99\t0\n")  # one more indexed record than the layout
    assert read_pack_facts(pack).num_images == 13
