"""OverClippingMonitor: one warning per frozen variable within its window, none on the paper's setting, the count in
History; export of factors turned on when needed; the window's bookkeeping on made-up factors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import tensorflow as tf

from tfrs_clippy import OverClippingMonitor, OverClippingWarning, build_optimizer, keras

BATCH = 64
# Frozen by TFRS's thresholds within 20 steps: every zero-initialized bias, and the hidden kernels (the heads'
# kernels end above 0.05). Names without Keras 2's ":0".
FROZEN = {"hidden_1/kernel", "hidden_1/bias", "hidden_2/kernel", "hidden_2/bias",
          "head_0/bias", "head_1/bias", "head_2/bias", "head_3/bias"}
TFRS_THRESHOLDS = {"variable_relative_threshold": 0.1, "absolute_threshold": 1e-7}


def _mlp(optimizer) -> keras.Model:
    """80 -> 64 -> 64 -> 4 one-unit heads; Dense biases start at zero."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((80,))
    hidden = keras.layers.Dense(64, activation="relu", name="hidden_1")(inputs)
    hidden = keras.layers.Dense(64, activation="relu", name="hidden_2")(hidden)
    heads = [keras.layers.Dense(1, name=f"head_{i}")(hidden) for i in range(4)]
    model = keras.Model(inputs, keras.layers.Concatenate(name="heads")(heads))
    model.compile(optimizer=optimizer, loss=keras.losses.BinaryCrossentropy(from_logits=True))
    return model


def _data(steps: int):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((steps * BATCH, 80)).astype(np.float32)
    return features, (features[:, :4] > 0).astype(np.float32)


def _fit(model, monitor, steps: int, epochs: int = 1):
    """Trains `steps` steps per epoch; returns the History dict and the over-clipping warnings, in order."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(*_data(steps), batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0,
                            callbacks=[monitor])
    return history.history, [w for w in caught if issubclass(w.category, OverClippingWarning)]


def _stem(name: str) -> str:
    return name.split(":")[0]


def test_tfrs_thresholds_warn_once_per_frozen_variable_within_the_window():
    model = _mlp(build_optimizer("clippy", 0.2, **TFRS_THRESHOLDS))
    monitor = OverClippingMonitor(window=20, every_n_steps=1)
    history, caught = _fit(model, monitor, steps=19)
    assert caught == [] and history["over_clipped_variables"] == [0]  # 19 low steps: not yet
    history, caught = _fit(model, monitor, steps=1)  # the 20th step
    assert history["over_clipped_variables"] == [len(FROZEN)]
    assert {_stem(name) for name in monitor.over_clipped} == FROZEN
    # Each warning names its variable and carries the factor of the step it was issued after (the last one).
    last = {name: float(value) for name, value in model.optimizer.clipping_factors_by_name().items()}
    assert [name for name in monitor.over_clipped] == [name for name in last if _stem(name) in FROZEN]
    for warning, (name, factor) in zip(caught, monitor.over_clipped.items(), strict=True):
        assert factor == pytest.approx(last[name], rel=1e-6) and factor < 0.05
        assert str(warning.message).startswith(
            f"Variable {name!r} is over-clipped: its clipping factor has stayed below 0.05 for 20 steps "
            f"(now {factor:.3g}, at step 19)"
        )
        assert "raise `absolute_threshold` (now 1e-07; the paper's setting" in str(warning.message)
        assert f"exclude_from_clipping=[{_stem(name)!r}]" in str(warning.message)
    assert len(caught) == len(FROZEN)
    history, caught = _fit(model, monitor, steps=5)  # still frozen: counted in the new epoch, not warned again
    assert caught == [] and history["over_clipped_variables"] == [len(FROZEN)]


def test_the_default_path_warns_after_100_steps():
    model = _mlp(build_optimizer("clippy", 0.2, **TFRS_THRESHOLDS))  # built without export_clipping_factors
    monitor = OverClippingMonitor()
    history, caught = _fit(model, monitor, steps=100)
    assert model.optimizer.export_clipping_factors is True  # turned on before the optimizer was built
    assert history["over_clipped_variables"] == [len(FROZEN)]
    # Reads after steps 0, 10, ..., each standing for 10 steps: the 10th low read, after step 90, warns.
    assert {_stem(name) for name in monitor.over_clipped} == FROZEN and len(caught) == len(FROZEN)
    assert all("for 100 steps" in str(w.message) and "at step 90)" in str(w.message) for w in caught)


def test_the_paper_setting_does_not_warn():
    model = _mlp(build_optimizer("clippy", 0.2))
    monitor = OverClippingMonitor(window=20, every_n_steps=1)
    history, caught = _fit(model, monitor, steps=40)
    assert caught == [] and monitor.over_clipped == {}
    assert history["over_clipped_variables"] == [0]
    factors = [float(value) for value in model.optimizer.clipping_factors_by_name().values()]
    assert min(factors) > 0.9


def test_a_user_exported_optimizer_is_read_as_it_is():
    optimizer = build_optimizer("clippy", 0.2, export_clipping_factors=True, **TFRS_THRESHOLDS)
    _, caught = _fit(_mlp(optimizer), OverClippingMonitor(window=20, every_n_steps=5), steps=20)
    assert len(caught) == len(FROZEN)
    assert all("at step 15)" in str(w.message) for w in caught)  # 4 reads x 5 steps


def test_an_optimizer_built_without_factors_is_rejected_before_training():
    model = _mlp(build_optimizer("clippy", 0.2))
    model.optimizer.build(model.trainable_variables)
    with pytest.raises(ValueError, match=r"built with export_clipping_factors=False.*export_clipping_factors=True"):
        _fit(model, OverClippingMonitor(), steps=1)
    assert int(model.optimizer.iterations) == 0
    with pytest.raises(ValueError, match=r"optimizer SGD has no `clipping_factors_by_name\(\)`"):
        _fit(_mlp(keras.optimizers.SGD(0.1)), OverClippingMonitor(), steps=1)


class _MadeUpFactorsSGD(keras.optimizers.SGD):
    """SGD reporting made-up factors: "a" is 0.01 except after iteration 4 (1.0), "b" is always 0.5."""

    def clipping_factors_by_name(self):
        iterations = tf.cast(self.iterations, tf.float32)
        return {"a": tf.where(tf.equal(iterations, 4.0), 1.0, 0.01), "b": tf.constant(0.5)}


def test_a_read_above_the_threshold_restarts_the_window():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=_MadeUpFactorsSGD(0.01, name="made_up_sgd"), loss="mse")
    monitor = OverClippingMonitor(threshold=0.1, window=4, every_n_steps=1)
    features = np.ones((10, 3), np.float32)
    with pytest.warns(OverClippingWarning) as caught:
        history = model.fit(features, features[:, :1], batch_size=1, epochs=1, verbose=0, callbacks=[monitor])
    # Low after iterations 1-3, high after 4, low again from 5: the 4th low read in a row is after iteration 8.
    assert [str(w.message) for w in caught] == [
        "Variable 'a' is over-clipped: its clipping factor has stayed below 0.1 for 4 steps (now 0.01, at step 7), "
        "so its updates are almost entirely clipped away and it barely trains. To fix it, loosen "
        "_MadeUpFactorsSGD's threshold, lower the learning rate, or leave it unclipped with "
        "exclude_from_clipping=['a']."
    ]
    assert monitor.over_clipped == {"a": pytest.approx(0.01)}
    assert history.history["over_clipped_variables"] == [1]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"threshold": 0.0}, "`threshold` must be in (0, 1], got 0.0."),
        ({"threshold": 1.5}, "`threshold` must be in (0, 1], got 1.5."),
        ({"window": 0}, "`window` must be an int >= 1, got 0."),
        ({"window": True}, "`window` must be an int >= 1, got True."),
        ({"every_n_steps": 0}, "`every_n_steps` must be an int >= 1, got 0."),
    ],
)
def test_bad_arguments_name_the_argument_and_value(arguments, message):
    with pytest.raises(ValueError) as error:
        OverClippingMonitor(**arguments)
    assert str(error.value) == message
