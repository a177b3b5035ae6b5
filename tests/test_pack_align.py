"""`facetrain pack` with 5-point alignment from a list file, in worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from dataio.align import similarity_matrix, template_for, transform_points
from dataio.pack import FacePack, PackError
from dataio.packer import pack_image_folder


def _photo(landmarks: np.ndarray, size=(200, 190)) -> np.ndarray:
    """A smooth background with a bright dot at each landmark, uint8 [H, W, 3]."""
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float64)
    img = 20 + 0.1 * xs + 0.1 * ys
    for x, y in landmarks:
        img = img + 200 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.5**2))
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _centre(img: np.ndarray, x: float, y: float, r: int = 5) -> np.ndarray:
    g = img[:, :, 0].astype(np.float64) - np.median(img[:, :, 0])
    g = np.clip(g, 0, None)
    x0, y0 = int(round(x)), int(round(y))
    py, px = np.mgrid[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    patch = g[y0 - r : y0 + r + 1, x0 - r : x0 + r + 1]
    return np.array([(patch * px).sum() / patch.sum(), (patch * py).sum() / patch.sum()])


@pytest.mark.parametrize("align_size", [(112, 112), (112, 96)])
def test_pack_list_file_with_alignment_in_worker_processes(tmp_path, align_size):
    template = template_for(align_size)
    lines = []
    for i in range(5):
        m = similarity_matrix(1.2 + 0.05 * i, np.deg2rad(-15 + 8 * i), 10.0 + 3 * i, 12.0)
        lm = transform_points(m, template)
        path = tmp_path / f"img{i}.png"  # PNG: lossless, so only the packed JPEG loses detail
        Image.fromarray(_photo(lm)).save(path)
        coords = " ".join(f"{v:.4f}" for v in lm.reshape(-1))
        lines.append(f"{path.name} {i % 2} {coords}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    info = pack_image_folder(
        tmp_path / "list.txt",
        tmp_path / "pack",
        workers=2,
        chunk_size=2,  # 3 chunks over 2 processes
        progress=False,
        align=True,
        align_size=align_size,
        jpeg_quality=98,
    )
    assert (info.num_images, info.num_classes, info.image_size) == (5, 2, align_size)
    pack = FacePack(tmp_path / "pack")
    assert pack.labels.tolist() == [0, 0, 0, 1, 1]  # stable by label: images 0, 2, 4, 1, 3
    for i in range(5):
        data, _ = pack.read(i)
        crop = simplejpeg.decode_jpeg(data, colorspace="RGB")
        assert crop.shape == (*align_size, 3)
        centres = np.array([_centre(crop, x, y) for x, y in template])
        np.testing.assert_allclose(centres, template, atol=0.35)


def test_alignment_needs_landmarks_and_valid_lines(tmp_path):
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "plain.txt").write_text("a.png 0\n")
    with pytest.raises(PackError, match=r"plain\.txt:1: align needs a list file whose lines"):
        pack_image_folder(tmp_path / "plain.txt", tmp_path / "o", progress=False, align=True)
    (tmp_path / "short.txt").write_text("a.png 0 1 2 3\n")
    with pytest.raises(PackError, match=r"short\.txt:1: expected 'path label' or 'path label x1"):
        pack_image_folder(tmp_path / "short.txt", tmp_path / "o", progress=False)
    (tmp_path / "same.txt").write_text("a.png 0 " + " ".join(["5"] * 10) + "\n")
    with pytest.raises(PackError, match=r"same\.txt:1: umeyama: the source points coincide"):
        pack_image_folder(tmp_path / "same.txt", tmp_path / "o", progress=False, align=True)
    with pytest.raises(ValueError, match="align_size: no 5-point template"):
        pack_image_folder(
            tmp_path / "same.txt", tmp_path / "o", progress=False, align=True, align_size=(90, 70)
        )
    # without align the landmarks are accepted and ignored
    info = pack_image_folder(tmp_path / "same.txt", tmp_path / "o", progress=False)
    assert info.image_size == (20, 20)
