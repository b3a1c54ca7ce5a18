"""AdagradStepLogger: ||g||_2 and ||lr r||_inf per variable and step, against a NumPy replay of Adagrad."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy
from tfrs_clippy import keras
from tfrs_clippy.stability import AdagradStepLogger, learning_rate_at

RATE, START, EPSILON = 0.1, 0.1, 1e-7


def linear_model() -> keras.Model:
    inputs = keras.Input(shape=(3,))
    outputs = keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="zeros", name="dense")(inputs)
    return keras.Model(inputs, outputs)


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)


def numpy_replay(x: np.ndarray, y: np.ndarray, rates: list[float]) -> list[dict[str, tuple[float, float]]]:
    """Per step {name: (||g||_2, lr * max|g / sqrt(G + eps)|)} of Adagrad (G += g^2 first) on the MSE."""
    weights = {"kernel": np.ones((3, 2)), "bias": np.zeros(2)}
    accumulators = {name: np.full(value.shape, START) for name, value in weights.items()}
    steps = []
    for rate in rates:
        error = x @ weights["kernel"] + weights["bias"] - y
        grads = {"kernel": 2 * x.T @ error / error.size, "bias": 2 * error.sum(axis=0) / error.size}
        step = {}
        for name, grad in grads.items():
            accumulators[name] += grad**2
            update = rate * grad / np.sqrt(accumulators[name] + EPSILON)
            step[name] = (float(np.linalg.norm(grad)), float(np.abs(update).max()))
            weights[name] -= update
        steps.append(step)
    return steps


@pytest.mark.parametrize("schedule", [False, True])
def test_norms_match_a_numpy_replay_of_adagrad(schedule: bool):
    x, y = data()
    learning_rate = tfrs_clippy.LinearWarmup(RATE, 3) if schedule else RATE
    model = linear_model()
    model.compile(optimizer=tfrs_clippy.Adagrad(learning_rate=learning_rate, fuse_dense_updates=False),
                  loss="mse")
    short_name = lambda variable: variable.name.split("/")[-1].split(":")[0]  # noqa: E731
    logger = AdagradStepLogger(exclude_pattern=None, name_of=short_name)
    dataset = tf.data.Dataset.from_tensors((x, y)).repeat(4)
    model.fit(dataset, epochs=1, verbose=0, callbacks=[logger])
    rates = [RATE * min(1.0, (step + 1) / 3) for step in range(4)] if schedule else [RATE] * 4
    expected = numpy_replay(x.astype(np.float64), y.astype(np.float64), rates)
    assert logger.record.steps == [0, 1, 2, 3]
    for step, values in enumerate(expected):
        for name, (grad_norm, max_update) in values.items():
            assert logger.record.values["grad_norm"][name][step] == pytest.approx(grad_norm, rel=1e-3), (step, name)
            assert logger.record.values["max_update"][name][step] == pytest.approx(max_update, rel=1e-3), (step, name)
    assert "clipping_factor" not in logger.record.values  # not exported


def test_records_only_the_chosen_steps_and_the_clipping_factors():
    x, y = data()
    model = linear_model()
    model.compile(optimizer=tfrs_clippy.ClippyAdagrad.from_paper(1.0, export_clipping_factors=True), loss="mse")
    logger = AdagradStepLogger(steps=range(1, 3), exclude_pattern=None)
    model.fit(tf.data.Dataset.from_tensors((x, y)).repeat(4), epochs=1, verbose=0, callbacks=[logger])
    assert logger.record.steps == [1, 2]
    factors = logger.record.values["clipping_factor"]
    assert len(factors) == 2 and all(0 < value <= 1 for values in factors.values() for value in values)
    # Clippy at lr 1 clips the kernel of ones: 0.5 * 1 + 0.01 per coordinate against steps of up to lr.
    assert min(min(values) for values in factors.values()) < 1


def test_needs_a_tfrs_clippy_optimizer_with_the_standard_accumulator_order():
    x, y = data()
    for optimizer, message in ((keras.optimizers.SGD(0.1), "accumulator"),
                               (tfrs_clippy.ClippyAdagrad(0.1), "standard")):
        model = linear_model()
        model.compile(optimizer=optimizer, loss="mse")
        with pytest.raises(ValueError, match=message):
            model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, verbose=0, callbacks=[AdagradStepLogger()])
    with pytest.raises(ValueError, match="variable_pattern"):
        AdagradStepLogger(variable_pattern="(")


def test_learning_rate_at_reads_numbers_and_schedules():
    assert learning_rate_at(tfrs_clippy.Adagrad(learning_rate=0.3), 7) == pytest.approx(0.3)
    optimizer = tfrs_clippy.Adagrad(learning_rate=tfrs_clippy.LinearWarmup(0.4, 4))
    assert [learning_rate_at(optimizer, step) for step in (0, 1, 3, 9)] == pytest.approx([0.1, 0.2, 0.4, 0.4])
