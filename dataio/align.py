"""5-point face alignment: a similarity transform onto the ArcFace template, and the warp.

Why: recognition models are trained and evaluated on faces cropped so that the eyes, nose
tip and mouth corners land on fixed points (the ArcFace 112x112 template). Packing images
with their five detected landmarks through :func:`align_face` reproduces that crop.

Conventions: points are ``(x, y)`` in pixels with pixel centres at integer coordinates (the
OpenCV convention the published templates use); landmark order is left eye, right eye, nose
tip, left mouth corner, right mouth corner (as seen in the image). Transforms are 3x3
homogeneous matrices mapping source points to destination points, ``[x', y', 1]^T = T
[x, y, 1]^T``.
"""

from __future__ import annotations

import numpy as np

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
"""The ArcFace 5-point template for 112x112 crops (insightface ``arcface_dst``)."""

ARCFACE_TEMPLATE_112x96 = ARCFACE_TEMPLATE_112 - np.array([8.0, 0.0])
"""The same template for 112x96 (height x width) crops: 8 pixels narrower on each side."""


class AlignmentError(ValueError):
    """Landmarks or an alignment request that cannot be satisfied."""


def template_for(size: tuple[int, int]) -> np.ndarray:
    """The 5-point template for an output ``(height, width)``: float64 ``[5, 2]``.

    ``(112, 112)`` and ``(112, 96)`` are the published templates; another square size ``s``
    scales the 112x112 template by ``s / 112``.
    """
    h, w = (int(size[0]), int(size[1]))
    if (h, w) == (112, 112):
        return ARCFACE_TEMPLATE_112.copy()
    if (h, w) == (112, 96):
        return ARCFACE_TEMPLATE_112x96.copy()
    if h == w and h > 0:
        return ARCFACE_TEMPLATE_112 * (h / 112.0)
    raise AlignmentError(
        f"no 5-point template for a {h}x{w} crop: use 112x112, 112x96 or a square size"
    )


def umeyama(src: np.ndarray, dst: np.ndarray, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity transform mapping ``src`` onto ``dst`` (Umeyama, 1991).

    Minimises ``sum_i |dst_i - (c R src_i + t)|^2`` over rotations ``R`` (no reflection),
    scale ``c`` (fixed to 1 unless ``estimate_scale``) and translation ``t``. ``src``, ``dst``:
    ``[N, D]`` with N >= 2 matching points. Returns the ``[D+1, D+1]`` homogeneous matrix.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape != dst.shape or src.shape[0] < 2:
        raise AlignmentError(
            f"umeyama: src and dst must be matching [N, D] arrays with N >= 2, got "
            f"{src.shape} and {dst.shape}"
        )
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise AlignmentError("umeyama: points must be finite")
    n, d = src.shape
    mu_src, mu_dst = src.mean(axis=0), dst.mean(axis=0)  # [D]
    xs, xd = src - mu_src, dst - mu_dst  # [N, D]
    var_src = float((xs**2).sum() / n)
    if var_src <= 1e-12:
        raise AlignmentError("umeyama: the source points coincide; no transform is defined")
    cov = xd.T @ xs / n  # [D, D]
    u, sing, vt = np.linalg.svd(cov)
    signs = np.ones(d)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal map would reflect
        signs[-1] = -1.0
    rot = u @ np.diag(signs) @ vt  # [D, D]
    scale = float((sing * signs).sum() / var_src) if estimate_scale else 1.0
    out = np.eye(d + 1)
    out[:d, :d] = scale * rot
    out[:d, d] = mu_dst - scale * rot @ mu_src
    return out


def similarity_matrix(scale: float, angle_rad: float, tx: float, ty: float) -> np.ndarray:
    """The 3x3 matrix of ``p -> scale * R(angle) p + (tx, ty)`` (for tests and callers)."""
    c, s = scale * np.cos(angle_rad), scale * np.sin(angle_rad)
    return np.array([[c, -s, tx], [s, c, ty], [0.0, 0.0, 1.0]])


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 (or 2x3) affine matrix to ``[N, 2]`` points."""
    m = np.asarray(matrix, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    return p @ m[:2, :2].T + m[:2, 2]


def warp_affine(
    image: np.ndarray, matrix: np.ndarray, size: tuple[int, int], border_value: float = 0.0
) -> np.ndarray:
    """Warp ``image`` by the affine ``matrix`` (source -> output coordinates), bilinear.

    ``image``: ``[H, W]`` or ``[H, W, C]``; ``size``: output ``(height, width)``. Each output
    pixel takes the bilinear interpolation of the source at ``matrix^-1 (x, y)``; source
    pixels outside the image count as ``border_value`` (like OpenCV's constant border).
    The output has the input's dtype (rounded and clipped for integer images).
    """
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise AlignmentError(f"warp_affine: expected an [H, W] or [H, W, C] image, got {img.shape}")
    m = np.eye(3)
    m[:2] = np.asarray(matrix, dtype=np.float64)[:2]
    try:
        inv = np.linalg.inv(m)
    except np.linalg.LinAlgError as e:
        raise AlignmentError(f"warp_affine: the transform is singular: {e}") from e
    out_h, out_w = int(size[0]), int(size[1])
    src = img.astype(np.float64)
    if src.ndim == 2:
        src = src[:, :, None]
    h, w, c = src.shape
    ys, xs = np.mgrid[0:out_h, 0:out_w].astype(np.float64)  # [oh, ow]
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    x0, y0 = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - x0)[..., None], (sy - y0)[..., None]  # [oh, ow, 1]
    # Pad by one border pixel on each side so every neighbour index is valid.
    padded = np.full((h + 2, w + 2, c), float(border_value))
    padded[1:-1, 1:-1] = src

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return padded[np.clip(yy + 1, 0, h + 1), np.clip(xx + 1, 0, w + 1)]  # [oh, ow, C]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    out = top * (1 - fy) + bottom * fy  # [oh, ow, C]
    if img.ndim == 2:
        out = out[:, :, 0]
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(img.dtype)
    return out.astype(img.dtype)


def check_landmarks(landmarks: np.ndarray | list[float], what: str = "landmarks") -> np.ndarray:
    """Five ``(x, y)`` points as float64 ``[5, 2]``; AlignmentError naming ``what`` otherwise."""
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.size != 10:
        raise AlignmentError(f"{what}: expected 5 (x, y) points (10 numbers), got {pts.size}")
    pts = pts.reshape(5, 2)
    if not np.isfinite(pts).all():
        raise AlignmentError(f"{what}: landmarks must be finite numbers")
    return pts


def align_face(
    image: np.ndarray,
    landmarks: np.ndarray | list[float],
    size: tuple[int, int] = (112, 112),
    border_value: float = 0.0,
) -> np.ndarray:
    """Crop a face so its 5 landmarks land on the ArcFace template of ``size`` (H, W).

    ``image``: ``[H, W, 3]`` uint8; ``landmarks``: 5 ``(x, y)`` points in ``image``'s pixel
    coordinates (see the module docstring for their order). Returns ``[size[0], size[1], 3]``.
    """
    pts = check_landmarks(landmarks)
    matrix = umeyama(pts, template_for(size))
    return warp_affine(image, matrix, size, border_value=border_value)
