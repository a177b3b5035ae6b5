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
project) the first time a process needs them, about half a minute, then loaded from torch's
extension cache (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``);
``make setup`` builds them ahead (``cpu_kernels.main()``). The torch-op
versions stay the reference and the path on every other device, for other dtypes, when the
build fails (one warning, then the torch ops) and after ``set_enabled(False)`` (the
trainer's ``partialfc.cpu_kernels: false``). Tests check that both paths agree.
"""

from __future__ import annotations

import hashlib
import threading
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["available", "enabled", "kernels", "set_enabled", "usable"]

_SOURCE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
# -fopenmp-simd: the `omp simd` reductions vectorise without -ffast-math (which would assume
# away the -inf of masked logits; no OpenMP runtime is involved); -fno-trapping-math lets the
# compiler turn float comparisons into vector selects (nothing here reads FP exceptions).
_CFLAGS = ["-O3", "-fopenmp-simd", "-fno-trapping-math"]
_LOCK = threading.Lock()
_state: dict[str, Any] = {"module": None, "failed": False, "enabled": True}


def _build_name() -> str:
    """Extension name with a digest of the source and flags: a changed source gets its own
    build directory in torch's cache, so an older build can never be loaded for it."""
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_CFLAGS).encode()).hexdigest()
    return f"facetrain_pfc_cpu_{digest[:12]}"


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
                from torch.utils.cpp_extension import load

                _state["module"] = load(
                    name=_build_name(),
                    sources=[str(_SOURCE)],
                    extra_cflags=_CFLAGS,
                    verbose=False,
                )
            except Exception as exc:  # noqa: BLE001 - any build problem means "use torch ops"
                _state["failed"] = True
                warnings.warn(
                    f"Partial FC's fused CPU kernels ({_SOURCE.name}) could not be built "
                    f"({type(exc).__name__}: {exc}); using the slower torch-op path "
                    "(partialfc.cpu_kernels: false skips the build).",
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
