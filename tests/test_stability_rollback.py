"""RollbackOnDivergence: exact restore of weights and optimizer slots, skipped batches, learning-rate cut."""

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.optimizers import ClippyAdagrad, LinearWarmup
from tfrs_clippy.stability import DetectorConfig, RollbackOnDivergence

BATCH_SIZE = 16
BATCHES = 60
SPIKE_BATCH = 40
SKIP = 3


def _data(bad_batch: int, make_bad):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((BATCH_SIZE * BATCHES, 4)).astype(np.float32)
    targets = features @ rng.standard_normal((4, 1)).astype(np.float32)
    make_bad(targets[bad_batch * BATCH_SIZE:(bad_batch + 1) * BATCH_SIZE])
    return features, targets


def _model(learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0.1) -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(optimizer=keras.optimizers.Adagrad(learning_rate), loss="mse")
    return model


class _StateLog(keras.callbacks.Callback):
    """Copies model weights and optimizer variables after every batch (after the callbacks before it ran)."""

    def __init__(self):
        super().__init__()
        self.states = []

    def on_train_batch_end(self, batch, logs=None):
        self.states.append(
            [w.copy() for w in self.model.get_weights()] + [np.array(v) for v in self.model.optimizer.variables]
        )


def _assert_same_state(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def _spiky_targets(block):
    block *= 20.0


def test_rollback_restores_exact_state_and_skips_batches():
    features, targets = _data(SPIKE_BATCH, _spiky_targets)
    rollback = RollbackOnDivergence(snapshot_every_n_steps=1, keep_snapshots=3, skip_batches=SKIP)
    state_log = _StateLog()
    model = _model()
    history = model.fit(
        features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[rollback, state_log]
    )
    assert [(e.step, e.restored_step) for e in rollback.rollback_events] == [(SPIKE_BATCH, SPIKE_BATCH - 2)]
    assert history.history["rollbacks"] == [1]
    states = state_log.states
    restored = states[SPIKE_BATCH - 2]
    # The spiking batch and the SKIP batches after it leave weights, slots and iteration count as restored.
    for step in range(SPIKE_BATCH, SPIKE_BATCH + SKIP + 1):
        _assert_same_state(states[step], restored)
    assert int(model.optimizer.iterations) == BATCHES - (SKIP + 2)  # 2: the spiking batch and the one before it
    with pytest.raises(AssertionError):
        _assert_same_state(states[SPIKE_BATCH + SKIP + 1], restored)
    # Nothing else is lost: the run equals one that never saw batches SPIKE_BATCH - 1 .. SPIKE_BATCH + SKIP.
    kept = np.r_[0:SPIKE_BATCH - 1, SPIKE_BATCH + SKIP + 1:BATCHES]
    rows = (kept[:, None] * BATCH_SIZE + np.arange(BATCH_SIZE)).ravel()
    reference = _model()
    reference.fit(features[rows], targets[rows], batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0)
    for actual, expected in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)
    # The spike was seen as a micro divergence: after the rollback the loss was back to normal.
    assert [(e.kind, e.start_step) for e in rollback.events] == [("micro", SPIKE_BATCH)]


def test_nan_rolls_back_from_disk_with_a_lower_learning_rate(tmp_path):
    def nan_targets(block):
        block[0] = np.nan

    features, targets = _data(30, nan_targets)
    rollback = RollbackOnDivergence(
        snapshot_every_n_steps=5, keep_snapshots=2, skip_batches=2, lr_factor=0.5, directory=str(tmp_path)
    )
    model = _model()
    model.fit(features, targets, batch_size=BATCH_SIZE, epochs=2, shuffle=False, verbose=0, callbacks=[rollback])
    # Snapshots at steps 0, 5, ..., 25 before the NaN at 30 and two kept: the newest <= 28 is 25.
    assert [(e.step, e.restored_step) for e in rollback.rollback_events] == [(30, 25), (90, 85)]
    assert [e.learning_rate for e in rollback.rollback_events] == pytest.approx([0.05, 0.025])
    assert float(np.array(model.optimizer.learning_rate)) == pytest.approx(0.025)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    # Both NaN steps were undone: rescued, not a divergence of the run.
    assert [(e.kind, e.reason) for e in rollback.events] == [("rescued", "non_finite")] * 2
    score = rollback.record.instability_score()
    assert (score.full_divergences, score.rescued_divergences, score.had_full_divergence) == (0, 2, False)
    assert len(list(tmp_path.glob("*.npz"))) == 2


def test_rollback_keeps_the_count_of_skipped_steps_in_both_runtimes():
    """ClippyAdagrad skips the NaN step and counts it; the rollback it causes restores state, not the count."""
    def nan_targets(block):
        block[0] = np.nan

    features, targets = _data(30, nan_targets)
    rollback = RollbackOnDivergence(snapshot_every_n_steps=5, skip_batches=2)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model.compile(optimizer=ClippyAdagrad.from_paper(0.1, export_clipping_factors=True), loss="mse")
    model.fit(features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[rollback])
    assert [(e.step, e.restored_step) for e in rollback.rollback_events] == [(30, 25)]
    assert int(model.optimizer.nonfinite_steps) == 2  # the kernel's and the bias's step of batch 30
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_rescued_nan_does_not_stop_training_but_an_unrescued_one_does():
    def nan_targets(block):
        block[0] = np.nan

    features, targets = _data(30, nan_targets)
    rescuing = RollbackOnDivergence(snapshot_every_n_steps=5, skip_batches=2, stop_on_full_divergence=True)
    history = _model().fit(
        features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[rescuing]
    )
    assert rescuing.global_step == BATCHES  # trained to the end
    assert history.history["full_divergences"] == [0] and history.history["rescued_divergences"] == [1]
    out_of_rollbacks = RollbackOnDivergence(snapshot_every_n_steps=5, max_rollbacks=0, stop_on_full_divergence=True)
    _model().fit(
        features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[out_of_rollbacks]
    )
    assert out_of_rollbacks.global_step == 31
    assert [(e.kind, e.start_step) for e in out_of_rollbacks.events] == [("full", 30)]


def test_spike_before_any_old_enough_snapshot_is_logged_without_rollback():
    features, targets = _data(1, _spiky_targets)
    # One snapshot kept, taken every step: step 0's replaces the initial state's, and is too new for step 1.
    rollback = RollbackOnDivergence(
        config=DetectorConfig(warmup_steps=1, baseline_window=5), snapshot_every_n_steps=1, keep_snapshots=1
    )
    _model().fit(features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0, callbacks=[rollback])
    assert [(e.step, e.restored_step) for e in rollback.rollback_events] == [(1, None)]
    assert rollback.rollbacks == 0


class _BlowUpAfterStep0(keras.callbacks.Callback):
    """Sets every weight to 100 after step 0, as a wild first update would: the loss of step 1 blows up.

    Listed before the rollback callback, so the snapshot of step 0 holds the blown-up state.
    """

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0 and int(self.model.optimizer.iterations) == 1:
            self.model.set_weights([np.full_like(w, 100.0) for w in self.model.get_weights()])


def test_blow_up_at_step_1_rolls_back_to_the_initial_state():
    features, targets = _data(0, lambda block: None)  # clean data: the callback makes the blow-up
    rollback = RollbackOnDivergence(snapshot_every_n_steps=1, skip_batches=SKIP)
    state_log = _StateLog()
    model = _model()
    initial = _model()
    initial.optimizer.build(initial.trainable_variables)
    initial_state = initial.get_weights() + [np.array(v) for v in initial.optimizer.variables]
    model.fit(
        features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0,
        callbacks=[_BlowUpAfterStep0(), rollback, state_log],
    )
    # The loss of step 1 (about 1e4 x step 0's) is a warm-up spike; the s - 2 rule needs the snapshot of step -1.
    assert [(e.step, e.restored_step) for e in rollback.rollback_events] == [(1, -1)]
    assert [(e.kind, e.start_step) for e in rollback.events] == [("micro", 1)]
    assert all(np.all(w == 0.0) for w in state_log.states[1][:2])  # the zero-initialized kernel and bias
    for step in range(1, SKIP + 2):  # the blown-up step and the skipped ones: back at the initial state
        _assert_same_state(state_log.states[step], initial_state)
    # The run equals one that never saw batches 0 .. SKIP + 1.
    rows = np.arange((SKIP + 2) * BATCH_SIZE, BATCHES * BATCH_SIZE)
    reference = _model()
    reference.fit(features[rows], targets[rows], batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0)
    for actual, expected in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def test_lr_factor_scales_a_linear_warmup_schedule():
    features, targets = _data(0, lambda block: None)
    schedule = LinearWarmup(0.1, warmup_steps=5)
    rollback = RollbackOnDivergence(skip_batches=SKIP, lr_factor=0.5)
    model = _model(schedule)
    model.fit(
        features, targets, batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0,
        callbacks=[_BlowUpAfterStep0(), rollback],
    )
    assert [(e.step, e.restored_step) for e in rollback.rollback_events] == [(1, -1)]
    assert float(schedule.multiplier.numpy()) == 0.5
    # The warm-up restarts from the restored iteration 0, at half the rates: 0.5 * 0.1 * 1/5, then 0.5 * 0.1.
    assert [float(schedule(tf.constant(s, tf.int64))) for s in (0, 10)] == pytest.approx([0.01, 0.05], rel=1e-6)
    # Training after the rollback equals a run over the kept batches with the halved schedule.
    rows = np.arange((SKIP + 2) * BATCH_SIZE, BATCHES * BATCH_SIZE)
    reference = _model(LinearWarmup(0.05, warmup_steps=5))
    reference.fit(features[rows], targets[rows], batch_size=BATCH_SIZE, epochs=1, shuffle=False, verbose=0)
    for actual, expected in zip(model.get_weights(), reference.get_weights(), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "argument, value",
    [("snapshot_every_n_steps", 0), ("keep_snapshots", 0), ("skip_batches", -1), ("lr_factor", 0.0),
     ("lr_factor", 2.0)],
)
def test_bad_arguments_raise_naming_them(argument, value):
    with pytest.raises(ValueError, match=argument):
        RollbackOnDivergence(**{argument: value})


def test_lr_factor_needs_a_numeric_learning_rate():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.9)
    model.compile(optimizer=keras.optimizers.Adagrad(schedule), loss="mse")
    with pytest.raises(ValueError, match="lr_factor"):
        model.fit(np.zeros((4, 4)), np.zeros((4, 1)), verbose=0, callbacks=[RollbackOnDivergence(lr_factor=0.5)])
