"""The Adagrad family: Adagrad whose update is scaled per variable by a rule (`core` has the math).

`ScaledAdagrad` is the family's base: Adagrad's arguments and accumulator, and the step of `core`; each method of
the Clippy paper is a subclass that sets the rule (`ClippyAdagrad`, the baselines in `baselines`), and
`Adagrad` is the family with no rule.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfrs_clippy.keras_runtime import BACKEND
from tfrs_clippy.optimizers import core, keras_ops_steps
from tfrs_clippy.optimizers.scaled_optimizer import ScaledOptimizer, check_non_negative, normalize_learning_rate


def check_denominator(initial_accumulator_value: float, epsilon: float) -> None:
    """Raises a ValueError naming both arguments unless every step's sqrt(G + epsilon) is positive.

    G starts at `initial_accumulator_value` and never decreases (every order only adds squares), so the first
    step's G + epsilon is the smallest. It must be a positive *normal* number in float32 (and in float64, the
    accumulator dtype of float64 variables): TensorFlow flushes subnormals to 0 on CPU, where rsqrt then returns
    inf. epsilon 0 is therefore fine with a positive initial accumulator (TFRS's tests use it), and so is a
    negative epsilon smaller in size than it; both 0 divide by zero, in the "standard" order too (a coordinate
    whose gradient is 0 computes 0 * inf).
    """
    smallest_normal = float(np.finfo(np.float32).tiny)
    in_float32 = float(np.float32(initial_accumulator_value) + np.float32(epsilon))
    in_float64 = float(np.float64(initial_accumulator_value) + np.float64(epsilon))
    if not (in_float32 >= smallest_normal and in_float64 >= smallest_normal):
        raise ValueError(
            f"`initial_accumulator_value` + `epsilon` must be positive (every step divides by "
            f"sqrt(G + epsilon), and G starts at `initial_accumulator_value`), got "
            f"initial_accumulator_value={initial_accumulator_value} and epsilon={epsilon} (sum {in_float64}); "
            f"TFRS's defaults are 0.1 and 1e-7."
        )


class ScaledAdagrad(ScaledOptimizer):
    """Adagrad whose update is scaled by `scaling_rule()` per variable; plain Adagrad when the rule is None.

    Every model variable gets a float32 accumulator (float64 for float64 variables) besides `ScaledOptimizer`'s
    scalars (float64 factors for float64 variables, as TFRS's class has them, so that checkpoints of either class
    restore into the other).
    """

    slots_type = core.Slots

    def __init__(
        self,
        learning_rate: Any = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        accumulator_update: str = "standard",
        export_clipping_factors: bool = False,
        clipping_axis: Optional[int] = None,
        exclude_from_clipping: Optional[Sequence[str]] = None,
        fuse_dense_updates: bool = True,
        name: str = "ScaledAdagrad",
        **kwargs,
    ) -> None:
        """Initializes the optimizer.

        Args:
            learning_rate: A number (int, float, NumPy scalar or eager scalar tensor, as Keras 2 accepts) or a
                Keras learning-rate schedule.
            initial_accumulator_value: Starting value of every accumulator (>= 0).
            epsilon: Added to the accumulator inside the square root; 0 (or negative) is allowed as long as
                `initial_accumulator_value + epsilon` is positive.
            accumulator_update: One of `core.ACCUMULATOR_UPDATES`: "standard" (G += g^2, then the step),
                "delayed" (the step, then G += g^2) or "delayed_clipped" (the step, then G += (sigma*g)^2).
            export_clipping_factors: Keep one scalar per variable with the smallest scale of its last step,
                readable as `clipping_factors` and `clipping_factors_by_name()`.
            clipping_axis: None for one scale per tensor; an axis (0: one per embedding row) for one scale per
                slice along it.
            exclude_from_clipping: Regular expressions; a variable whose name (Keras 3: path) matches one gets
                plain Adagrad (scale 1).
            fuse_dense_updates: Compute dense steps with XLA, which fuses them into two passes over memory.
            name: The optimizer's name.
            **kwargs: The Keras optimizer base's keyword arguments (clipnorm, global_clipnorm, weight_decay, ...).

        Raises:
            ValueError: An argument is out of range; the message names it and its value.
        """
        learning_rate = normalize_learning_rate(learning_rate)
        initial_accumulator_value = check_non_negative("initial_accumulator_value", initial_accumulator_value)
        epsilon = float(epsilon)
        if math.isnan(epsilon):
            raise ValueError(f"`epsilon` must be a number, got {epsilon}.")
        check_denominator(initial_accumulator_value, epsilon)
        if accumulator_update not in core.ACCUMULATOR_UPDATES:
            raise ValueError(
                f"`accumulator_update` must be one of {core.ACCUMULATOR_UPDATES}, got {accumulator_update!r}."
            )
        self._init_keras_base(learning_rate, name, kwargs)
        self._init_scaling(export_clipping_factors, clipping_axis, exclude_from_clipping, fuse_dense_updates)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon
        self.accumulator_update = accumulator_update

    def accumulator(self, variable) -> tf.Variable:
        """The Adagrad accumulator G of a model variable this optimizer was built with."""
        return self._slots[self._slot_index(variable)].accumulator

    def _create_tensor_slots(self, variable, dtype: tf.DType) -> dict[str, Any]:
        return {"accumulator": self._create_tensor_slot(variable, "accumulator", dtype, self.initial_accumulator_value)}

    def _apply_step(self, gradient, variable, slots: core.Slots, learning_rate) -> tf.Operation:
        """The sparse path for `IndexedSlices`, the dense path otherwise; `keras.ops` off TensorFlow."""
        sparse = isinstance(gradient, tf.IndexedSlices)
        rule, clipping_axis = self.scaling_for(variable, sparse)
        options = dict(epsilon=self.epsilon, accumulator_update=self.accumulator_update, rule=rule,
                       clipping_axis=clipping_axis)
        if BACKEND != "tensorflow":
            return keras_ops_steps.apply_adagrad(self, variable, gradient, slots, learning_rate, **options)
        if sparse:
            return core.apply_sparse(variable, gradient, slots, learning_rate, **options)
        return core.apply_dense(variable, gradient, slots, learning_rate, fused=self.fuse_dense_updates, **options)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "initial_accumulator_value": self.initial_accumulator_value,
            "epsilon": self.epsilon,
            "accumulator_update": self.accumulator_update,
        })
        return config
