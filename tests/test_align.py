"""5-point alignment: Umeyama similarity on known transforms, bilinear warp, ArcFace crops."""

from __future__ import annotations

import numpy as np
import pytest

from dataio.align import (
    ARCFACE_TEMPLATE_112,
    AlignmentError,
    ARCFACE_TEMPLATE_112x96,
    align_face,
    check_landmarks,
    similarity_matrix,
    template_for,
    transform_points,
    umeyama,
    warp_affine,
)


@pytest.mark.parametrize(
    "scale, angle_deg, tx, ty",
    [(1.0, 0.0, 0.0, 0.0), (0.37, 23.0, 12.5, -40.0), (2.5, -170.0, 3.0, 7.0), (1.2, 90.0, 0, 0)],
)
def test_umeyama_recovers_a_known_similarity_exactly(scale, angle_deg, tx, ty):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    truth = similarity_matrix(scale, np.deg2rad(angle_deg), tx, ty)
    dst = transform_points(truth, src)
    est = umeyama(src, dst)
    np.testing.assert_allclose(est, truth, atol=1e-9)
    np.testing.assert_allclose(transform_points(est, src), dst, atol=1e-9)
    # without scale estimation the rotation and translation still fit when scale is 1
    if scale == 1.0:
        np.testing.assert_allclose(umeyama(src, dst, estimate_scale=False), truth, atol=1e-9)


def test_umeyama_is_the_least_squares_similarity_and_never_reflects():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    truth = similarity_matrix(0.8, 0.3, 5.0, -2.0)
    dst = transform_points(truth, src) + rng.normal(0, 1.5, (5, 2))
    est = umeyama(src, dst)

    def sse(m):
        return float(((transform_points(m, src) - dst) ** 2).sum())

    best = sse(est)
    assert best < sse(truth)  # the noisy optimum fits better than the generating transform
    # perturbing any of the 4 similarity parameters only increases the squared error
    s = np.hypot(est[0, 0], est[1, 0])
    a = np.arctan2(est[1, 0], est[0, 0])
    for d in np.eye(4) * 1e-3:
        for sign in (1, -1):
            p = np.array([s, a, est[0, 2], est[1, 2]]) + sign * d
            assert sse(similarity_matrix(*p)) > best

    # mirrored points: the best *rotation* is returned, never a reflection (det > 0)
    mirrored = dst * np.array([-1.0, 1.0])
    est_m = umeyama(src, mirrored)
    assert np.linalg.det(est_m[:2, :2]) > 0


def test_umeyama_rejects_bad_input():
    pts = np.ones((5, 2))
    with pytest.raises(AlignmentError, match="coincide"):
        umeyama(pts, np.random.default_rng(0).random((5, 2)))
    with pytest.raises(AlignmentError, match=r"matching \[N, D\]"):
        umeyama(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(AlignmentError, match="finite"):
        umeyama(np.array([[0, 0], [np.nan, 1.0]]), np.zeros((2, 2)))
    with pytest.raises(AlignmentError, match="10 numbers"):
        check_landmarks([1, 2, 3])


def test_templates():
    np.testing.assert_allclose(template_for((112, 112)), ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(template_for((112, 96)), ARCFACE_TEMPLATE_112x96)
    np.testing.assert_allclose(ARCFACE_TEMPLATE_112x96[:, 0], ARCFACE_TEMPLATE_112[:, 0] - 8)
    np.testing.assert_allclose(template_for((224, 224)), 2 * ARCFACE_TEMPLATE_112)
    # the 112x112 template is symmetric about the vertical centre line within 1 pixel
    centre = (ARCFACE_TEMPLATE_112[0, 0] + ARCFACE_TEMPLATE_112[1, 0]) / 2
    assert abs(centre - 55.9) < 1.0 and abs(ARCFACE_TEMPLATE_112[2, 0] - centre) < 0.2
    with pytest.raises(AlignmentError, match="no 5-point template for a 100x80"):
        template_for((100, 80))


def test_warp_is_exact_on_a_linear_image():
    # Bilinear interpolation reproduces a linear function exactly, so every output pixel
    # inside the source must equal the ramp evaluated at the inverse-mapped point.
    h, w = 60, 80
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    ramp = 2.0 * xs + 3.0 * ys + 1.0  # [H, W]
    m = similarity_matrix(0.9, np.deg2rad(12.0), -4.0, 6.0)
    out = warp_affine(ramp, m, (50, 50), border_value=-1.0)
    oy, ox = np.mgrid[0:50, 0:50].astype(np.float64)
    inv = np.linalg.inv(m)
    sx = inv[0, 0] * ox + inv[0, 1] * oy + inv[0, 2]
    sy = inv[1, 0] * ox + inv[1, 1] * oy + inv[1, 2]
    inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(out[inside], (2.0 * sx + 3.0 * sy + 1.0)[inside], atol=1e-9)
    far = (sx < -1) | (sx > w) | (sy < -1) | (sy > h)
    assert far.any() and np.all(out[far] == -1.0)
    # identity on a uint8 colour image is lossless; integer shifts move pixels exactly
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(warp_affine(img, np.eye(3), (20, 30)), img)
    shifted = warp_affine(img, similarity_matrix(1.0, 0.0, 3.0, 2.0), (20, 30))
    np.testing.assert_array_equal(shifted[2:, 3:], img[:-2, :-3])
    assert shifted.dtype == np.uint8 and np.all(shifted[:2] == 0)


def _render_dots(points: np.ndarray, size: tuple[int, int], sigma: float) -> np.ndarray:
    """A greyscale-as-RGB image with a Gaussian dot at each point."""
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float64)
    img = np.zeros(size)
    for x, y in points:
        img += 250 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.repeat(np.clip(img, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _dot_centres(img: np.ndarray, near: np.ndarray, radius: int = 5) -> np.ndarray:
    """Intensity-weighted centre of the dot near each of ``near``."""
    g = img[:, :, 0].astype(np.float64)
    out = []
    for x, y in near:
        x0, y0 = int(round(x)), int(round(y))
        patch = g[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
        py, px = np.mgrid[y0 - radius : y0 + radius + 1, x0 - radius : x0 + radius + 1]
        out.append([(patch * px).sum() / patch.sum(), (patch * py).sum() / patch.sum()])
    return np.array(out)


@pytest.mark.parametrize("size", [(112, 112), (112, 96)])
def test_align_face_puts_landmarks_on_the_template(size):
    # A "photo" whose 5 landmarks are the template moved by a known similarity: aligning it
    # must bring dots drawn at the landmarks back onto the template.
    template = template_for(size)
    photo_from_crop = similarity_matrix(1.7, np.deg2rad(-25.0), 60.0, 40.0)
    landmarks = transform_points(photo_from_crop, template)
    photo = _render_dots(landmarks, (260, 240), sigma=1.7 * 1.5)
    crop = align_face(photo, landmarks.reshape(-1).tolist(), size=size)
    assert crop.shape == (*size, 3) and crop.dtype == np.uint8
    centres = _dot_centres(crop, template)
    np.testing.assert_allclose(centres, template, atol=0.15)
