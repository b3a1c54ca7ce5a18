"""The layers between the input vector and the towers: DCN-v2 cross network, shared bottom, MMoE and PLE.

Every bottom maps a [batch, width] input to one [batch, units[-1]] output per task (in task order) and a dict of
gate weights, task name -> [batch, number of experts the task's gate mixes]; `gate_expert_names[task]` names those
experts in the same order. The shared bottom has no gates.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy_models.config import RankerConfig

BottomOutput = tuple[list[tf.Tensor], dict[str, tf.Tensor]]


def dense_layers(units: Sequence[int], activation: str, kernel_initializer: str) -> list[keras.layers.Dense]:
    """One Dense layer per width in `units`, each with `activation`."""
    return [keras.layers.Dense(width, activation=activation, kernel_initializer=kernel_initializer) for width in units]


def dense_stack(units: Sequence[int], activation: str, kernel_initializer: str, name: str) -> keras.Sequential:
    """An MLP of `dense_layers` (at least one width: Keras cannot call an empty Sequential)."""
    return keras.Sequential(dense_layers(units, activation, kernel_initializer), name=name)


class CrossNetwork(keras.layers.Layer):
    """DCN-v2 (Wang et al. 2021): x_{l+1} = x0 * (W_l x_l + b_l) + x_l for each `tfrs.layers.dcn.Cross`, then LayerNorm.

    The LayerNorm after the cross layers is the paper's Large+DCN design: the cross terms grow with the square of the
    input, and normalizing them keeps the bottom's input on the scale the rest of the model expects.
    """

    def __init__(self, num_layers: int, projection_dim: int | None, kernel_initializer: str, **kwargs) -> None:
        """Creates `num_layers` full-rank (`projection_dim` None) or rank-`projection_dim` cross layers."""
        super().__init__(**kwargs)
        self.cross_layers = [
            tfrs.layers.dcn.Cross(projection_dim=projection_dim, kernel_initializer=kernel_initializer)
            for _ in range(num_layers)
        ]
        self.layer_norm = keras.layers.LayerNormalization()

    def call(self, x0: tf.Tensor) -> tf.Tensor:
        crossed = x0
        for cross in self.cross_layers:
            crossed = cross(x0, crossed)
        return self.layer_norm(crossed)


class SharedBottom(keras.layers.Layer):
    """One MLP whose output every task's tower reads (hard parameter sharing)."""

    def __init__(
        self, units: Sequence[int], task_names: Sequence[str], activation: str, kernel_initializer: str, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self._num_tasks = len(task_names)
        self.mlp = dense_stack(units, activation, kernel_initializer, name="shared_mlp")
        self.gate_expert_names: dict[str, list[str]] = {}

    def call(self, inputs: tf.Tensor, training: bool = False) -> BottomOutput:
        shared = self.mlp(inputs, training=training)
        return [shared] * self._num_tasks, {}


class MixtureOfExperts(keras.layers.Layer):
    """MMoE and PLE: levels of expert MLPs mixed per task by softmax gates.

    Level l has `num_shared_experts` shared experts and, per task, `num_task_experts` task-specific experts. Task
    t's gate, softmax(Dense(x_t)), mixes t's own experts and the shared ones; below the last level a shared gate
    mixes all the level's experts into the input of the next level's shared experts (PLE, Tang et al. 2020).
    With no task-specific experts and one level this is MMoE (Ma et al. 2018): every gate mixes the same experts.
    """

    def __init__(
        self,
        units: Sequence[int],
        task_names: Sequence[str],
        num_shared_experts: int,
        num_task_experts: int,
        num_levels: int,
        activation: str,
        kernel_initializer: str,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self._task_names = list(task_names)
        self._num_levels = num_levels

        def experts(count: int, prefix: str) -> list[keras.Sequential]:
            return [dense_stack(units, activation, kernel_initializer, name=f"{prefix}{i}") for i in range(count)]

        def gate(num_experts: int, name: str) -> keras.layers.Dense:
            return keras.layers.Dense(
                num_experts, activation="softmax", kernel_initializer=kernel_initializer, name=name
            )

        shared_prefix = "shared" if num_task_experts else "expert"
        self.shared_experts = [experts(num_shared_experts, shared_prefix) for _ in range(num_levels)]
        self.task_experts = [{t: experts(num_task_experts, "specific") for t in task_names} for _ in range(num_levels)]
        self.task_gates = [
            {t: gate(num_task_experts + num_shared_experts, f"gate_{t}") for t in task_names} for _ in range(num_levels)
        ]
        all_experts = num_shared_experts + num_task_experts * len(self._task_names)
        self.shared_gates = [gate(all_experts, "gate_shared") for _ in range(num_levels - 1)]
        self.gate_expert_names = {
            t: [f"specific{i}" for i in range(num_task_experts)]
            + [f"{shared_prefix}{i}" for i in range(num_shared_experts)]
            for t in task_names
        }

    def call(self, inputs: tf.Tensor, training: bool = False) -> BottomOutput:
        task_inputs = {t: inputs for t in self._task_names}
        shared_input = inputs
        for level in range(self._num_levels):
            shared_outputs = [expert(shared_input, training=training) for expert in self.shared_experts[level]]
            specific_outputs = {
                t: [expert(task_inputs[t], training=training) for expert in self.task_experts[level][t]]
                for t in self._task_names
            }
            gate_weights = {t: self.task_gates[level][t](task_inputs[t]) for t in self._task_names}
            task_inputs = {t: _mix(gate_weights[t], specific_outputs[t] + shared_outputs) for t in self._task_names}
            if level < self._num_levels - 1:
                every_output = [o for t in self._task_names for o in specific_outputs[t]] + shared_outputs
                shared_input = _mix(self.shared_gates[level](shared_input), every_output)
        # `gate_weights` is the last level's: how each task's tower input mixes the experts.
        return [task_inputs[t] for t in self._task_names], gate_weights


def _mix(gate_weights: tf.Tensor, expert_outputs: list[tf.Tensor]) -> tf.Tensor:
    """sum_e gate_weights[:, e] * expert_outputs[e]: [batch, experts] x experts * [batch, d] -> [batch, d]."""
    return tf.einsum("be,bed->bd", gate_weights, tf.stack(expert_outputs, axis=1))


def make_bottom(config: RankerConfig, task_names: Sequence[str]) -> SharedBottom | MixtureOfExperts:
    """The bottom `config.bottom` names, with `config`'s scaled widths."""
    units = config.scaled(config.bottom_units)
    common = {"activation": config.activation, "kernel_initializer": config.kernel_initializer}
    if config.bottom == "shared_bottom":
        return SharedBottom(units, task_names, name="shared_bottom", **common)
    if config.bottom == "mmoe":
        return MixtureOfExperts(
            units, task_names, num_shared_experts=config.num_experts, num_task_experts=0, num_levels=1,
            name="mmoe", **common,
        )
    return MixtureOfExperts(
        units,
        task_names,
        num_shared_experts=config.num_experts,
        num_task_experts=config.num_task_experts,
        num_levels=config.num_levels,
        name="ple",
        **common,
    )
