"""LinearWarmup: hand-computed rates, a nested schedule, optimizers stepping with it, serialization, `scale`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

import tfrs_clippy
from tfrs_clippy import keras
from tfrs_clippy.optimizers import LinearWarmup


def _rate(schedule, step: int) -> float:
    return float(schedule(tf.constant(step, tf.int64)))


def test_constant_peak_ramps_linearly_then_holds():
    schedule = LinearWarmup(0.1, warmup_steps=5)
    # steps 0, 1, warmup - 1, warmup, 10 * warmup: 0.1 * 1/5, 0.1 * 2/5, then the peak.
    assert [_rate(schedule, s) for s in (0, 1, 4, 5, 50)] == pytest.approx([0.02, 0.04, 0.1, 0.1, 0.1], rel=1e-6)


def test_no_warmup_is_the_peak_from_step_zero():
    assert [_rate(LinearWarmup(0.3, warmup_steps=0), s) for s in (0, 7)] == pytest.approx([0.3, 0.3], rel=1e-6)


def test_nested_schedule_is_warmed_up_at_the_same_step():
    decay = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    schedule = LinearWarmup(decay, warmup_steps=4)
    # lr = 0.1 * 0.5^(step/10) * min(1, (step+1)/4)
    expected = [0.1 * 1 / 4, 0.1 * 0.5 ** 0.1 * 2 / 4, 0.1 * 0.5 ** 0.3, 0.1 * 0.5 ** 0.4, 0.1 * 0.5 ** 4]
    assert [_rate(schedule, s) for s in (0, 1, 3, 4, 40)] == pytest.approx(expected, rel=1e-6)


def _numpy_adagrad(weights, grads, rates, initial_accumulator=0.1, epsilon=1e-7):
    """G += g^2; w -= lr_t * g / sqrt(G + epsilon)."""
    w, accumulator = weights.astype(np.float64), np.full_like(weights, initial_accumulator, dtype=np.float64)
    for grad, rate in zip(grads, rates, strict=True):
        accumulator += grad ** 2
        w -= rate * grad / np.sqrt(accumulator + epsilon)
    return w


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda schedule: tfrs_clippy.ClippyAdagrad.from_paper(schedule),
        lambda schedule: tfrs_clippy.Adagrad(learning_rate=schedule),
    ],
    ids=["clippy_from_paper", "scaled_adagrad"],
)
def test_optimizer_steps_with_the_warmup_rates(make_optimizer):
    weights = np.array([1.0, -2.0, 3.0], np.float32)
    # Updates are at most lr <= 0.1 per coordinate, far below Clippy's 0.5 * |w| + 0.01: no clipping.
    grads = np.random.default_rng(0).uniform(-1.0, 1.0, (8, 3)).astype(np.float32)
    optimizer = make_optimizer(LinearWarmup(0.1, warmup_steps=5))
    variable = tf.Variable(weights)
    apply = tf.function(optimizer.apply_gradients)
    for grad in grads:
        apply([(tf.constant(grad), variable)])
    rates = [0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1, 0.1]
    np.testing.assert_allclose(variable.numpy(), _numpy_adagrad(weights, grads, rates), rtol=1e-6, atol=1e-7)
    # Without the warm-up the result is measurably different: the test sees the ramp.
    assert not np.allclose(variable.numpy(), _numpy_adagrad(weights, grads, [0.1] * 8), rtol=1e-3)


def test_config_round_trip_with_nested_schedule_and_multiplier():
    decay = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    schedule = LinearWarmup(decay, warmup_steps=4, name="warm")
    schedule.scale(0.25)
    config = schedule.get_config()
    assert config["multiplier"] == 0.25 and config["warmup_steps"] == 4
    restored = LinearWarmup.from_config(config)
    assert isinstance(restored.learning_rate, keras.optimizers.schedules.ExponentialDecay)
    assert restored.get_config() == config
    assert _rate(restored, 1) == pytest.approx(0.25 * 0.1 * 0.5 ** 0.1 * 2 / 4, rel=1e-6)
    serialized = keras.optimizers.schedules.serialize(schedule)
    assert "LinearWarmup" in str(serialized)
    assert keras.optimizers.schedules.deserialize(serialized).get_config() == config


def test_round_trip_inside_a_saved_optimizer_config():
    schedule = LinearWarmup(0.1, 5)
    schedule.scale(0.5)
    optimizer = tfrs_clippy.ClippyAdagrad.from_paper(schedule)
    config = optimizer.get_config()
    assert config["learning_rate"]["config"] == {"learning_rate": 0.1, "warmup_steps": 5, "multiplier": 0.5,
                                                 "name": None}
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, tfrs_clippy.ClippyAdagrad) and restored.get_config() == config
    # The restored optimizer's rate at its first step: 0.5 * 0.1 * 1/5.
    assert float(np.array(restored.learning_rate)) == pytest.approx(0.01, rel=1e-6)


def test_scale_halves_later_rates_in_a_traced_step():
    schedule = LinearWarmup(0.1, warmup_steps=5)
    rate = tf.function(schedule)
    assert float(rate(tf.constant(6, tf.int64))) == pytest.approx(0.1, rel=1e-6)
    schedule.scale(0.5)
    # The same trace reads the multiplier variable: no retracing needed for the cut to apply.
    assert [float(rate(tf.constant(s, tf.int64))) for s in (0, 6)] == pytest.approx([0.01, 0.05], rel=1e-6)
    schedule.scale(0.5)
    assert float(rate(tf.constant(6, tf.int64))) == pytest.approx(0.025, rel=1e-6)


@pytest.mark.parametrize(
    "argument, kwargs",
    [
        ("learning_rate", dict(learning_rate=-0.1, warmup_steps=5)),
        ("learning_rate", dict(learning_rate=math.nan, warmup_steps=5)),
        ("learning_rate", dict(learning_rate="0.1", warmup_steps=5)),
        ("warmup_steps", dict(learning_rate=0.1, warmup_steps=-1)),
        ("warmup_steps", dict(learning_rate=0.1, warmup_steps=2.0)),
        ("multiplier", dict(learning_rate=0.1, warmup_steps=5, multiplier=0.0)),
    ],
)
def test_bad_arguments_raise_naming_them(argument, kwargs):
    with pytest.raises(ValueError, match=argument):
        LinearWarmup(**kwargs)


@pytest.mark.parametrize("factor", [0.0, -1.0, math.inf])
def test_bad_scale_factor_raises_naming_it(factor):
    with pytest.raises(ValueError, match="factor"):
        LinearWarmup(0.1, 5).scale(factor)
