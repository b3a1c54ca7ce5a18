"""Sharpness by power iteration on Hessian-vector products, checked on quadratics with known Hessians."""

import os

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy
from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.stability import (
    DivergenceMonitor,
    SharpnessMonitor,
    adagrad_preconditioner,
    detect_divergence,
    hessian_vector_product,
    largest_hessian_eigenvalue,
    plot_sharpness,
)

from numpy_oracle import ClippyOracle

HESSIAN_DIAGONAL = (20.0, 1.0)  # The paper's figure: eta < 2/20 = 0.1 is stable, above diverges.


def _quadratic(x: tf.Variable) -> tf.Tensor:
    return 0.5 * tf.reduce_sum(tf.constant(HESSIAN_DIAGONAL) * tf.square(x))


def test_hessian_vector_product_of_a_quadratic_is_exact():
    x = tf.Variable([0.3, -2.0])
    (product,) = hessian_vector_product(lambda: _quadratic(x), [x], [tf.constant([1.0, 1.0])])
    np.testing.assert_allclose(product.numpy(), HESSIAN_DIAGONAL)


def test_largest_eigenvalue_of_the_papers_quadratic_within_one_percent():
    x = tf.Variable([0.3, -2.0])
    result = largest_hessian_eigenvalue(lambda: _quadratic(x), [x], max_iterations=50, tolerance=1e-6)
    assert result.eigenvalue == pytest.approx(20.0, rel=0.01)
    assert result.converged and result.iterations < 50


def test_largest_eigenvalue_with_a_dense_non_diagonal_hessian():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    hessian = (basis * np.array([9.0, 4.0, 3.0, 1.0, 0.5, 0.1])) @ basis.T
    x = tf.Variable(rng.standard_normal(6).astype(np.float32))
    h = tf.constant(hessian, tf.float32)
    loss = lambda: 0.5 * tf.tensordot(x, tf.linalg.matvec(h, x), 1)  # noqa: E731
    result = largest_hessian_eigenvalue(loss, [x], max_iterations=100, tolerance=1e-7)
    assert result.eigenvalue == pytest.approx(9.0, rel=0.01)


def test_preconditioned_sharpness_is_that_of_p_inverse_sqrt_h_p_inverse_sqrt():
    x = tf.Variable([0.3, -2.0])
    # P = diag(10, 0.25): P^-1/2 H P^-1/2 = diag(20/10, 1/0.25) = diag(2, 4) -> 4, not 20.
    result = largest_hessian_eigenvalue(
        lambda: _quadratic(x), [x], preconditioner=[tf.constant([10.0, 0.25])], max_iterations=100, tolerance=1e-7
    )
    assert result.eigenvalue == pytest.approx(4.0, rel=0.01)


def _gradient_descent_losses(learning_rate: float, steps: int = 60) -> list:
    x = tf.Variable([1.0, 1.0])
    losses = []
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = _quadratic(x)
        losses.append(float(loss))
        x.assign_sub(learning_rate * tape.gradient(loss, x))
    return losses


def test_gradient_descent_below_two_over_lambda_is_stable_and_above_diverges_and_is_flagged():
    x = tf.Variable([1.0, 1.0])
    sharpness = largest_hessian_eigenvalue(lambda: _quadratic(x), [x], max_iterations=50, tolerance=1e-6).eigenvalue
    assert 0.09 < 2.0 / sharpness < 0.11
    stable, unstable = _gradient_descent_losses(0.09), _gradient_descent_losses(0.11)
    assert stable[-1] < 1e-3 * stable[0]
    assert unstable[-1] > 1e3 * unstable[0]
    assert detect_divergence(stable).events == []
    flagged = detect_divergence(unstable).events
    assert flagged and flagged[0].kind == "full"


def _quadratic_regression_data():
    # MSE of a bias-free linear model on these two rows is 0.5 w^T diag(20, 1) w: the same Hessian.
    features = np.array([[np.sqrt(20.0), 0.0], [0.0, 1.0]], np.float32)
    return features, np.zeros((2, 1), np.float32)


def _quadratic_keras_model(optimizer) -> keras.Model:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(optimizer=optimizer, loss="mse")
    return model


@pytest.mark.parametrize("learning_rate, diverges", [(0.09, False), (0.11, True)])
def test_keras_sgd_on_the_quadratic_with_both_monitors(learning_rate, diverges, tmp_path):
    features, targets = _quadratic_regression_data()
    model = _quadratic_keras_model(keras.optimizers.SGD(learning_rate))
    sharpness = SharpnessMonitor((features, targets), every_n_steps=20, max_iterations=30, tolerance=1e-5)
    monitor = DivergenceMonitor()
    dataset = tf.data.Dataset.from_tensors((features, targets)).repeat(80)
    history = model.fit(dataset, epochs=1, verbose=0, callbacks=[monitor, sharpness])
    assert sharpness.record.steps == [0, 20, 40, 60]
    # The Hessian of a quadratic does not depend on the weights: every measurement is 20.
    np.testing.assert_allclose(sharpness.record.sharpness, 20.0, rtol=0.01)
    np.testing.assert_allclose(sharpness.record.stability_threshold, 2.0 / learning_rate, rtol=1e-6)
    assert all(np.isnan(sharpness.record.preconditioned_sharpness))  # SGD has no accumulators.
    assert history.history["full_divergences"] == [1 if diverges else 0]
    assert history.history["sharpness"][0] == pytest.approx(20.0, rel=0.01)
    path = plot_sharpness(sharpness.record, str(tmp_path / "sharpness.png"))
    assert os.path.getsize(path) > 1000


def test_preconditioned_sharpness_of_keras_adagrad_matches_the_accumulator():
    features, targets = _quadratic_regression_data()
    model = _quadratic_keras_model(keras.optimizers.Adagrad(0.5, initial_accumulator_value=0.1))
    sharpness = SharpnessMonitor((features, targets), every_n_steps=3, max_iterations=100, tolerance=1e-7)
    model.fit(features, targets, batch_size=2, epochs=4, verbose=0, callbacks=[sharpness])
    (kernel,) = model.trainable_variables
    (p,) = adagrad_preconditioner(model.optimizer, [kernel])
    p = p.numpy().ravel()
    # After the last measurement (step 3 of 0-3) no step ran, so P is the one used there.
    assert sharpness.record.steps == [0, 3]
    expected = max(20.0 / p[0], 1.0 / p[1])
    assert sharpness.record.preconditioned_sharpness[-1] == pytest.approx(expected, rel=0.01)
    assert sharpness.record.sharpness[-1] == pytest.approx(20.0, rel=0.01)


def test_sharpness_monitor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every_n_steps"):
        SharpnessMonitor((np.zeros((1, 2)), np.zeros((1, 1))), every_n_steps=0)
    with pytest.raises(ValueError, match="batch"):
        SharpnessMonitor(np.zeros((1, 2)))


class TwoHeadModel(keras.Model):
    """A model with dict inputs and outputs and its own train_step, no compiled loss: the shape of a TFRS Ranker."""

    def __init__(self):
        super().__init__()
        self.score = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")
        self.aux = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")

    def call(self, features, training=False):
        return {"score": self.score(features["x"]), "aux": self.aux(features["x"])}

    def batch_loss(self, batch, training=False):
        # On the quadratic's rows: score's kernel sees H = diag(20, 1), aux's kernel 0.5 * diag(20, 1).
        outputs = self(batch, training=training)
        return tf.reduce_mean(tf.square(outputs["score"] - batch["label"])) + 0.5 * tf.reduce_mean(
            tf.square(outputs["aux"])
        )

    def train_step(self, batch):
        with tf.GradientTape() as tape:
            loss = self.batch_loss(batch, training=True)
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return {"loss": loss}


def test_loss_fn_measures_a_model_with_dict_outputs_and_no_compiled_loss():
    features, labels = _quadratic_regression_data()
    batch = {"x": features, "label": labels}
    model = TwoHeadModel()
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    sharpness = SharpnessMonitor(
        batch, every_n_steps=2, loss_fn=lambda m, b: m.batch_loss(b), max_iterations=100, tolerance=1e-6
    )
    model.fit(tf.data.Dataset.from_tensors(batch).repeat(5), epochs=1, verbose=0, callbacks=[sharpness])
    assert sharpness.record.steps == [0, 2, 4]
    np.testing.assert_allclose(sharpness.record.sharpness, 20.0, rtol=0.01)  # the two heads' blocks: 20 and 10
    assert all(np.isnan(sharpness.record.preconditioned_sharpness))
    # Without loss_fn the same model cannot be measured: no compiled loss, and a dict is not an (x, y) pair.
    with pytest.raises(ValueError, match="loss_fn"):
        SharpnessMonitor(batch)
    without_loss_fn = SharpnessMonitor((features, labels))
    with pytest.raises(ValueError, match="loss_fn"):
        model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0, callbacks=[without_loss_fn])


def test_loss_fn_arguments_are_checked():
    batch = {"x": np.zeros((2, 2), np.float32)}
    with pytest.raises(ValueError, match="loss_fn"):
        SharpnessMonitor(batch, loss_fn="mse")
    with pytest.raises(ValueError, match="not both"):
        SharpnessMonitor(batch, loss="mse", loss_fn=lambda m, b: 0.0)


def test_hessian_vector_product_through_an_embedding_lookup_is_dense_and_exact():
    # L = sum_i (E[ids_i] . w)^2 over a 5 x 3 table E: the product for E comes as IndexedSlices from the tape and
    # must come back dense. For a fixed w, d2L/dE_k dE_k = 2 * count_k * w w^T for each row k (0 across rows).
    table = tf.Variable(np.arange(15, dtype=np.float32).reshape(5, 3) / 10)
    weights = tf.constant([1.0, -2.0, 0.5])
    ids = tf.constant([0, 2, 2, 4])
    vector = tf.constant(np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32))
    (product,) = hessian_vector_product(
        lambda: tf.reduce_sum(tf.linalg.matvec(tf.gather(table, ids), weights) ** 2), [table], [vector])
    assert isinstance(product, tf.Tensor)
    counts = np.bincount(ids.numpy(), minlength=5)[:, None]
    expected = 2 * counts * (vector.numpy() @ weights.numpy())[:, None] * weights.numpy()[None, :]
    np.testing.assert_allclose(product.numpy(), expected, rtol=1e-5, atol=1e-6)


# Which optimizers have a preconditioned sharpness -----------------------------------------------------------------


def _fit_with_sharpness(optimizer, **monitor_arguments):
    features, targets = _quadratic_regression_data()
    model = _quadratic_keras_model(optimizer)
    sharpness = SharpnessMonitor(
        (features, targets), every_n_steps=2, max_iterations=30, tolerance=1e-5, **monitor_arguments
    )
    model.fit(tf.data.Dataset.from_tensors((features, targets)).repeat(4), epochs=1, verbose=0, callbacks=[sharpness])
    return sharpness


@pytest.mark.keras2_only
@pytest.mark.parametrize("name", ["legacy.Adam", "legacy.Adagrad", "Adam"])
def test_keras2_optimizers_without_readable_accumulators_skip_the_preconditioned_sharpness(name, caplog):
    # The legacy tf_keras optimizers have slot variables and an epsilon; they used to be taken for Adagrad and
    # crash on `_accumulators`. The legacy Adagrad divides by sqrt(G) + epsilon: not the P this measures.
    optimizer_class = keras.optimizers.legacy.Adam if name == "legacy.Adam" else (
        keras.optimizers.legacy.Adagrad if name == "legacy.Adagrad" else keras.optimizers.Adam)
    with caplog.at_level("WARNING", logger="tfrs_clippy.stability.sharpness"):
        sharpness = _fit_with_sharpness(optimizer_class(0.01))
    assert sharpness.record.steps == [0, 2]
    np.testing.assert_allclose(sharpness.record.sharpness, 20.0, rtol=0.01)  # the plain one is still measured
    assert all(np.isnan(sharpness.record.preconditioned_sharpness))
    assert type(sharpness.model.optimizer).__qualname__ in sharpness.preconditioned_skipped
    assert "exposes no Adagrad accumulator" in sharpness.preconditioned_skipped
    assert [record.levelname for record in caplog.records] == ["WARNING"]  # once, not per measurement


def test_adam_skips_the_preconditioned_sharpness_unless_asked_for_it():
    sharpness = _fit_with_sharpness(keras.optimizers.Adam(0.01))
    assert all(np.isnan(sharpness.record.preconditioned_sharpness))
    assert "exposes no Adagrad accumulator" in sharpness.preconditioned_skipped
    with pytest.raises(ValueError, match=r"No Adagrad preconditioner: `optimizer` \S+Adam exposes no Adagrad"):
        _fit_with_sharpness(keras.optimizers.Adam(0.01), preconditioned=True)
    assert _fit_with_sharpness(keras.optimizers.Adam(0.01), preconditioned=False).preconditioned_skipped == (
        "`preconditioned` is False")


class PublicAccumulatorSGD(keras.optimizers.SGD):
    """SGD that reports a fixed Adagrad accumulator through the public `accumulator(variable)`, as tfrs_clippy's
    Adagrad optimizers do, and has no other accumulator attribute."""

    epsilon = 0.0

    def accumulator(self, variable):
        # P = sqrt(G) = diag(10, 0.25) for the kernel of the quadratic model.
        return tf.constant([[100.0], [0.0625]], variable.dtype)


def test_preconditioned_sharpness_reads_the_public_accumulator_method():
    sharpness = _fit_with_sharpness(PublicAccumulatorSGD(0.01))
    # P^-1/2 H P^-1/2 = diag(20 / 10, 1 / 0.25) = diag(2, 4): 4, at every measurement.
    np.testing.assert_allclose(sharpness.record.preconditioned_sharpness, 4.0, rtol=0.01)
    assert sharpness.preconditioned_skipped is None


def test_keras_adagrad_before_its_first_step_has_no_preconditioner_yet():
    x = tf.Variable([0.3, -2.0])
    with pytest.raises(ValueError, match="Keras's Adagrad but not built yet"):
        adagrad_preconditioner(keras.optimizers.Adagrad(0.1), [x])
    with pytest.raises(ValueError, match="exposes no Adagrad accumulator"):
        adagrad_preconditioner(keras.optimizers.SGD(0.1), [x])


# The preconditioned sharpness against an oracle in NumPy: explicit Hessian, Adagrad's accumulator replayed ----------

ORACLE_STEPS = 4


def _regression_problem():
    """Least squares with a bias on 16 rows and 4 features of scales 0.2-3: a dense, non-diagonal Hessian."""
    rng = np.random.default_rng(7)
    features = (rng.normal(size=(16, 4)) * [0.2, 1.0, 3.0, 0.5] + [0.0, 0.5, 0.0, -1.0]).astype(np.float32)
    targets = rng.normal(size=(16, 1)).astype(np.float32)
    kernel = rng.normal(size=(4, 1)).astype(np.float32)
    return features, targets, kernel


def _oracle_accumulators(make_steppers, features, targets, kernel):
    """Replays full-batch training in NumPy; returns the accumulators of (kernel, bias) before the first step and
    after each step (index s: after s steps).

    The MSE of y = X w + b over n rows has gradient 2/n X~^T (X~ [w; b] - y), X~ = [X, 1], and Hessian 2/n X~^T X~.
    """
    inputs = np.hstack([features, np.ones((len(features), 1))]).astype(np.float64)
    steppers = make_steppers(kernel, np.zeros(1))
    accumulators = [np.concatenate([s.accumulator.ravel() for s in steppers])]
    for _ in range(ORACLE_STEPS):
        parameters = np.concatenate([s.weights.ravel() for s in steppers])
        gradient = 2.0 / len(inputs) * inputs.T @ (inputs @ parameters - targets[:, 0].astype(np.float64))
        steppers[0].step(gradient[:-1].reshape(kernel.shape))
        steppers[1].step(gradient[-1:])
        accumulators.append(np.concatenate([s.accumulator.ravel() for s in steppers]))
    return inputs, accumulators


class _AdagradOracle:
    """Keras's Adagrad in NumPy: G += g^2, then w -= lr g / sqrt(G + epsilon)."""

    def __init__(self, weights, learning_rate, initial_accumulator_value, epsilon=1e-7):
        self.weights = np.array(weights, np.float64)
        self.accumulator = np.full_like(self.weights, initial_accumulator_value)
        self.learning_rate, self.epsilon = learning_rate, epsilon

    def step(self, grad):
        self.accumulator = self.accumulator + grad**2
        self.weights = self.weights - self.learning_rate * grad / np.sqrt(self.accumulator + self.epsilon)


ORACLE_OPTIMIZERS = {
    # name: (optimizer, NumPy steppers for (kernel, bias), epsilon of P = sqrt(G + epsilon))
    "keras_adagrad": (
        lambda: keras.optimizers.Adagrad(0.3, initial_accumulator_value=0.01, epsilon=1e-7),
        lambda kernel, bias: [_AdagradOracle(x, 0.3, 0.01) for x in (kernel, bias)],
        1e-7,
    ),
    "clippy_adagrad": (
        lambda: tfrs_clippy.ClippyAdagrad.from_paper(0.3),
        lambda kernel, bias: [ClippyOracle(x, 0.3, mode="standard", variable_relative_threshold=0.5,
                                           absolute_threshold=1e-2) for x in (kernel, bias)],
        1e-7,
    ),
}


def _largest_eigenvalue(hessian, accumulator, epsilon, power=-0.5):
    """lambda_max(P^power H P^power), P = diag(sqrt(G + epsilon)), by `numpy.linalg.eigvalsh`."""
    scale = np.sqrt(accumulator + epsilon) ** power
    return np.linalg.eigvalsh(scale[:, None] * hessian * scale[None, :]).max()


@pytest.mark.parametrize("name", sorted(ORACLE_OPTIMIZERS))
def test_preconditioned_sharpness_matches_an_explicit_numpy_hessian_and_replayed_accumulator(name):
    """SharpnessMonitor's preconditioned sharpness after Adagrad steps on a dense least-squares problem is the top
    eigenvalue of P^-1/2 H P^-1/2, with H = 2/n X~^T X~ and P = sqrt(G + epsilon) from G replayed in NumPy, within
    1e-3; and the wrong conventions the oracle also computes (P^+1/2, P = G + epsilon, the accumulator of the step
    before, the diagonal of H only) are more than 1e-2 away, so the check tells them apart."""
    make_optimizer, make_steppers, epsilon = ORACLE_OPTIMIZERS[name]
    features, targets, kernel = _regression_problem()
    inputs, accumulators = _oracle_accumulators(make_steppers, features, targets, kernel)
    hessian = 2.0 / len(inputs) * inputs.T @ inputs

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.set_weights([kernel, np.zeros(1, np.float32)])
    model.compile(optimizer=make_optimizer(), loss="mse")
    sharpness = SharpnessMonitor((features, targets), every_n_steps=3, max_iterations=300, tolerance=1e-5)
    dataset = tf.data.Dataset.from_tensors((features, targets)).repeat(ORACLE_STEPS)
    model.fit(dataset, epochs=1, verbose=0, callbacks=[sharpness])
    assert sharpness.record.steps == [0, 3]

    # The measurement after step s (0-based) sees the accumulator of s + 1 updates. rtol 1e-3, as asked of the
    # measure: float32 Hessian-vector products and a residual of 1e-5 give errors of ~2e-7 here (eigenvalue gap
    # 3x), and every wrong convention below is more than 1e-2 away.
    measured = [step + 1 for step in sharpness.record.steps]
    expected = [_largest_eigenvalue(hessian, accumulators[s], epsilon) for s in measured]
    np.testing.assert_allclose(sharpness.record.preconditioned_sharpness, expected, rtol=1e-3)
    np.testing.assert_allclose(sharpness.record.sharpness, np.linalg.eigvalsh(hessian).max(), rtol=1e-3)
    # The library's own P against the replayed one (the optimizer under test is the one the oracle replays).
    kernel_variable, bias_variable = model.trainable_variables
    preconditioner = adagrad_preconditioner(model.optimizer, [kernel_variable, bias_variable])
    np.testing.assert_allclose(np.concatenate([np.ravel(p) for p in preconditioner]),
                               np.sqrt(accumulators[-1] + epsilon), rtol=1e-4)

    wrong = {
        "P^+1/2 H P^+1/2": lambda s: _largest_eigenvalue(hessian, accumulators[s], epsilon, power=0.5),
        "P = G + epsilon": lambda s: _largest_eigenvalue(hessian, accumulators[s], epsilon, power=-1.0),
        "the previous step's G": lambda s: _largest_eigenvalue(hessian, accumulators[s - 1], epsilon),
        "diag(H) only": lambda s: _largest_eigenvalue(np.diag(np.diag(hessian)), accumulators[s], epsilon),
    }
    for convention, value_at in wrong.items():
        values = np.array([value_at(s) for s in measured])
        assert np.max(np.abs(values / expected - 1.0)) > 1e-2, (convention, values, expected)
