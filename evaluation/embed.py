"""Turn face images into embeddings with a PyTorch model or an ONNX file (``facetrain embed``).

The evaluation protocols (IJB, identification) and ``facetrain embed`` all need the same three
things, kept here:

* an **embedder**: a function ``float32 [B, 3, H, W] (pixels (x - 127.5) / 127.5) -> [B, D]``
  raw embeddings, from a PyTorch module (:func:`torch_embedder`) or an ONNX file run by
  onnxruntime (:func:`onnx_embedder`), so every protocol works for checkpoints and shipped
  models alike;
* an **image source**: aligned face crops from a face pack (``train.rec``/``train.idx``), an
  insightface ``.bin`` verification set, a folder of images (one sub-folder per identity gives
  labels) or a list file, read lazily in batches (:func:`open_image_source`);
* :func:`embed_images`: batches through the embedder, optional flip test (the embedding of the
  mirrored image is added, as insightface evaluates), optional L2 normalisation, a tqdm bar.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from tqdm import tqdm

from evaluation.verification import l2_normalize

__all__ = [
    "EmbedResult",
    "Embedder",
    "EmbeddingError",
    "ImageSource",
    "embed_images",
    "embed_to_npy",
    "normalize_pixels",
    "check_image_size",
    "onnx_embedder",
    "open_image_source",
    "torch_embedder",
]

Embedder = Callable[[np.ndarray], np.ndarray]
"""float32 [B, 3, H, W] normalised pixels -> float [B, D] raw (not normalised) embeddings."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class EmbeddingError(ValueError):
    """An image source or model cannot be used; the message names the file at fault."""


def normalize_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] RGB -> float32 [B, 3, H, W] in [-1, 1], the training normalisation."""
    x = images.astype(np.float32).transpose(0, 3, 1, 2)  # [B, 3, H, W]
    return np.ascontiguousarray((x - 127.5) / 127.5)


# ------------------------------------------------------------------------------ embedders


def torch_embedder(model: nn.Module, device: str | torch.device = "cpu") -> Embedder:
    """Wrap an ``nn.Module`` (already on ``device``, put in eval mode here) as an embedder."""
    device = torch.device(device)
    model.eval()

    @torch.no_grad()
    def embed(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x).to(device)).float().cpu().numpy()  # [B, D]

    return embed


def onnx_embedder(
    path: str | os.PathLike[str], providers: list[str] | None = None
) -> tuple[Embedder, tuple[int, int] | None]:
    """An onnxruntime session of ``path`` as an embedder, plus the model's (H, W) if fixed.

    A model exported with a fixed batch size is fed in chunks of that size.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: ONNX model not found")
    session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise EmbeddingError(
            f"{path}: expected one input [batch, 3, H, W], got "
            f"{[(i.name, i.shape) for i in inputs]}"
        )
    name, shape = inputs[0].name, inputs[0].shape
    fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    hw = (shape[2], shape[3]) if all(isinstance(d, int) for d in shape[2:]) else None
    input_type = np.float16 if "float16" in inputs[0].type else np.float32

    def embed(x: np.ndarray) -> np.ndarray:
        if fixed_batch is None:
            return session.run(None, {name: x.astype(input_type)})[0].astype(np.float32)
        outs = []
        for start in range(0, len(x), fixed_batch):
            chunk = x[start : start + fixed_batch]
            pad = fixed_batch - len(chunk)
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out = session.run(None, {name: chunk.astype(input_type)})[0]
            outs.append(out[: fixed_batch - pad].astype(np.float32))
        return np.concatenate(outs)

    return embed, hw


# ------------------------------------------------------------------------------ image sources


@dataclass
class ImageSource:
    """Face crops to embed: names, optional identity labels, and a batch reader."""

    path: str
    kind: str
    """"pack", "bin", "folder" or "list"."""
    names: list[str]
    labels: np.ndarray | None
    """int64 [N] identity labels where the source defines them, else None."""
    read_batch: Callable[[int, int], np.ndarray]
    """(start, stop) -> uint8 [stop - start, H, W, 3] RGB."""
    issame: np.ndarray | None = None
    """For a .bin source: the pair labels [N / 2]."""

    def __len__(self) -> int:
        return len(self.names)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive uint8 [<= batch_size, H, W, 3] chunks covering every image in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.read_batch(start, min(start + batch_size, len(self)))


def _stack(images: list[np.ndarray], names: list[str], source: str) -> np.ndarray:
    shape = images[0].shape
    for img, name in zip(images, names, strict=True):
        if img.shape != shape:
            raise EmbeddingError(
                f"{source}: {name} is {img.shape[1]}x{img.shape[0]} but {names[0]} is "
                f"{shape[1]}x{shape[0]}; all face crops must have the same size"
            )
    return np.stack(images)  # [n, H, W, 3]


def _read_image_file(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))  # [H, W, 3] uint8
    except (UnidentifiedImageError, OSError) as e:
        raise EmbeddingError(f"{path}: cannot read image ({e})") from e


def _file_source(path: str, kind: str, files: list[Path], labels: np.ndarray | None, root: Path):
    names = [str(f.relative_to(root)) if f.is_relative_to(root) else str(f) for f in files]

    def read(start: int, stop: int) -> np.ndarray:
        imgs = [_read_image_file(f) for f in files[start:stop]]
        return _stack(imgs, names[start:stop], path)

    return ImageSource(path, kind, names, labels, read)


def _folder_source(path: Path) -> ImageSource:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise EmbeddingError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    labels = None
    if all(len(f.relative_to(path).parts) == 2 for f in files):  # one folder per identity
        identities = sorted({f.parent.name for f in files})
        index = {name: i for i, name in enumerate(identities)}
        labels = np.array([index[f.parent.name] for f in files], dtype=np.int64)
    return _file_source(str(path), "folder", files, labels, path)


def _list_source(path: Path) -> ImageSource:
    files: list[Path] = []
    labels: list[int] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) > 2:
            raise EmbeddingError(f"{path}:{lineno}: expected 'image_path [label]', got {line!r}")
        f = Path(parts[0])
        files.append(f if f.is_absolute() else path.parent / f)
        if len(parts) == 2:
            try:
                labels.append(int(parts[1]))
            except ValueError as e:
                raise EmbeddingError(f"{path}:{lineno}: label {parts[1]!r} is not an int") from e
    if not files:
        raise EmbeddingError(f"{path}: the list names no images")
    if labels and len(labels) != len(files):
        raise EmbeddingError(f"{path}: some lines have a label and some do not")
    label_arr = np.asarray(labels, dtype=np.int64) if labels else None
    return _file_source(str(path), "list", files, label_arr, path.parent)


def _pack_source(path: Path) -> ImageSource:
    from dataio.decode import decode_image
    from dataio.pack import FacePack

    pack = FacePack(path)
    names = [str(int(k)) for k in pack.image_keys]

    def read(start: int, stop: int) -> np.ndarray:
        imgs = []
        for i in range(start, stop):
            data, _ = pack.read(i)
            imgs.append(decode_image(data, f"{pack.rec_path}: key {names[i]}"))
        return _stack(imgs, [f"key {n}" for n in names[start:stop]], str(path))

    return ImageSource(str(path), "pack", names, np.asarray(pack.labels, np.int64), read)


def _bin_source(path: Path) -> ImageSource:
    from dataio.verification_bin import load_bin

    vs = load_bin(path)
    names = [f"pair{i // 2}.{i % 2}" for i in range(len(vs))]
    return ImageSource(str(path), "bin", names, None, vs.decode, issame=np.asarray(vs.issame))


def open_image_source(path: str | os.PathLike[str]) -> ImageSource:
    """Open face crops from a pack folder, a ``.bin`` set, an image folder or a list file.

    - a folder with ``train.rec`` and ``train.idx``: a face pack (labels from the pack);
    - a ``.bin`` file: an insightface verification set (pair labels in ``issame``);
    - a folder of images, searched recursively in sorted order; when every image sits in a
      sub-folder of ``path`` the sub-folder names are identities (labels by sorted name);
    - any other file: a list with one ``image_path [label]`` per line, relative paths resolved
      from the list's folder.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "train.rec").is_file() and (p / "train.idx").is_file():
            return _pack_source(p)
        return _folder_source(p)
    if not p.is_file():
        raise EmbeddingError(f"{p}: no such image folder, pack, .bin or list file")
    if p.suffix == ".bin":
        return _bin_source(p)
    return _list_source(p)


# ------------------------------------------------------------------------------ embedding


def embed_images(
    embedder: Embedder,
    batches: Iterable[np.ndarray],
    *,
    flip: bool = False,
    normalize: bool = True,
    progress: bool = False,
    total: int | None = None,
    desc: str = "embed",
) -> np.ndarray:
    """Embed uint8 [b, H, W, 3] batches -> float32 [N, D].

    With ``flip`` the embedding of the horizontally mirrored crop is added to the plain one
    (insightface's flip test). With ``normalize`` rows are L2-normalised; without it the raw
    norm is kept (IJB's template pooling uses it as a quality weight). ``total`` (images) sizes
    the progress bar.
    """
    chunks = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for batch in batches:
            x = normalize_pixels(batch)  # [b, 3, H, W]
            emb = np.asarray(embedder(x), dtype=np.float64)  # [b, D]
            if emb.ndim != 2 or len(emb) != len(x):
                raise EmbeddingError(
                    f"the model returned shape {emb.shape} for a batch of {len(x)} images; "
                    "expected [batch, D]"
                )
            if flip:
                emb = emb + np.asarray(embedder(np.ascontiguousarray(x[..., ::-1])), np.float64)
            chunks.append(emb)
            bar.update(len(x))
    if not chunks:
        raise EmbeddingError("no images to embed (the image source is empty)")
    out = np.concatenate(chunks)  # [N, D]
    return (l2_normalize(out) if normalize else out).astype(np.float32)


@dataclass(frozen=True)
class EmbedResult:
    """What ``facetrain embed`` wrote."""

    path: Path
    """float32 [N, D] L2-normalised embeddings (``np.load``)."""
    index_path: Path
    """Tab-separated ``row, name, label`` of every embedding row."""
    num_images: int
    dim: int


def check_image_size(
    src: ImageSource,
    source: str | os.PathLike[str],
    hw: tuple[int, int] | None,
    model_path: str | os.PathLike[str],
) -> None:
    """EmbeddingError naming both files when ``source``'s images are not the model's (H, W)
    (``hw`` None: the model takes any size)."""
    first = src.read_batch(0, 1)
    if hw is not None and tuple(first.shape[1:3]) != tuple(hw):
        raise EmbeddingError(
            f"{source}: images are {first.shape[1]}x{first.shape[2]} (HxW) but {model_path} "
            f"expects {hw[0]}x{hw[1]}; align/crop the faces first"
        )


def embed_to_npy(
    model: str | os.PathLike[str] | Embedder,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    batch_size: int = 128,
    flip: bool = False,
    progress: bool = True,
    providers: list[str] | None = None,
    input_size: tuple[int, int] | None = None,
    name: str | None = None,
) -> EmbedResult:
    """``facetrain embed MODEL IMAGES_OR_PACK --out emb.npy``: normalised embeddings.

    ``model`` is an ONNX file, run with onnxruntime, or an :data:`Embedder` (e.g.
    :func:`torch_embedder` of a checkpoint's backbone) that takes ``input_size`` (H, W)
    images (None: any) and is called ``name`` in messages. It runs over every crop of
    ``source`` (see :func:`open_image_source`) in batches of ``batch_size``; the embeddings
    are L2-normalised and written to ``out`` (``.npy``), with ``out`` with suffix ``.tsv``
    beside: one ``row<TAB>name<TAB>label`` line per embedding (label -1 where the source has
    none).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if callable(model):
        embedder, hw = model, input_size
    else:
        embedder, hw = onnx_embedder(model, providers)
        name = name or str(model)
    src = open_image_source(source)
    check_image_size(src, source, hw, name or "the model")
    emb = embed_images(
        embedder, src.batches(batch_size), flip=flip, progress=progress, total=len(src)
    )
    out_path = Path(out)
    if out_path.suffix != ".npy":  # np.save would append it; report the real name
        out_path = out_path.with_name(out_path.name + ".npy")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(out_path, emb)
    index_path = out_path.with_suffix(".tsv")
    labels = src.labels if src.labels is not None else np.full(len(src), -1)
    rows = zip(src.names, labels, strict=True)
    index_path.write_text("".join(f"{i}\t{n}\t{int(lab)}\n" for i, (n, lab) in enumerate(rows)))
    return EmbedResult(out_path, index_path, int(emb.shape[0]), int(emb.shape[1]))
