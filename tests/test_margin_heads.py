"""Every margin head against an independent float64 NumPy implementation of its published
formula, float64 gradcheck (theta near 0, near pi, theta + m > pi), finite gradients at
cos = +-1, monotone target logits, state updates, and the registry's defaults and errors.

The NumPy references work entry by entry with ``math`` functions and never call the code
under test; SphereFace's ``cos(m theta)`` is computed as ``math.cos(m * theta)`` (the
implementation uses Chebyshev polynomials).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from partialfc import MarginContext, ShardSpec, build_margin, margin_defaults, margin_names
from partialfc.head_configs import CombinedConfig
from partialfc.heads import chebyshev_cos, sphere_psi
from partialfc.margins import CombinedMargin, monotone_psi
from partialfc.specs import DEFAULT_EPS

EPS = DEFAULT_EPS


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: OpenMP threads only add contention on the 2-core test machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Target cosines: near 1 (theta ~ 0), ordinary, and past the ArcFace limit (theta + 0.5 > pi
# <=> cos < -0.8776), down to near -1 (theta ~ pi).
COS_POINTS = [0.9999, 0.97, 0.5, 0.1, -0.05, -0.6, -0.86, -0.9, -0.95, -0.9999]
N_ROWS = len(COS_POINTS) + 1  # the last row has no target (class on another rank)
N_COLS = 5


def _problem(dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    cos = torch.rand(N_ROWS, N_COLS, generator=gen, dtype=torch.float64) * 1.8 - 0.9
    target = torch.tensor([i % N_COLS for i in range(N_ROWS - 1)] + [-1])
    for i, c in enumerate(COS_POINTS):
        cos[i, target[i]] = c
    # A few hard negatives (negative above the target) to exercise MV / Curricular / NPC.
    cos[2, 4] = 0.7
    cos[4, 0] = 0.3
    norms = torch.rand(N_ROWS, generator=gen, dtype=torch.float64) * 40 + 5  # [5, 45]
    norms[3] = 120.0  # above MagFace's u_a
    w_norms = torch.rand(N_COLS, generator=gen, dtype=torch.float64) * 2 + 0.5
    bias = torch.randn(N_COLS, generator=gen, dtype=torch.float64)
    return {
        "cos": cos.to(dtype),
        "target": target,
        "norms": norms.to(dtype),
        "w_norms": w_norms.to(dtype),
        "bias": bias.to(dtype),
    }


# ------------------------------------------------------------------ NumPy reference formulas
def _acos(c: float, eps: float = EPS) -> float:
    return math.acos(min(max(c, -1.0 + eps), 1.0 - eps))


def np_combined(c: float, s: float, m1: float, m2: float, m3: float, fallback: str) -> float:
    if m1 == 1.0 and m2 == 0.0:
        return s * (c - m3)
    theta = _acos(c)
    phi = m1 * theta + m2
    if fallback == "thmm":
        val = math.cos(phi) if c > math.cos(math.pi - m2) else c - m2 * math.sin(m2)
    elif fallback == "easy":
        val = math.cos(phi) if c > 0 else c
    elif fallback == "psi":
        k = math.floor(phi / math.pi)
        val = (-1) ** k * math.cos(phi) - 2 * k
    else:
        val = math.cos(phi)
    return s * (val - m3)


def ref_logits(name: str, kw: dict, p: dict, step: int = 0) -> tuple[np.ndarray, dict]:
    """Reference logits [N, S] and the expected state after one training step."""
    cos = p["cos"].double().numpy()
    target = p["target"].numpy()
    norms = p["norms"].double().numpy()
    w_norms = p["w_norms"].double().numpy()
    bias = p["bias"].double().numpy()
    defaults = margin_defaults(name)
    a = {**defaults, **kw}
    out = np.zeros_like(cos)
    state: dict = {}
    rows = [i for i in range(len(target)) if target[i] >= 0]
    n, s_cols = cos.shape
    if name in ("arcface", "cosface", "normface", "combined", "sphereface_arccos"):
        m1 = a.get("m1", 1.0)
        m2 = a.get("m2", 0.0)
        m3 = a.get("m3", 0.0)
        fb = a.get("fallback", "auto")
        if a.get("easy_margin"):
            fb = "easy"
        if fb == "auto":
            fb = "thmm" if (m1 == 1.0 and m3 == 0.0 and m2 > 0) else "psi"
        thr = a.get("interclass_filtering_threshold", 0.0)
        for i in range(n):
            for j in range(s_cols):
                c = cos[i, j]
                if j == target[i]:
                    out[i, j] = np_combined(c, a["s"], m1, m2, m3, fb)
                else:
                    out[i, j] = a["s"] * (0.0 if (thr > 0 and c > thr) else c)
    elif name in ("sphereface", "lsoftmax"):
        m = int(a["m"])
        lam = max(a["lambda_min"], a["base"] * (1 + a["gamma"] * step) ** (-a["power"]))
        for i in range(n):
            row = norms[i] if a.get("s") is None else a["s"]
            for j in range(s_cols):
                col = w_norms[j] if name == "lsoftmax" else 1.0
                c = cos[i, j]
                if j == target[i]:
                    theta = _acos(c)
                    k = min(math.floor(m * theta / math.pi), m - 1)
                    psi = (-1) ** k * math.cos(m * theta) - 2 * k
                    out[i, j] = row * col * (lam * c + psi) / (1 + lam)
                else:
                    out[i, j] = row * col * c
    elif name == "softmax":
        out = cos * norms[:, None] * w_norms[None, :] + bias[None, :]
    elif name in ("mv_softmax", "mv_arc_softmax"):
        arc = name == "mv_arc_softmax"
        for i in range(n):
            ct = cos[i, target[i]] if target[i] >= 0 else 0.0
            # The mask compares with the margin function f itself (also where cos_y <= 0);
            # only MV-Arc's target logit falls back to plain cos there (authors' release).
            f = math.cos(_acos(ct) + a["m"]) if arc else ct - a["m"]
            for j in range(s_cols):
                c = cos[i, j]
                if j == target[i]:
                    out[i, j] = a["s"] * (f if ct > 0 or not arc else ct)
                elif c > f:
                    h = (a["t"] + 1) * c + a["t"] if a["variant"] == "adaptive" else c + a["t"]
                    out[i, j] = a["s"] * h
                else:
                    out[i, j] = a["s"] * c
    elif name == "curricularface":
        t = a["momentum"] * np.mean([cos[i, target[i]] for i in rows])  # from t = 0
        state["t"] = t
        m = a["m"]
        for i in range(n):
            ct = cos[i, target[i]] if target[i] >= 0 else 0.0
            thr = math.cos(_acos(ct) + m)
            for j in range(s_cols):
                c = cos[i, j]
                if j == target[i]:
                    val = (
                        math.cos(_acos(c) + m) if c > math.cos(math.pi - m) else c - m * math.sin(m)
                    )
                    out[i, j] = a["s"] * val
                elif c > thr:
                    out[i, j] = a["s"] * c * (t + c)
                else:
                    out[i, j] = a["s"] * c
    elif name == "npcface":
        for i in range(n):
            ct = cos[i, target[i]] if target[i] >= 0 else 0.0
            thr = math.cos(_acos(ct) + a["m"])
            hard = [cos[i, j] for j in range(s_cols) if j != target[i] and cos[i, j] > thr]
            mi = a["m0"] + a["m1"] * (sum(hard) / len(hard) if hard else 0.0)
            for j in range(s_cols):
                c = cos[i, j]
                if j == target[i]:
                    out[i, j] = a["s"] * (math.cos(_acos(c) + mi) if c > 0 else c)
                elif c > thr:
                    out[i, j] = a["s"] * (a["t"] * c + a["alpha"])
                else:
                    out[i, j] = a["s"] * c
    elif name == "circleloss":
        m = a["m"]
        for i in range(n):
            for j in range(s_cols):
                c = cos[i, j]
                if j == target[i]:
                    out[i, j] = a["s"] * max(1 + m - c, 0.0) * (c - (1 - m))
                else:
                    out[i, j] = a["s"] * max(c + m, 0.0) * (c - m)
    elif name == "adaface":
        eps = a["eps"]
        z = np.clip(norms, 0.001, 100)
        mean = a["t_alpha"] * z.mean() + (1 - a["t_alpha"]) * 20.0
        std = a["t_alpha"] * z.std(ddof=1) + (1 - a["t_alpha"]) * 100.0
        state.update(batch_mean=mean, batch_std=std)
        for i in range(n):
            for j in range(s_cols):
                c = cos[i, j]
                if j == target[i]:
                    zh = min(max((z[i] - mean) / (std + eps) * a["h"], -1.0), 1.0)
                    th = min(max(_acos(c, eps) - a["m"] * zh, eps), math.pi - eps)
                    out[i, j] = a["s"] * (math.cos(th) - (a["m"] * zh + a["m"]))
                else:
                    out[i, j] = a["s"] * c
    elif name == "magface":
        la, ua, lm, um = a["l_a"], a["u_a"], a["l_margin"], a["u_margin"]
        av = np.clip(norms, la, ua)
        state["regularizer"] = a["lambda_g"] * np.mean(1 / av + av / ua**2)
        for i in range(n):
            m = (um - lm) / (ua - la) * (av[i] - la) + lm
            for j in range(s_cols):
                c = cos[i, j]
                if j == target[i]:
                    if c > math.cos(math.pi - m):
                        val = math.cos(_acos(c) + m)
                    else:
                        val = c - math.sin(math.pi - m) * m
                    out[i, j] = a["s"] * val
                else:
                    out[i, j] = a["s"] * c
    else:  # pragma: no cover - test table error
        raise AssertionError(name)
    return out, state


HEAD_CASES = [
    ("arcface", {}),
    ("arcface", {"s": 30.0, "m2": 0.3}),
    ("arcface", {"easy_margin": True}),
    ("cosface", {}),
    ("normface", {"s": 16.0}),
    ("combined", {"s": 64.0, "m1": 1.0, "m2": 0.3, "m3": 0.2}),
    ("combined", {"s": 32.0, "m1": 1.35, "m2": 0.0, "m3": 0.0}),
    ("combined", {"s": 64.0, "m1": 1.2, "m2": 0.2, "m3": 0.1}),
    ("combined", {"s": 64.0, "m1": 1.2, "m2": 0.2, "m3": 0.1, "fallback": "none"}),
    ("combined", {"s": 64.0, "m1": 1.0, "m2": 0.4, "m3": 0.1, "fallback": "thmm"}),
    ("sphereface_arccos", {}),
    ("arcface", {"interclass_filtering_threshold": 0.4}),
    ("sphereface", {}),
    ("sphereface", {"m": 3, "s": 30.0}),
    ("lsoftmax", {"m": 2}),
    ("softmax", {}),
    ("mv_softmax", {}),
    ("mv_arc_softmax", {"variant": "fixed"}),
    ("curricularface", {}),
    ("npcface", {}),
    ("circleloss", {}),
    ("adaface", {}),
    ("magface", {}),
]


def _call(head: torch.nn.Module, p: dict, step: int = 0) -> torch.Tensor:
    return head(
        p["cos"],
        p["target"],
        feature_norms=p["norms"],
        weight_norms=p["w_norms"],
        bias=p["bias"],
        step=step,
    )


def _bound(name: str, kw: dict) -> torch.nn.Module:
    head = build_margin(name, **kw)
    spec = ShardSpec(N_COLS, 0, N_COLS, 8, 0, 1, 0, torch.device("cpu"))
    head.bind(spec)
    return head.double()


@pytest.mark.parametrize(("name", "kw"), HEAD_CASES)
def test_head_matches_numpy(name: str, kw: dict) -> None:
    p = _problem(torch.float64)
    head = _bound(name, kw)
    before = {k: v.clone() for k, v in p.items()}
    step = 1000 if name in ("sphereface", "lsoftmax") else 0
    out = _call(head, p, step)
    expected, state = ref_logits(name, kw, p, step)
    assert out.dtype == torch.float64 and out.shape == p["cos"].shape
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-9, atol=1e-9)
    for key, value in p.items():
        assert torch.equal(value, before[key]), f"{key} was modified"
    if "t" in state:
        assert head.t.item() == pytest.approx(state["t"], rel=1e-12)
    if "batch_mean" in state:
        assert head.batch_mean.item() == pytest.approx(state["batch_mean"], rel=1e-12)
        assert head.batch_std.item() == pytest.approx(state["batch_std"], rel=1e-12)
    if "regularizer" in state:
        ctx = MarginContext.from_cos(p["cos"], p["target"], feature_norms=p["norms"])
        assert head.regularizer(ctx).item() == pytest.approx(state["regularizer"], rel=1e-12)


def test_float32_input_gives_float32_and_half_upcasts() -> None:
    p32 = _problem(torch.float32)
    head = build_margin("arcface")
    out = head(p32["cos"], p32["target"])
    assert out.dtype == torch.float32
    half = head(p32["cos"].half(), p32["target"])
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, head(p32["cos"].half().float(), p32["target"]))
    expected, _ = ref_logits("arcface", {}, p32)
    np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-5, atol=1e-4)


def test_sphereface_annealing_and_subcenter_pooling() -> None:
    head = build_margin("sphereface")
    assert head.annealing_lambda(0).item() == pytest.approx(1000.0)
    assert head.annealing_lambda(100).item() == pytest.approx(1000.0 / 13.0)
    assert head.annealing_lambda(10**6).item() == pytest.approx(5.0)  # lambda_min
    p = _problem()
    early = _call(head.double(), p, step=0)
    late = _call(head, p, step=10**6)
    rows = torch.arange(N_ROWS - 1)
    cols = p["target"][:-1]
    # The annealed target is between the plain and the margin logit; later = more margin.
    assert bool((late[rows, cols] <= early[rows, cols] + 1e-12).all())
    assert not torch.allclose(late, early)

    sub = build_margin("subcenter_arcface", k=3)
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(4, 6, generator=gen, dtype=torch.float64) * 2 - 1  # [N, S*K], S = 2
    target = torch.tensor([0, 1, 1, -1])
    pooled = raw.view(4, 2, 3).amax(dim=2)
    torch.testing.assert_close(sub(raw, target), build_margin("arcface")(pooled, target))
    with pytest.raises(ValueError, match="K=3"):
        sub(raw[:, :5], target)


def test_chebyshev_and_psi_are_the_published_functions() -> None:
    theta = torch.linspace(0.0, math.pi, 1001, dtype=torch.float64)
    for m in (1, 2, 3, 4):
        torch.testing.assert_close(chebyshev_cos(torch.cos(theta), m), torch.cos(m * theta))
        psi = sphere_psi(torch.cos(theta), m)
        assert bool((psi[1:] <= psi[:-1] + 1e-12).all()), f"psi not monotone for m={m}"
        assert psi[-1].item() == pytest.approx(-(2 * m - 1), abs=1e-6)
    phi = torch.linspace(0.0, 3 * math.pi, 3001, dtype=torch.float64)
    mp = monotone_psi(phi)
    assert bool((mp[1:] < mp[:-1]).all())
    torch.testing.assert_close(mp[phi <= math.pi], torch.cos(phi[phi <= math.pi]))


@pytest.mark.parametrize(
    "kw",
    [
        {"s": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0},  # ArcFace, th/mm
        {"s": 64.0, "m1": 1.35, "m2": 0.0, "m3": 0.0},  # psi
        {"s": 64.0, "m1": 1.2, "m2": 0.3, "m3": 0.2},  # psi
        {"s": 64.0, "m1": 1.0, "m2": 0.0, "m3": 0.35},  # CosFace
    ],
)
def test_combined_target_logit_is_monotone(kw: dict) -> None:
    head = CombinedMargin(CombinedConfig(**kw))
    grid = torch.linspace(-1, 1, 4001, dtype=torch.float64)[:, None]
    logit = head(grid, torch.zeros(4001, dtype=torch.long))[:, 0]
    assert bool((logit[1:] >= logit[:-1]).all())


def test_arcface_fallback_beyond_pi() -> None:
    head = build_margin("arcface", s=64.0, m2=0.5)
    cos = torch.tensor([[-0.95, 0.2], [-0.85, 0.2]], dtype=torch.float64)
    out = head(cos, torch.tensor([0, 0]))
    assert out[0, 0].item() == pytest.approx(64 * (-0.95 - 0.5 * math.sin(0.5)), abs=1e-9)
    assert out[1, 0].item() == pytest.approx(64 * math.cos(math.acos(-0.85) + 0.5), abs=1e-9)
    assert out[0, 1].item() == pytest.approx(64 * 0.2, abs=1e-12)


# Heads whose published gradient stops through part of the formula are checked separately
# (test_stop_gradient_heads); AdaFace stops the gradient through the feature norm.
STOP_GRADIENT = ("circleloss", "npcface")
GRAD_CASES = [
    c
    for c in HEAD_CASES
    if c[0] not in STOP_GRADIENT and (c[0] != "arcface" or c[1] != {"easy_margin": True})
]


@pytest.mark.parametrize(("name", "kw"), GRAD_CASES)
def test_head_gradcheck_float64(name: str, kw: dict) -> None:
    """Gradients wrt cos, feature norms, weight norms and bias, incl. theta near 0 and pi."""
    p = _problem(torch.float64)
    head = _bound(name, kw).eval()  # eval: stateful heads do not move between evaluations
    cos = p["cos"].clone().requires_grad_(True)
    norms = p["norms"].clone().requires_grad_(name != "adaface")
    w_norms = p["w_norms"].clone().requires_grad_(True)
    bias = p["bias"].clone().requires_grad_(True)
    target = p["target"]

    def fn(c: torch.Tensor, n: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = head(c, target, feature_norms=n, weight_norms=w, bias=b, step=7)
        if name == "magface":
            ctx = MarginContext.from_cos(c, target, feature_norms=n)
            out = out + head.regularizer(ctx)
        return out

    assert torch.autograd.gradcheck(fn, (cos, norms, w_norms, bias), eps=1e-7, atol=1e-5)


def test_stop_gradient_heads() -> None:
    """CircleLoss (alpha detached) and NPCFace (mask and adaptive margin detached): the
    autograd gradient equals the published gradient with those parts held constant."""
    p = _problem(torch.float64)
    cos = p["cos"].clone().requires_grad_(True)
    target = p["target"]
    c = p["cos"].numpy()
    circle = build_margin("circleloss")
    (grad,) = torch.autograd.grad(circle(cos, target).sum(), cos)
    s, m = 256.0, 0.25
    expected = s * np.maximum(c + m, 0.0)
    for i, t in enumerate(target.tolist()):
        if t >= 0:
            expected[i, t] = s * max(1 + m - c[i, t], 0.0)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-12, atol=1e-9)

    npc = build_margin("npcface")
    (grad,) = torch.autograd.grad(npc(cos, target).sum(), cos)
    a = margin_defaults("npcface")
    expected = np.full_like(c, a["s"])
    for i, t in enumerate(target.tolist()):
        ct = c[i, t] if t >= 0 else 0.0
        thr = math.cos(_acos(ct) + a["m"])
        hard = [j for j in range(N_COLS) if j != t and c[i, j] > thr]
        for j in hard:
            expected[i, j] = a["s"] * a["t"]
        if t >= 0 and ct > 0:
            mi = a["m0"] + a["m1"] * (sum(c[i, j] for j in hard) / len(hard) if hard else 0.0)
            theta = math.acos(ct)
            expected[i, t] = a["s"] * math.sin(theta + mi) / math.sin(theta)
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "kw"), HEAD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_gradient_finite_at_plus_minus_one(name: str, kw: dict, dtype: torch.dtype) -> None:
    head = _bound(name, kw).to(dtype)
    cos = torch.tensor(
        [[1.0, -1.0, 0.2], [-1.0, 1.0, 0.1], [1.0, 1.0, -1.0]], dtype=dtype, requires_grad=True
    )
    norms = torch.tensor([10.0, 50.0, 120.0], dtype=dtype, requires_grad=True)
    out = head(
        cos,
        torch.tensor([0, 0, -1]),
        feature_norms=norms,
        weight_norms=torch.ones(3, dtype=dtype),
        bias=torch.zeros(3, dtype=dtype),
    )
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(cos.grad).all()
    assert norms.grad is None or torch.isfinite(norms.grad).all()


def test_curricular_state_updates_only_in_training() -> None:
    p = _problem()
    head = build_margin("curricularface").double()
    _call(head.eval(), p)
    assert head.t.item() == 0.0
    _call(head.train(), p)
    first = head.t.item()
    _call(head, p)
    assert head.t.item() == pytest.approx(first * 0.99 + first, rel=1e-12)  # same batch mean
    state = head.state_dict()
    assert "t" in state  # checkpointed


def test_registry_defaults_and_errors() -> None:
    names = margin_names()
    for expected in (
        "softmax",
        "normface",
        "sphereface",
        "sphereface_arccos",
        "lsoftmax",
        "cosface",
        "am_softmax",
        "arcface",
        "combined",
        "mv_softmax",
        "mv_arc_softmax",
        "curricularface",
        "npcface",
        "circleloss",
        "adaface",
        "magface",
        "subcenter_arcface",
        "discface",
        "interclass_filtering",
        "none",
    ):
        assert expected in names
    arc = build_margin("arcface")
    assert (arc.s, arc.m1, arc.m2, arc.m3, arc.fallback) == (64.0, 1.0, 0.5, 0.0, "thmm")
    assert build_margin("am_softmax").m3 == 0.4
    assert build_margin("combined", s=64, m1=1.35, m2=0.0, m3=0.0).fallback == "psi"
    sphere = build_margin("sphereface")
    assert (sphere.m, sphere.base, sphere.gamma, sphere.lambda_min) == (4, 1000.0, 0.12, 5.0)
    assert build_margin("sphereface", m=3.0).m == 3  # integral floats from YAML are fine
    assert build_margin("subcenter_arcface").num_subcenters == 3
    assert build_margin("circleloss").s == 256.0
    mag = build_margin("magface")
    assert (mag.l_a, mag.u_a, mag.l_margin, mag.u_margin, mag.lambda_g) == (10, 110, 0.45, 0.8, 35)

    with pytest.raises(ValueError, match="arcface.*combined.*cosface.*normface"):
        build_margin("sphereface2")
    with pytest.raises(ValueError, match="m3"):
        build_margin("combined", s=64.0, m1=1.0, m2=0.5)
    with pytest.raises(ValueError, match="m3"):
        build_margin("arcface", m3=0.1)
    with pytest.raises(ValueError, match="easy_margin"):
        CombinedConfig(s=64.0, m1=1.0, m2=0.0, m3=0.4, easy_margin=True)
    with pytest.raises(ValueError, match="margin 'normface': s: Input should be greater than 0"):
        build_margin("normface", s=0.0)
    with pytest.raises(ValueError, match="m2"):
        build_margin("arcface", m2=4.0)
    with pytest.raises(ValueError, match="m: Input should be a valid integer"):
        build_margin("sphereface", m=1.5)
    with pytest.raises(ValueError, match="interclass_filtering_threshold"):
        build_margin("interclass_filtering")
    with pytest.raises(ValueError, match="variant"):
        build_margin("mv_softmax", variant="soft")
    with pytest.raises(ValueError, match="fallback"):
        build_margin("combined", s=1, m1=1, m2=0.1, m3=0, fallback="clip")
    with pytest.raises(ValueError, match="aux"):
        build_margin("none")
    with pytest.raises(ValueError, match=r"aux\.quadruplet: Extra inputs"):
        build_margin("arcface", aux={"quadruplet": {}})
    with pytest.raises(ValueError, match="feature_norms"):
        build_margin("magface")(torch.zeros(2, 3), torch.tensor([0, 1]))
    head = build_margin("arcface")
    with pytest.raises(ValueError, match="target"):
        head(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        head(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int32))
