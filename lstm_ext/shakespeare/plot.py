"""Loss-curve figures, drawn with matplotlib's object API (Agg) so no GUI backend is touched."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

from matplotlib.axes import Axes
from matplotlib.figure import Figure


def draw_losses(ax: Axes, history: Mapping[str, Sequence], label: str = "", style: str = "-") -> None:
    """Per-step training loss as a line and validation losses as dots on ``ax``."""
    prefix = f"{label} " if label else ""
    train = history.get("train", [])
    ax.plot(range(1, len(train) + 1), train, style, lw=1, alpha=0.8, label=f"{prefix}train")
    val = history.get("val", [])
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o" + style, ms=4, label=f"{prefix}validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_losses(history: Mapping[str, Sequence], path: Union[str, Path]) -> None:
    """Save a PNG of one run's training and validation loss curves."""
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    draw_losses(ax, history)
    ax.set_title("character-level LSTM on Shakespeare")
    fig.savefig(path, dpi=100)
