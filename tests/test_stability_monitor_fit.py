"""DivergenceMonitor inside a real Keras `fit`, in both runtimes: what the logs hold and how it reads batch losses."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.stability import DetectorConfig, DivergenceMonitor, detect_divergence, plot_divergence

BATCH_SIZE = 16
BATCHES = 60
SPIKE_BATCH = 40


def _regression_data(seed: int = 0):
    """Linear-regression data whose batch SPIKE_BATCH has targets 20x too large (a single bad batch)."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((BATCH_SIZE * BATCHES, 4)).astype(np.float32)
    targets = features @ rng.standard_normal((4, 1)).astype(np.float32)
    targets += 0.1 * rng.standard_normal(targets.shape).astype(np.float32)
    targets[SPIKE_BATCH * BATCH_SIZE:(SPIKE_BATCH + 1) * BATCH_SIZE] *= 20.0
    return features, targets


class _LossLog(keras.callbacks.Callback):
    """Keeps what Keras put in logs["loss"] after every batch."""

    def __init__(self):
        super().__init__()
        self.logged = []

    def on_train_batch_end(self, batch, logs=None):
        self.logged.append(float(logs["loss"]))


def _linear_model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    return model


def test_single_batch_spike_in_fit_is_detected_though_the_running_mean_hides_it(tmp_path):
    features, targets = _regression_data()
    monitor, logged = DivergenceMonitor(log_dir=str(tmp_path / "tb")), _LossLog()
    history = _linear_model().fit(
        features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, logged]
    )
    assert monitor.reader.probes_train_step  # Keras's own train_step logs the epoch's running mean...
    # ... on which the one-batch spike looks like a divergence that never recovers: the mean keeps it.
    assert [event.kind for event in detect_divergence(logged.logged).events] == ["full"]
    spikes = [event for event in monitor.events if event.start_step == SPIKE_BATCH]
    assert len(spikes) == 1 and spikes[0].kind == "micro"
    assert spikes[0].peak_loss > 50 * spikes[0].baseline
    # The batch losses are the model's loss on each batch before its update.
    assert monitor.record.losses[0] == pytest.approx(float(np.mean(targets[:BATCH_SIZE] ** 2)), rel=1e-6)
    assert history.history["micro_divergences"] == [monitor.record.count("micro")]
    assert history.history["full_divergences"] == [0]
    batch_losses = _scalars_written(tmp_path / "tb")["batch_loss"]
    np.testing.assert_allclose(batch_losses, monitor.record.losses, rtol=1e-6)
    assert plot_divergence(monitor.record, str(tmp_path / "loss.png")).endswith("loss.png")


def test_batch_losses_stay_exact_after_a_huge_early_spike():
    # A learning rate of 0 keeps the weights at zero: every batch's loss is exactly mean(target^2) of its batch.
    # Batch 12's targets are 3e4 times larger (loss ~6e8): in Keras's float32 running mean the later batches'
    # losses of ~1 are below its rounding error, so neither they nor the 400x spike of batch SPIKE_BATCH can be
    # recovered from it.
    features, targets = _regression_data()
    spike_batch = 12
    targets[spike_batch * BATCH_SIZE:(spike_batch + 1) * BATCH_SIZE] *= 3e4
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    monitor, logged = DivergenceMonitor(), _LossLog()
    history = model.fit(
        features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, logged]
    )
    expected = np.mean(targets.reshape(BATCHES, BATCH_SIZE) ** 2, axis=1)
    assert expected[spike_batch] > 3e8
    np.testing.assert_allclose(monitor.record.losses, expected, rtol=1e-6)
    assert [(e.kind, e.start_step, e.end_step) for e in monitor.events] == [
        ("micro", spike_batch, spike_batch + 1),
        ("micro", SPIKE_BATCH, SPIKE_BATCH + 1),
    ]
    # The probe leaves Keras's own logs alone: `loss` is still the epoch's running mean.
    np.testing.assert_allclose(logged.logged, np.cumsum(expected) / np.arange(1, BATCHES + 1), rtol=1e-5)
    assert history.history["loss"] == pytest.approx([np.mean(expected)], rel=1e-5)
    assert "batch_loss" not in history.history


def test_probe_is_removed_after_fit_and_installed_once_for_two_monitors():
    features, targets = _regression_data()
    model = _linear_model()
    first, second = DivergenceMonitor(), DivergenceMonitor()
    model.fit(features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[first, second])
    assert first.record.losses == second.record.losses
    assert "train_step" not in vars(model) and "compute_loss" not in vars(model)
    logged = _LossLog()
    model.fit(features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[logged])
    assert len(logged.logged) == BATCHES  # a plain fit afterwards trains as before


def _scalars_written(log_dir) -> dict:
    """{tag: [values]} from the TensorBoard event files in `log_dir`."""
    scalars = {}
    for path in sorted(log_dir.iterdir()):
        for raw in tf.data.TFRecordDataset(str(path)):
            for value in tf.compat.v1.Event.FromString(raw.numpy()).summary.value:
                scalars.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return scalars


class PerBatchLossModel(keras.Model):
    """A model whose train_step reports the batch's own loss (as TFRS models do), not a running mean."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1, kernel_initializer="zeros")

    def call(self, inputs, training=False):
        return self.dense(inputs)

    def train_step(self, data):
        features, targets = data
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(targets - self(features, training=True)))
        gradients = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        return {"loss": loss}


def test_model_reporting_per_batch_loss_is_read_as_is():
    features, targets = _regression_data()
    model = PerBatchLossModel()
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    monitor, logged = DivergenceMonitor(), _LossLog()
    model.fit(features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[monitor, logged])
    assert not monitor.reader.probes_train_step
    assert monitor.record.losses == logged.logged
    assert [e.start_step for e in monitor.events if e.kind == "micro"][:1] == [SPIKE_BATCH]


def test_nan_loss_is_full_divergence_and_can_stop_training():
    features, targets = _regression_data()
    targets[5 * BATCH_SIZE] = np.nan
    monitor = DivergenceMonitor(stop_on_full_divergence=True, config=DetectorConfig(warmup_steps=3))
    history = _linear_model().fit(
        features, targets, batch_size=BATCH_SIZE, epochs=3, shuffle=False, verbose=0, callbacks=[monitor]
    )
    assert [(e.kind, e.start_step, e.reason) for e in monitor.events] == [("full", 5, "non_finite")]
    assert monitor.global_step == 6  # stopped right after the NaN batch
    assert len(history.history["loss"]) == 1
