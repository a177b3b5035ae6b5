"""uint8 loader output normalised on the device, and the torch loader's reused batch buffers."""

from __future__ import annotations

import time

import numpy as np
import pytest
import simplejpeg
import torch
from _loaders import torch_loader
from _packs import write_test_pack

from dataio.loading import to_model_input
from dataio.pack_dataset import PackDataset

H, W = 8, 11


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixels")
    write_test_pack(d, list(range(40)), size=(H, W), seed=3, magic_every=7)  # odd width
    return d


def reference(pack_dir, epoch, seed=5):
    """Float32 batches of one epoch from the single-process loader (the expected output)."""
    loader = torch_loader(pack_dir, 0, 1, batch_size=3, seed=seed, workers=0)
    loader.set_epoch(epoch)
    return list(loader)


def test_to_model_input_equals_the_float_loader_exactly(pack):
    ds = PackDataset(pack, flip=True, seed=2, pixels="uint8")
    x8, y8, k8 = ds.load_batch(list(range(12)))
    assert x8.dtype == torch.uint8 and x8.shape == (12, H, W, 3)
    xf, yf, kf = PackDataset(pack, flip=True, seed=2).load_batch(list(range(12)))
    assert torch.equal(y8, yf) and torch.equal(k8, kf)
    x = to_model_input(x8, "cpu")
    assert x.shape == (12, 3, H, W) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, xf)  # the same arithmetic, bit for bit
    # independent check: decode with simplejpeg, mirror where flip_mask says, normalise
    for j in range(12):
        data, _ = ds.pack.read(j)
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB")
        if ds.flipped(j):
            rgb = rgb[:, ::-1]
        want = (rgb.astype(np.float32).transpose(2, 0, 1) - 127.5) / 127.5
        np.testing.assert_allclose(x[j].numpy(), want, rtol=0, atol=1e-7)
    assert to_model_input(xf, "cpu") is xf  # float batches are only moved


def test_to_model_input_rejects_other_batches():
    with pytest.raises(TypeError, match=r"uint8 \[B, H, W, 3\], got torch.uint8 \[2, 3, 4, 4\]"):
        to_model_input(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "cpu")
    with pytest.raises(TypeError, match="got torch.float64"):
        to_model_input(torch.zeros(2, 4, 4, 3, dtype=torch.float64), "cpu")
    with pytest.raises(ValueError, match="pixels must be one of"):
        PackDataset("unused", pixels="float16")


def test_workers_reuse_buffers_and_never_overwrite_a_held_batch(pack):
    loader = torch_loader(pack, 0, 1, batch_size=3, seed=5, workers=2, pixels="uint8", prefetch=1)
    assert loader.steps_per_epoch == 13
    for epoch in range(10):
        # Streaming: each batch is dropped before the next, so the workers cycle through
        # their buffers and never need a fresh one. (Several passes: each starts while the
        # workers are already filling buffers for it.)
        loader.set_epoch(epoch)
        want = reference(pack, epoch)
        for (x, y), (xf, yf) in zip(loader, want, strict=True):
            assert torch.equal(to_model_input(x, "cpu"), xf) and torch.equal(y, yf)
            del x
    assert loader._buffers.fresh == 0
    # Holding every batch: the workers run out of free buffers (3 each) and fall back to
    # fresh ones; nothing held is overwritten.
    loader.set_epoch(2)
    held = list(loader)
    fresh_after_held = loader._buffers.fresh
    assert fresh_after_held > 0
    want = reference(pack, 2)
    assert len(held) == len(want) == 13
    for (x, y), (xf, yf) in zip(held, want, strict=True):
        assert torch.equal(to_model_input(x, "cpu"), xf) and torch.equal(y, yf)
    del held, x
    loader.set_epoch(3)
    for (x, _), (xf, _) in zip(loader, reference(pack, 3), strict=True):
        assert torch.equal(to_model_input(x, "cpu"), xf)
        del x
    assert loader._buffers.fresh == fresh_after_held  # dropped batches freed their buffers


def test_an_abandoned_pass_leaks_no_buffer(pack, monkeypatch):
    # One worker, one batch prefetched: 3 buffers and no spare. Slow batches keep tasks of
    # the abandoned pass running while the DataLoader drains it at the next pass's start.
    original = PackDataset.load_batch

    def slow(self, indices, out=None):
        time.sleep(0.02)
        return original(self, indices, out=out)

    monkeypatch.setattr(PackDataset, "load_batch", slow)  # inherited by the forked worker
    kw = dict(batch_size=3, seed=5, workers=1, pixels="uint8", prefetch=1)
    loader = torch_loader(pack, 0, 1, **kw)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for i, _batch in enumerate(loader):
            if i == 1:
                break  # abandon the pass with tasks queued and running
        del _batch
    loader.set_epoch(3)
    for (x, _), (xf, _) in zip(loader, reference(pack, 3), strict=True):
        assert torch.equal(to_model_input(x, "cpu"), xf)
        del x
    assert loader._buffers.fresh == 0


def test_short_last_batch_and_reuse_off(pack):
    # 40 images in batches of 3, no drop_last: the last batch holds 1 image in its own
    # tensor, not in a view of a whole 3-image buffer.
    loader = torch_loader(
        pack, 0, 1, batch_size=3, seed=5, workers=2, pixels="uint8", drop_last=False
    )
    loader.set_epoch(0)
    batches = [x for x, _ in loader]
    assert [b.shape[0] for b in batches] == [3] * 13 + [1]
    assert batches[-1].untyped_storage().nbytes() == H * W * 3
    # Without reuse every batch is its own tensor; same pixels.
    plain = torch_loader(
        pack, 0, 1, batch_size=3, seed=5, workers=2, pixels="uint8", reuse_buffers=False
    )
    plain.set_epoch(1)
    for (x, _), (xf, _) in zip(plain, reference(pack, 1), strict=True):
        assert torch.equal(to_model_input(x, "cpu"), xf)
    assert plain._buffers.fresh == 0  # "fresh" counts only fallbacks of reuse
