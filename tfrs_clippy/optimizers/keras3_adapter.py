"""The runtime base of every `tfrs_clippy` optimizer on Keras 3 (`keras.optimizers.Optimizer`), on any backend.

On the TensorFlow backend the slots are TensorFlow variables colocated with their model variable (what `core`
writes, under every `tf.distribute` strategy); on JAX and PyTorch they are Keras variables, which the
backend-neutral step (`keras_ops_steps`) writes through `Optimizer.assign`, so that JAX's stateless train step sees
them.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from tfrs_clippy.keras_runtime import BACKEND, check_training_backend
from tfrs_clippy.optimizers.variable_names import variable_name


def _filled(value: float):
    """An initializer exact in any dtype (Keras's Constant rounds through float32 first)."""
    if BACKEND == "tensorflow":
        return lambda shape, dtype=None: tf.fill(shape, tf.constant(value, dtype))
    return lambda shape, dtype=None: keras.ops.full(shape, value, dtype=dtype)


class RuntimeOptimizer(keras.optimizers.Optimizer):
    """Creates slots and owns the learning rate and config on Keras 3; `ScaledOptimizer` and its families do the
    rest, through `_build_slots` (called once with every variable) and `_run_step`."""

    def _init_keras_base(self, learning_rate: Any, name: str, kwargs: dict) -> None:
        check_training_backend(type(self).__name__)
        keras.optimizers.Optimizer.__init__(self, learning_rate=learning_rate, name=name, **kwargs)

    def _build_slots(self, var_list) -> None:
        raise NotImplementedError

    def _run_step(self, gradient, variable, learning_rate) -> tf.Operation:
        raise NotImplementedError

    def build(self, var_list) -> None:
        if self.built:
            return
        super().build(var_list)
        self._build_slots(var_list)

    def _add_colocated(self, variable, name: str, shape, dtype: tf.DType, initializer):
        """Adds an optimizer variable beside `variable`; returns its TensorFlow variable (which `core` writes) on
        the TensorFlow backend, the Keras variable on the others."""
        prefix = variable_name(variable).replace("/", "_").replace(":", "_")
        if BACKEND != "tensorflow":
            return self.add_variable(shape=shape, initializer=initializer, dtype=tf.as_dtype(dtype).name,
                                     name=f"{prefix}_{name}")
        reference = variable.value if isinstance(variable, keras.Variable) else variable
        with self._distribution_strategy.extended.colocate_vars_with(reference):
            slot = self.add_variable(shape=shape, initializer=initializer, dtype=dtype, name=f"{prefix}_{name}")
        return slot.value

    def _create_tensor_slot(self, variable, name: str, dtype: tf.DType, value: float):
        """A slot of `variable`'s shape filled with `value`."""
        return self._add_colocated(variable, name, variable.shape, dtype, _filled(value))

    def _create_scalar_slot(self, variable, name: str, dtype: tf.DType, value: float):
        return self._add_colocated(variable, name, (), dtype, _filled(value))

    def _slot_index(self, variable) -> int:
        return self._get_variable_index(variable)

    def update_step(self, gradient, variable, learning_rate) -> tf.Operation:
        return self._run_step(gradient, variable, learning_rate)
