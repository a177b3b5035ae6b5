"""Tests for evaluation/onnx_export.py: export, parity, dynamic batch, atomic failure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from backbones import create_backbone
from evaluation.onnx_export import ExportResult, OnnxParityError, export_onnx

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _nano() -> nn.Module:
    torch.manual_seed(0)
    model = create_backbone("iresnet_nano", dropout=0.2)
    # A few training-mode batches give BN realistic running statistics (an untrained model's
    # eval-mode activations are not representative of a real export).
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(8, 3, 112, 112) * 2 - 1)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, ExportResult, dict]:
    model = _nano()
    model.train()  # the caller's mode must survive the export
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out_dir = tmp_path_factory.mktemp("onnx")
    result = export_onnx(model, out_dir / "sub" / "nano.onnx")
    return model, result, before


def test_export_writes_a_verified_opset_18_file(exported) -> None:
    _, result, _ = exported
    assert result.path.name == "nano.onnx" and result.path.is_file()
    assert 0.0 <= result.max_abs_diff < 1e-4
    assert result.opset == 18  # the exporter's own opset: no down-conversion by default
    assert result.trace_batch != result.check_batch == 4
    proto = onnx.load(str(result.path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [18]
    # only the final file remains: no temporary, no external-data side file
    assert sorted(p.name for p in result.path.parent.iterdir()) == ["nano.onnx"]


def test_onnx_graph_has_named_io_and_dynamic_batch(exported) -> None:
    model, result, _ = exported
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["embedding"]
    in_shape = session.get_inputs()[0].shape
    assert isinstance(in_shape[0], str) and in_shape[1:] == [3, 112, 112]
    reference = model.eval()
    try:
        for batch in (1, 7):
            x = torch.rand(batch, 3, 112, 112, generator=torch.Generator().manual_seed(batch))
            x = x * 2 - 1
            out = session.run(None, {"input": x.numpy()})[0]
            with torch.no_grad():
                ref = reference(x).numpy()
            assert out.shape == (batch, 128)
            assert np.abs(out - ref).max() < 1e-4
            assert np.abs(ref).max() > 0.1  # a real signal, not all zeros
    finally:
        model.train()


def test_export_leaves_the_model_as_it_was(exported) -> None:
    model, _, before = exported
    assert model.training is True
    assert all(m.training for m in model.modules())
    assert model.dropout.p == 0.2
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
        assert after[key].device.type == "cpu"
    assert model.features.weight.requires_grad is False


class ExportsDifferently(nn.Module):
    """Adds 1 only while being exported, so the ONNX graph disagrees with eager PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x.flatten(1))
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            y = y + 1.0
        return y


@pytest.mark.parametrize("dynamo", [True, False])
def test_parity_failure_raises_and_leaves_no_file(tmp_path: Path, dynamo: bool) -> None:
    target = tmp_path / "bad.onnx"
    with pytest.raises(OnnxParityError, match=r"max \|onnxruntime - torch\| = 1\.000e\+00") as err:
        export_onnx(ExportsDifferently(), target, input_size=(8, 8), dynamo=dynamo)
    assert err.value.max_abs_diff == pytest.approx(1.0, abs=1e-5)
    assert err.value.tolerance == 1e-4
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_an_existing_file_untouched(tmp_path: Path) -> None:
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous release")
    with pytest.raises(OnnxParityError):
        export_onnx(ExportsDifferently(), target, input_size=8)
    assert target.read_bytes() == b"previous release"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_legacy_exporter_also_passes_parity(tmp_path: Path) -> None:
    model = _nano().eval()
    result = export_onnx(model, tmp_path / "legacy.onnx", opset=17, dynamo=False, batch_for_check=2)
    assert result.max_abs_diff < 1e-4 and result.opset == 17  # as asked
    assert result.trace_batch == 3  # never traced at the check batch size
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).uniform(-1, 1, size=(5, 3, 112, 112)).astype(np.float32)
    assert session.run(["embedding"], {"input": x})[0].shape == (5, 128)
    assert model.training is False  # eval in, eval out


def test_bad_arguments(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="tolerance"):
        export_onnx(model, tmp_path / "a.onnx", tolerance=-1.0)
    with pytest.raises(ValueError, match="batch_for_check"):
        export_onnx(model, tmp_path / "a.onnx", batch_for_check=0)
    with pytest.raises(ValueError, match="input_size"):
        export_onnx(model, tmp_path / "a.onnx", input_size=(112, 112, 3))
    assert list(tmp_path.iterdir()) == []
