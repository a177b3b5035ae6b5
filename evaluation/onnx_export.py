"""Export an embedding network to ONNX and prove the file computes what PyTorch computes.

The shipped artefact of a training run is ``model.onnx`` with one input ``"input"``
[batch, 3, H, W] float32 (pixels normalised to ``(x - 127.5) / 127.5``) and one output
``"embedding"`` [batch, D] (not normalised), with a dynamic batch axis.

Exporter choice: torch 2.13's default, the ``torch.export``-based exporter (``dynamo=True``).
It handles everything IResNet uses (BatchNorm in eval mode, PReLU, Dropout as identity,
flatten with a symbolic batch) and the legacy TorchScript exporter is deprecated and prints
that it will be removed. Its native opset is 18, the default here; ``opset=17`` (for runtimes
that stop at 17, such as TensorRT 8.x) down-converts with the ONNX version converter, which
works for IResNet and warns on every export that it may not. If a conversion ever falls back
to a newer opset, the opset actually written is read back from the file and reported in
:class:`ExportResult`. The exporter's known noise (:data:`common.noise.EXPORT_NOISE`) is kept
off the console. ``external_data=False`` keeps the model in one file (every IResNet up to r200
is well under protobuf's 2 GB limit), which is what makes the atomic rename below possible.
``dynamo=False`` selects the legacy exporter.

The file is only trusted after onnxruntime reproduces the PyTorch output on a seeded random
batch whose size differs from the trace batch (so the dynamic batch axis is exercised too).

Two optional post-processing steps, each followed by its own parity check before anything is
written:

* ``simplify=True`` runs onnxsim (constant folding, redundant-node elimination; installed
  separately: ``pip install onnxsim``); the simplified graph must still pass the fp32
  tolerance.
* ``fp16=True`` stores weights and computes in float16 (half the file, faster on GPUs with
  fp16 units) while the graph keeps float32 input and output (a Cast at each end), so callers
  feed the same arrays. The fp32 graph must pass ``tolerance`` first; the fp16 graph is then
  checked against PyTorch with ``fp16_tolerance`` relative to the output scale
  (``max|diff| / max|torch|``), since float16 has only 11 significant bits.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from common.noise import EXPORT_NOISE, quiet

__all__ = ["ExportResult", "OnnxParityError", "convert_to_fp16", "export_onnx"]

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
    """max |onnxruntime - torch| of the written file on the check batch."""
    opset: int
    trace_batch: int
    check_batch: int
    fp32_max_abs_diff: float | None = None
    """For an fp16 export: the difference of the fp32 graph it was converted from."""
    simplified: bool = False
    fp16: bool = False
    max_rel_diff: float = 0.0
    """max |onnxruntime - torch| / max |torch| of the written file."""


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
    opset: int = 18,
    tolerance: float = 1e-4,
    batch_for_check: int = 4,
    seed: int = 0,
    *,
    dynamo: bool = True,
    simplify: bool = False,
    fp16: bool = False,
    fp16_tolerance: float = 1e-2,
) -> ExportResult:
    """Export ``model`` to ``path`` as ONNX and verify it with onnxruntime on CPU.

    The export runs on a float32 CPU deep copy of ``model`` in eval mode, so the caller's model
    (possibly on a GPU, mid-training, in train mode) is never moved or switched, even when the
    export fails. The file is written under a temporary name in the same directory and renamed
    onto ``path`` only after the parity check passes (missing parent directories are created);
    on any failure the temporary file is removed and an existing file at ``path`` is left as it
    was.

    ``simplify`` runs onnxsim and ``fp16`` converts to float16 with float32 input/output (see
    the module docstring); each step is parity-checked before the file is written.
    ``result.max_abs_diff`` is the measured difference of the file actually written.

    Raises:
        OnnxParityError: max |onnxruntime - torch| on a seeded batch of ``batch_for_check``
            exceeds ``tolerance`` (or is not finite); for fp16, the relative difference
            exceeds ``fp16_tolerance``.
        ValueError: bad arguments, or the exported graph lacks the expected input/output names.
    """
    hw = _as_hw(input_size)
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if opset < 17:
        raise ValueError(f"opset must be >= 17 (the exporter targets 17 and up), got {opset}")
    if batch_for_check < 1:
        raise ValueError(f"batch_for_check must be >= 1, got {batch_for_check}")
    if fp16_tolerance < 0:
        raise ValueError(f"fp16_tolerance must be >= 0, got {fp16_tolerance}")
    onnxsim = _import_onnxsim(path) if simplify else None  # fail before the slow export
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
        with quiet(EXPORT_NOISE):
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
        with torch.no_grad():
            torch_out = cpu_model(check).numpy()  # [B, D]
        max_abs_diff, max_rel = _parity(path, tmp_path, check, torch_out, tolerance, None)
        fp32_diff = max_abs_diff
        if simplify:
            proto = _simplify(onnxsim, proto, path)
            onnx.save(proto, str(tmp_path))
            max_abs_diff, max_rel = _parity(path, tmp_path, check, torch_out, tolerance, None)
            fp32_diff = max_abs_diff
        if fp16:
            proto = convert_to_fp16(proto)
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp_path))
            max_abs_diff, max_rel = _parity(
                path, tmp_path, check, torch_out, fp16_tolerance, "relative"
            )
        del proto
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
        fp32_max_abs_diff=fp32_diff if fp16 else None,
        simplified=simplify,
        fp16=fp16,
        max_rel_diff=max_rel,
    )


def _parity(
    path: Path,
    onnx_path: Path,
    check: torch.Tensor,
    torch_out: np.ndarray,
    tolerance: float,
    mode: str | None,
) -> tuple[float, float]:
    """Run ``onnx_path`` on ``check``; return (max abs diff, max abs diff / max |torch|).

    Raises OnnxParityError past ``tolerance`` (absolute, or relative when ``mode`` is set).
    """
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    onnx_out = session.run([OUTPUT_NAME], {INPUT_NAME: check.numpy()})[0]  # [B, D]
    del session
    batch = len(check)
    if onnx_out.shape != torch_out.shape:
        raise OnnxParityError(
            path,
            float("inf"),
            tolerance,
            batch,
            detail=f"output shape {onnx_out.shape} != torch output shape {torch_out.shape}",
        )
    diff = float(np.max(np.abs(onnx_out.astype(np.float64) - torch_out.astype(np.float64))))
    scale = float(np.max(np.abs(torch_out))) if torch_out.size else 0.0
    rel = diff / scale if scale > 0 else diff
    measured = rel if mode == "relative" else diff
    if not np.isfinite(diff) or measured > tolerance:
        detail = ""
        if mode == "relative":
            detail = (
                f"fp16 graph: max |onnxruntime - torch| / max |torch| = {rel:.3e} "
                f"(abs {diff:.3e}) > fp16_tolerance {tolerance:.3e}"
            )
        raise OnnxParityError(path, diff, tolerance, batch, detail=detail)
    return diff, rel


def _import_onnxsim(path: str | os.PathLike[str]) -> Any:
    try:
        import onnxsim
    except ImportError as e:
        raise ValueError(
            f"simplify=True for {path} needs onnxsim (pip install onnxsim); it is not installed"
        ) from e
    return onnxsim


def _simplify(onnxsim: Any, proto: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise OnnxParityError(path, float("nan"), 0.0, 0, detail="onnxsim's own check failed")
    return simplified


_TYPE_ATTR_OPS = {
    "Cast": "to",
    "RandomNormal": "dtype",
    "RandomUniform": "dtype",
    "EyeLike": "dtype",
}
_FP16_MAX = float(np.finfo(np.float16).max)


def _tensor_to_fp16(tensor: onnx.TensorProto) -> onnx.TensorProto:
    arr = numpy_helper.to_array(tensor).astype(np.float64)
    half = np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16)
    return numpy_helper.from_array(half, tensor.name)


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Float32 weights and arithmetic -> float16, keeping float32 graph inputs and outputs.

    Every float32 initializer and constant becomes float16 (values beyond the float16 range are
    clipped to it rather than becoming inf), casts to float32 become casts to float16, and every
    intermediate float32 type annotation is rewritten. A Cast to float16 follows each float32
    input and a Cast back to float32 precedes each float32 output, so the model's interface is
    unchanged. Graphs with sub-graphs (If/Loop/Scan) are refused: backbones have none.
    """
    model = copy.deepcopy(model)
    graph = model.graph
    for node in graph.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise ValueError(
                f"convert_to_fp16: node {node.name!r} ({node.op_type}) has a sub-graph"
            )

    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            graph.initializer[i].CopyFrom(_tensor_to_fp16(init))
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(_tensor_to_fp16(attr.t))
            if node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                values = [attr.f] if attr.name == "value_float" else list(attr.floats)
                tensor = numpy_helper.from_array(
                    np.asarray(values, np.float16).reshape(
                        () if attr.name == "value_float" else (len(values),)
                    )
                )
                node.attribute.remove(attr)
                node.attribute.append(helper.make_attribute("value", tensor))
                break
            if _TYPE_ATTR_OPS.get(node.op_type) == attr.name and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    for info in graph.value_info:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = TensorProto.FLOAT16

    head: list[onnx.NodeProto] = []
    for inp in graph.input:
        if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{inp.name}__fp16"
        for node in graph.node:
            node.input[:] = [half if n == inp.name else n for n in node.input]
        head.append(helper.make_node("Cast", [inp.name], [half], to=TensorProto.FLOAT16))
    tail: list[onnx.NodeProto] = []
    for out in graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        half = f"{out.name}__fp16"
        for node in graph.node:
            node.output[:] = [half if n == out.name else n for n in node.output]
            node.input[:] = [half if n == out.name else n for n in node.input]
        tail.append(helper.make_node("Cast", [half], [out.name], to=TensorProto.FLOAT))
    nodes = head + list(graph.node) + tail
    del graph.node[:]
    graph.node.extend(nodes)
    return model
