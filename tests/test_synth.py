"""Synthetic identity data: deterministic, held-out identities disjoint, not pixel-trivial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataio.pack import FacePack
from dataio.synth import (
    HELDOUT_IDENTITY_OFFSET,
    FaceGenerator,
    SynthConfig,
    encode_image,
    verification_pairs,
)
from dataio.verification_bin import load_bin


def test_render_is_deterministic_and_seed_dependent() -> None:
    g1, g2 = FaceGenerator(), FaceGenerator()
    a = g1.render(0, 5, 3)
    assert a.shape == (112, 112, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, g2.render(0, 5, 3))
    assert not np.array_equal(a, g1.render(0, 5, 4))  # another image of the identity
    assert not np.array_equal(a, g1.render(1, 5, 3))  # another dataset seed
    # Rendering order does not matter: image (5, 3) after other images is the same.
    g1.render(0, 9, 9)
    np.testing.assert_array_equal(a, g1.render(0, 5, 3))


def test_encoded_bytes_are_deterministic() -> None:
    g = FaceGenerator()
    assert encode_image(g, 0, 2, 1) == encode_image(FaceGenerator(), 0, 2, 1)


def test_generator_seed_changes_the_identity_map() -> None:
    p_a = FaceGenerator().face_params(np.ones(16))
    p_b = FaceGenerator(SynthConfig(generator_seed=99)).face_params(np.ones(16))
    assert p_a != p_b
    assert all(0.0 < v < 1.0 for v in p_a.values())


def test_identities_differ_more_than_their_images() -> None:
    """Same-identity images share structure: their latent-driven parameters are identical."""
    g = FaceGenerator()
    z0, z1 = g.identity_latent(0, 0), g.identity_latent(0, 1)
    assert not np.allclose(z0, z1)
    np.testing.assert_array_equal(z0, g.identity_latent(0, 0))


def test_verification_pairs_balanced_and_valid() -> None:
    pairs, issame = verification_pairs(10, 4, 40, seed=1)
    assert pairs.shape == (40, 2) and issame.sum() == 20
    ident = pairs // 4
    assert np.all((ident[:, 0] == ident[:, 1]) == issame)
    assert np.all(pairs[issame, 0] != pairs[issame, 1])  # genuine pairs use two images
    # Each contiguous tenth (a fold) holds both kinds.
    for fold in np.split(issame, 10):
        assert 0 < fold.sum() < len(fold)
    with pytest.raises(ValueError, match="even"):
        verification_pairs(10, 4, 7, seed=1)


def test_written_dataset(tiny_dataset: Path) -> None:
    with FacePack(tiny_dataset / "train") as pack:
        assert pack.num_classes == 6 and pack.num_images == 24
        assert sorted(set(pack.labels.tolist())) == list(range(6))
        jpeg, label = pack.read(0)
        assert jpeg[:2] == b"\xff\xd8" and label == 0
    vs = load_bin(tiny_dataset / "val.bin")
    assert len(vs) == 40 and vs.issame.sum() == 10
    assert vs.decode(0, 2).shape == (2, 112, 112, 3)


def test_heldout_images_are_not_training_identities(tiny_dataset: Path) -> None:
    """Val images are rendered from identities >= HELDOUT_IDENTITY_OFFSET, never from 0..N-1."""
    g = FaceGenerator()
    vs = load_bin(tiny_dataset / "val.bin")
    pairs, _ = verification_pairs(5, 4, 20, seed=3)
    first = int(pairs[0, 0])
    expected = encode_image(g, 3, HELDOUT_IDENTITY_OFFSET + first // 4, first % 4)
    assert vs.encoded(0) == expected


def test_raw_pixels_do_not_solve_verification() -> None:
    """Raw-pixel cosine similarity must stay far from a trained model (issue: <= 75%)."""
    from evaluation.verification import cosine_pixel_baseline

    g = FaceGenerator()
    ids, per = 30, 6
    pairs, issame = verification_pairs(ids, per, 300, seed=5)
    images = np.stack([g.render(5, int(p) // per, int(p) % per) for p in pairs.reshape(-1)])
    acc = cosine_pixel_baseline(images, issame, nfolds=10).accuracy_mean
    assert acc <= 0.75, acc
