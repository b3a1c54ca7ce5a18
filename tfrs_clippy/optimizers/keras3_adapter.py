"""The scaled Adagrad optimizer on Keras 3 (`keras.optimizers.Optimizer`, TensorFlow backend)."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tfrs_clippy.optimizers.scaled_adagrad import ScaledAdagradMixin


def _filled(value: float):
    """An initializer exact in any dtype (Keras's Constant rounds through float32 first)."""
    return lambda shape, dtype=None: tf.fill(shape, tf.constant(value, dtype))


class KerasAdapter(ScaledAdagradMixin, keras.optimizers.Optimizer):
    """Owns slots, learning rate and config on Keras 3; `ScaledAdagradMixin` and `core` do the rest."""

    def _init_keras_base(self, learning_rate: Any, name: str, kwargs: dict) -> None:
        keras.optimizers.Optimizer.__init__(self, learning_rate=learning_rate, name=name, **kwargs)

    def build(self, var_list) -> None:
        if self.built:
            return
        super().build(var_list)
        self._build_slots(var_list)

    def _add_colocated(self, variable, name: str, shape, dtype: tf.DType, initializer) -> tf.Variable:
        """Adds an optimizer variable beside `variable` and returns its TensorFlow variable (which `core` writes)."""
        reference = variable.value if isinstance(variable, keras.Variable) else variable
        prefix = self._variable_name(variable).replace("/", "_").replace(":", "_")
        with self._distribution_strategy.extended.colocate_vars_with(reference):
            slot = self.add_variable(shape=shape, initializer=initializer, dtype=dtype, name=f"{prefix}_{name}")
        return slot.value

    def _create_accumulator(self, variable, dtype: tf.DType):
        return self._add_colocated(variable, "accumulator", variable.shape, dtype,
                                   _filled(self.initial_accumulator_value))

    def _create_scalar_slot(self, variable, name: str, dtype: tf.DType, value: float):
        return self._add_colocated(variable, name, (), dtype, _filled(value))

    def _slot_index(self, variable) -> int:
        return self._get_variable_index(variable)

    def update_step(self, gradient, variable, learning_rate) -> tf.Operation:
        return self._apply_scaled_adagrad(gradient, variable, learning_rate)
