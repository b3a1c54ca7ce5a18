"""Matplotlib set-up shared by the stability plots: a headless backend and saving to PNG."""

from __future__ import annotations

import os
from typing import Any


def pyplot() -> Any:
    """Returns matplotlib.pyplot on the Agg backend (no display needed), imported only when a plot is made."""
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

    return plt


def save_png(figure: Any, path: str) -> str:
    """Saves `figure` to `path` (creating its directory), closes it and returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot().close(figure)
    return path
