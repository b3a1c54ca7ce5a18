"""The Nash bargaining solver against a NumPy reference: alpha > 0 with alpha_i (M alpha)_i = 1."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy.multitask import cosines, nash_weights


def numpy_nash(gram: np.ndarray, iterations: int = 200) -> np.ndarray:
    """Newton with Armijo backtracking on f = a'Ma/2 - sum log a, in float64, to machine precision."""
    gram = np.asarray(gram, np.float64)
    alpha = np.ones(len(gram))

    def objective(a):
        return 0.5 * a @ gram @ a - np.log(a).sum() if np.all(a > 0) else np.inf

    for _ in range(iterations):
        gradient = gram @ alpha - 1.0 / alpha
        direction = np.linalg.solve(gram + np.diag(1.0 / alpha**2), gradient)
        step = 1.0
        while objective(alpha - step * direction) > objective(alpha) - 1e-4 * step * gradient @ direction:
            step /= 2
            if step < 1e-12:
                return alpha
        alpha = alpha - step * direction
    return alpha


def random_gram(rng: np.random.Generator, num_tasks: int, kind: str) -> np.ndarray:
    width = 64
    if kind == "independent":
        utilities = rng.normal(size=(num_tasks, width))
    elif kind == "scales":  # norms from 1e-3 to 1e3
        utilities = rng.normal(size=(num_tasks, width)) * 10.0 ** rng.uniform(-3, 3, (num_tasks, 1))
    else:  # nearly collinear: cosines ~ 1 - 1e-6
        utilities = rng.normal(size=width) + 1e-3 * rng.normal(size=(num_tasks, width))
    return utilities @ utilities.T


@pytest.mark.parametrize("kind", ["independent", "scales", "collinear"])
@pytest.mark.parametrize("num_tasks", range(2, 9))
def test_solver_matches_numpy(num_tasks, kind):
    rng = np.random.default_rng(100 * num_tasks + len(kind))
    for _ in range(3):
        gram = random_gram(rng, num_tasks, kind)
        alpha = nash_weights(tf.constant(gram), ridge=0.0).numpy().astype(np.float64)
        expected = numpy_nash(gram)
        np.testing.assert_allclose(alpha * (gram @ alpha), 1.0, rtol=2e-5)
        np.testing.assert_allclose(alpha, expected, rtol=2e-5)


def test_two_tasks_closed_form():
    # |u1| = 2, |u2| = 1, cosine 0.5: alpha_i = 1 / (|u_i| sqrt(1.5)).
    gram = tf.constant([[4.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(nash_weights(gram).numpy(), [1 / (2 * 1.5**0.5), 1 / 1.5**0.5], rtol=1e-5)


def test_orthogonal_and_identical_utilities():
    np.testing.assert_allclose(nash_weights(tf.linalg.diag([1.0, 4.0, 16.0])).numpy(), [1.0, 0.5, 0.25], rtol=1e-5)
    # Identical unit utilities: alpha_i * K alpha_i = 1.
    np.testing.assert_allclose(nash_weights(tf.ones([4, 4])).numpy(), [0.5] * 4, rtol=1e-4)


def test_warm_start_reaches_the_same_solution():
    gram = tf.constant(random_gram(np.random.default_rng(7), 5, "scales"))
    cold = nash_weights(gram, ridge=0.0)
    # From a slightly different problem's solution (as during training), and from a useless start.
    nearby = nash_weights(gram * tf.constant(np.random.default_rng(8).uniform(0.9, 1.1, [5, 5]) ** 2), ridge=0.0)
    for initial in (nearby, tf.constant([5.0, 0.1, 1.0, 0.0, float("nan")])):
        warm = nash_weights(gram, initial=initial, ridge=0.0)
        np.testing.assert_allclose(warm.numpy(), cold.numpy(), rtol=1e-5)


def test_a_task_with_zero_utility_is_set_aside():
    gram = np.zeros([3, 3])
    gram[:2, :2] = [[4.0, 1.0], [1.0, 1.0]]
    alpha = nash_weights(tf.constant(gram)).numpy()
    assert alpha[2] == 0.0
    np.testing.assert_allclose(alpha[:2], nash_weights(tf.constant(gram[:2, :2])).numpy(), rtol=1e-5)
    assert np.all(nash_weights(tf.zeros([3, 3])).numpy() == 0.0)


def test_cancelling_utilities_stay_finite_with_the_ridge():
    gram = tf.constant([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    alpha = nash_weights(gram, max_iterations=100).numpy()
    assert np.all(np.isfinite(alpha)) and np.all(alpha > 0)
    np.testing.assert_allclose(alpha[0], alpha[1], rtol=1e-4)


def test_runs_under_xla_with_the_same_result():
    gram = tf.constant(random_gram(np.random.default_rng(3), 6, "scales"), tf.float32)
    compiled = tf.function(lambda m, a: nash_weights(m, a), jit_compile=True)
    np.testing.assert_allclose(compiled(gram, tf.ones([6])).numpy(), nash_weights(gram).numpy(), rtol=1e-5)


def test_cosines():
    np.testing.assert_allclose(
        cosines(tf.constant([[4.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])).numpy(),
        [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.0]],
        rtol=1e-6,
    )


@pytest.mark.parametrize(
    "gram, message",
    [(tf.ones([1, 1]), "K >= 2"), (tf.ones([2, 3]), r"\[K, K\]"), (tf.ones([4]), r"\[K, K\]")],
)
def test_bad_gram_is_rejected(gram, message):
    with pytest.raises(ValueError, match=message):
        nash_weights(gram)
