"""The stability callbacks under MirroredStrategy on two logical CPUs, in a fresh process.

Logical devices must be configured before TensorFlow runs any op, which pytest's process has already done, so the
test runs this file as a script in a subprocess (same Keras runtime, via the inherited environment).
"""

import json
import os
import subprocess
import sys

import pytest

BATCH_SIZE = 16
BATCHES = 48
SPIKE_BATCH = 30
SKIP = 2


def _run_under_mirrored_strategy() -> dict:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np  # pylint: disable=import-outside-toplevel

    from tfrs_clippy import ClippyAdagrad  # pylint: disable=import-outside-toplevel
    from tfrs_clippy.keras_runtime import keras  # pylint: disable=import-outside-toplevel
    from tfrs_clippy.stability import (  # pylint: disable=import-outside-toplevel
        ClippingFactorLogger,
        RollbackOnDivergence,
        SharpnessMonitor,
    )
    from tfrs_clippy.stability.rollback import optimizer_state_variables  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(0)
    features = rng.standard_normal((BATCH_SIZE * BATCHES, 4)).astype(np.float32)
    targets = features @ rng.standard_normal((4, 1)).astype(np.float32)
    targets[SPIKE_BATCH * BATCH_SIZE:(SPIKE_BATCH + 1) * BATCH_SIZE] *= 20.0

    class StateLog(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.states = []

        def on_train_batch_end(self, batch, logs=None):
            # The optimizer's state: a rollback restores it, not the diagnostics (the last step's factor).
            state = optimizer_state_variables(self.model.optimizer)
            self.states.append(self.model.get_weights() + [v.numpy() for v in state])

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")])
        model.compile(optimizer=ClippyAdagrad(0.1, export_clipping_factors=True), loss="mse")
    rollback = RollbackOnDivergence(snapshot_every_n_steps=1, skip_batches=SKIP)
    sharpness = SharpnessMonitor((features[:64], targets[:64]), every_n_steps=40, max_iterations=150, tolerance=1e-4)
    factors = ClippingFactorLogger()
    states = StateLog()
    model.fit(
        features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0,
        callbacks=[rollback, sharpness, factors, states],
    )
    restored = states.states[SPIKE_BATCH - 2]
    augmented = np.c_[features[:64], np.ones(64)].astype(np.float64)
    return {
        "replicas": strategy.num_replicas_in_sync,
        "rollbacks": [[e.step, e.restored_step] for e in rollback.rollback_events],
        "events": [[e.kind, e.start_step] for e in rollback.events],
        "max_difference_after_rollback": max(
            float(np.max(np.abs(a - b)))
            for step in range(SPIKE_BATCH, SPIKE_BATCH + SKIP + 1)
            for a, b in zip(states.states[step], restored, strict=True)
        ),
        "sharpness_steps": sharpness.record.steps,
        "sharpness": sharpness.record.sharpness,
        # The model is linear and the loss MSE: H = 2/n [x 1]^T [x 1] exactly, whatever the weights.
        "exact_sharpness": float(np.linalg.eigvalsh(2.0 / 64 * augmented.T @ augmented)[-1]),
        "preconditioned_sharpness": sharpness.record.preconditioned_sharpness,
        "factor_steps": len(factors.record.steps),
        "factor_names": len(factors.record.factors),
    }


@pytest.mark.slow
def test_callbacks_under_mirrored_strategy():
    completed = subprocess.run(
        [sys.executable, os.path.abspath(__file__)], capture_output=True, text=True, timeout=240, env=dict(os.environ)
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["rollbacks"] == [[SPIKE_BATCH, SPIKE_BATCH - 2]]
    assert ["micro", SPIKE_BATCH] in result["events"]
    assert result["max_difference_after_rollback"] == 0.0
    assert result["sharpness_steps"] == [0, 40]
    assert result["sharpness"] == pytest.approx([result["exact_sharpness"]] * 2, rel=0.01)
    assert all(value > 0.0 for value in result["preconditioned_sharpness"])
    assert result["factor_steps"] == BATCHES and result["factor_names"] == 2


if __name__ == "__main__":
    print(json.dumps(_run_under_mirrored_strategy()))
