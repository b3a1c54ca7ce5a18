"""Argument checks shared by the generated datasets: each failure is a ValueError naming dataset, argument and value."""

from __future__ import annotations

import math

import numpy as np


def is_int(value: object) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number (NaN and Inf would make every label NaN)."""
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    return real and math.isfinite(value)


def require(dataset: str, valid: bool, argument: str, requirement: str, value: object) -> None:
    """Raises a ValueError naming the dataset, the argument, what it must be and the value it got, unless `valid`."""
    if not valid:
        raise ValueError(f"{dataset}: `{argument}` must be {requirement}, got {value!r}.")
