"""Fused CPU kernels for Partial FC's memory-bound passes, compiled on first use.

On CPU the step's cost beyond its three matrix products is memory traffic: the row gather,
the softmax's passes over the ``[N, S]`` logits, the radial projection of the centres'
gradient and the sampled optimizer update each read and write their operands several times
as separate torch ops. The kernels in ``csrc/cpu_kernels.cpp`` do each in one sweep
(BENCHMARKS.md, "Partial FC", has the figures):

- ``gather_rows_inv_norm``: ``out = weight[index]`` and ``inv = 1 / max(|out_i|, eps)``;
- ``softmax_rows_``: per row ``m = max(m_init, max_j u_ij)``, ``z = exp(u - m) * c`` and the
  sum of ``exp(u - m)``, with ``u = z * c`` for an optional column scale ``c``;
  ``softmax_cols_`` the same for logits stored transposed (``[S, N]``, two sweeps);
- ``project_radial_`` / ``project_radial_rows_``: ``grad_i -= coef_i * (grad_i . w_i) * w_i``
  with ``w_i`` row i of a matrix or row ``index_i`` of the shard;
- ``sgd_rows_``: SGD with momentum and coupled weight decay on the indexed rows only.

They are built with ``torch.utils.cpp_extension`` (g++ and ninja, both installed with the
project) the first time they are needed, about a minute, announced on stderr ("building
Partial FC CPU kernels (one time)"), into a folder of their own under torch's default
extension root (``~/.cache/torch_extensions``) named by a digest of everything that changes
the build (:func:`build_dir`). Every later start imports the compiled module from there
directly, without running ninja; two checkouts or virtual environments on one machine each
keep their own build instead of rebuilding each other's. ``make setup`` builds them ahead
(``cpu_kernels.main()``). The fast backend falls back to torch ops for other dtypes, when
the build fails (one warning) and after ``set_enabled(False)``; ``partialfc.backend: plain``
(the reference, what every GPU runs) never uses them. Tests check that all paths agree.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "available",
    "build_dir",
    "default_root",
    "enabled",
    "kernels",
    "load_kernels",
    "set_enabled",
    "usable",
]

_SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
# -fopenmp-simd: the `omp simd` reductions vectorise without -ffast-math (which would assume
# away the -inf of masked logits; no OpenMP runtime is involved); -fno-trapping-math lets the
# compiler turn float comparisons into vector selects (nothing here reads FP exceptions).
_CFLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
_READY = "ready"  # written after a finished build: the compiled module's file name
_LOCK = threading.Lock()
_state: dict[str, Any] = {"module": None, "failed": False, "enabled": True}


def default_root() -> Path:
    """torch's default extension root (``~/.cache/torch_extensions``), from its public
    ``get_default_build_root``. ``TORCH_EXTENSIONS_DIR`` is not consulted: only the launcher
    reads the environment (DESIGN.md), and the keyed folders below need no other isolation."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_dir(root: Path, cflags: Sequence[str] = _CFLAGS) -> Path:
    """The build folder under ``root`` of this source with ``cflags`` for this torch and this
    Python; the folder's name is also the module's name.

    A digest of everything that changes the build names it: the source's bytes and its path
    (torch's build.ninja names the source, so two checkouts sharing a folder made ninja
    rebuild one's module for the other, every start), the flags, torch's version, commit
    and folder (its headers), the environment (``sys.prefix``: each virtual environment has
    its own torch and ninja; not ``sys.executable``, which differs between ``python`` and
    ``python3`` of one environment) and Python's version. A build is therefore only ever
    loaded by what it was built for.
    """
    parts = [
        _SOURCE.read_bytes(),
        str(_SOURCE.resolve()),
        " ".join(cflags),
        torch.__version__,
        str(torch.version.git_version),
        str(Path(torch.__file__).parent),
        sys.prefix,
        sys.version,
    ]
    digest = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else part.encode()
        digest.update(len(data).to_bytes(8, "little") + data)
    return root / f"facetrain_pfc_cpu_{digest.hexdigest()[:16]}"


def _import_built(folder: Path) -> ModuleType | None:
    """The module a finished build left in ``folder``, imported directly (no ninja, no lock);
    None when there is no finished build or it does not import."""
    try:
        filename = (folder / _READY).read_text().strip()
    except OSError:
        return None
    path = folder / filename
    spec = importlib.util.spec_from_file_location(filename.split(".")[0], path)
    if spec is None or spec.loader is None:
        return None
    try:
        module = importlib.util.module_from_spec(spec)  # dlopen of the compiled module
        spec.loader.exec_module(module)
    except (ImportError, OSError):
        return None
    return module


def load_kernels(root: Path | None = None) -> ModuleType:
    """The kernel module built for this key (:func:`build_dir`) under ``root`` (default:
    :func:`default_root`), built there first when no finished build is found. Raises when
    the build fails.

    Ranks that start together on a machine without the build all go to torch's ``load``,
    which holds a file lock in the folder: one compiles, the others wait and import its module.
    """
    folder = build_dir(default_root() if root is None else root)
    module = _import_built(folder)
    if module is not None:
        return module
    from torch.utils.cpp_extension import load

    print(
        f"facetrain: building Partial FC CPU kernels (one time) in {folder}",
        file=sys.stderr,
        flush=True,
    )
    folder.mkdir(parents=True, exist_ok=True)
    module = load(
        name=folder.name,
        sources=[str(_SOURCE)],
        extra_cflags=list(_CFLAGS),
        build_directory=str(folder),
        verbose=False,
    )
    tmp = folder / f"{_READY}.{os.getpid()}"
    tmp.write_text(Path(module.__file__).name)
    os.replace(tmp, folder / _READY)  # atomic: a reader sees no marker or a whole one
    return module


def set_enabled(flag: bool) -> None:
    """Use the kernels on CPU (the default) or the torch-op path everywhere (this process)."""
    _state["enabled"] = bool(flag)


def enabled() -> bool:
    """Whether ``set_enabled`` allows the kernels in this process."""
    return bool(_state["enabled"])


def kernels(build: bool = True) -> Any | None:
    """The compiled kernel module, or None (switched off, or the build failed: warned once).

    ``build=False`` only returns an already loaded module.
    """
    if not _state["enabled"] or _state["failed"]:
        return None
    if _state["module"] is not None or not build:
        return _state["module"]
    with _LOCK:
        if _state["module"] is None and not _state["failed"]:
            try:
                _state["module"] = load_kernels()
            except Exception as exc:  # noqa: BLE001 - any build problem means "use torch ops"
                _state["failed"] = True
                warnings.warn(
                    f"Partial FC's fused CPU kernels ({_SOURCE.name}) could not be built "
                    f"({type(exc).__name__}: {exc}); using the slower torch-op path "
                    "(partialfc.backend: plain skips the build).",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _state["module"]


def usable(*tensors: torch.Tensor | None) -> Any | None:
    """The kernel module if every tensor is a contiguous float32/float64 CPU tensor of one
    dtype and the kernels are available; else None (the caller uses torch ops). None
    arguments (an optional operand that is absent) are skipped."""
    tensors = tuple(t for t in tensors if t is not None)
    if not tensors:
        return None
    dtype = tensors[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
            return None
    return kernels()


def available() -> bool:
    """Whether the kernels can be used in this process (builds them if needed)."""
    return kernels() is not None


def main() -> int:
    """Build (or load from the cache) the kernels; exit status 1 if that failed."""
    ok = available()
    print(f"Partial FC fused CPU kernels: {'ready' if ok else 'NOT available (torch-op path)'}")
    return 0 if ok else 1
