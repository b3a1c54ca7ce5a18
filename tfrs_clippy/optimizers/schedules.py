"""A linear learning-rate warm-up for any Keras optimizer, in both Keras runtimes.

Adagrad's first steps are its largest: while the accumulator holds little more than its initial value, g / sqrt(G)
is close to sign(g) for every coordinate with a large gradient, so a badly initialized net can take a huge step at
step 0 or 1. A warm-up ramps the learning rate over the first steps instead:

    lr(step) = m * peak(step) * min(1, (step + 1) / warmup_steps)

where `peak` is a constant or another schedule (warm-up then decay) and m, 1 unless `scale` was called, is the
multiplier `RollbackOnDivergence(lr_factor=...)` lowers at each rollback.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import tensorflow as tf

from tfrs_clippy.keras_runtime import keras

_Schedule = keras.optimizers.schedules.LearningRateSchedule


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


@keras.saving.register_keras_serializable(package="tfrs_clippy")
class LinearWarmup(_Schedule):
    """lr(step) = multiplier * peak(step) * min(1, (step + 1) / warmup_steps); see the module docstring.

    Step 0 (the optimizer's first update) uses peak / warmup_steps, step warmup_steps - 1 and later the full peak.
    The multiplier lives in a non-trainable `tf.Variable`, read by the traced train step at every call, so `scale`
    changes the rates of the steps that follow without retracing; `get_config` saves its current value.

    Args:
        learning_rate: The peak learning rate: a finite number >= 0, or a schedule evaluated at the same step.
        warmup_steps: Steps of the linear ramp (an int >= 0; 0: no warm-up, the peak from step 0).
        multiplier: The initial multiplier m (a finite number > 0); `scale` multiplies it.
        name: An optional name for the schedule's ops.

    Raises:
        ValueError: An argument is out of range; the message names it and its value.
    """

    def __init__(
        self,
        learning_rate: Union[float, _Schedule],
        warmup_steps: int,
        multiplier: float = 1.0,
        name: Optional[str] = None,
    ) -> None:
        super().__init__()
        if not isinstance(learning_rate, _Schedule):
            if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not (
                math.isfinite(learning_rate) and learning_rate >= 0
            ):
                raise ValueError(
                    f"`learning_rate` must be a finite number >= 0 or a LearningRateSchedule, got {learning_rate!r}."
                )
            learning_rate = float(learning_rate)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0, got {warmup_steps!r}.")
        self.learning_rate = learning_rate
        self.warmup_steps = warmup_steps
        self.multiplier = tf.Variable(
            _check_positive("multiplier", multiplier), trainable=False, dtype=tf.float32, name="lr_multiplier"
        )
        self.name = name

    def __call__(self, step: Any) -> tf.Tensor:
        with tf.name_scope(self.name or "LinearWarmup"):
            if isinstance(self.learning_rate, _Schedule):
                peak = tf.convert_to_tensor(self.learning_rate(step))
            else:
                peak = tf.constant(self.learning_rate, tf.float32)
            dtype = peak.dtype  # a nested schedule may compute in float64: follow it
            rate = tf.cast(self.multiplier, dtype) * peak
            if self.warmup_steps == 0:
                return rate
            ramp = (tf.cast(step, dtype) + 1.0) / tf.constant(self.warmup_steps, dtype)
            return rate * tf.minimum(tf.constant(1.0, dtype), ramp)

    def scale(self, factor: float) -> None:
        """Multiplies every later learning rate by `factor` (a finite number > 0): m <- m * factor."""
        self.multiplier.assign(self.multiplier * _check_positive("factor", factor))

    def get_config(self) -> dict[str, Any]:
        learning_rate = self.learning_rate
        if isinstance(learning_rate, _Schedule):
            learning_rate = keras.optimizers.schedules.serialize(learning_rate)
        return {
            "learning_rate": learning_rate,
            "warmup_steps": self.warmup_steps,
            "multiplier": float(self.multiplier.numpy()),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "LinearWarmup":
        config = dict(config)
        if isinstance(config["learning_rate"], dict):
            config["learning_rate"] = keras.optimizers.schedules.deserialize(config["learning_rate"])
        return cls(**config)
