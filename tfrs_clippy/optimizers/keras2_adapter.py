"""The scaled Adagrad optimizer on Keras 2 (`tf_keras.optimizers.Optimizer`, TFRS's runtime)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras

from tfrs_clippy.optimizers.scaled_adagrad import ScaledAdagradMixin


class KerasAdapter(ScaledAdagradMixin, tf_keras.optimizers.Optimizer):
    """Owns slots, learning rate and config on Keras 2; `ScaledAdagradMixin` and `core` do the rest."""

    def _init_keras_base(self, learning_rate: Any, name: str, kwargs: dict) -> None:
        # The Keras 2 base defaults weight_decay to 0, not None, and then decays every variable, whole embedding
        # tables included, by 0 at every step: a full-table read and write that costs ~100x a sparse update.
        kwargs.setdefault("weight_decay", None)
        tf_keras.optimizers.Optimizer.__init__(self, name=name, **kwargs)
        self._learning_rate = self._build_learning_rate(learning_rate)

    def build(self, var_list) -> None:
        # The base rebuilds `_index_dict` from every `apply_gradients` call's variables, so after a call on a subset
        # its positions no longer match the slots: slots are found by variable key instead, and a variable seen
        # for the first time gets its slots then.
        super().build(var_list)
        if not hasattr(self, "_slot_positions"):
            self._slot_positions = {}
        new_variables = [v for v in var_list if self._var_key(v) not in self._slot_positions]
        for variable in new_variables:
            self._slot_positions[self._var_key(variable)] = len(self._slot_positions)
        self._build_slots(new_variables)

    def _create_accumulator(self, variable, dtype: tf.DType):
        initial_value = tf.fill(variable.shape, tf.constant(self.initial_accumulator_value, dtype))
        if getattr(variable, "true_dtype", variable.dtype) == dtype:
            # The base's own path: it also groups the slots of a sharded table into one checkpointed table.
            return self.add_variable_from_reference(variable, "accumulator", initial_value=initial_value)
        # float16/bfloat16 variables keep a float32 accumulator, which the base cannot make.
        with tf.distribute.get_strategy().extended.colocate_vars_with(variable):
            accumulator = tf.Variable(initial_value, name=f"accumulator/{variable._shared_name}", trainable=False)
        self._variables.append(accumulator)
        return accumulator

    def _create_scalar_slot(self, variable, name: str, dtype: tf.DType, value: float):
        # Diagnostics (the last factor, the skip count) are kept out of Keras 2 checkpoints, which store optimizer
        # variables by position in `_variables`: a sharded table has one scalar per shard but, grouped by the base,
        # one accumulator, so with the scalars in the list a checkpoint of a sharded table would not restore into
        # the same table unsharded (ParameterServer -> one device). They do not change the training numbers.
        with tf.distribute.get_strategy().extended.colocate_vars_with(variable):
            return tf.Variable(tf.constant(value, dtype), name=f"{name}/{variable._shared_name}", trainable=False)

    def _deduplicate_sparse_grad(self, grads):
        # `core.apply_sparse` sums repeated ids itself, with static shapes. The base's `tf.unique` gives a dynamic
        # shape that XLA (jit_compile=True) miscompiles here: the accumulator's scatter was silently dropped.
        return grads

    def _slot_index(self, variable) -> int:
        return self._slot_positions[self._var_key(variable)]

    def update_step(self, gradient, variable) -> tf.Operation:
        return self._apply_scaled_adagrad(gradient, variable, self.learning_rate)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["learning_rate"] = self._serialize_hyperparameter(self._learning_rate)
        return config
