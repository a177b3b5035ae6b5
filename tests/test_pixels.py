"""uint8 loader output normalised on the device, and the torch loader's reused batch buffers."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg
import torch

from dataio.fixtures import write_test_pack
from dataio.loading import to_model_input
from dataio.torch_loader import PackDataset, build_train_loader

H, W = 8, 11


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    d = tmp_path_factory.mktemp("pixels")
    write_test_pack(d, list(range(40)), size=(H, W), seed=3, magic_every=7)  # odd width
    return d


def reference(pack_dir, epoch, seed=5):
    """Float32 batches of one epoch from the single-process loader (the expected output)."""
    loader = build_train_loader(pack_dir, 0, 1, batch_size=3, seed=seed, workers=0)
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
    loader = build_train_loader(
        pack, 0, 1, batch_size=3, seed=5, workers=2, pixels="uint8", prefetch_factor=1
    )
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
    assert loader._buffers.fresh > 0
    want = reference(pack, 2)
    assert len(held) == len(want) == 13
    for (x, y), (xf, yf) in zip(held, want, strict=True):
        assert torch.equal(to_model_input(x, "cpu"), xf) and torch.equal(y, yf)
    # Once they are dropped, the buffers return to the workers. An abandoned pass (its
    # prefetched batches discarded by the DataLoader) leaks none either.
    del held, x
    loader.set_epoch(3)
    first = next(iter(loader))
    del first
    fresh = loader._buffers.fresh
    loader.set_epoch(3)
    for (x, _), (xf, _) in zip(loader, reference(pack, 3), strict=True):
        assert torch.equal(to_model_input(x, "cpu"), xf)
        del x
    assert loader._buffers.fresh == fresh
