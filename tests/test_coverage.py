"""Exactly-once coverage per epoch across ranks, for both loaders and both pack layouts.

Policy under test: with ``drop_last`` every rank yields ``floor(floor(N/W)/B)`` full batches,
no image twice in an epoch, the rest left out; without it every image is yielded and shards
shorter than ``ceil(N/W)`` repeat images to fill, exactly ``W * ceil(N/W) - N`` repeats.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from _packs import write_test_pack

from dataio.loaders import DaliOptions, LoaderConfig, build_loader
from dataio.loading import steps_per_epoch
from dataio.pack import FacePack

N, B = 23, 3
LABELS = [i * 7 // N for i in range(N)]


@pytest.fixture(scope="module", params=["header", "headerless"])
def pack_dir(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"coverage_{request.param}")
    labels = (
        LABELS if request.param == "header" else list(np.random.default_rng(0).permutation(LABELS))
    )
    write_test_pack(d, labels, size=(8, 8), with_header=request.param == "header")
    return d


def build(kind, pack_dir, rank, world, drop_last, cache):
    config = LoaderConfig(
        batch_size=B, seed=7, workers=0 if kind == "torch" else 1, flip=False,
        drop_last=drop_last, with_keys=True, dali=DaliOptions(cache_dir=cache),
    )  # fmt: skip
    return build_loader(kind, pack_dir, config, rank=rank, world_size=world)


@pytest.mark.parametrize("kind", ["torch", "dali"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_image_once_per_epoch_across_ranks(pack_dir, tmp_path, kind, world):
    if kind == "dali":
        pytest.importorskip("nvidia.dali")
    pack = FacePack(pack_dir)
    label_of = dict(zip(pack.image_keys.tolist(), pack.labels.tolist(), strict=True))
    for drop_last in (True, False):
        steps = steps_per_epoch(N, world, B, drop_last)
        loaders = [build(kind, pack_dir, r, world, drop_last, tmp_path) for r in range(world)]
        orders = []
        for epoch in (0, 1):
            counts: collections.Counter[int] = collections.Counter()
            for loader in loaders:
                loader.set_epoch(epoch)
                assert len(loader) == steps
                batches = list(loader)
                assert len(batches) == steps  # every rank runs the same number of steps
                for _, y, k in batches:
                    assert y.dtype == torch.int64
                    assert y.tolist() == [label_of[key] for key in k.tolist()]
                counts.update(int(key) for _, _, k in batches for key in k)
                if loader is loaders[0]:
                    orders.append([int(key) for _, _, k in batches for key in k])
            assert set(counts) <= set(label_of)
            if drop_last:
                assert max(counts.values()) == 1  # nothing twice
                assert sum(counts.values()) == world * steps * B
                assert N - len(counts) < world * (B + 1)  # what is left out is bounded
            else:
                assert set(counts) == set(label_of)  # nothing lost
                per_rank = -(-N // world)
                assert sum(counts.values()) == world * per_rank
                assert sum(c - 1 for c in counts.values()) == world * per_rank - N
        assert orders[0] != orders[1]  # each epoch is reshuffled
