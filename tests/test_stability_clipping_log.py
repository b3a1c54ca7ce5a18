"""ClippingFactorLogger and its plot, with a stand-in optimizer, the baselines and ClippyAdagrad."""

import math
import os

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.optimizers import build_optimizer
from tfrs_clippy.stability import ClippingFactorLogger, SharpnessMonitor, plot_clipping_factors
from tfrs_clippy.stability.clipping_log import ClippingFactorRecord, layer_of


class FactorReportingSGD(keras.optimizers.SGD):
    """SGD that reports a made-up clipping factor per variable: 1 / (1 + iterations * (index + 1))."""

    def clipping_factors_by_name(self):
        variables = self._tracked_model_variables
        iterations = tf.cast(self.iterations, tf.float32)
        return {_name(v): 1.0 / (1.0 + iterations * (index + 1)) for index, v in enumerate(variables)}


def _name(variable) -> str:
    """A unique variable name in both runtimes (Keras 3's `name` is just "kernel"; its `path` is unique)."""
    return getattr(variable, "path", None) or variable.name


def _model(optimizer) -> keras.Model:
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, name="hidden"), keras.layers.Dense(1, name="head")]
    )
    model.compile(optimizer=optimizer, loss="mse")
    return model


def _data():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((64, 3)).astype(np.float32)
    return features, features.sum(axis=1, keepdims=True)


def test_logger_records_every_nth_step_and_logs_epoch_means(tmp_path):
    model = _model(FactorReportingSGD(0.01))
    model.optimizer._tracked_model_variables = model.trainable_variables  # what the stand-in reports on
    logger = ClippingFactorLogger(every_n_steps=2, log_dir=str(tmp_path / "tb"))
    history = model.fit(*_data(), batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[logger])
    assert logger.record.steps == list(range(0, 16, 2))
    first = _name(model.trainable_variables[0])
    # Measured after step s, the optimizer has done s + 1 iterations.
    np.testing.assert_allclose(logger.record.factors[first], [1.0 / (1.0 + (s + 1)) for s in range(0, 16, 2)])
    tag = "clipping_factor/" + first.split(":")[0]
    assert history.history[tag][0] == pytest.approx(np.mean([1.0 / (2.0 + s) for s in range(0, 8, 2)]))
    assert history.history["clipping_factor/min"][1] == pytest.approx(1.0 / (1.0 + 15 * 4))
    path = plot_clipping_factors(logger.record, str(tmp_path / "factors.png"))
    assert os.path.getsize(path) > 1000


def test_logger_needs_an_optimizer_that_exports_factors():
    model = _model(keras.optimizers.SGD(0.01))
    with pytest.raises(ValueError, match="clipping_factors_by_name"):
        model.fit(*_data(), epochs=1, verbose=0, callbacks=[ClippingFactorLogger()])
    with pytest.raises(ValueError, match="every_n_steps"):
        ClippingFactorLogger(every_n_steps=0)


@pytest.mark.parametrize("method", ["gc", "agc", "lamb", "clippy"])
def test_logger_rejects_a_tfrs_clippy_optimizer_built_without_exporting_factors_before_training(method):
    model = _model(build_optimizer(method, 0.1))
    with pytest.raises(ValueError, match=r"export_clipping_factors=False.*export_clipping_factors=True"):
        model.fit(*_data(), epochs=1, verbose=0, callbacks=[ClippingFactorLogger()])
    assert int(model.optimizer.iterations) == 0  # rejected in on_train_begin, not at the first batch


@pytest.mark.parametrize("method, at_most_one", [("gc", True), ("agc", True), ("lamb", False)])
def test_logger_with_the_baselines_scaling_factors(method, at_most_one, tmp_path):
    # A small threshold / trust scale so that the scaling bites; factors are the optimizer's own, step by step.
    hyperparameters = {"trust_scale": 1e-2} if method == "lamb" else {"threshold": 1e-3}
    model = _model(build_optimizer(method, 0.5, export_clipping_factors=True, **hyperparameters))
    logger = ClippingFactorLogger()
    history = model.fit(*_data(), batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[logger])
    assert logger.record.steps == list(range(8))
    assert len(logger.record.factors) == 4  # two kernels, two biases
    values = np.array(list(logger.record.factors.values()))
    assert np.all(np.isfinite(values) & (values > 0.0))
    if at_most_one:
        assert np.all(values <= 1.0) and values.min() < 1.0
    final = {name: float(v) for name, v in model.optimizer.clipping_factors_by_name().items()}
    assert [logger.record.factors[name][-1] for name in final] == pytest.approx(list(final.values()))
    assert history.history["clipping_factor/min"] == pytest.approx([values.min()])
    assert os.path.getsize(plot_clipping_factors(logger.record, str(tmp_path / f"{method}.png"))) > 1000


def test_record_fills_missing_variables_with_nan_and_groups_by_layer():
    record = ClippingFactorRecord()
    record.add(0, {"a/kernel:0": 1.0})
    record.add(1, {"a/kernel:0": 0.5, "b/bias:0": 0.25})
    assert record.factors["a/kernel:0"] == [1.0, 0.5]
    assert math.isnan(record.factors["b/bias:0"][0]) and record.factors["b/bias:0"][1] == 0.25
    assert [layer_of(name) for name in ("model/dense_1/kernel:0", "sequential/head/bias", "x")] == [
        "model/dense_1",
        "sequential/head",
        "x",
    ]


def test_with_clippy_adagrad_factors_and_preconditioned_sharpness(tmp_path):
    from tfrs_clippy import ClippyAdagrad  # pylint: disable=import-outside-toplevel

    # A large learning rate so that clipping bites.
    model = _model(ClippyAdagrad(learning_rate=1.0, export_clipping_factors=True))
    features, targets = _data()
    logger = ClippingFactorLogger()
    sharpness = SharpnessMonitor((features, targets), every_n_steps=4, max_iterations=30)
    model.fit(features, targets, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[logger, sharpness])
    assert len(logger.record.factors) == 4  # two kernels, two biases
    values = np.array(list(logger.record.factors.values()))
    assert np.all((values > 0.0) & (values <= 1.0))
    assert values.min() < 0.5  # lr 1.0 steps are far larger than 0.1 * |w|: clipped
    final = {name: float(v) for name, v in model.optimizer.clipping_factors_by_name().items()}
    assert [logger.record.factors[name][-1] for name in final] == pytest.approx(list(final.values()))
    # ClippyAdagrad's accumulators are read for the preconditioned sharpness.
    assert sharpness.record.steps == [0, 4]
    assert all(np.isfinite(sharpness.record.preconditioned_sharpness))
    assert plot_clipping_factors(logger.record, str(tmp_path / "clippy.png"))


@pytest.mark.parametrize("steps", [[0, 1, 2], [5]])
def test_plot_of_a_record_with_steps_and_no_variable_left_is_one_empty_panel(steps, tmp_path):
    # E.g. every variable filtered out (reporting drops embedding tables): a plot saying so, not a ZeroDivisionError.
    record = ClippingFactorRecord(steps=steps, factors={})
    path = plot_clipping_factors(record, str(tmp_path / "none.png"), title="nothing clipped")
    from matplotlib import image  # pylint: disable=import-outside-toplevel

    assert image.imread(path).shape[:2] == (300, 450)  # one 4.5 x 3 inch panel at 100 dpi
    with pytest.raises(ValueError, match="no steps"):
        plot_clipping_factors(ClippingFactorRecord(), str(tmp_path / "empty.png"))
