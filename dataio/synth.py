"""Synthetic identity data: cartoon faces rendered from latent identity vectors.

Why this exists: the demo and the tests need a face-recognition problem that runs on a
2-core laptop in minutes, is *open-set* learnable (a model trained on some identities must
separate identities it has never seen), and is not trivial (comparing raw pixels must fail).

How it works:

* An identity is a latent vector ``z ~ N(0, I_latent_dim)`` drawn from a per-identity seed.
* A fixed generator (a random linear map ``A`` and offset ``b`` drawn once from
  ``generator_seed``) turns ``z`` into face parameters ``p = sigmoid(A z + b)`` in (0, 1):
  face shape and skin tone, hair, eye spacing/size/colour, eyebrows, nose, mouth, a mole.
  Because every identity goes through the same smooth map, what distinguishes identities is
  shared structure a network can learn and transfer to unseen identities.
* Each image of an identity adds nuisance drawn from a per-image seed: a random background,
  shift, scale, rotation, illumination gain, colour cast and light gradient, sensor noise,
  blur, a horizontal flip and JPEG compression. The nuisance is strong enough that raw-pixel
  cosine similarity verifies poorly.

Everything is seeded: image ``k`` of identity ``i`` depends only on ``(seed, i, k)`` and the
generator seed, so any subset can be rendered in any order, in any number of processes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

# Indices into the parameter vector p (each in (0, 1)); see _face_layers for their meaning.
_PARAM_NAMES = (
    "face_w",
    "face_h",
    "face_y",
    "skin_r",
    "skin_g",
    "skin_b",
    "hair_h",
    "hair_w",
    "hair_r",
    "hair_g",
    "hair_b",
    "eye_sep",
    "eye_y",
    "eye_size",
    "iris_r",
    "iris_g",
    "iris_b",
    "brow_tilt",
    "brow_thick",
    "brow_gap",
    "nose_len",
    "nose_w",
    "mouth_w",
    "mouth_h",
    "mouth_y",
    "lip_r",
    "lip_g",
    "mole_x",
    "mole_y",
    "mole_size",
    "cheek_tone",
    "chin",
)
NUM_PARAMS = len(_PARAM_NAMES)


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """How identities and their images are drawn. Defaults are the demo's."""

    image_size: int = 112
    """Side of the square RGB image in pixels."""
    latent_dim: int = 16
    """Dimension of the identity latent vector."""
    generator_seed: int = 1234
    """Seed of the fixed latent->face-parameter map (the same for train and held-out data)."""
    max_shift: float = 0.06
    """Largest translation, as a fraction of the image side."""
    scale_range: tuple[float, float] = (0.88, 1.12)
    """Range of the random zoom."""
    max_rotation_deg: float = 8.0
    """Largest in-plane rotation."""
    gain_range: tuple[float, float] = (0.55, 1.45)
    """Range of the global illumination gain."""
    color_cast: float = 0.18
    """Largest per-channel gain deviation (white balance)."""
    light_gradient: float = 0.45
    """Largest amplitude of the directional light ramp across the image."""
    noise_std: tuple[float, float] = (2.0, 10.0)
    """Range of the sensor noise standard deviation, in intensity levels."""
    jpeg_quality: tuple[int, int] = (70, 95)
    """Range of the JPEG quality of the encoded image."""


class FaceGenerator:
    """Renders identities (latent vectors) into face images with per-image nuisance."""

    def __init__(self, config: SynthConfig | None = None) -> None:
        self.config = config or SynthConfig()
        rng = np.random.default_rng(self.config.generator_seed)
        d = self.config.latent_dim
        # A fixed random map: each parameter mixes a few latent directions. The scale keeps
        # sigmoid(A z + b) spread over (0, 1) rather than saturated at the ends.
        self._A = rng.normal(0.0, 1.6 / np.sqrt(d), size=(NUM_PARAMS, d))
        self._b = rng.normal(0.0, 0.3, size=NUM_PARAMS)
        n = self.config.image_size
        # Pixel centres in [-1, 1] image coordinates; y grows downwards.
        axis = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
        self._gy, self._gx = np.meshgrid(axis, axis, indexing="ij")

    # ----------------------------------------------------------------------------- identity
    def identity_latent(self, seed: int, identity: int) -> np.ndarray:
        """The latent vector of ``identity`` (float64 [latent_dim]) for dataset ``seed``."""
        rng = np.random.default_rng([seed, identity, 0x1D])
        return rng.normal(size=self.config.latent_dim)

    def face_params(self, latent: np.ndarray) -> dict[str, float]:
        """Face parameters in (0, 1) from a latent vector."""
        p = 1.0 / (1.0 + np.exp(-(self._A @ latent + self._b)))
        return dict(zip(_PARAM_NAMES, p.tolist(), strict=True))

    # ------------------------------------------------------------------------------- render
    def render(self, seed: int, identity: int, index: int) -> np.ndarray:
        """Image ``index`` of ``identity``: uint8 [H, W, 3] RGB, deterministic in its args."""
        params = self.face_params(self.identity_latent(seed, identity))
        rng = np.random.default_rng([seed, identity, index, 0xA6])
        return self._render(params, rng)

    def _render(self, p: dict[str, float], rng: np.random.Generator) -> np.ndarray:
        cfg = self.config
        # Inverse similarity transform: canonical face coordinates of every output pixel.
        scale = rng.uniform(*cfg.scale_range)
        angle = np.deg2rad(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
        tx, ty = rng.uniform(-cfg.max_shift, cfg.max_shift, size=2) * 2.0
        cos_a, sin_a = np.cos(angle), np.sin(angle)
        x0, y0 = self._gx - tx, self._gy - ty
        u = (cos_a * x0 + sin_a * y0) / scale
        v = (-sin_a * x0 + cos_a * y0) / scale

        img = self._background(rng)
        for mask, color in self._face_layers(p, u, v):
            img = img + mask[..., None] * (np.asarray(color, dtype=np.float32) - img)

        # Illumination in image coordinates: gain, white balance and a directional ramp.
        gain = rng.uniform(*cfg.gain_range)
        cast = 1.0 + rng.uniform(-cfg.color_cast, cfg.color_cast, size=3)
        theta = rng.uniform(0, 2 * np.pi)
        ramp = 1.0 + rng.uniform(0, cfg.light_gradient) * (
            np.cos(theta) * self._gx + np.sin(theta) * self._gy
        )
        img = img * (gain * cast)[None, None, :] * ramp[..., None]
        if rng.random() < 0.3:  # mild defocus
            img = _box_blur(img)
        img = img + rng.normal(0.0, rng.uniform(*cfg.noise_std), size=img.shape)
        if rng.random() < 0.5:
            img = img[:, ::-1]
        return np.clip(img, 0, 255).astype(np.uint8)

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A per-image background: two random colours blended along a random direction."""
        c1, c2 = rng.uniform(20, 235, size=(2, 3))
        theta = rng.uniform(0, 2 * np.pi)
        t = 0.5 + 0.5 * (np.cos(theta) * self._gx + np.sin(theta) * self._gy)
        return (c1[None, None] + t[..., None] * (c2 - c1)[None, None]).astype(np.float32)

    @staticmethod
    def _face_layers(
        p: dict[str, float], u: np.ndarray, v: np.ndarray
    ) -> Iterator[tuple[np.ndarray, tuple[float, float, float]]]:
        """Soft masks (in canonical coords u, v) and colours, painted back to front."""
        skin = (110 + 130 * p["skin_r"], 70 + 120 * p["skin_g"], 50 + 110 * p["skin_b"])
        hair = (15 + 200 * p["hair_r"], 10 + 150 * p["hair_g"], 5 + 120 * p["hair_b"])
        face_w = 0.42 + 0.2 * p["face_w"]
        face_h = 0.58 + 0.2 * p["face_h"]
        face_y = 0.08 + 0.1 * (p["face_y"] - 0.5)
        # Hair: a larger ellipse behind the head, raised.
        yield (
            _ellipse(
                u,
                v,
                0.0,
                face_y - 0.12 - 0.2 * p["hair_h"],
                face_w + 0.04 + 0.14 * p["hair_w"],
                face_h * (0.75 + 0.25 * p["hair_h"]),
            ),
            hair,
        )
        # Face, with a chin that is pointed or round.
        chin = 0.7 + 0.6 * p["chin"]
        d = (u / face_w) ** 2 + (np.abs(v - face_y) / face_h) ** (
            2.0 * np.where(v > face_y, chin, 1.0)
        )
        yield _soft(1.0 - d, 0.06), skin
        # Cheeks: a tone shift under the eyes on both sides.
        cheek = tuple(c * (0.8 + 0.4 * p["cheek_tone"]) for c in skin)
        for side in (-1.0, 1.0):
            yield 0.7 * _ellipse(u, v, side * 0.28 * face_w / 0.5, face_y + 0.18, 0.12, 0.09), cheek
        eye_y = face_y - 0.1 - 0.14 * p["eye_y"]
        eye_x = 0.13 + 0.14 * p["eye_sep"]
        eye_r = 0.06 + 0.05 * p["eye_size"]
        iris = (20 + 160 * p["iris_r"], 20 + 160 * p["iris_g"], 20 + 200 * p["iris_b"])
        brow_gap = 0.05 + 0.08 * p["brow_gap"]
        brow_t = 0.015 + 0.03 * p["brow_thick"]
        tilt = (p["brow_tilt"] - 0.5) * 0.8
        for side in (-1.0, 1.0):
            ex = side * eye_x
            yield _ellipse(u, v, ex, eye_y, eye_r * 1.5, eye_r), (235.0, 235.0, 230.0)
            yield _ellipse(u, v, ex, eye_y, eye_r * 0.7, eye_r * 0.7), iris
            yield _ellipse(u, v, ex, eye_y, eye_r * 0.3, eye_r * 0.3), (10.0, 10.0, 10.0)
            # Eyebrow: a thin ellipse rotated by the identity's tilt, mirrored across sides.
            bu, bv = u - ex, v - (eye_y - eye_r - brow_gap)
            ca, sa = np.cos(side * tilt), np.sin(side * tilt)
            yield _ellipse(ca * bu + sa * bv, -sa * bu + ca * bv, 0, 0, eye_r * 1.8, brow_t), hair
        nose_len = 0.1 + 0.12 * p["nose_len"]
        nose_w = 0.03 + 0.05 * p["nose_w"]
        nose = tuple(0.72 * c for c in skin)
        yield _ellipse(u, v, 0.0, eye_y + 0.05 + nose_len / 2, nose_w, nose_len / 2), nose
        mouth_y = eye_y + 0.1 + nose_len + 0.06 + 0.08 * p["mouth_y"]
        lip = (120 + 120 * p["lip_r"], 30 + 80 * p["lip_g"], 40 + 60 * p["lip_g"])
        yield (
            _ellipse(u, v, 0.0, mouth_y, 0.08 + 0.12 * p["mouth_w"], 0.02 + 0.05 * p["mouth_h"]),
            lip,
        )
        # A mole: asymmetric, so a flip is a nuisance the model must learn to ignore.
        mx = (p["mole_x"] - 0.5) * 1.2 * face_w
        my = face_y + (p["mole_y"] - 0.5) * 1.1 * face_h
        mr = 0.015 + 0.04 * p["mole_size"]
        yield _ellipse(u, v, mx, my, mr, mr), (60.0, 35.0, 25.0)


def _soft(x: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased step: 0 outside (x < 0), 1 inside, a ramp about ``width`` wide."""
    return np.clip(0.5 + x / width, 0.0, 1.0).astype(np.float32)


def _ellipse(
    u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float
) -> np.ndarray:
    d = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
    # Edge ramp of about a pixel whatever the ellipse size (0.03 of the [-1, 1] range).
    return _soft((1.0 - d) * min(rx, ry), 0.03)


def _box_blur(img: np.ndarray) -> np.ndarray:
    """3x3 box blur with edge replication."""
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    out = np.zeros_like(img)
    for dy in range(3):
        for dx in range(3):
            out += pad[dy : dy + img.shape[0], dx : dx + img.shape[1]]
    return out / 9.0


# ------------------------------------------------------------------------------ dataset files
HELDOUT_IDENTITY_OFFSET = 10_000_000
"""Held-out identities are numbered from here, so they never coincide with training ones."""


@dataclasses.dataclass(frozen=True)
class SynthDatasetInfo:
    train_dir: str
    val_path: str
    num_classes: int
    num_images: int
    num_val_pairs: int


def encode_image(generator: FaceGenerator, seed: int, identity: int, index: int) -> bytes:
    """Render one image and JPEG-encode it at a quality drawn from its own seed."""
    import simplejpeg  # local: only dataset writing needs the encoder

    img = generator.render(seed, identity, index)
    q_lo, q_hi = generator.config.jpeg_quality
    quality = int(np.random.default_rng([seed, identity, index, 0x17]).integers(q_lo, q_hi + 1))
    return simplejpeg.encode_jpeg(np.ascontiguousarray(img), quality=quality, colorspace="RGB")


def _encode_chunk(args: tuple[SynthConfig, int, list[tuple[int, int]]]) -> list[bytes]:
    config, seed, jobs = args
    generator = FaceGenerator(config)
    return [encode_image(generator, seed, identity, index) for identity, index in jobs]


def _render_all(
    config: SynthConfig,
    seed: int,
    jobs: list[tuple[int, int]],
    workers: int,
    desc: str,
    progress: bool,
) -> Iterator[bytes]:
    """JPEG bytes of every (identity, index) job, in order, rendered by ``workers`` processes."""
    from tqdm import tqdm

    chunk = 64
    tasks = [(config, seed, jobs[i : i + chunk]) for i in range(0, len(jobs), chunk)]
    bar = tqdm(total=len(jobs), desc=desc, unit="img", disable=not progress, mininterval=1.0)
    try:
        if workers <= 1:
            results: Iterator[list[bytes]] = map(_encode_chunk, tasks)
            for out in results:
                bar.update(len(out))
                yield from out
        else:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                for out in pool.imap(_encode_chunk, tasks):
                    bar.update(len(out))
                    yield from out
    finally:
        bar.close()


def verification_pairs(
    identities: int, images_per_id: int, num_pairs: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Balanced genuine/impostor pairs over a held-out set -> (pairs [P, 2] image ids, issame [P]).

    Pairs alternate genuine/impostor blocks so every contiguous fold of a k-fold split holds
    both kinds (like LFW's 10 folds of 300 + 300). Image id = identity * images_per_id + index.
    """
    if identities < 2 or images_per_id < 2:
        raise ValueError("held-out set needs >= 2 identities and >= 2 images per identity")
    if num_pairs < 2 or num_pairs % 2:
        raise ValueError(f"num_pairs must be even and >= 2, got {num_pairs}")
    rng = np.random.default_rng([seed, 0x9A1])
    pairs = np.empty((num_pairs, 2), dtype=np.int64)
    issame = np.zeros(num_pairs, dtype=bool)
    for p in range(num_pairs):
        if p % 2 == 0:
            ident = rng.integers(identities)
            a, b = rng.choice(images_per_id, size=2, replace=False)
            pairs[p] = (ident * images_per_id + a, ident * images_per_id + b)
            issame[p] = True
        else:
            i, j = rng.choice(identities, size=2, replace=False)
            a, b = rng.integers(images_per_id, size=2)
            pairs[p] = (i * images_per_id + a, j * images_per_id + b)
    return pairs, issame


def write_synthetic_dataset(
    out_dir: str,
    identities: int,
    images_per_id: int,
    val_identities: int = 200,
    val_images_per_id: int = 10,
    val_pairs: int = 3000,
    seed: int = 0,
    workers: int = 2,
    config: SynthConfig | None = None,
    progress: bool = True,
) -> SynthDatasetInfo:
    """Write ``out_dir/train`` (an insightface-layout RecordIO pack) and ``out_dir/val.bin``.

    Training identities are 0..identities-1; the verification pairs come from
    ``val_identities`` other identities that training never sees (open-set evaluation).
    """
    from dataio.packer import write_pack
    from dataio.verification_bin import save_bin

    if identities < 1 or images_per_id < 1:
        raise ValueError(
            f"identities and images_per_id must be >= 1, got {identities}, {images_per_id}"
        )
    config = config or SynthConfig()
    size = (config.image_size, config.image_size)
    train_dir = os.path.join(out_dir, "train")
    jobs = [(i, k) for i in range(identities) for k in range(images_per_id)]
    labels = [i for i, _ in jobs]
    images = _render_all(config, seed, jobs, workers, "synth train", progress)
    info = write_pack(train_dir, zip(labels, images, strict=True), identities, size)

    pairs, issame = verification_pairs(val_identities, val_images_per_id, val_pairs, seed)
    val_jobs = [
        (HELDOUT_IDENTITY_OFFSET + int(img) // val_images_per_id, int(img) % val_images_per_id)
        for img in pairs.reshape(-1)
    ]
    val_jpegs = list(_render_all(config, seed, val_jobs, workers, "synth val", progress))
    val_path = os.path.join(out_dir, "val.bin")
    save_bin(val_path, val_jpegs, issame.tolist())
    return SynthDatasetInfo(train_dir, val_path, identities, info.num_images, len(issame))
