"""Matplotlib set-up shared by the stability plots: a headless backend, checks, one-panel plots over steps, PNGs."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence, Tuple


def pyplot() -> Any:
    """Returns matplotlib.pyplot on the Agg backend (no display needed), imported only when a plot is made."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def require_steps(steps: Sequence[int]) -> None:
    """Raises ValueError if a record to plot has no steps."""
    if not steps:
        raise ValueError("`record` has no steps to plot.")


def plot_over_steps(
    steps: Sequence[int], path: str, title: str, draw: Callable[[Any], None], figsize: Tuple[float, float] = (8, 4)
) -> str:
    """One panel of curves over training steps on a log scale: `draw(axes)` plots them; saved to `path`, returned."""
    require_steps(steps)
    figure, axes = pyplot().subplots(figsize=figsize)
    draw(axes)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_title(title)
    axes.legend()
    return save_png(figure, path)


def save_png(figure: Any, path: str) -> str:
    """Saves `figure` to `path` (creating its directory), closes it and returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot().close(figure)
    return path
