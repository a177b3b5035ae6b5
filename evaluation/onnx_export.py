"""Export an embedding network to ONNX and prove the file computes what PyTorch computes.

The shipped artefact of a training run is ``model.onnx`` with one input ``"input"``
[batch, 3, H, W] float32 (pixels normalised to ``(x - 127.5) / 127.5``) and one output
``"embedding"`` [batch, D] (not normalised), with a dynamic batch axis.

Exporter choice: torch 2.13's default, the ``torch.export``-based exporter (``dynamo=True``).
It handles everything IResNet uses (BatchNorm in eval mode, PReLU, Dropout as identity,
flatten with a symbolic batch) and the legacy TorchScript exporter is deprecated and prints
that it will be removed. Its native opset is 18; for ``opset=17`` (the default here, for
runtimes such as older TensorRT) it down-converts with the ONNX version converter. That works
for IResNet; if a conversion ever falls back to a newer opset, the opset actually written is
read back from the file and reported in :class:`ExportResult`. ``external_data=False`` keeps the
model in one file (every IResNet up to r200 is well under protobuf's 2 GB limit), which is what
makes the atomic rename below possible. ``dynamo=False`` selects the legacy exporter.

The file is only trusted after onnxruntime reproduces the PyTorch output on a seeded random
batch whose size differs from the trace batch (so the dynamic batch axis is exercised too).
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

__all__ = ["ExportResult", "OnnxParityError", "export_onnx"]

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"


class OnnxParityError(RuntimeError):
    """The exported graph's output differs from PyTorch's by more than the tolerance."""

    def __init__(
        self, path: Path, max_abs_diff: float, tolerance: float, batch: int, detail: str = ""
    ) -> None:
        reason = detail or (
            f"max |onnxruntime - torch| = {max_abs_diff:.3e} > tolerance {tolerance:.3e}"
        )
        super().__init__(
            f"ONNX export of {path} does not match PyTorch: {reason} on a batch of {batch}; "
            "the file was not written"
        )
        self.path = path
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


@dataclass(frozen=True)
class ExportResult:
    """Where the verified ONNX file is, how close it is to PyTorch, and its real opset."""

    path: Path
    max_abs_diff: float
    opset: int
    trace_batch: int
    check_batch: int


def _as_hw(input_size: int | Sequence[int]) -> tuple[int, int]:
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"input_size must be a positive (H, W), got {input_size!r}")
    return int(size[0]), int(size[1])


def _default_opset(model_proto: onnx.ModelProto) -> int:
    for entry in model_proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("exported ONNX model has no default-domain opset import")


def _run_exporter(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamo: bool
) -> None:
    if dynamo:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        )
    else:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )


def _random_batch(batch: int, hw: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Seeded input in [-1, 1], the range of normalised face pixels."""
    return torch.rand(batch, 3, *hw, generator=generator) * 2.0 - 1.0  # [B, 3, H, W]


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_size: int | Sequence[int] = (112, 112),
    opset: int = 17,
    tolerance: float = 1e-4,
    batch_for_check: int = 4,
    seed: int = 0,
    *,
    dynamo: bool = True,
) -> ExportResult:
    """Export ``model`` to ``path`` as ONNX and verify it with onnxruntime on CPU.

    The export runs on a float32 CPU deep copy of ``model`` in eval mode, so the caller's model
    (possibly on a GPU, mid-training, in train mode) is never moved or switched, even when the
    export fails. The file is written under a temporary name in the same directory and renamed
    onto ``path`` only after the parity check passes (missing parent directories are created);
    on any failure the temporary file is removed and an existing file at ``path`` is left as it
    was.

    Raises:
        OnnxParityError: max |onnxruntime - torch| on a seeded batch of ``batch_for_check``
            exceeds ``tolerance`` (or is not finite).
        ValueError: bad arguments, or the exported graph lacks the expected input/output names.
    """
    hw = _as_hw(input_size)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if batch_for_check < 1:
        raise ValueError(f"batch_for_check must be >= 1, got {batch_for_check}")
    # The dynamo exporter specialises sizes 0 and 1, and tracing with the check batch would not
    # prove the batch axis is dynamic: trace with a different size >= 2.
    trace_batch = 3 if batch_for_check == 2 else 2

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")

    cpu_model = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    example = _random_batch(trace_batch, hw, generator)
    check = _random_batch(batch_for_check, hw, generator)

    done = False
    try:
        _run_exporter(cpu_model, example, tmp_path, opset, dynamo)
        proto = onnx.load(str(tmp_path))
        onnx.checker.check_model(proto)
        inputs = [i.name for i in proto.graph.input]
        outputs = [o.name for o in proto.graph.output]
        if inputs != [INPUT_NAME] or outputs != [OUTPUT_NAME]:
            raise ValueError(
                f"exported graph has inputs {inputs} and outputs {outputs}; expected "
                f"[{INPUT_NAME!r}] and [{OUTPUT_NAME!r}] (model must take one tensor and "
                "return one tensor)"
            )
        written_opset = _default_opset(proto)
        del proto

        session = ort.InferenceSession(str(tmp_path), providers=["CPUExecutionProvider"])
        onnx_out = session.run([OUTPUT_NAME], {INPUT_NAME: check.numpy()})[0]  # [B, D]
        del session
        with torch.no_grad():
            torch_out = cpu_model(check).numpy()  # [B, D]
        if onnx_out.shape != torch_out.shape:
            raise OnnxParityError(
                path,
                float("inf"),
                tolerance,
                batch_for_check,
                detail=f"output shape {onnx_out.shape} != torch output shape {torch_out.shape}",
            )
        max_abs_diff = float(
            np.max(np.abs(onnx_out.astype(np.float64) - torch_out.astype(np.float64)))
        )
        if not np.isfinite(max_abs_diff) or max_abs_diff > tolerance:
            raise OnnxParityError(path, max_abs_diff, tolerance, batch_for_check)
        os.replace(tmp_path, path)
        done = True
    finally:
        if not done:
            tmp_path.unlink(missing_ok=True)
    return ExportResult(
        path=path,
        max_abs_diff=max_abs_diff,
        opset=written_opset,
        trace_batch=trace_batch,
        check_batch=batch_for_check,
    )
