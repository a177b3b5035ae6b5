"""Loss scaling of the classifier that lives outside the backbone's engine.

torch AMP fp16: one GradScaler covers the backbone's and the classifier's optimizer (its CPU
form here; the config admits fp16 on CUDA only, and the device string is the only
difference). DeepSpeed fp16: DeepSpeed scales the loss, so the classifier's gradients are
divided by DeepSpeed's current scale and its step is skipped on overflow. DeepSpeed's fp16
optimizer does not run on a CPU, so its two attributes the engine reads (``cur_scale``,
``overflow``) and its step are stood in for by a small object.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from trainer.config import load_config
from trainer.context import DistContext
from trainer.engine import DDPEngine, DeepSpeedEngine

REPO = Path(__file__).resolve().parents[1]


def _fp16_config():
    cfg = load_config(REPO / "configs" / "demo_cpu.yaml", ["train.clip_grad_norm=null"])
    return cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"precision": "fp16"})}
    )  # bypasses the CUDA-only check on purpose


def _problem() -> tuple[nn.Linear, nn.Parameter, torch.Tensor]:
    torch.manual_seed(0)
    backbone = nn.Linear(4, 3)
    fc = nn.Parameter(torch.randn(5, 3))
    return backbone, fc, torch.randn(2, 4)


def _loss(backbone: nn.Module, fc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (backbone(x) @ fc.T).square().mean()


def test_one_grad_scaler_unscales_both_optimizers_and_skips_both_on_overflow() -> None:
    backbone, fc, x = _problem()
    ref_backbone, ref_fc = nn.Linear(4, 3), nn.Parameter(fc.detach().clone())
    ref_backbone.load_state_dict(backbone.state_dict())
    opt_b = torch.optim.SGD(backbone.parameters(), lr=0.1)
    opt_fc = torch.optim.SGD([fc], lr=0.1)
    engine = DDPEngine(backbone, opt_b, DistContext.single(), _fp16_config())
    scale = engine.scaler.get_scale()
    assert scale > 1

    engine.backward(_loss(backbone, fc, x), last_micro=True)
    assert torch.allclose(fc.grad / scale, _grads(ref_backbone, ref_fc, x)[1], rtol=1e-5)
    engine.step(opt_fc, [fc], fc_clip=None)
    # The same SGD step as without scaling, for both optimizers.
    ref_b, ref_f = _grads(ref_backbone, ref_fc, x)
    torch.testing.assert_close(fc.detach(), ref_fc.detach() - 0.1 * ref_f)
    torch.testing.assert_close(backbone.weight.detach(), ref_backbone.weight.detach() - 0.1 * ref_b)

    # An inf in the classifier's gradient skips both steps and halves the scale.
    before = [p.detach().clone() for p in (*backbone.parameters(), fc)]
    opt_b.zero_grad()
    opt_fc.zero_grad()
    engine.backward(_loss(backbone, fc, x), last_micro=True)
    fc.grad[0, 0] = math.inf
    engine.step(opt_fc, [fc], fc_clip=None)
    for old, new in zip(before, (*backbone.parameters(), fc), strict=True):
        assert torch.equal(old, new.detach())
    assert engine.scaler.get_scale() == scale / 2


def _grads(backbone: nn.Module, fc: nn.Parameter, x: torch.Tensor):
    backbone.zero_grad()
    fc.grad = None
    _loss(backbone, fc, x).backward()
    return backbone.weight.grad.clone(), fc.grad.clone()


class _DeepSpeedStandIn:
    """What DeepSpeedEngine.step reads of DeepSpeed: its fp16 optimizer's scale and overflow
    flag, and the engine's step / grad norm."""

    def __init__(self, cur_scale: float, overflow: bool) -> None:
        self.optimizer = SimpleNamespace(cur_scale=cur_scale, overflow=overflow)
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def get_global_grad_norm(self) -> float:
        return 1.0


def _deepspeed_engine(stand_in: _DeepSpeedStandIn) -> DeepSpeedEngine:
    engine = object.__new__(DeepSpeedEngine)  # no DeepSpeed initialisation on a CPU
    engine.engine, engine.optimizer, engine.fp16 = stand_in, stand_in.optimizer, True
    engine.ctx = DistContext.single()
    return engine


def test_deepspeed_fp16_unscales_the_classifier_and_skips_it_on_overflow() -> None:
    for sparse in (False, True):
        fc = nn.Parameter(torch.ones(4, 2))
        grad = torch.full((4, 2), 8.0)
        fc.grad = grad.to_sparse(1) if sparse else grad.clone()  # row-sparse
        opt = torch.optim.SGD([fc], lr=0.5) if not sparse else _row_sgd([fc], lr=0.5)
        stand_in = _DeepSpeedStandIn(cur_scale=4.0, overflow=False)
        _deepspeed_engine(stand_in).step(opt, [fc], fc_clip=None)
        assert stand_in.steps == 1
        torch.testing.assert_close(fc.detach(), torch.full((4, 2), 1.0 - 0.5 * 2.0))

    # DeepSpeed found an overflow in the backbone: the classifier does not step either.
    fc = nn.Parameter(torch.ones(4, 2))
    fc.grad = torch.full((4, 2), 8.0)
    stand_in = _DeepSpeedStandIn(cur_scale=4.0, overflow=True)
    _deepspeed_engine(stand_in).step(torch.optim.SGD([fc], lr=0.5), [fc], fc_clip=None)
    assert torch.equal(fc.detach(), torch.ones(4, 2))

    # An inf in the classifier's own gradient: skipped as well.
    fc.grad = torch.full((4, 2), 8.0)
    fc.grad[1, 1] = math.inf
    stand_in = _DeepSpeedStandIn(cur_scale=4.0, overflow=False)
    _deepspeed_engine(stand_in).step(torch.optim.SGD([fc], lr=0.5), [fc], fc_clip=None)
    assert torch.equal(fc.detach(), torch.ones(4, 2))


def _row_sgd(params, lr: float):
    from partialfc import ShardOptimizer

    return ShardOptimizer(params, name="sgd", lr=lr, momentum=0.0, weight_decay=0.0)
