"""The runtime base of every `tfrs_clippy` optimizer on Keras 2 (`tf_keras.optimizers.Optimizer`, TFRS's runtime)."""

from __future__ import annotations

from typing import Any

import tensorflow as tf
import tf_keras


class RuntimeOptimizer(tf_keras.optimizers.Optimizer):
    """Creates slots and owns the learning rate and config on Keras 2; `ScaledOptimizer` and its families do the
    rest, through `_build_slots` (called with every variable seen for the first time) and `_run_step`."""

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

    def _build_slots(self, var_list) -> None:
        raise NotImplementedError

    def _run_step(self, gradient, variable, learning_rate) -> tf.Operation:
        raise NotImplementedError

    def _create_tensor_slot(self, variable, name: str, dtype: tf.DType, value: float):
        """A slot of `variable`'s shape filled with `value`, checkpointed in creation order (as Keras's own)."""
        initial_value = tf.fill(variable.shape, tf.constant(value, dtype))
        if getattr(variable, "true_dtype", variable.dtype) == dtype:
            # The base's own path: it also groups the slots of a sharded table into one checkpointed table.
            return self.add_variable_from_reference(variable, name, initial_value=initial_value)
        # float16/bfloat16 variables keep float32 slots, which the base cannot make.
        with tf.distribute.get_strategy().extended.colocate_vars_with(variable):
            slot = tf.Variable(initial_value, name=f"{name}/{variable._shared_name}", trainable=False)
        self._variables.append(slot)
        return slot

    def _create_scalar_slot(self, variable, name: str, dtype: tf.DType, value: float):
        with tf.distribute.get_strategy().extended.colocate_vars_with(variable):
            slot = tf.Variable(tf.constant(value, dtype), name=f"{name}/{variable._shared_name}", trainable=False)
        if name == "clipping_factor":
            self._checkpoint_clipping_factor(variable, slot)
        # The skip count stays out of checkpoints: TFRS has none, and Keras 2 checkpoints optimizer variables by
        # position in `_variables`, so one more variable per model variable would shift TFRS's layout.
        return slot

    def _checkpoint_clipping_factor(self, variable, slot: tf.Variable) -> None:
        """Puts a clipping factor in `_variables` where TFRS's class puts it: right after the accumulator.

        Keras 2 checkpoints `_variables` by position, and TFRS's class builds, per variable, the accumulator and
        then (with `export_clipping_factors=True`) the factor. Without the same layout, a checkpoint of one class
        restores into the other with a factor in an accumulator's position and the later accumulators silently
        left at their initial value. The base groups a sharded table's accumulators into one checkpointed table,
        appended with its last shard; its factors become one scalar there too, the minimum over the shards (the
        table's factor), so a ParameterServer checkpoint still restores into the table unsharded, and back.
        """
        container = getattr(variable, "_sharded_container", None)
        if container is None:
            self._variables.append(slot)
            return
        table = container()
        if not hasattr(self, "_table_factors"):
            self._table_factors = self._no_dependency({})  # tracked through `_variables` only
        shards = self._table_factors.setdefault(table._unique_id, [None] * len(table.variables))
        shards[[shard is variable for shard in table.variables].index(True)] = slot
        if all(shard is not None for shard in shards):
            first_shard = table.variables[0]
            table_name = first_shard._shared_name.rsplit("/part_", 1)[0]  # the shards' "<name>/part_<i>"
            with tf.distribute.get_strategy().extended.colocate_vars_with(first_shard):
                table_factor = tf.Variable(
                    tf.constant(1.0, slot.dtype), name=f"clipping_factor/{table_name}", trainable=False
                )
            self._variables.append(table_factor)
            self._table_factors[table._unique_id] = (table_factor, list(shards))

    def _update_table_factor(self, variable, step: tf.Operation) -> tf.Operation:
        """After a shard's step, its table's checkpointed factor: the minimum of the shards' last factors."""
        container = getattr(variable, "_sharded_container", None)
        entry = getattr(self, "_table_factors", {}).get(container()._unique_id) if container else None
        if not isinstance(entry, tuple):
            return step
        table_factor, shards = entry
        with tf.control_dependencies([step]):
            smallest = tf.reduce_min(tf.stack([tf.convert_to_tensor(shard) for shard in shards]))
            return table_factor.assign(smallest, read_value=False)

    def _deduplicate_sparse_grad(self, grads):
        # `core.deduplicate` sums repeated ids, with static shapes. The base's `tf.unique` gives a dynamic
        # shape that XLA (jit_compile=True) miscompiles here: the accumulator's scatter was silently dropped.
        return grads

    def _slot_index(self, variable) -> int:
        return self._slot_positions[self._var_key(variable)]

    def update_step(self, gradient, variable) -> tf.Operation:
        step = self._run_step(gradient, variable, self.learning_rate)
        if self.export_clipping_factors:
            step = self._update_table_factor(variable, step)
        return step

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["learning_rate"] = self._serialize_hyperparameter(self._learning_rate)
        return config
