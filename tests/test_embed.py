"""Tests for evaluation/embed.py: image sources, embedders, and `facetrain embed`'s logic."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dataio.packer import write_pack
from dataio.verification_bin import save_bin
from evaluation.embed import (
    EmbeddingError,
    embed_images,
    embed_to_npy,
    normalize_pixels,
    onnx_embedder,
    open_image_source,
    torch_embedder,
)
from evaluation.onnx_export import export_onnx

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def images(n: int, size: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


class MeanColour(nn.Module):
    """[B, 3, H, W] -> [B, 4]: channel means and the mean of the left half (not flip-invariant)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = x[..., : x.shape[-1] // 2].mean(dim=(1, 2, 3))
        return torch.cat([x.mean(dim=(2, 3)), left[:, None]], dim=1) + 2.0


def test_folder_source_labels_by_subfolder_and_reads_in_order(tmp_path: Path) -> None:
    imgs = images(5)
    layout = ["bob/b.png", "alice/z.png", "alice/a.png", "bob/a.jpg", "carol/x.png"]
    for img, rel in zip(imgs, layout, strict=True):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / rel, format="PNG")  # .jpg name, lossless bytes
    (tmp_path / "notes.txt").write_text("not an image")
    src = open_image_source(tmp_path)
    assert src.kind == "folder"
    assert src.names == ["alice/a.png", "alice/z.png", "bob/a.jpg", "bob/b.png", "carol/x.png"]
    assert src.labels.tolist() == [0, 0, 1, 1, 2]
    chunks = list(src.batches(2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    assert np.array_equal(np.concatenate(chunks), imgs[[2, 1, 3, 0, 4]])


def test_flat_folder_has_no_labels_and_list_file_resolves_paths(tmp_path: Path) -> None:
    imgs = images(3)
    for i, img in enumerate(imgs):
        Image.fromarray(img).save(tmp_path / f"{i}.png")
    assert open_image_source(tmp_path).labels is None
    listing = tmp_path / "sub" / "list.txt"
    listing.parent.mkdir()
    listing.write_text(f"# comment\n../2.png 7\n{tmp_path / '0.png'} 3\n")
    src = open_image_source(listing)
    assert src.kind == "list" and src.labels.tolist() == [7, 3]
    assert np.array_equal(src.read_batch(0, 2), imgs[[2, 0]])
    listing.write_text("../2.png seven\n")
    with pytest.raises(EmbeddingError, match=r"list\.txt:1: label 'seven'"):
        open_image_source(listing)


def test_pack_and_bin_sources(tmp_path: Path) -> None:
    imgs = images(4, size=8)
    write_pack(tmp_path / "pack", [(i % 2, png_bytes(im)) for i, im in enumerate(imgs)], 2, (8, 8))
    src = open_image_source(tmp_path / "pack")
    assert src.kind == "pack" and len(src) == 4
    assert sorted(src.labels.tolist()) == [0, 0, 1, 1]
    decoded = src.read_batch(0, 4)
    for img, label in zip(decoded, src.labels, strict=True):
        assert any(np.array_equal(img, imgs[j]) for j in range(label, 4, 2))
    save_bin(tmp_path / "v.bin", [png_bytes(im) for im in imgs], [True, False])
    src = open_image_source(tmp_path / "v.bin")
    assert src.kind == "bin" and src.issame.tolist() == [True, False]
    assert np.array_equal(src.read_batch(0, 4), imgs)
    assert src.names[3] == "pair1.1"


def test_mixed_sizes_and_missing_paths_are_clear_errors(tmp_path: Path) -> None:
    Image.fromarray(images(1, 8)[0]).save(tmp_path / "a.png")
    Image.fromarray(images(1, 9)[0]).save(tmp_path / "b.png")
    with pytest.raises(EmbeddingError, match="b.png is 9x9 but a.png is 8x8"):
        open_image_source(tmp_path).read_batch(0, 2)
    with pytest.raises(EmbeddingError, match="no such image folder"):
        open_image_source(tmp_path / "nope")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(EmbeddingError, match="bad.png: cannot read image"):
        open_image_source(tmp_path).read_batch(0, 3)


def test_embed_images_flip_and_normalisation() -> None:
    imgs = images(5)
    embed = torch_embedder(MeanColour())
    raw = embed_images(embed, [imgs[:3], imgs[3:]], normalize=False)
    x = normalize_pixels(imgs)
    np.testing.assert_allclose(x, (imgs.transpose(0, 3, 1, 2) - 127.5) / 127.5, atol=1e-6)
    expected = np.concatenate([x.mean(axis=(2, 3)), x[..., :6].mean(axis=(1, 2, 3))[:, None]], 1)
    np.testing.assert_allclose(raw, expected + 2.0, rtol=1e-5)
    flipped = embed_images(embed, [imgs], flip=True, normalize=False)
    right = x[..., 6:].mean(axis=(1, 2, 3))  # the flip's left half is the image's right half
    np.testing.assert_allclose(flipped[:, 3], expected[:, 3] + right + 4.0, rtol=1e-5)
    unit = embed_images(embed, [imgs], flip=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    norms = np.linalg.norm(flipped, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, flipped / norms, rtol=1e-6)
    with pytest.raises(EmbeddingError, match="no images"):
        embed_images(embed, [])
    with pytest.raises(EmbeddingError, match=r"shape \(5,\)"):
        embed_images(lambda x: x[:, 0, 0, 0], [imgs])


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_onnx(_tiny(), tmp_path_factory.mktemp("m") / "m.onnx", input_size=12).path


def test_onnx_embedder_matches_torch(onnx_model: Path) -> None:
    embed, hw = onnx_embedder(onnx_model)
    assert hw == (12, 12)
    x = normalize_pixels(images(3))
    out = embed(x)
    assert out.shape == (3, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out, torch_embedder(_tiny())(x), atol=1e-5)
    with pytest.raises(EmbeddingError, match="ONNX model not found"):
        onnx_embedder(onnx_model.with_name("missing.onnx"))


def test_embed_to_npy_writes_normalised_embeddings_and_an_index(
    tmp_path: Path, onnx_model: Path
) -> None:
    imgs = images(5)
    for i, img in enumerate(imgs):
        (tmp_path / "faces" / f"id{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "faces" / f"id{i % 2}" / f"{i}.png")
    res = embed_to_npy(
        onnx_model, tmp_path / "faces", tmp_path / "out" / "emb", batch_size=2, progress=False
    )
    assert res.path == tmp_path / "out" / "emb.npy" and res.num_images == 5 and res.dim == 6
    emb = np.load(res.path)
    assert emb.shape == (5, 6) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    embed, _ = onnx_embedder(onnx_model)
    order = [0, 2, 4, 1, 3]  # id0/0, id0/2, id0/4, id1/1, id1/3
    ref = embed(normalize_pixels(imgs[order]))
    np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-6)
    lines = res.index_path.read_text().splitlines()
    assert lines[0] == "0\tid0/0.png\t0" and lines[4] == "4\tid1/3.png\t1"

    small = tmp_path / "small"
    small.mkdir()
    Image.fromarray(images(1, 10)[0]).save(small / "a.png")
    with pytest.raises(EmbeddingError, match="images are 10x10 .* expects 12x12"):
        embed_to_npy(onnx_model, small, tmp_path / "x.npy", progress=False)
