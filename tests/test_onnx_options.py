"""Tests for export_onnx's options (onnxsim, fp16) and the export of every backbone family."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from backbones import create_backbone
from evaluation.onnx_export import OnnxParityError, convert_to_fp16, export_onnx

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def warmed(name: str, **kwargs) -> nn.Module:
    """A backbone whose BN running statistics come from a few batches (realistic eval mode)."""
    torch.manual_seed(0)
    model = create_backbone(name, **kwargs).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 112, 112) * 2 - 1)
    return model.eval()


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"input": x})[0]


@pytest.fixture(scope="module")
def nano() -> nn.Module:
    return warmed("iresnet_nano")


@pytest.fixture(scope="module")
def fp32(nano: nn.Module, tmp_path_factory: pytest.TempPathFactory):
    return export_onnx(nano, tmp_path_factory.mktemp("fp32") / "fp32.onnx")


def test_fp16_export_halves_the_file_and_keeps_fp32_io(
    nano: nn.Module, fp32, tmp_path: Path
) -> None:
    half = export_onnx(nano, tmp_path / "fp16.onnx", fp16=True)
    assert half.fp16 and not fp32.fp16
    assert half.fp32_max_abs_diff is not None and half.fp32_max_abs_diff < 1e-4
    assert 0 < half.max_rel_diff < 1e-2
    assert half.max_abs_diff > fp32.max_abs_diff  # float16 really is used
    ratio = half.path.stat().st_size / fp32.path.stat().st_size
    assert 0.45 < ratio < 0.55
    proto = onnx.load(str(half.path))
    kinds = {i.data_type for i in proto.graph.initializer if len(i.dims) > 1}
    assert kinds == {TensorProto.FLOAT16}
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(0).uniform(-1, 1, (5, 3, 112, 112)).astype(np.float32)
    out = run(half.path, x)
    with torch.no_grad():
        ref = nano(torch.from_numpy(x)).numpy()
    assert out.dtype == np.float32 and out.shape == (5, 128)
    assert np.abs(out - ref).max() / np.abs(ref).max() < 1e-2
    assert np.abs(run(fp32.path, x) - ref).max() < 1e-4


def test_fp16_beyond_its_tolerance_is_refused(nano: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(OnnxParityError, match=r"fp16 graph: .* > fp16_tolerance 1\.000e-07"):
        export_onnx(nano, tmp_path / "m.onnx", fp16=True, fp16_tolerance=1e-7)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="fp16_tolerance"):
        export_onnx(nano, tmp_path / "m.onnx", fp16=True, fp16_tolerance=-1.0)


def test_simplified_export_passes_parity(nano: nn.Module, fp32, tmp_path: Path) -> None:
    plain = fp32
    # opset 17 asked for: the exporter's 18 is converted down, then simplified
    simple = export_onnx(nano, tmp_path / "simple.onnx", simplify=True, opset=17)
    assert simple.simplified and simple.max_abs_diff < 1e-4 and simple.opset == 17
    plain_nodes = len(onnx.load(str(plain.path)).graph.node)
    assert len(onnx.load(str(simple.path)).graph.node) <= plain_nodes
    x = np.random.default_rng(1).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
    assert np.abs(run(simple.path, x) - run(plain.path, x)).max() < 1e-5


def test_simplify_without_onnxsim_says_how_to_install(
    nano: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxsim", None)  # import onnxsim -> ImportError
    with pytest.raises(ValueError, match="pip install onnxsim"):
        export_onnx(nano, tmp_path / "m.onnx", simplify=True)
    assert list(tmp_path.iterdir()) == []


def test_convert_to_fp16_rewrites_constants_casts_and_types() -> None:
    """y = Cast<float>(x * W + c) with c a Constant(value_float) and W an initializer."""
    w = numpy_helper.from_array(np.array([1.5, -2.0, 70000.0], np.float32), "W")
    nodes = [
        helper.make_node("Constant", [], ["c"], value_float=0.25),
        helper.make_node("Mul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "c"], ["s"]),
        helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [w],
        value_info=[helper.make_tensor_value_info("xw", TensorProto.FLOAT, [None, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    half = convert_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    assert half.graph.initializer[0].data_type == TensorProto.FLOAT16
    # out-of-range weights are clipped to the float16 maximum, not turned into inf
    assert numpy_helper.to_array(half.graph.initializer[0])[2] == np.finfo(np.float16).max
    assert half.graph.value_info[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    ops = [n.op_type for n in half.graph.node]
    assert ops == ["Cast", "Constant", "Mul", "Add", "Cast", "Cast"]
    assert model.graph.node[0].attribute[0].name == "value_float"  # the input model is intact
    x = np.array([[1.0, 2.0, 1e-3]], np.float32)
    sess = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": x})[0]
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[0, :2], [1.75, -3.75])
    assert abs(y[0, 2] - (65504.0 * np.float16(1e-3) + 0.25)) < 0.1


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("mobilefacenet", {"scale": 1}), ("vit_t", {"dim": 32, "depth": 2})],
)
def test_every_family_exports_with_parity(name: str, kwargs: dict, tmp_path: Path) -> None:
    model = warmed(name, embedding_size=64, **kwargs)
    result = export_onnx(model, tmp_path / f"{name}.onnx")
    assert result.max_abs_diff < 1e-4 and result.opset == 18
    x = np.random.default_rng(2).uniform(-1, 1, (3, 3, 112, 112)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = run(result.path, x)
    assert out.shape == (3, 64) and np.abs(out - ref).max() < 1e-4
    assert np.abs(ref).max() > 1e-3  # a real signal
