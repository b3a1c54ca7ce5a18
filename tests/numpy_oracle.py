"""A NumPy (float64) reference of Clippy Adagrad: the paper's Algorithm 1 and TFRS's two delayed variants."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass
class ClippyOracle:
    """Runs Clippy Adagrad on NumPy arrays; `step` returns sigma.

    mode: "standard" (G += g^2, then the step: Algorithm 1), "delayed" (the step from the old G, then G += g^2) or
    "delayed_clipped" (the step, then G += (sigma g)^2). axis: None for one sigma per tensor, else one per slice.
    """

    weights: np.ndarray
    learning_rate: float
    mode: str = "standard"
    variable_relative_threshold: float = 0.5
    accumulator_relative_threshold: float = 0.0
    absolute_threshold: float = 1e-2
    initial_accumulator_value: float = 0.1
    epsilon: float = 1e-7
    axis: Optional[int] = None

    def __post_init__(self) -> None:
        self.weights = np.array(self.weights, np.float64)
        self.accumulator = np.full_like(self.weights, self.initial_accumulator_value)

    def sigma(self, update: np.ndarray, precondition: np.ndarray) -> np.ndarray:
        """Largest sigma <= 1 with sigma |u_i| <= rel |w_i| + acc_rel p_i + abs, per tensor or per slice."""
        bound = (
            self.absolute_threshold
            + self.variable_relative_threshold * np.abs(self.weights)
            + self.accumulator_relative_threshold * precondition
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(update == 0, 1.0, bound / np.abs(update))
        axes = tuple(range(update.ndim)) if self.axis is None else tuple(
            a for a in range(update.ndim) if a != self.axis % update.ndim
        )
        return np.minimum(1.0, ratio.min(axis=axes, keepdims=True))

    def step(self, grad: np.ndarray) -> np.ndarray:
        grad = np.asarray(grad, np.float64)
        if self.mode == "standard":
            self.accumulator = self.accumulator + grad**2
        precondition = 1.0 / np.sqrt(self.accumulator + self.epsilon)
        update = self.learning_rate * grad * precondition
        sigma = self.sigma(update, precondition)
        if self.mode == "delayed":
            self.accumulator = self.accumulator + grad**2
        elif self.mode == "delayed_clipped":
            self.accumulator = self.accumulator + (sigma * grad) ** 2
        self.weights = self.weights - sigma * update
        return sigma
