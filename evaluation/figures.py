"""A matplotlib figure on the Agg canvas, and saving it as PNG: the two steps every plot shares.

The object API with its own canvas (no pyplot, no global backend switch) means that importing
a plotting module or drawing from a training process changes no matplotlib state.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["new_figure", "save_png"]


def new_figure(width: float = 6.0, height: float = 4.5) -> Any:
    """An empty ``matplotlib.figure.Figure`` of ``width`` x ``height`` inches at 100 dpi."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Lay ``fig`` out tightly and write it to ``path`` as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
