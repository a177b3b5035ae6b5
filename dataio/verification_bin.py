"""insightface ``.bin`` verification sets (LFW, CFP-FP, AgeDB-30, ...), loaded safely.

Format: a pickle of ``(bins, issame_list)``; ``bins`` holds 2N encoded images (pair i is
``bins[2i]``, ``bins[2i+1]``) and ``issame_list`` N booleans. Most published files were written
by Python 2, so their ``bins`` are Python 2 ``str``.

Why a restricted unpickler: ``pickle.load`` on a downloaded file runs whatever callables the
file names. :class:`_BinUnpickler` resolves only the globals real ``.bin`` files need and
refuses every other one with :class:`UnsafePickleError` before anything is called:

* ``_codecs.encode`` — Python 3 protocol-2 pickles store ``bytes`` as
  ``_codecs.encode(text, "latin1")``; only latin-1 is admitted.
* ``builtins.bytes`` / ``builtins.bytearray`` (``__builtin__`` at protocol < 3) — empty
  ``bytes`` and ``bytearray`` at protocol < 5; only called with no argument or a bytes-like
  argument (never an int size).
* numpy array / scalar reconstruction (``numpy[._]core.multiarray._reconstruct``,
  ``numpy[._]core.multiarray.scalar``, ``numpy[._]core.numeric._frombuffer``, ``numpy.ndarray``,
  ``numpy.dtype``) — some sets store images as uint8 arrays or labels as ``numpy.bool_``.
  ``_reconstruct`` accepts only ``numpy.ndarray`` itself as the subtype. The elements of object
  arrays are unpickled through the same restricted loader.

The file is unpickled with ``encoding="latin1"``, so a Python 2 ``str`` comes back as a ``str``
whose code points are its bytes; it is turned back into the original bytes.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError


class VerificationBinError(ValueError):
    """A ``.bin`` file is malformed; the message names the file (and image index if any)."""


class UnsafePickleError(VerificationBinError, pickle.UnpicklingError):
    """The pickle names a global outside the allow-list; nothing it references was called."""


_LATIN1_NAMES = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "l1"})


def _codecs_encode(text: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    if not isinstance(text, str) or not isinstance(encoding, str):
        raise pickle.UnpicklingError("_codecs.encode: expected (str, encoding)")
    if encoding.lower() not in _LATIN1_NAMES or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode: encoding {encoding!r} is not admitted")
    return text.encode("latin1")


def _bytes_like(kind: type) -> Callable[..., Any]:
    def build(*args: object) -> Any:
        if not args:
            return kind()
        if len(args) == 1 and isinstance(args[0], bytes | bytearray):
            return kind(args[0])
        if len(args) == 2 and isinstance(args[0], str) and args[1] in _LATIN1_NAMES:
            # Protocol 2 pickles bytearray as bytearray(text, "latin-1").
            return kind(args[0].encode("latin1"))
        raise pickle.UnpicklingError(f"{kind.__name__}: arguments not admitted")

    return build


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object handed to the unpickler, resolved from this numpy build."""
    reconstruct = np.zeros(1).__reduce__()[0]
    scalar = np.float32(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]

    def safe_reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError("numpy _reconstruct: only numpy.ndarray is admitted")
        return reconstruct(subtype, shape, dtype)

    allowed: dict[tuple[str, str], Any] = {
        ("_codecs", "encode"): _codecs_encode,
        ("builtins", "bytes"): _bytes_like(bytes),
        ("builtins", "bytearray"): _bytes_like(bytearray),
        # protocol < 3 pickles name the builtins module by its Python 2 name
        ("__builtin__", "bytearray"): _bytes_like(bytearray),
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = safe_reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _BinUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :func:`_allowed_globals` (see module docstring)."""

    def __init__(self, file: io.BufferedIOBase, path: str):
        super().__init__(file, encoding="latin1")
        self._path = path
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._path}: refused to load global '{module}.{name}': a verification .bin "
                "holds only image bytes and booleans; this file may be malicious"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refused persistent id {pid!r} in pickle")


# --------------------------------------------------------------------------------------------


def _as_image_bytes(obj: object, path: str, index: int) -> bytes:
    if isinstance(obj, bytes):
        return obj
    if isinstance(obj, bytearray | memoryview):
        return bytes(obj)
    if isinstance(obj, str):  # Python 2 str read with encoding="latin1"
        return obj.encode("latin1")
    if isinstance(obj, np.ndarray) and obj.dtype == np.uint8 and obj.ndim == 1:
        return obj.tobytes()
    raise VerificationBinError(
        f"{path}: image {index} is a {type(obj).__name__}, expected encoded image bytes"
    )


def _decode_rgb(data: bytes, what: str) -> np.ndarray:
    """Encoded image -> uint8 [H, W, 3] RGB; simplejpeg first, PIL for anything else."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")
    except ValueError:
        pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise VerificationBinError(f"{what}: cannot decode image: {e}") from e


class VerificationSet:
    """Pairs of encoded face images plus same/different labels, decoded on demand.

    Images stay encoded in memory (LFW is ~60 MB encoded, ~450 MB decoded); :meth:`decode`
    and :meth:`batches` decode only the requested range.
    """

    def __init__(self, jpegs: Sequence[bytes], issame: Sequence[bool] | np.ndarray, name: str = ""):
        self.name = name
        self._images = list(jpegs)
        self.issame = np.asarray(issame, dtype=bool).reshape(-1)  # [N]
        if len(self._images) != 2 * self.issame.size:
            raise VerificationBinError(
                f"{name or 'verification set'}: {len(self._images)} images for "
                f"{self.issame.size} pairs (need exactly 2 per pair)"
            )
        self._image_size: tuple[int, int] | None = None

    def __len__(self) -> int:
        """Number of images (2 x number of pairs)."""
        return len(self._images)

    @property
    def num_pairs(self) -> int:
        return int(self.issame.size)

    def encoded(self, i: int) -> bytes:
        """The encoded bytes of image ``i``."""
        return self._images[i]

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images (all images must share it), from image 0."""
        if self._image_size is None:
            if not self._images:
                raise VerificationBinError(f"{self.name}: empty verification set")
            img = _decode_rgb(self._images[0], f"{self.name}: image 0")
            self._image_size = (int(img.shape[0]), int(img.shape[1]))
        return self._image_size

    def decode(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Decode images ``[start, stop)`` -> uint8 ``[n, H, W, 3]`` RGB."""
        n = len(self._images)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise ValueError(f"{self.name}: decode range [{start}, {stop}) outside [0, {n}]")
        h, w = self.image_size if stop > start else (0, 0)
        out = np.empty((stop - start, h, w, 3), dtype=np.uint8)  # [n, H, W, 3]
        for j, i in enumerate(range(start, stop)):
            img = _decode_rgb(self._images[i], f"{self.name}: image {i}")
            if img.shape != (h, w, 3):
                raise VerificationBinError(
                    f"{self.name}: image {i} is {img.shape[0]}x{img.shape[1]} but image 0 is "
                    f"{h}x{w}; all images must have the same size"
                )
            out[j] = img
        return out

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Yield consecutive decoded chunks uint8 ``[<=batch_size, H, W, 3]`` covering all images.

        Image ``2i`` and ``2i+1`` form pair ``i``; chunks are in image order.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, len(self._images), batch_size):
            yield self.decode(start, min(start + batch_size, len(self._images)))


def load_bin(path: str | os.PathLike[str]) -> VerificationSet:
    """Load an insightface ``.bin`` with the restricted unpickler (see module docstring)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise VerificationBinError(f"{p}: verification .bin file not found")
    with open(p, "rb") as f:
        try:
            obj = _BinUnpickler(f, p).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            if isinstance(e, UnsafePickleError):
                raise e  # already names the file and the refused global
            raise VerificationBinError(f"{p}: not a valid verification .bin pickle: {e}") from e
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        raise VerificationBinError(f"{p}: expected a pickled (bins, issame_list) pair")
    bins, issame = obj
    if not isinstance(bins, list | tuple | np.ndarray):
        raise VerificationBinError(f"{p}: bins is a {type(bins).__name__}, expected a list")
    images = [_as_image_bytes(b, p, i) for i, b in enumerate(bins)]
    try:
        same = np.asarray(issame)
    except (TypeError, ValueError) as e:
        raise VerificationBinError(f"{p}: issame_list is not a list of booleans: {e}") from e
    if same.ndim != 1 or not (same.dtype == bool or np.issubdtype(same.dtype, np.integer)):
        raise VerificationBinError(f"{p}: issame_list must be a flat list of booleans")
    if same.dtype != bool and not np.isin(same, (0, 1)).all():
        raise VerificationBinError(f"{p}: issame_list holds values other than 0/1")
    if len(images) != 2 * same.size:
        raise VerificationBinError(
            f"{p}: {len(images)} images for {same.size} pairs (need exactly 2 per pair)"
        )
    name = os.path.splitext(os.path.basename(p))[0]
    return VerificationSet(images, same.astype(bool), name=name)


def save_bin(path: str | os.PathLike[str], jpegs: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write an insightface-compatible ``.bin`` (pickle protocol 4, only bytes and bools)."""
    p = os.fspath(path)
    images: list[bytes] = []
    for i, b in enumerate(jpegs):
        if not isinstance(b, bytes | bytearray | memoryview):
            raise ValueError(f"save_bin({p}): image {i} is a {type(b).__name__}, expected bytes")
        images.append(bytes(b))
    same = [bool(x) for x in issame]
    if len(images) != 2 * len(same):
        raise ValueError(
            f"save_bin({p}): {len(images)} images for {len(same)} pairs (need 2 per pair)"
        )
    tmp = p + ".tmp"
    try:
        with open(tmp, "wb") as f:
            pickle.dump((images, same), f, protocol=4)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
