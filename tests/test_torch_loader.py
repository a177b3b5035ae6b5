"""PyTorch loading: shard sampler arithmetic, dataset tensors, reproducibility across workers."""

from __future__ import annotations

import io
import multiprocessing
import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
import simplejpeg
import torch
from _loaders import torch_loader
from PIL import Image

from dataio.pack import PackError
from dataio.pack_dataset import PackDataset
from dataio.packer import write_pack
from dataio.recordio import IRHeader, RecordWriter, pack_record
from dataio.shard_sampler import ShardSampler

H, W = 8, 10


def make_pack(path, n=24, num_classes=4):
    rng = np.random.default_rng(7)
    samples = [
        (i % num_classes, simplejpeg.encode_jpeg(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)))
        for i in range(n)
    ]
    write_pack(path, samples, num_classes, (H, W))
    return path


# ------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_covers_every_index_once_when_divisible(world):
    n = 12
    for epoch in (0, 1):
        shards = []
        for rank in range(world):
            s = ShardSampler(n, rank, world, seed=3)
            s.set_epoch(epoch)
            shards.append(list(s))
            assert len(s) == n // world == len(shards[-1])
        assert sorted(sum(shards, [])) == list(range(n))
        # rank r takes positions r::world of the shared permutation
        order = ShardSampler(n, 0, world, seed=3)
        order.set_epoch(epoch)
        perm = order.global_order()
        for rank in range(world):
            assert shards[rank] == perm[rank::world].tolist()


def test_sampler_pads_by_wrapping_or_truncates():
    n, world = 10, 3
    samplers = [ShardSampler(n, r, world, seed=1) for r in range(world)]
    perm = samplers[0].global_order()
    assert sorted(perm[:10].tolist()) == list(range(10))
    assert perm[10:].tolist() == perm[:2].tolist()  # padded with the first 2 of the permutation
    shards = [list(s) for s in samplers]
    assert [len(s) for s in shards] == [4, 4, 4]
    flat = sum(shards, [])
    counts = np.bincount(flat, minlength=n)
    assert sorted(np.flatnonzero(counts == 2).tolist()) == sorted(perm[:2].tolist())
    assert counts.min() == 1

    dropped = [list(ShardSampler(n, r, world, seed=1, drop_last=True)) for r in range(world)]
    assert [len(s) for s in dropped] == [3, 3, 3]
    assert sorted(sum(dropped, [])) == sorted(perm[:9].tolist())

    # fewer samples than ranks: padding repeats the permutation
    tiny = [list(ShardSampler(2, r, 5, seed=0)) for r in range(5)]
    assert [len(s) for s in tiny] == [1] * 5 and set(sum(tiny, [])) == {0, 1}
    with pytest.raises(ValueError, match="leaves ranks without samples"):
        ShardSampler(2, 0, 5, drop_last=True)


def test_sampler_is_deterministic_and_seeded():
    def order(seed, epoch, rank=0, world=2, shuffle=True):
        s = ShardSampler(100, rank, world, seed=seed, shuffle=shuffle)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    assert order(0, 1) != order(1, 0)  # (seed, epoch) is not collapsed into seed + epoch
    assert order(5, 2, shuffle=False) == list(range(0, 100, 2))
    assert order(5, 2, rank=1, shuffle=False) == list(range(1, 100, 2))


def test_sampler_resume_and_validation():
    s = ShardSampler(20, 1, 2, seed=9)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start_index=3)
    assert list(s) == full[3:] and len(s) == 7
    with pytest.raises(ValueError, match="start_index 11 past"):
        s.set_epoch(4, start_index=11)
    with pytest.raises(ValueError, match="rank 2 outside"):
        ShardSampler(20, 2, 2)
    with pytest.raises(ValueError, match="num_samples must be positive"):
        ShardSampler(0, 0, 1)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        ShardSampler(10, 0, 1, seed=-1)


# ------------------------------------------------------------------------------- dataset


def test_dataset_item_shape_dtype_range_and_values(tmp_path):
    ds = PackDataset(make_pack(tmp_path / "p"))
    assert len(ds) == 24 and ds.num_classes == 4
    for i in (0, 5, 23):
        x, y = ds[i]
        assert x.shape == (3, H, W) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.ndim == 0
        data, label = ds.pack.read(i)
        assert int(y) == label
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB").astype(np.float32)
        expected = torch.from_numpy((rgb - 127.5) / 127.5).permute(2, 0, 1)
        torch.testing.assert_close(x, expected, rtol=0, atol=1e-6)
        assert -1.0 <= x.min() and x.max() <= 1.0
        assert x.min() < -0.5 and x.max() > 0.5  # random pixels span the range


def test_dataset_flip_is_per_sample_seeded(tmp_path):
    pack = make_pack(tmp_path / "p")
    plain = PackDataset(pack)
    ds = PackDataset(pack, flip=True, seed=11)
    pattern = [ds.flipped(i) for i in range(24)]
    assert 0 < sum(pattern) < 24
    for i in range(24):
        x, _ = ds[i]
        ref, _ = plain[i]
        torch.testing.assert_close(x, ref.flip(-1) if pattern[i] else ref, rtol=0, atol=0)
    assert [PackDataset(pack, flip=True, seed=11).flipped(i) for i in range(24)] == pattern
    ds.set_epoch(1)
    assert ds.epoch == 1
    assert [ds.flipped(i) for i in range(24)] != pattern
    assert [ds.flipped(i, epoch=0) for i in range(24)] == pattern
    assert not any(plain.flipped(i) for i in range(24))
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.epoch == 1 and [clone.flipped(i) for i in range(24)] == [
        ds.flipped(i) for i in range(24)
    ]


@pytest.mark.parametrize("pixels", ["float32", "uint8"])
def test_dataset_decodes_png_and_reports_undecodable(tmp_path, pixels):
    arr = np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    with RecordWriter(tmp_path / "train.rec", tmp_path / "train.idx") as w:
        w.write(0, pack_record(IRHeader(0, 0.0, 0, 0), buf.getvalue()))
        w.write(1, pack_record(IRHeader(0, 1.0, 1, 0), b"\xff\xd8\xffbroken"))
        small = simplejpeg.encode_jpeg(np.zeros((4, 4, 3), np.uint8))
        w.write(2, pack_record(IRHeader(0, 1.0, 2, 0), small))
    (tmp_path / "property").write_text(f"2,{H},{W}")
    ds = PackDataset(tmp_path, pixels=pixels)
    x, _ = ds[0]
    if pixels == "uint8":
        assert torch.equal(x, torch.from_numpy(arr))
    else:
        torch.testing.assert_close(x, (torch.from_numpy(arr).permute(2, 0, 1) - 127.5) / 127.5)
    with pytest.raises(PackError, match="train.rec: key 1: cannot decode image"):
        ds[1]
    with pytest.raises(PackError, match=f"key 2: image is 4x4 .* says {H}x{W}"):
        ds[2]


# ------------------------------------------------------------------------------- loader


def _epochs(loader, epochs):
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def test_loader_is_identical_for_any_worker_count(tmp_path):
    pack = make_pack(tmp_path / "p", n=26)
    kw = dict(rank=1, world_size=2, batch_size=4, seed=5, flip=True)
    serial = _epochs(torch_loader(pack, workers=0, **kw), [0, 1, 2])
    parallel = _epochs(torch_loader(pack, workers=2, **kw), [0, 1, 2])
    assert [len(e) for e in serial] == [3, 3, 3]  # 13 per rank, drop_last -> 3 batches of 4
    for es, ep in zip(serial, parallel, strict=True):
        for (xs, ys), (xp, yp) in zip(es, ep, strict=True):
            assert xs.shape == (4, 3, H, W) and ys.shape == (4,) and ys.dtype == torch.int64
            torch.testing.assert_close(xs, xp, rtol=0, atol=0)
            assert torch.equal(ys, yp)
    # epochs differ (order and flips), so set_epoch reached the persistent workers
    assert not torch.equal(parallel[0][0][0], parallel[1][0][0])


def test_loader_workers_outlive_sigterm(tmp_path):
    """Slurm's scancel / time limit SIGTERM every process of a job; the training process
    checkpoints on it and keeps drawing batches, so its decoding workers must not die."""
    pack = make_pack(tmp_path / "p", n=24)
    loader = torch_loader(pack, 0, 1, batch_size=4, seed=0, workers=2, flip=False)
    loader.set_epoch(0)
    others = set(multiprocessing.active_children())
    batches = iter(loader)
    next(batches), next(batches)  # one from each worker: both have set their handling up
    workers = [p for p in multiprocessing.active_children() if p not in others]
    assert len(workers) == 2
    for worker in workers:  # from another process, as Slurm's
        subprocess.run([sys.executable, "-c", _SIGTERM, str(worker.pid)], check=True)
    time.sleep(1.0)
    assert all(w.is_alive() for w in workers)
    assert len(list(batches)) == 4  # the rest of the epoch: 6 batches of 4


_SIGTERM = "import os, signal, sys; os.kill(int(sys.argv[1]), signal.SIGTERM)"


# A process that exits with a loader still referenced (its persistent workers alive).
_EXIT_WITH_LIVE_WORKERS = """
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
from _loaders import torch_loader
loader = torch_loader(sys.argv[3], 0, 1, batch_size=4, seed=0, workers=2, flip=False)
loader.set_epoch(0)
batches = iter(loader)
next(batches)
"""


def test_exit_with_live_workers_ends(tmp_path):
    """At interpreter exit multiprocessing terminates its daemonic children and then joins
    them: the workers end on their parent's SIGTERM (they ignored it, and the exit hung)."""
    pack = make_pack(tmp_path / "p", n=24)
    tests = os.path.dirname(__file__)
    argv = [sys.executable, "-c", _EXIT_WITH_LIVE_WORKERS, os.path.dirname(tests), tests]
    # A limit only against a hang (a loaded machine can be slow to start torch).
    proc = subprocess.run([*argv, str(pack)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "exited unexpectedly" not in proc.stderr, proc.stderr  # torch's SIGCHLD check


def test_loader_ranks_split_the_data_with_equal_steps(tmp_path):
    pack = make_pack(tmp_path / "p", n=24, num_classes=24)  # label == image index
    seen = []
    steps = []
    for rank in range(3):
        loader = torch_loader(pack, rank, 3, batch_size=4, seed=0, workers=0, flip=False)
        loader.set_epoch(0)
        labels = [y for _, y in loader]
        steps.append(len(labels))
        seen += torch.cat(labels).tolist()
    assert steps == [2, 2, 2]
    assert sorted(seen) == list(range(24))

    resumed = torch_loader(pack, 0, 3, batch_size=4, seed=0, workers=0, flip=False)
    resumed.set_epoch(0)
    full = [y.tolist() for _, y in resumed]
    resumed.set_epoch(0, start_batch=1)
    assert [y.tolist() for _, y in resumed] == full[1:]

    with pytest.raises(ValueError, match="fewer than batch_size=16: no full batch"):
        torch_loader(pack, 0, 3, batch_size=16, seed=0, workers=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        torch_loader(pack, 0, 3, batch_size=0, seed=0, workers=0)


# ------------------------------------------------------------------------------- resume, faults


def test_state_dict_resumes_with_the_next_unseen_batch(tmp_path):
    from _packs import write_test_pack

    pack = tmp_path / "p"
    write_test_pack(pack, [i % 5 for i in range(31)], size=(8, 8))
    kw = dict(batch_size=4, seed=2, flip=True, with_keys=True)
    full = torch_loader(pack, 1, 2, workers=0, **kw)
    full.set_epoch(3)
    ref = [(x, y, k) for x, y, k in full]
    assert len(ref) == 3 and full.state_dict()["batch"] == 3  # 15 per rank -> 3 batches of 4

    loader = torch_loader(pack, 1, 2, workers=2, **kw)
    loader.set_epoch(3)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state == {
        "kind": "torch", "epoch": 3, "batch": 1, "world_size": 2, "batch_size": 4,
        "seed": 2, "num_images": 31,
    }  # fmt: skip
    resumed = torch_loader(pack, 1, 2, workers=2, **kw)
    assert resumed.load_state_dict(state) == (3, 1) and len(resumed) == 2
    rest = list(resumed)
    assert len(rest) == 2 and resumed.state_dict()["batch"] == 3
    for (x, y, k), (xr, yr, kr) in zip(ref[1:], rest, strict=True):
        assert torch.equal(k, kr) and torch.equal(y, yr) and torch.equal(x, xr)

    with pytest.raises(ValueError, match="batch_size: saved 4, this loader 5"):
        torch_loader(pack, 1, 2, workers=0, batch_size=5, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="loader state 'batch' 9 is past the 3 batches"):
        resumed.load_state_dict(state | {"batch": 9})
    assert resumed.load_state_dict(state | {"kind": "dali"}, strict=False) == (4, 0)


@pytest.mark.parametrize(
    "workers,pixels", [(0, "float32"), (2, "float32"), (0, "uint8"), (2, "uint8")]
)
def test_skip_corrupt_replaces_and_counts(tmp_path, workers, pixels):
    from _packs import corrupt_record, write_test_pack

    pack = tmp_path / "p"
    write_test_pack(pack, list(range(12)), size=(8, 8))  # label == key - 1
    corrupt_record(pack, 5, "jpeg")
    corrupt_record(pack, 8, "label")
    kw = dict(rank=0, world_size=1, batch_size=4, seed=0, flip=pixels == "uint8", pixels=pixels)
    if workers == 0:  # (a worker's error leaves persistent workers to time out at exit)
        loader = torch_loader(pack, with_keys=True, workers=0, **kw)
        loader.set_epoch(0)
        with pytest.raises(PackError, match=r"train\.rec: key (5|8): "):
            list(loader)
    loader = torch_loader(pack, with_keys=True, skip_corrupt=True, workers=workers, **kw)
    loader.set_epoch(0)
    batches = list(loader)
    keys = [int(k) for _, _, ks in batches for k in ks]
    labels = [int(v) for _, ys, _ in batches for v in ys]
    assert len(keys) == 12 and 5 not in keys and 8 not in keys
    assert labels == [k - 1 for k in keys]  # a replacement carries its own label
    counts = np.bincount(keys)
    assert counts[6] == 2 and counts[9] == 2  # replaced by the next image: explicit repeats
    assert loader.num_skipped == 2
