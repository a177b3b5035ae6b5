"""Two head rules pinned on hand-built rows (issue 14, item 5).

- Inter-class filtering: a threshold <= 0 means "off" (insightface), on the generic and the
  fused path; a positive threshold still filters.
- MV-Arc-Softmax: a negative is hard when ``cos_k > cos(theta_y + m)`` also for rows whose
  target cosine is <= 0 (the authors' release), while the target logit there is plain cos.
"""

from __future__ import annotations

import math

import pytest
import torch
from _backends import partial_fc

from partialfc import build_margin

S = 32.0


def _cos_problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines [3, 4] with negatives on both sides of 0 and targets on column 0."""
    cos = torch.tensor(
        [
            [0.6, 0.4, -0.3, 0.1],
            [-0.2, -0.4, -0.7, 0.5],
            [0.1, -0.8, 0.2, -0.1],
        ],
        dtype=torch.float64,
    )
    return cos, torch.zeros(3, dtype=torch.long)


@pytest.mark.parametrize("threshold", [-0.5, 0.0])
def test_filtering_threshold_not_above_zero_is_off(threshold: float) -> None:
    cos, target = _cos_problem()
    plain = build_margin("arcface", s=S)
    off = build_margin("interclass_filtering", s=S, interclass_filtering_threshold=threshold)
    torch.testing.assert_close(off(cos, target), plain(cos, target), rtol=0, atol=0)
    assert off.fused_scale == S  # "off" takes the fused path like plain ArcFace

    # Through PartialFC, fused and generic: the same loss as plain ArcFace.
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 5, generator=gen)
    x = torch.randn(9, 5, generator=gen)
    labels = torch.tensor([0, 1, 1, 2, 3, 3, 3, 5, 6])
    losses = []
    for head, fused in ((plain, True), (off, True), (off, False)):
        pfc = partial_fc(head, 5, 7, 1.0, 0, 1, fused=fused, low_memory=False)
        with torch.no_grad():
            pfc.weight.copy_(weight)
        losses.append(pfc(x, labels)[0].detach())
    torch.testing.assert_close(losses[1], losses[0])
    torch.testing.assert_close(losses[2], losses[0])


def test_positive_filtering_threshold_filters() -> None:
    cos, target = _cos_problem()
    head = build_margin("interclass_filtering", s=S, interclass_filtering_threshold=0.3)
    plain = build_margin("arcface", s=S)
    out, ref = head(cos, target), plain(cos, target)
    assert head.fused_scale is None
    # Non-target cosines above 0.3 become 0; the target (column 0) and the rest are untouched.
    expected = ref.clone()
    expected[0, 1] = 0.0  # 0.4 > 0.3
    expected[1, 3] = 0.0  # 0.5 > 0.3
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_mv_arc_mask_uses_margin_function_when_target_cos_is_negative() -> None:
    cos, target = _cos_problem()
    m, t = 0.5, 0.2
    head = build_margin("mv_arc_softmax", s=S, m=m, t=t, variant="adaptive")
    out = head(cos, target)
    # Row 1: cos_y = -0.2 <= 0, so its target logit is plain s * cos_y, and the mask threshold
    # is cos(theta_y + m) = cos(acos(-0.2) + 0.5) ~ -0.645 (not cos_y = -0.2 itself).
    threshold = math.cos(math.acos(-0.2) + m)
    assert -0.7 < threshold < -0.4
    assert out[1, 0].item() == pytest.approx(S * -0.2, rel=1e-12)
    # -0.4: hard under the released rule (> -0.645), not under "cos_k > cos_y" (< -0.2).
    assert out[1, 1].item() == pytest.approx(S * ((t + 1.0) * -0.4 + t), rel=1e-12)
    # -0.7: easy under both rules; 0.5: hard under both.
    assert out[1, 2].item() == pytest.approx(S * -0.7, rel=1e-12)
    assert out[1, 3].item() == pytest.approx(S * ((t + 1.0) * 0.5 + t), rel=1e-12)
    # Row 0 (cos_y = 0.6 > 0): target cos(theta_y + m), the same threshold for the mask.
    f0 = math.cos(math.acos(0.6) + m)
    assert out[0, 0].item() == pytest.approx(S * f0, rel=1e-12)
    assert out[0, 1].item() == pytest.approx(S * ((t + 1.0) * 0.4 + t), rel=1e-12)  # 0.4 > f0
    assert out[0, 2].item() == pytest.approx(S * -0.3, rel=1e-12)
