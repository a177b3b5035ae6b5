"""Index files that DALI's mxnet reader can read: image records only, kept in a cache folder.

DALI's mxnet reader takes every ``.idx`` entry for a sample: the header record (key 0) and the
identity records of an insightface pack come out as empty images with vector labels, which
the decoder rejects. DALI only needs the offsets of the records it should read (it sorts them
and reads each record up to the next listed offset), so the DALI loader reads through an index
of image records only, named by a hash of its content and written into a cache folder: the one
the caller names (the trainer's is ``RUN/cache``, or ``data.cache_dir``), else the user's
``~/.cache/facetrain``. Never into the pack's folder: datasets on clusters are often read-only
or shared. Headerless packs with no bad records use their own ``train.idx``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import numpy as np

from dataio.layout import PackError
from dataio.pack import FacePack

USER_CACHE = os.path.join("~", ".cache", "facetrain")
"""The cache folder of a loader given none (``~`` is the user's home)."""


def resolve_cache_dir(
    pack_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> str:
    """The folder for files derived from a pack: ``cache_dir`` (created), else
    ``~/.cache/facetrain/<hash of the pack path>``, else the same under the system temp dir
    when that cannot be written. Never a folder inside the pack."""
    if cache_dir is not None:
        path = os.fspath(cache_dir)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as exc:
            raise PackError(
                f"{path}: cannot create the cache folder of DALI's index: {exc}"
            ) from exc
        return path
    pack = os.path.realpath(os.fspath(pack_dir))
    name = hashlib.sha1(pack.encode()).hexdigest()[:16]
    candidates = [
        os.path.join(os.path.expanduser(USER_CACHE), name),
        os.path.join(tempfile.gettempdir(), "facetrain_cache", name),
    ]
    for path in candidates:
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path):
                pass
            return path
        except OSError:
            continue
    raise PackError(f"{pack}: no writable cache folder (tried {', '.join(candidates)})")


def write_index(path: str, keys: np.ndarray, offsets: np.ndarray) -> None:
    """Write a ``key<TAB>offset`` index atomically (temporary name, then rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        pairs = zip(keys.tolist(), offsets.tolist(), strict=True)
        f.write("".join(f"{k}\t{o}\n" for k, o in pairs))
    os.replace(tmp, path)


def image_index_path(
    pack: FacePack, positions: np.ndarray, cache_dir: str | os.PathLike[str] | None = None
) -> str:
    """An index of the image records at ``positions`` of ``pack`` that DALI can read.

    The file lives in the cache folder (see :func:`resolve_cache_dir`), named by a hash of
    its content, so every rank and every later run with the same folder reuses it and a
    changed pack never meets a stale index. A headerless pack read whole uses its own ``train.idx``.
    """
    pos = np.sort(np.asarray(positions, dtype=np.int64))
    if pos.size == 0:
        raise PackError(f"{pack.rec_path}: no image records left to read")
    if not pack.has_header and not pack.bad_keys and pos.size == pack.num_images:
        return pack.idx_path
    keys = pack.image_keys[pos]
    offsets = pack.image_offsets[pos]
    digest = hashlib.sha1()
    digest.update(os.path.realpath(pack.rec_path).encode())
    stat = os.stat(pack.rec_path)
    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(keys.tobytes())
    digest.update(offsets.tobytes())
    folder = resolve_cache_dir(pack.pack_dir, cache_dir)
    path = os.path.join(folder, f"images-{digest.hexdigest()[:20]}.idx")
    if not os.path.isfile(path):
        write_index(path, keys, offsets)
    return path
