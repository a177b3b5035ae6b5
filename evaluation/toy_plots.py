"""The classic 2-D picture of each margin loss, drawn on a toy problem.

A small network maps scikit-learn's ``digits`` images to 2-D features, trained with each head of
``partialfc.margin_names()`` (plus a plain softmax baseline); the figure shows the features, the
class-centre directions, the decision regions, and in grey the margin zone where no class wins
once its margin is applied.

* :func:`train_toy_head`: train the 2-D toy with one head (:class:`ToyModel`).
* :func:`make_toy_plots`: train and draw every head (``toy_<head>.png``), skipping with a
  reason the heads the toy cannot use.

``python -m evaluation.plots toy --out DIR`` (or ``facetrain plots``) regenerates the figures.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluation.figures import new_figure, save_png

__all__ = [
    "TOY_DEFAULT_KWARGS",
    "ToyModel",
    "ToyPlotsResult",
    "make_toy_plots",
    "train_toy_head",
]

TOY_DEFAULT_KWARGS: dict[str, dict[str, Any]] = {
    "arcface": {"s": 16.0, "m2": 0.3},
    "cosface": {"s": 16.0, "m3": 0.25},
    "combined": {"s": 16.0, "m1": 1.0, "m2": 0.2, "m3": 0.1},
    "normface": {"s": 16.0},
    "interclass_filtering": {"s": 16.0, "m2": 0.3, "interclass_filtering_threshold": 0.9},
}
"""Head arguments for the toy figures. In 2-D, 8 classes share 360 degrees (45 each), so the
published s=64, m=0.5 rad are too strong; these keep the margins visible but satisfiable.
Heads not listed are tried with ``s`` = ``toy_scale`` and then with their own defaults."""


class _ToyNet(nn.Module):
    """64 digit pixels -> 2-D feature: two hidden PReLU layers, no normalisation."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.PReLU(hidden),
            nn.Linear(hidden, hidden),
            nn.PReLU(hidden),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 2]


@dataclass
class ToyModel:
    """A trained 2-D toy: the feature net, the class centres, and how logits are formed."""

    name: str
    net: nn.Module
    weight: torch.Tensor
    """[C * K, 2] class centres (K sub-centres per class for sub-center heads)."""
    bias: torch.Tensor | None
    """[C] class bias for heads on raw (un-normalised) logits, else None."""
    head: nn.Module | None
    """The margin head (None: the plain linear softmax baseline)."""
    num_classes: int = 0
    step: int = 0
    """Training steps taken (heads with annealing, e.g. SphereFace's lambda, read it)."""
    train_accuracy: float = 0.0
    test_accuracy: float = 0.0
    losses: list[float] = field(default_factory=list)

    @property
    def raw_logits(self) -> bool:
        """Whether the head decides on ``W f + b`` (softmax, L-Softmax) rather than cosines."""
        if self.head is None:
            return True
        return bool(
            getattr(self.head, "needs_weight_norms", False)
            or getattr(self.head, "needs_bias", False)
        )

    def logits(self, feats: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """[B, C] logits; with ``target`` the head applies its margin to those columns.

        Without a target this is the test-time decision: nearest centre by cosine (normalised
        heads) or the largest ``W f + b`` (raw heads), sub-centres max-pooled per class.
        """
        if target is not None and self.head is not None:
            cos = F.normalize(feats, dim=1) @ F.normalize(self.weight, dim=1).T  # [B, C*K]
            return _call_head(self.head, cos, target, feats, self.weight, self.bias, self.step)
        if self.raw_logits:
            out = feats @ self.weight.T  # [B, C*K]
            out = out if self.bias is None or len(self.bias) != out.shape[1] else out + self.bias
        else:
            out = F.normalize(feats, dim=1) @ F.normalize(self.weight, dim=1).T  # [B, C*K]
        k = out.shape[1] // self.num_classes
        return out.reshape(len(out), self.num_classes, k).amax(dim=2)  # [B, C]


def _call_head(
    head: nn.Module,
    cos: torch.Tensor,
    target: torch.Tensor,
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    step: int,
) -> torch.Tensor:
    """``head(cos, target, ...)`` with the optional inputs its forward accepts.

    Heads that need the feature norms (AdaFace, MagFace), the centre norms or a bias (softmax,
    L-Softmax) take them as keyword arguments; the toy passes whichever the forward declares.
    """
    params = inspect.signature(head.forward).parameters
    kwargs: dict[str, Any] = {}
    if "feature_norms" in params:
        kwargs["feature_norms"] = feats.norm(dim=1)  # [B]
    if "weight_norms" in params:
        kwargs["weight_norms"] = weight.norm(dim=1)  # [C*K]
    if "bias" in params and bias is not None:
        kwargs["bias"] = bias
    if "step" in params:
        kwargs["step"] = step
    return head(cos, target, **kwargs)


def _bind_toy_head(head: nn.Module, num_classes: int) -> None:
    """Let a head create its per-class state (partialfc ``bind``) for a 1-rank, C-class shard."""
    if not hasattr(head, "bind"):
        return
    from partialfc.context import ShardSpec

    spec = ShardSpec(
        num_classes=num_classes,
        class_start=0,
        num_local=num_classes,
        embedding_size=2,
        rank=0,
        world_size=1,
        seed=0,
        device=torch.device("cpu"),
    )
    head.bind(spec)


def _toy_data(num_classes: int, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    keep = digits.target < num_classes
    x = digits.data[keep].astype(np.float32) / 16.0  # [N, 64] in [0, 1]
    y = digits.target[keep].astype(np.int64)
    return train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)


def _margin_aliases() -> dict[str, str]:
    """Alias -> canonical name of partialfc's head registry, if it publishes ``ALIASES``."""
    try:
        from partialfc import registry
    except ImportError:
        return {}
    return dict(getattr(registry, "ALIASES", {}))


def _build_toy_head(
    name: str, kwargs: Mapping[str, Any] | None, toy_scale: float
) -> tuple[nn.Module | None, str | None]:
    """(head, None) or (None, reason it cannot be used in the toy)."""
    from partialfc import build_margin

    attempts: list[dict[str, Any]] = []
    if kwargs is not None:
        attempts.append(dict(kwargs))
    else:
        canonical = _margin_aliases().get(name, name)
        if canonical in TOY_DEFAULT_KWARGS:
            attempts.append(dict(TOY_DEFAULT_KWARGS[canonical]))
        attempts += [{"s": toy_scale}, {}]
    errors = []
    for attempt in attempts:
        try:
            return build_margin(name, **attempt), None
        except (ValueError, TypeError) as e:
            errors.append(f"{attempt}: {e}")
    return None, "cannot build with " + "; ".join(errors)


def train_toy_head(
    name: str,
    head: nn.Module | None,
    data: tuple[np.ndarray, ...],
    *,
    steps: int = 300,
    lr: float = 0.01,
    hidden: int = 64,
    seed: int = 0,
) -> ToyModel:
    """Train the 2-D toy with ``head`` (None = plain softmax with bias) by full-batch Adam."""
    x_tr, x_te, y_tr, y_te = data
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = _ToyNet(x_tr.shape[1], hidden)
    if head is not None:
        if not getattr(head, "uses_classifier", True):
            raise ValueError(f"head {name!r} has no classifier: nothing to draw")
        _bind_toy_head(head, num_classes)
    subcenters = int(getattr(head, "num_subcenters", 1) or 1)
    weight = nn.Parameter(torch.randn(num_classes * subcenters, 2, generator=gen))
    model = ToyModel(name, net, weight, None, head, num_classes=num_classes)
    if model.raw_logits:
        model.bias = nn.Parameter(torch.zeros(num_classes))
    params = list(net.parameters()) + [weight] + ([model.bias] if model.bias is not None else [])
    if head is not None:
        params += [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    net.train()
    if head is not None:
        head.train()
    for _ in range(steps):
        loss = F.cross_entropy(model.logits(net(xt), yt), yt)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"toy '{name}': loss became {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.step += 1
        model.losses.append(float(loss.detach()))
    net.eval()
    if head is not None:
        head.eval()
    with torch.no_grad():
        for xs, ys, attr in ((x_tr, y_tr, "train_accuracy"), (x_te, y_te, "test_accuracy")):
            pred = model.logits(net(torch.from_numpy(xs)), None).argmax(1).numpy()
            setattr(model, attr, float(np.mean(pred == ys)))
    return model


def _plot_toy(model: ToyModel, data: tuple[np.ndarray, ...], path: Path, resolution: int) -> Path:
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    _, x_te, _, y_te = data
    with torch.no_grad():
        feats = model.net(torch.from_numpy(x_te))  # [N, 2]
        radius = float(feats.norm(dim=1).quantile(0.98)) * 1.15 or 1.0
        axis = torch.linspace(-radius, radius, resolution)
        gy, gx = torch.meshgrid(axis, axis, indexing="ij")
        grid = torch.stack([gx.ravel(), gy.ravel()], dim=1)  # [R*R, 2]
        plain = model.logits(grid, None)  # [R*R, C]
        region = plain.argmax(1)
        num_classes = plain.shape[1]
        if model.head is not None:
            # Class c claims a point when its margin-adjusted logit still beats every other
            # class there; points no class claims form the margin zone.
            claimed = torch.zeros(len(grid), dtype=torch.bool)
            for c in range(num_classes):
                target = torch.full((len(grid),), c, dtype=torch.long)
                with_margin = model.logits(grid, target)  # [R*R, C]
                others = with_margin.clone()
                others[:, c] = -torch.inf
                claimed |= (region == c) & (with_margin[:, c] >= others.max(1).values)
            region = torch.where(claimed, region, torch.full_like(region, num_classes))
    # tab10 without its grey (index 7), which marks the margin zone
    colours = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    palette = [*colours, colormaps["tab20"].colors[1]][:num_classes]
    fig = new_figure(5.5, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    cmap = ListedColormap([*palette, (0.8, 0.8, 0.8)])
    ax.imshow(
        region.reshape(resolution, resolution).numpy(),
        origin="lower",
        extent=(-radius, radius, -radius, radius),
        cmap=cmap,
        vmin=0,
        vmax=num_classes,
        alpha=0.25,
        interpolation="nearest",
    )
    f = feats.numpy()
    ax.scatter(f[:, 0], f[:, 1], c=[palette[int(k)] for k in y_te], s=6, edgecolors="none")
    directions = F.normalize(model.weight.detach(), dim=1).numpy() * radius
    k = len(directions) // num_classes  # sub-centres of class c are rows c*k .. c*k+k-1
    for row, (dx, dy) in enumerate(directions):
        c = row // k
        ax.plot([0, dx], [0, dy], color=palette[c], linewidth=2 if row % k == 0 else 1)
        ax.annotate(str(c), (dx * 0.92, dy * 0.92), fontsize=9, ha="center", va="center")
    ax.set_xlim(-radius, radius)
    ax.set_ylim(-radius, radius)
    ax.set_aspect("equal")
    ax.set_title(
        f"{model.name}: test accuracy {100 * model.test_accuracy:.1f}%"
        + ("" if model.head is None else "  (grey: margin zone)"),
        fontsize=10,
    )
    return save_png(fig, path)


@dataclass(frozen=True)
class ToyPlotsResult:
    """Files written by :func:`make_toy_plots`, per head, and heads that were skipped."""

    files: dict[str, Path]
    accuracy: dict[str, float]
    skipped: dict[str, str]


def make_toy_plots(
    out_dir: str | os.PathLike[str],
    heads: Sequence[str] | None = None,
    *,
    head_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    num_classes: int = 8,
    steps: int = 300,
    lr: float = 0.01,
    toy_scale: float = 16.0,
    resolution: int = 300,
    seed: int = 0,
    threads: int | None = 1,
) -> ToyPlotsResult:
    """Train and draw the 2-D toy for every head (``facetrain plots``; ``toy_<head>.png``).

    ``heads`` defaults to ``"softmax"`` (plain linear softmax baseline, unless partialfc
    registers its own ``softmax`` head) plus every name of ``partialfc.margin_names()``.
    ``head_kwargs`` overrides a head's arguments (else ``TOY_DEFAULT_KWARGS``, else ``s =
    toy_scale``, else the head's defaults). An alias of a head already drawn is skipped with
    the name of its figure. A head that cannot be built from arguments alone, whose forward
    does not take ``(cos, target)``, or whose training diverges is skipped and reported in
    ``skipped`` with the reason; the others are still drawn.

    ``threads`` sets torch's intra-op threads while training (restored afterwards; None keeps
    the current setting): the toy's tiny matrix products run ~6x slower on 2 threads that
    spin-wait for each other than on one.
    """
    from partialfc import margin_names

    if not 2 <= num_classes <= 10:
        raise ValueError(f"num_classes must be in [2, 10] (digits), got {num_classes}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    registered = margin_names()
    names = list(heads) if heads is not None else ["softmax", *registered]
    names = list(dict.fromkeys(names))  # "softmax" once even if partialfc registers it
    # Canonical names first, so an alias (am_softmax for cosface) is the one skipped.
    aliases = set(_margin_aliases())
    names = [n for n in names if n not in aliases] + [n for n in names if n in aliases]
    data = _toy_data(num_classes, seed)
    out = Path(out_dir)
    files: dict[str, Path] = {}
    accuracy: dict[str, float] = {}
    skipped: dict[str, str] = {}
    drawn: dict[str, str] = {}  # head description -> first name drawn with it
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        for name in names:
            head: nn.Module | None = None
            if name != "softmax" or name in registered:  # "softmax" alone: linear baseline
                if name not in registered:
                    skipped[name] = f"not a registered margin head ({registered})"
                    continue
                head, reason = _build_toy_head(name, (head_kwargs or {}).get(name), toy_scale)
                if head is None:
                    skipped[name] = reason or "cannot build"
                    continue
                key = f"{type(head).__name__}({head.extra_repr()})"
                if key in drawn:  # an alias (am_softmax = cosface): same figure
                    skipped[name] = f"same head as {drawn[key]!r} (toy_{drawn[key]}.png)"
                    continue
                drawn[key] = name
            try:
                model = train_toy_head(name, head, data, steps=steps, lr=lr, seed=seed)
                files[name] = _plot_toy(model, data, out / f"toy_{name}.png", resolution)
            except (TypeError, ValueError, RuntimeError, IndexError, FloatingPointError) as e:
                # A head with another interface (extra inputs, state) or one that diverges on
                # the toy problem must not stop the others from being drawn.
                skipped[name] = f"{type(e).__name__}: {e}"
                continue
            accuracy[name] = model.test_accuracy
    finally:
        torch.set_num_threads(previous_threads)
    return ToyPlotsResult(files, accuracy, skipped)
