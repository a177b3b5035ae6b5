"""Auxiliary embedding losses against independent NumPy implementations of their published
formulas, their float64 gradients, and their use with a head or alone ("none").

(Sharded equality of every auxiliary loss for W = 2, 3, 4 is in ``test_partialfc_dist.py``.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from partialfc import PartialFC, aux_loss_names, build_aux_loss, build_margin
from partialfc.specs import DEFAULT_EPS

C, D = 9, 6


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(C, D, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 1, 4, 4, 7, 2, 0, 7, 5])  # repeats and singletons
    x = torch.randn(len(labels), D, generator=gen, dtype=torch.float64) * 3
    centers = torch.randn(C, D, generator=gen, dtype=torch.float64)
    return weight, x, labels, centers


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def np_contrastive(x: np.ndarray, y: np.ndarray, margin: float) -> float:
    f = _unit(x)
    vals = []
    for i in range(len(y)):
        for j in range(i + 1, len(y)):
            d = np.linalg.norm(f[i] - f[j])
            vals.append(0.5 * d * d if y[i] == y[j] else 0.5 * max(0.0, margin - d) ** 2)
    return float(np.mean(vals))


def _dist(x: np.ndarray, angular: bool) -> np.ndarray:
    f = _unit(x)
    if angular:
        return np.arccos(np.clip(f @ f.T, -1 + DEFAULT_EPS, 1 - DEFAULT_EPS))
    return np.maximum(((f[:, None, :] - f[None, :, :]) ** 2).sum(-1), 0.0)


def np_triplet(x: np.ndarray, y: np.ndarray, margin: float, mining: str, angular: bool) -> float:
    d = _dist(x, angular)
    n = len(y)
    vals = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [q for q in range(n) if y[q] != y[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            vals.append(max(d[a, p] for p in pos) - min(d[a, q] for q in neg) + margin)
            continue
        for p in pos:
            farther = [d[a, q] for q in neg if d[a, q] > d[a, p]]
            d_an = min(farther) if farther else max(d[a, q] for q in neg)
            vals.append(d[a, p] - d_an + margin)
    return float(np.mean(np.maximum(vals, 0.0))) if vals else 0.0


def np_center(x: np.ndarray, y: np.ndarray, centers: np.ndarray) -> float:
    return float(0.5 * ((x - centers[y]) ** 2).sum() / len(y))


def np_intra(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    cos = (_unit(x) * _unit(w)[y]).sum(1)
    return float(np.mean(np.arccos(np.clip(cos, -1 + DEFAULT_EPS, 1 - DEFAULT_EPS))) / math.pi)


def np_inter(y: np.ndarray, w: np.ndarray) -> float:
    wn = _unit(w)
    vals = [
        math.acos(min(max(float(wn[y[i]] @ wn[j]), -1 + DEFAULT_EPS), 1 - DEFAULT_EPS))
        for i in range(len(y))
        for j in range(len(w))
        if j != y[i]
    ]
    return -float(np.mean(vals)) / math.pi


def _run(
    head: str,
    aux: dict,
    weight: torch.Tensor,
    x: torch.Tensor,
    labels: torch.Tensor,
    centers: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict, PartialFC]:
    pfc = PartialFC(build_margin(head, aux=aux), D, C, 1.0, 0, 1).double()
    with torch.no_grad():
        if pfc.weight.numel():
            pfc.weight.copy_(weight)
        if centers is not None:
            pfc.margin.aux_losses["center"].centers.copy_(centers)
    loss, stats = pfc(x, labels)
    return loss, stats, pfc


def test_each_aux_loss_matches_numpy() -> None:
    weight, x, labels, centers = _problem()
    aux = {
        "contrastive": {"margin": 1.2},
        "triplet": {"margin": 0.2, "mining": "semi_hard"},
        "angular_triplet": {"margin": 0.35, "mining": "batch_hard"},
        "center": {},
        "intra": {},
        "inter": {},
    }
    _, stats, _ = _run("arcface", aux, weight, x, labels, centers)
    xn, yn, wn = x.numpy(), labels.numpy(), weight.numpy()
    expected = {
        "contrastive": np_contrastive(xn, yn, 1.2),
        "triplet": np_triplet(xn, yn, 0.2, "semi_hard", angular=False),
        "angular_triplet": np_triplet(xn, yn, 0.35, "batch_hard", angular=True),
        "center": np_center(xn, yn, centers.numpy()),
        "intra": np_intra(xn, yn, wn),
        "inter": np_inter(yn, wn),
    }
    for name, value in expected.items():
        assert stats.losses[f"aux_{name}"].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name
    # The other mining of each triplet loss too.
    _, stats, _ = _run(
        "none",
        {"triplet": {"mining": "batch_hard"}, "angular_triplet": {"mining": "semi_hard"}},
        weight,
        x,
        labels,
    )
    assert stats.losses["aux_triplet"].item() == pytest.approx(
        np_triplet(xn, yn, 0.2, "batch_hard", angular=False), rel=1e-9
    )
    assert stats.losses["aux_angular_triplet"].item() == pytest.approx(
        np_triplet(xn, yn, 0.35, "semi_hard", angular=True), rel=1e-9
    )


def test_weights_add_to_the_head_loss_and_none_uses_them_alone() -> None:
    weight, x, labels, centers = _problem(1)
    plain, _, _ = _run("arcface", {}, weight, x, labels)
    both, stats, _ = _run(
        "arcface",
        {"triplet": {"weight": 0.5}, "center": {"weight": 0.01}},
        weight,
        x,
        labels,
        centers,
    )
    expected = plain + 0.5 * stats.losses["aux_triplet"] + 0.01 * stats.losses["aux_center"]
    torch.testing.assert_close(both, expected)
    alone, stats, pfc = _run("none", {"triplet": {"weight": 2.0}}, weight, x, labels)
    assert pfc.weight.shape == (0, D) and stats.num_sampled == 0
    torch.testing.assert_close(alone, 2.0 * stats.losses["aux_triplet"])
    assert stats.angles is None and set(stats.losses) == {"aux_triplet"}


@pytest.mark.parametrize(
    "aux",
    [
        {"contrastive": {}},
        {"triplet": {"mining": "semi_hard"}},
        {"triplet": {"mining": "batch_hard"}},
        {"angular_triplet": {}},
        {"center": {}},
    ],
)
def test_aux_gradcheck_float64(aux: dict) -> None:
    weight, x, labels, centers = _problem(2)
    pfc = PartialFC(build_margin("none", aux=aux), D, C, 1.0, 0, 1).double()
    if "center" in aux:
        with torch.no_grad():
            pfc.margin.aux_losses["center"].centers.copy_(centers)
    e = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: pfc(inp, labels)[0], (e,), atol=1e-6)


def test_intra_inter_gradcheck_float64() -> None:
    weight, x, labels, _ = _problem(3)
    head = build_margin("cosface", s=4.0, aux={"intra": {}, "inter": {}})
    pfc = PartialFC(head, D, C, 1.0, 0, 1).double()
    with torch.no_grad():
        pfc.weight.copy_(weight)
    e = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: pfc(inp, labels)[0], (e,), atol=1e-6)
    w0 = pfc.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda w: torch.func.functional_call(pfc, {"weight": w}, (x, labels))[0], (w0,), atol=1e-6
    )


def test_no_valid_triplet_gives_zero_and_bad_arguments() -> None:
    weight, x, _, _ = _problem()
    labels = torch.arange(len(x))  # every identity once: no positive pair at all
    pfc = PartialFC(build_margin("none", aux={"triplet": {}}), D, 12, 1.0, 0, 1).double()
    loss, _ = pfc(x.clone().requires_grad_(True), labels)
    assert loss.item() == 0.0
    assert set(aux_loss_names()) == {
        "angular_triplet",
        "center",
        "contrastive",
        "inter",
        "intra",
        "triplet",
    }
    with pytest.raises(ValueError, match="mining"):
        build_aux_loss("triplet", mining="hardest")
    with pytest.raises(ValueError, match="triplet"):
        build_aux_loss("triplet", alpha=0.3)
    with pytest.raises(ValueError, match="needs a classifier"):
        build_margin("none", aux={"intra": {}})
