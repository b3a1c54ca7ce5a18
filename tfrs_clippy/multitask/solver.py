"""The Nash bargaining weights of K tasks, in pure TensorFlow: alpha > 0 with alpha_i * (M alpha)_i = 1 for all i.

M = U U^T is the K x K Gram matrix of the tasks' utilities (their parameter updates for PUB, their gradients for
Nash-MTL). The equations are the stationarity conditions of the strictly convex

    f(alpha) = 1/2 alpha^T M alpha - sum_i log(alpha_i),     grad f = M alpha - 1/alpha,

so the solution is unique when it exists, and Newton's method on f finds it. f is self-concordant (a convex
quadratic plus a log barrier), so the damped Newton step alpha -= H^{-1} grad / (1 + lambda), lambda the Newton
decrement, never leaves alpha > 0 and converges from any positive start; once lambda < 1/4 full steps converge
quadratically. Nash-MTL (Navon et al. 2022) and the PUB authors' code solve the same problem with a
concave-convex procedure through cvxpy; this solver needs no round trip to Python and runs under XLA.

For K = 2 the solution is closed-form: with c = M_12 / sqrt(M_11 M_22), alpha_i = 1 / sqrt(M_ii (1 + c)).

Degenerate cases:
- A task whose utility is zero (M_ii = 0, e.g. no labeled example in the batch) has no finite weight (alpha_i ->
  infinity as M_ii -> 0). It is set aside: weight 0, the others solved among themselves. Its utility is zero, so
  its weight would not move anything anyway.
- Utilities that cancel (M singular with a positive null vector, e.g. u_1 = -u_2) make f unbounded below. `ridge`
  adds ridge * M_ii to each diagonal entry so that a solution always exists; the default 1e-6 changes a
  well-posed solution by ~1e-6 relatively.
"""

from __future__ import annotations

import tensorflow as tf

INACTIVE_TOLERANCE = 1e-12
"""A task whose utility norm squared is at most this fraction of the largest one is set aside (weight 0)."""


def _scale_to_best_multiple(alpha: tf.Tensor, gram: tf.Tensor) -> tf.Tensor:
    """The multiple t * alpha minimizing f along alpha's ray: t = sqrt(K / alpha^T M alpha). A cheap, good start."""
    num_tasks = tf.cast(tf.shape(alpha)[0], alpha.dtype)
    quadratic = tf.tensordot(alpha, tf.linalg.matvec(gram, alpha), 1)
    return alpha * tf.sqrt(num_tasks / quadratic)


def _objective(alpha: tf.Tensor, gram: tf.Tensor) -> tf.Tensor:
    """f(alpha) = 1/2 alpha^T M alpha - sum_i log(alpha_i)."""
    return 0.5 * tf.tensordot(alpha, tf.linalg.matvec(gram, alpha), 1) - tf.reduce_sum(tf.math.log(alpha))


def _newton_solve(gram: tf.Tensor, initial: tf.Tensor, max_iterations: int, tolerance: float) -> tf.Tensor:
    """Damped Newton on f from `initial` (float64, > 0), until lambda^2 < tolerance or `max_iterations`."""

    def newton_step(iteration: tf.Tensor, alpha: tf.Tensor, decrement_squared: tf.Tensor):
        gradient = tf.linalg.matvec(gram, alpha) - 1.0 / alpha
        hessian = gram + tf.linalg.diag(1.0 / tf.square(alpha))
        direction = tf.linalg.cholesky_solve(tf.linalg.cholesky(hessian), gradient[:, tf.newaxis])[:, 0]
        decrement_squared = tf.maximum(tf.tensordot(gradient, direction, 1), 0.0)
        decrement = tf.sqrt(decrement_squared)
        step = tf.where(decrement < 0.25, tf.constant(1.0, alpha.dtype), 1.0 / (1.0 + decrement))
        return iteration + 1, alpha - step * direction, decrement_squared

    _, alpha, _ = tf.while_loop(
        lambda iteration, alpha, decrement_squared: decrement_squared > tolerance,
        newton_step,
        (tf.constant(0), initial, tf.constant(float("inf"), initial.dtype)),
        maximum_iterations=max_iterations,
    )
    return alpha


def nash_weights(
    gram: tf.Tensor,
    initial: tf.Tensor | None = None,
    *,
    max_iterations: int = 20,
    ridge: float = 1e-6,
    tolerance: float = 1e-20,
) -> tf.Tensor:
    """The weights alpha > 0 with alpha_i * (M alpha)_i = 1 (see the module docstring).

    Args:
        gram: M, a [K, K] symmetric positive semi-definite matrix with a static K >= 2.
        initial: A warm start (e.g. the previous solution), any positive [K] vector, used when it is closer (in f)
            than the cold start; None starts cold. Only its direction matters: it is rescaled to the best multiple.
        max_iterations: Most Newton steps (K > 2). The authors' solver ran at most 20 iterations.
        ridge: Adds ridge * M_ii to each diagonal entry of M (see the module docstring).
        tolerance: Stop once the squared Newton decrement (f's predicted decrease, doubled) is below this.

    Returns:
        alpha as a float32 [K] tensor; 0 for tasks set aside for a zero utility, and all zeros if every utility is.

    Raises:
        ValueError: `gram` is not [K, K] with a static K >= 2, or an option is out of range.
    """
    shape = gram.shape
    if shape.rank != 2 or shape[0] is None or shape[0] != shape[1] or shape[0] < 2:
        raise ValueError(f"nash_weights: `gram` must be [K, K] with a static K >= 2, got shape {shape}.")
    if not (isinstance(max_iterations, int) and max_iterations >= 1):
        raise ValueError(f"nash_weights: `max_iterations` must be an integer >= 1, got {max_iterations!r}.")
    if not ridge >= 0:
        raise ValueError(f"nash_weights: `ridge` must be >= 0, got {ridge!r}.")
    num_tasks = shape[0]
    gram = tf.cast(gram, tf.float64)
    gram = (gram + tf.transpose(gram)) / 2.0
    diagonal = tf.maximum(tf.linalg.diag_part(gram), 0.0)
    active = diagonal > INACTIVE_TOLERANCE * tf.reduce_max(diagonal)
    # The problem is solved on the cosine matrix C = S M S, S = diag(1 / sqrt(M_ii)): beta_i (C beta)_i = 1 is the
    # same equation for beta = alpha / S, and beta lies between 1 / sqrt(K) (identical utilities) and 1 (orthogonal
    # ones) whatever the utilities' norms, which keeps Newton's start close and the ridge scale-free. A task set
    # aside gets an identity row: it solves beta_i^2 = 1 on its own.
    inverse_norms = tf.where(active, tf.math.rsqrt(tf.where(active, diagonal, 1.0)), 0.0)
    identity = tf.eye(num_tasks, dtype=tf.float64)
    both_active = active[:, tf.newaxis] & active[tf.newaxis, :]
    cosine_matrix = gram * inverse_norms[:, tf.newaxis] * inverse_norms[tf.newaxis, :]
    cosine_matrix = tf.where(both_active, cosine_matrix, identity) + ridge * identity
    if num_tasks == 2:
        cosine_diagonal = tf.linalg.diag_part(cosine_matrix)
        cosine = cosine_matrix[0, 1] / tf.sqrt(cosine_diagonal[0] * cosine_diagonal[1])
        solution = 1.0 / tf.sqrt(cosine_diagonal * (1.0 + cosine))
    else:
        start = _scale_to_best_multiple(tf.ones([num_tasks], tf.float64), cosine_matrix)
        if initial is not None:
            warm = tf.cast(initial, tf.float64) * tf.sqrt(diagonal)
            # An entry of 0 (a task set aside last time) or NaN would leave f's domain: restart it at 1.
            warm = _scale_to_best_multiple(tf.where(tf.math.is_finite(warm) & (warm > 0.0), warm, 1.0), cosine_matrix)
            start = tf.where(_objective(warm, cosine_matrix) < _objective(start, cosine_matrix), warm, start)
        solution = _newton_solve(cosine_matrix, start, max_iterations, tolerance)
    alpha = tf.where(active, solution * inverse_norms, 0.0)
    return tf.cast(alpha, tf.float32)


def cosines(gram: tf.Tensor) -> tf.Tensor:
    """The [K, K] cosines M_ij / sqrt(M_ii M_jj) of a Gram matrix; 0 where a utility is zero."""
    norms = tf.sqrt(tf.maximum(tf.linalg.diag_part(gram), 0.0))
    return tf.math.divide_no_nan(gram, norms[:, tf.newaxis] * norms[tf.newaxis, :])
