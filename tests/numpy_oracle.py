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


def norms(x: np.ndarray, axis: Optional[int]) -> np.ndarray:
    """L2 norms over every axis but `axis` (None: over the whole tensor), kept broadcastable."""
    axes = tuple(range(x.ndim)) if axis is None else tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    return np.sqrt((x.astype(np.float64) ** 2).sum(axis=axes, keepdims=True))


def gc_sigma(g, w, r, threshold, axis=None):
    n = norms(g, axis)
    return np.where(n > threshold, threshold / np.where(n > 0, n, 1.0), 1.0)


def agc_sigma(g, w, r, threshold, weight_floor=1e-3, axis=None):
    limit = threshold * np.maximum(norms(w, axis), weight_floor)
    n = norms(g, axis)
    return np.where(n > limit, limit / np.where(n > 0, n, 1.0), 1.0)


def lamb_sigma(g, w, r, trust_scale, axis=None):
    wn, rn = norms(w, axis), norms(r, axis)
    ok = (wn > 0) & (rn > 0)
    return np.where(ok, trust_scale * wn / np.where(ok, rn, 1.0), 1.0)


def scaled_adagrad_numpy(weights, grads, learning_rate, sigma_fn, initial_accumulator_value=0.1, epsilon=1e-7):
    """Algorithm 1's Adagrad (G += g^2 first) with w -= lr * sigma * g / sqrt(G + eps); returns the final weights."""
    w = np.array(weights, np.float64)
    accumulator = np.full_like(w, initial_accumulator_value)
    for g in grads:
        g = np.asarray(g, np.float64)
        accumulator = accumulator + g**2
        r = g / np.sqrt(accumulator + epsilon)
        w = w - learning_rate * sigma_fn(g, w, r) * r
    return w


def scaled_adam_numpy(weights, grads, learning_rate, sigma_fn, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """Keras's Adam with w -= lr * sigma * d, d = m_hat / (sqrt(v_hat) + eps / sqrt(1 - b2^t)); final weights.

    `sigma_fn(g, w, d)` as for `scaled_adagrad_numpy`: the rules see Adam's direction d in place of Adagrad's r.
    """
    w = np.array(weights, np.float64)
    m, v = np.zeros_like(w), np.zeros_like(w)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = beta_1 * m + (1 - beta_1) * g
        v = beta_2 * v + (1 - beta_2) * g**2
        m_hat, v_hat = m / (1 - beta_1**t), v / (1 - beta_2**t)
        d = m_hat / (np.sqrt(v_hat) + epsilon / np.sqrt(1 - beta_2**t))
        w = w - learning_rate * sigma_fn(g, w, d) * d
    return w


def nash_bargaining_weights(gram: np.ndarray, ridge: float = 0.0) -> np.ndarray:
    """alpha > 0 with alpha_i (M alpha)_i = 1, M = gram + ridge * diag(gram), by SciPy (float64).

    Written apart from `tfrs_clippy.multitask.solver` (a damped Newton on the cosine matrix) and from
    `test_multitask_solver.numpy_nash` (Newton with backtracking): L-BFGS-B on the convex
    f(alpha) = alpha'M alpha / 2 - sum log alpha, whose stationary point is the solution, then a root polish of
    the KKT residual alpha * (M alpha) - 1 by MINPACK's hybrid method. Raises if the residual is not ~0.
    """
    from scipy import optimize

    gram = np.asarray(gram, np.float64)
    gram = (gram + gram.T) / 2 + ridge * np.diag(np.diag(gram))
    # Start at the best multiple of 1 / sqrt(M_ii): the solution for orthogonal utilities.
    start = 1.0 / np.sqrt(np.diag(gram))
    start *= np.sqrt(len(gram) / (start @ gram @ start))

    def objective(alpha):
        return 0.5 * alpha @ gram @ alpha - np.log(alpha).sum(), gram @ alpha - 1.0 / alpha

    bounds = [(1e-12 * s, None) for s in start]
    minimum = optimize.minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds,
                                options=dict(ftol=1e-15, gtol=1e-12, maxiter=10_000))
    root = optimize.root(lambda alpha: alpha * (gram @ alpha) - 1.0, minimum.x, method="hybr", tol=1e-14)
    alpha = root.x
    residual = np.max(np.abs(alpha * (gram @ alpha) - 1.0))
    if not (np.all(alpha > 0) and residual < 1e-10):
        raise ArithmeticError(f"nash_bargaining_weights did not converge: alpha {alpha}, residual {residual}")
    return alpha


def keras_adam_moments(momentum, velocity, grad, beta_1=0.9, beta_2=0.999):
    """Keras's Adam moments after one step on `grad` (float64)."""
    grad = np.asarray(grad, np.float64)
    return momentum + (grad - momentum) * (1 - beta_1), velocity + (grad**2 - velocity) * (1 - beta_2)


def keras_adam_update(momentum, velocity, grad, learning_rate, step, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    """The move (to subtract) of Keras's Adam at step `step` (1-based) on `grad` from the moments before it."""
    m, v = keras_adam_moments(momentum, velocity, grad, beta_1, beta_2)
    step_size = learning_rate * np.sqrt(1 - beta_2**step) / (1 - beta_1**step)
    return step_size * m / (np.sqrt(v) + epsilon)
