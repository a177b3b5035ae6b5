"""DALI loader (CPU mode): insightface packs without re-packing, agreement with the torch
loader, resume, corrupt records, and the loader dispatcher."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from _loaders import dali_loader, make_loader  # noqa: E402
from _packs import corrupt_record, write_test_pack  # noqa: E402

from dataio.dali_index import resolve_cache_dir  # noqa: E402
from dataio.loader_config import DaliAugment  # noqa: E402
from dataio.loading import TrainLoader, to_model_input  # noqa: E402
from dataio.pack import FacePack, PackError  # noqa: E402
from dataio.pack_dataset import PackDataset  # noqa: E402
from dataio.record_reader import read_index  # noqa: E402
from dataio.recordio import IRHeader, RecordWriter, pack_record  # noqa: E402
from dataio.torch_loader import build_train_loader  # noqa: E402

LEVEL = 1.0 / 127.5  # one intensity level after (x - 127.5) / 127.5


def labels_for(n: int, classes: int) -> list[int]:
    return [i * classes // n for i in range(n)]  # sorted, 2-3 images per class


@pytest.fixture(scope="module")
def header_pack(tmp_path_factory):
    d = tmp_path_factory.mktemp("dali_header")
    write_test_pack(d, labels_for(29, 11), size=(20, 18), seed=1, magic_every=4)
    return d


def run_epoch(loader, epoch, start_batch=0):
    loader.set_epoch(epoch, start_batch)
    return [(x.clone(), y.clone(), k.clone()) for x, y, k in loader]


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_header_pack_read_without_repacking_and_agrees_with_torch(header_pack, tmp_path):
    digests = {p.name: file_digest(p) for p in header_pack.iterdir() if p.is_file()}
    dali = dali_loader(
        header_pack, 0, 1, batch_size=4, seed=3, workers=2, flip=True, drop_last=False,
        cache_dir=tmp_path / "cache", with_keys=True,
    )  # fmt: skip
    assert isinstance(dali, TrainLoader) and len(dali) == dali.steps_per_epoch == 8
    ds = PackDataset(header_pack, flip=False)
    pos = {int(k): i for i, k in enumerate(ds.pack.image_keys)}
    flip_patterns = []
    for epoch in (0, 1):
        batches = run_epoch(dali, epoch)
        keys = torch.cat([k for _, _, k in batches]).tolist()
        assert sorted(keys) == list(range(1, 30))  # every image once; header/identities never
        assert [x.shape[0] for x, _, _ in batches] == [4] * 7 + [1]
        flipped = {}
        for x, y, k in batches:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            for j in range(len(k)):
                ref, label = ds[pos[int(k[j])]]
                assert int(y[j]) == int(label)
                diffs = [float((x[j] - r).abs().max()) for r in (ref, ref.flip(-1))]
                assert min(diffs) <= LEVEL + 1e-6  # the same pixels, maybe mirrored
                flipped[int(k[j])] = diffs[1] < diffs[0]
        assert 5 < sum(flipped.values()) < 24  # about half the images are mirrored
        flip_patterns.append(flipped)
    assert flip_patterns[0] != flip_patterns[1]
    again = run_epoch(dali, 1)  # an epoch is reproducible, flips included
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, batches, strict=True))
    # the pack is untouched; DALI read an image-only index from the cache folder
    assert {p.name: file_digest(p) for p in header_pack.iterdir() if p.is_file()} == digests
    (index,) = (tmp_path / "cache").glob("images-*.idx")
    keys, offsets = read_index(index)
    pack = FacePack(header_pack)
    assert keys == list(range(1, 30))
    assert [offsets[k] for k in keys] == pack.image_offsets.tolist()


def test_headerless_vector_labels_and_default_cache_folder(tmp_path, monkeypatch):
    jpegs = []
    import simplejpeg
    from _packs import smooth_image

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    pack_dir = tmp_path / "pack"
    pack_dir.mkdir()
    rng = np.random.default_rng(0)
    with RecordWriter(pack_dir / "train.rec", pack_dir / "train.idx") as w:
        for key in range(6):
            jpeg = simplejpeg.encode_jpeg(smooth_image(rng, 8, 8), quality=95)
            jpegs.append(jpeg)
            label = [float(key % 3), 0.25] if key % 2 else float(key % 3)  # mixed label forms
            w.write(key, pack_record(IRHeader(0, label, key, 0), jpeg))
    (pack_dir / "property").write_text("3,8,8")
    loader = dali_loader(
        pack_dir, 0, 1, batch_size=3, seed=0, workers=1, flip=False, with_keys=True
    )
    batches = run_epoch(loader, 0)
    got = {int(k): int(y) for _, ys, ks in batches for y, k in zip(ys, ks, strict=True)}
    assert got == {k: k % 3 for k in range(6)}
    # headerless and clean: DALI reads the pack's own index, no cache file is written
    assert not (tmp_path / "home").exists()
    # without a cache_dir, derived files go to the user's cache folder, never into the pack
    folder = resolve_cache_dir(pack_dir)
    assert folder.startswith(str(tmp_path / "home" / ".cache" / "facetrain"))
    assert os.listdir(folder) == []
    assert sorted(os.listdir(pack_dir)) == ["property", "train.idx", "train.rec"]


def test_resume_mid_epoch_continues_with_unseen_records(header_pack, tmp_path):
    kw = dict(batch_size=3, seed=5, workers=1, flip=True, cache_dir=tmp_path, with_keys=True)
    for rank in (0, 1):
        full = run_epoch(dali_loader(header_pack, rank, 2, **kw), 2)
        assert len(full) == 4  # floor(14 / 3) batches of the 14- or 15-image shard
        shard_keys = {int(k) for _, _, ks in full for k in ks}

        loader = dali_loader(header_pack, rank, 2, **kw)
        loader.set_epoch(2)
        it = iter(loader)
        first = [next(it)[2].tolist() for _ in range(2)]
        state = loader.state_dict()
        assert state["kind"] == "dali" and (state["epoch"], state["batch"]) == (2, 2)
        assert first == [k.tolist() for _, _, k in full[:2]]  # same seed, same order

        resumed = dali_loader(header_pack, rank, 2, **kw)
        assert resumed.load_state_dict(state) == (2, 2)
        assert len(resumed) == 2
        rest = [(x, y, k) for x, y, k in resumed]
        rest_keys = [int(k) for _, _, ks in rest for k in ks]
        consumed = {k for b in first for k in b}
        assert len(rest) == 2 and len(rest_keys) == 6 == len(set(rest_keys))
        assert not consumed & set(rest_keys)  # nothing seen twice
        # epoch 2 on 2 ranks: rank r reads shard (r + 2) % 2 = r of the key-ordered records,
        # [29 * r // 2, 29 * (r + 1) // 2) -> keys 1..14 and 15..29
        shard = set(range(1 + 29 * rank // 2, 1 + 29 * (rank + 1) // 2))
        assert shard_keys <= shard and consumed <= shard and set(rest_keys) <= shard
        assert len(shard - consumed - set(rest_keys)) == len(shard) - 12  # 2-3 left unread
        # the resumed batches carry those records' labels and pixels
        ds = PackDataset(header_pack)
        pos = {int(k): i for i, k in enumerate(ds.pack.image_keys)}
        for x, y, ks in rest:
            for j, k in enumerate(ks.tolist()):
                ref, label = ds[pos[k]]
                assert int(y[j]) == int(label)
                err = min(float((x[j] - r).abs().max()) for r in (ref, ref.flip(-1)))
                assert err <= LEVEL + 1e-6

    saved = dali_loader(header_pack, 0, 2, **kw).state_dict() | {"batch": 1}
    other = dali_loader(header_pack, 0, 3, **kw)
    with pytest.raises(ValueError, match="world_size: saved 2, this loader 3"):
        other.load_state_dict(saved)
    # not strict: the saved epoch is abandoned, the next one starts from its first batch
    assert other.load_state_dict(saved | {"epoch": 4}, strict=False) == (5, 0)


@pytest.mark.parametrize("kind", ["jpeg", "magic", "label", "length"])
def test_corrupt_record_raises_with_key_or_is_skipped(header_pack, tmp_path, kind):
    import shutil

    pack = tmp_path / "p"
    shutil.copytree(header_pack, pack)
    bad_key = 9
    corrupt_record(pack, bad_key, kind)
    kw = dict(batch_size=4, seed=2, workers=1, flip=False, cache_dir=tmp_path / "c")
    loader = dali_loader(pack, 0, 1, **kw)
    loader.set_epoch(0)
    with pytest.raises(PackError, match=rf"train\.rec: key {bad_key}: ") as ei:
        for _ in loader:
            pass
    assert str(pack / "train.rec") in str(ei.value)

    loader = dali_loader(pack, 0, 1, skip_corrupt=True, with_keys=True, **kw)
    for epoch in (0, 1):
        keys = [int(k) for _, _, ks in run_epoch(loader, epoch) for k in ks]
        assert len(keys) == 28 == len(set(keys)) and bad_key not in keys  # 7 full batches
    assert loader.num_skipped == 1  # found in epoch 0, left out of epoch 1 up front
    state = loader.state_dict()
    assert state["excluded"] == [bad_key]


def test_resume_replays_an_epoch_that_skipped_a_record(header_pack, tmp_path):
    import shutil

    pack = tmp_path / "p"
    shutil.copytree(header_pack, pack)
    corrupt_record(pack, 20, "jpeg")
    kw = dict(batch_size=3, seed=4, workers=1, flip=False, cache_dir=tmp_path / "c")
    loader = dali_loader(pack, 0, 1, skip_corrupt=True, with_keys=True, **kw)
    loader.set_epoch(0)
    seen, state = [], None
    for _, _, ks in loader:
        seen.append(ks.tolist())
        if loader.state_dict()["parts"] and state is None:
            state = loader.state_dict()  # right after the first batch past the repair
    assert state is not None and state["parts"][0][1] == [20]
    done = state["batch"]
    resumed = dali_loader(pack, 0, 1, skip_corrupt=True, with_keys=True, **kw)
    resumed.load_state_dict(state)
    rest = [int(k) for _, _, ks in resumed for k in ks]
    consumed = [k for b in seen[:done] for k in b]
    assert len(rest) == 3 * (9 - done) and not set(rest) & set(consumed)
    assert 20 not in rest and len(set(rest)) == len(rest)


def test_augment_and_dispatcher(header_pack, tmp_path):
    kw = dict(rank=0, world_size=1, batch_size=5, seed=0, workers=1, flip=False)
    plain = make_loader("dali", header_pack, cache_dir=tmp_path, with_keys=True, **kw)
    jitter = make_loader(
        "dali", header_pack, cache_dir=tmp_path, with_keys=True, augment=DaliAugment(), **kw
    )
    (xa, _, ka), (xb, _, kb) = next(iter(plain)), next(iter(jitter))
    assert torch.equal(ka, kb)  # same reader seed: same records
    assert xb.shape == xa.shape and xb.min() >= -1 and xb.max() <= 1
    diff = (xb - xa).abs().mean(dim=(1, 2, 3))
    assert (diff > 2 * LEVEL).all()  # each image was jittered
    torch_loader = make_loader("torch", header_pack, **kw)
    assert isinstance(torch_loader, TrainLoader) and len(torch_loader) == len(plain) == 5
    with pytest.raises(ValueError, match="data.loader: unknown loader kind 'mxnet'"):
        make_loader("mxnet", header_pack, **kw)
    with pytest.raises(ValueError, match="DaliAugment.contrast must be in"):
        DaliAugment(contrast=1.5)
    assert build_train_loader  # the torch builder stays importable by its old name


def test_uint8_pixels_match_the_float_pipeline(header_pack, tmp_path):
    kw = dict(batch_size=4, seed=2, workers=2, flip=True, with_keys=True, cache_dir=tmp_path)
    floats = run_epoch(dali_loader(header_pack, 0, 1, **kw), 1)
    raw = run_epoch(dali_loader(header_pack, 0, 1, pixels="uint8", **kw), 1)
    for (xf, yf, kf), (x8, y8, k8) in zip(floats, raw, strict=True):
        assert torch.equal(kf, k8) and torch.equal(yf, y8)  # same records, same order
        assert x8.dtype == torch.uint8 and x8.shape == (len(k8), 20, 18, 3)
        # same flips; DALI's normalisation rounds within a float32 ulp of ours
        torch.testing.assert_close(to_model_input(x8, "cpu"), xf, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipeline_matches_cpu(header_pack, tmp_path):
    kw = dict(batch_size=4, seed=1, workers=2, flip=True, with_keys=True, cache_dir=tmp_path)
    cpu = run_epoch(dali_loader(header_pack, 0, 1, device="cpu", **kw), 0)
    gpu = run_epoch(dali_loader(header_pack, 0, 1, device="cuda:0", **kw), 0)
    for (xc, yc, kc), (xg, yg, kg) in zip(cpu, gpu, strict=True):
        assert torch.equal(kc, kg) and torch.equal(yc, yg.cpu()) and xg.is_cuda
        assert float((xc - xg.cpu()).abs().max()) <= 2 * LEVEL
