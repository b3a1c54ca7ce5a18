"""The multitask ranker: input vector -> [cross network] -> bottom -> one tower per task, as a `tfrs.Model`.

Training inputs are `(features, labels)` or `(features, labels, sample_weight)`:
- `labels` maps each task's `TaskSpec.label_key` to a float32 [batch] (or [batch, 1]) tensor;
- a label that is NaN means "this example has no label for this task", and so does a 0 in the optional
  `labels["<label_key>_mask"]` tensor: such an example gets weight 0 in the task's loss and metrics;
- `sample_weight` is a [batch] tensor for all tasks, or a dict task name -> [batch] tensor (tasks it does not
  name get weight 1).

Task t's loss is sum_i(w_i * loss_i) / (number of examples labeled for t in the batch), w_i being the sample
weight (0 if unlabeled): a masked example changes neither the numerator nor the denominator, while sample weights
scale examples as Keras's do. The total loss is sum_t(task_weight_t * loss_t), divided by the number of replicas
in sync because the gradients of the replicas are summed (as `tfrs.experimental.models.Ranking` does).

`fit` logs, per task: `<task>_loss` (the task's loss averaged over its labeled examples), `<task>_auc` (binary)
or `<task>_rmse` (regression); and for MMoE/PLE `gate_<task>_<expert>`, the mean weight the task's gate gives
the expert (for PLE, that of the last level: the mixture its tower reads).

With `RankerConfig.multitask_balancing` set, `train_step` delegates to a `tfrs_clippy.multitask.MultitaskBalancer`
(PUB, Nash-MTL or uncertainty weighting), which also logs `weight_<task>` and `cosine_<task>_<task>`. Its shared
variables (`shared_trainable_variables`) are those every task's loss reaches: the embedding tables, the cross
network, and the bottom's shared part (the shared-bottom MLP; MMoE's experts; PLE's shared experts and the shared
gates between levels). Task towers, task gates and PLE's task-specific experts are task-specific.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import tensorflow as tf
import tensorflow_recommenders as tfrs

from tfrs_clippy.data.spec import DatasetSpec, TaskSpec
from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.multitask import MultitaskBalancer
from tfrs_clippy_models.bottoms import CrossNetwork, MixtureOfExperts, SharedBottom, dense_layers, make_bottom
from tfrs_clippy_models.config import OUTPUT_BIASES, RankerConfig
from tfrs_clippy_models.embedding import FeatureEmbedding, feature_signature, placeholder_features

Labels = Mapping[str, tf.Tensor]
SampleWeight = tf.Tensor | Mapping[str, tf.Tensor] | None


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """Numbers of trainable parameters: in embedding tables, and everywhere else."""

    embedding: int
    non_embedding: int

    @property
    def total(self) -> int:
        return self.embedding + self.non_embedding


@keras.utils.register_keras_serializable(package="tfrs_clippy")
class Ranker(tfrs.models.Model):
    """A multitask ranker built from a `DatasetSpec` and a `RankerConfig` (see the module docstring)."""

    def __init__(self, spec: DatasetSpec, config: RankerConfig, **kwargs) -> None:
        """Creates the layers; `build_ranker` also builds the variables.

        Raises:
            ValueError: the spec has no features, or `config.task_weights` names a task the spec lacks.
        """
        super().__init__(**kwargs)
        if not spec.features:
            raise ValueError("Ranker: the DatasetSpec has no features; a ranker needs at least one.")
        unknown_tasks = sorted(set(config.task_weights) - {task.name for task in spec.tasks})
        if unknown_tasks:
            raise ValueError(
                f"RankerConfig: `task_weights` names tasks {unknown_tasks} that the spec lacks; "
                f"its tasks are {[task.name for task in spec.tasks]}."
            )
        self.dataset_spec = spec
        self.ranker_config = config
        task_names = [task.name for task in spec.tasks]
        self.embedding = FeatureEmbedding(spec, config.multi_hot_combiner, name="embedding")
        self.cross_network = (
            CrossNetwork(config.cross_layers, config.cross_projection_dim, config.kernel_initializer, name="cross")
            if config.cross_layers
            else None
        )
        self.bottom = make_bottom(config, task_names)
        tower_units = config.scaled(config.tower_units)
        self.towers = {
            task.name: keras.Sequential(
                dense_layers(tower_units, config.activation, config.kernel_initializer)
                + [
                    keras.layers.Dense(
                        1,
                        kernel_initializer=config.kernel_initializer,
                        bias_initializer=keras.initializers.Constant(output_bias(task, config.output_bias)),
                        name=f"{task.name}_logit",
                    )
                ],
                name=f"tower_{task.name}",
            )
            for task in spec.tasks
        }
        self.ranking_tasks = {task.name: _ranking_task(task) for task in spec.tasks}
        self.task_loss_metrics = {name: keras.metrics.Mean(name=f"{name}_loss") for name in task_names}
        self.gate_metrics = {
            task: [keras.metrics.Mean(name=f"gate_{task}_{expert}") for expert in experts]
            for task, experts in self.bottom.gate_expert_names.items()
        }
        self.balancer = (
            MultitaskBalancer(task_names, config.multitask_balancing, name="balancer")
            if config.multitask_balancing is not None
            else None
        )

    def task_weight(self, task: TaskSpec) -> float:
        """The weight of `task`'s loss: `config.task_weights[task.name]` if given, else `task.weight`."""
        return float(self.ranker_config.task_weights.get(task.name, task.weight))

    def logits_and_gates(
        self, features: Mapping[str, tf.Tensor], training: bool = False
    ) -> tuple[dict[str, tf.Tensor], dict[str, tf.Tensor]]:
        """Per task the [batch] logit (binary) or value (regression), and the bottom's gate weights."""
        inputs = self.embedding(features)
        crossed = self.cross_network(inputs) if self.cross_network is not None else None
        if crossed is not None and self.ranker_config.cross_placement == "stacked":
            inputs = crossed
        task_inputs, gates = self.bottom(inputs, training=training)
        if crossed is not None and self.ranker_config.cross_placement == "parallel":
            task_inputs = [tf.concat([task_input, crossed], axis=1) for task_input in task_inputs]
        outputs = {
            task.name: tf.squeeze(self.towers[task.name](task_input, training=training), axis=1)
            for task, task_input in zip(self.dataset_spec.tasks, task_inputs)
        }
        return outputs, gates

    def call(self, features: Mapping[str, tf.Tensor], training: bool = False) -> dict[str, tf.Tensor]:
        """Per task a [batch] prediction: the probability for binary tasks, the value for regression tasks."""
        outputs, _ = self.logits_and_gates(features, training=training)
        return {
            task.name: tf.sigmoid(outputs[task.name]) if task.kind == "binary" else outputs[task.name]
            for task in self.dataset_spec.tasks
        }

    def compute_loss(self, inputs: tuple, training: bool = False) -> tf.Tensor:
        """The weighted sum of the task losses, divided by the replicas in sync; updates every metric.

        Raises:
            ValueError: `inputs` is not (features, labels[, sample_weight]), or a task's label is missing.
        """
        total_loss = tf.add_n(list(self.task_losses(inputs, training=training).values()))
        return total_loss / tf.distribute.get_strategy().num_replicas_in_sync

    def task_losses(self, inputs: tuple, training: bool = False) -> dict[str, tf.Tensor]:
        """Per task, in spec order, task_weight * the task's loss; updates every metric.

        Raises:
            ValueError: `inputs` is not (features, labels[, sample_weight]), or a task's label is missing.
        """
        if not isinstance(inputs, (tuple, list)) or len(inputs) not in (2, 3):
            raise ValueError(
                "Ranker.compute_loss: inputs must be (features, labels) or (features, labels, sample_weight), "
                f"got a {type(inputs).__name__} of {len(inputs)} items."
            )
        features, labels = inputs[0], inputs[1]
        sample_weight = inputs[2] if len(inputs) == 3 else None
        outputs, gates = self.logits_and_gates(features, training=training)
        task_losses = {}
        for task in self.dataset_spec.tasks:
            label, weight, num_labeled = self._label_and_weight(task, labels, sample_weight)
            # Reduction NONE: the task returns weight_i * loss_i per example; we reduce it ourselves.
            weighted_losses = self.ranking_tasks[task.name](
                label[:, tf.newaxis], outputs[task.name][:, tf.newaxis], sample_weight=weight
            )
            loss_sum = tf.reduce_sum(weighted_losses)
            # Weighting each batch's mean by its labeled count makes the logged value the mean over labeled examples.
            self.task_loss_metrics[task.name].update_state(
                tf.math.divide_no_nan(loss_sum, num_labeled), sample_weight=num_labeled
            )
            # Under a strategy each replica's share is divided by the labeled count of the *global* batch (times
            # the replica count, which the caller divides by): with masks the replicas' counts differ, and the
            # mean of their means would not be the mean over every labeled example.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            global_labeled = _sum_over_replicas(num_labeled)
            task_loss = tf.math.divide_no_nan(loss_sum * replicas, global_labeled)
            task_losses[task.name] = self.task_weight(task) * task_loss
        for task, weights in gates.items():
            for expert, metric in enumerate(self.gate_metrics[task]):
                metric.update_state(weights[:, expert])
        return task_losses

    def train_step(self, inputs: tuple) -> dict[str, tf.Tensor]:
        """TFRS's step on the summed loss; with `multitask_balancing`, the balancer's step (module docstring)."""
        if self.balancer is None:
            return super().train_step(inputs)
        logs = self.balancer.minimize(
            self.optimizer,
            lambda: list(self.task_losses(inputs, training=True).values()),
            shared_variables=self.shared_trainable_variables,
            specific_variables=self.task_specific_trainable_variables,
        )
        return {**{metric.name: metric.result() for metric in self.metrics}, **logs}

    def _label_and_weight(
        self, task: TaskSpec, labels: Labels, sample_weight: SampleWeight
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """The task's [batch] label (0 where unlabeled), [batch] weight (0 where unlabeled) and labeled count."""
        if task.label_key not in labels:
            raise ValueError(
                f"Ranker: task {task.name!r} needs the label {task.label_key!r}, but the labels have only "
                f"{sorted(labels)}."
            )
        label = tf.reshape(tf.cast(labels[task.label_key], tf.float32), [-1])
        labeled = tf.logical_not(tf.math.is_nan(label))
        mask_key = f"{task.label_key}_mask"
        if mask_key in labels:
            labeled &= tf.reshape(labels[mask_key], [-1]) > 0
        labeled = tf.cast(labeled, tf.float32)
        if isinstance(sample_weight, Mapping):
            sample_weight = sample_weight.get(task.name)
        weight = labeled
        if sample_weight is not None:
            weight *= tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
        # Zeroing the NaN labels matters: weight 0 times a NaN loss would still be NaN.
        return tf.where(labeled > 0, label, tf.zeros_like(label)), weight, tf.reduce_sum(labeled)

    @property
    def embedding_trainable_variables(self) -> list[tf.Variable]:
        """The embedding tables (e.g. for `tfrs.experimental.optimizers.CompositeOptimizer`)."""
        return list(self.embedding.trainable_variables)

    @property
    def dense_trainable_variables(self) -> list[tf.Variable]:
        """Every trainable variable that is not an embedding table."""
        embedding_ids = {id(variable) for variable in self.embedding.trainable_variables}
        return [variable for variable in self.trainable_variables if id(variable) not in embedding_ids]

    @property
    def shared_trainable_variables(self) -> list[tf.Variable]:
        """The variables every task's loss reaches (module docstring): what multitask balancing balances."""
        shared_layers = [self.embedding]
        if self.cross_network is not None:
            shared_layers.append(self.cross_network)
        if isinstance(self.bottom, SharedBottom):
            shared_layers.append(self.bottom.mlp)
        elif isinstance(self.bottom, MixtureOfExperts):
            shared_layers += [expert for level in self.bottom.shared_experts for expert in level]
            shared_layers += self.bottom.shared_gates
        return [variable for layer in shared_layers for variable in layer.trainable_variables]

    @property
    def task_specific_trainable_variables(self) -> list[tf.Variable]:
        """Every trainable variable not in `shared_trainable_variables`."""
        shared_ids = {id(variable) for variable in self.shared_trainable_variables}
        return [variable for variable in self.trainable_variables if id(variable) not in shared_ids]

    def parameter_counts(self) -> ParameterCounts:
        """Trainable parameters in the embedding tables and elsewhere (the model must be built)."""

        def count(variables: list[tf.Variable]) -> int:
            return int(sum(variable.shape.num_elements() for variable in variables))

        return ParameterCounts(count(self.embedding_trainable_variables), count(self.dense_trainable_variables))

    def serving_function(self) -> tf.types.experimental.ConcreteFunction:
        """raw features (TensorSpecs of `feature_signature`) -> {task: [batch] prediction}, as `call` computes."""
        serve = tf.function(
            lambda features: self(features, training=False), input_signature=[feature_signature(self.dataset_spec)]
        )
        return serve.get_concrete_function()

    def export(self, path: str) -> None:
        """Writes a SavedModel at `path` whose `serving_default` signature is `serving_function()`.

        Reload with `tf.saved_model.load(path).signatures["serving_default"](**features)`.
        """
        tf.saved_model.save(self, path, signatures={"serving_default": self.serving_function()})

    def get_config(self) -> dict[str, Any]:
        return {"spec": self.dataset_spec.to_dict(), "config": self.ranker_config.to_dict()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any], custom_objects: Any = None) -> "Ranker":
        """A new ranker of the same spec and config, with its variables built (and freshly initialized)."""
        return build_ranker(DatasetSpec.from_dict(config["spec"]), RankerConfig.from_dict(config["config"]))


def output_bias(task: TaskSpec, mode: str = "label_prior") -> float:
    """The initial bias of `task`'s logit layer under `RankerConfig.output_bias` `mode` (see RankerConfig).

    Args:
        task: The task; its `label_mean` is the training prior.
        mode: "label_prior": log(p / (1 - p)) for a binary task of `label_mean` p, `label_mean` for a regression
            task, 0 without a `label_mean`. "zero": 0.

    Returns:
        The bias: the logit for a binary task, the value for a regression task.

    Raises:
        ValueError: `mode` is not one of `models.config.OUTPUT_BIASES`.
    """
    if mode not in OUTPUT_BIASES:
        raise ValueError(f"output_bias: `mode` must be one of {OUTPUT_BIASES}, got {mode!r}.")
    if mode == "zero" or task.label_mean is None:
        return 0.0
    if task.kind == "binary":
        # TaskSpec guarantees 0 < p < 1, so the log-odds is finite.
        return math.log(task.label_mean / (1.0 - task.label_mean))
    return task.label_mean


def _ranking_task(task: TaskSpec) -> tfrs.tasks.Ranking:
    """Sigmoid cross-entropy and AUC on logits for a binary task; MSE and RMSE for a regression task."""
    reduction = keras.losses.Reduction.NONE
    if task.kind == "binary":
        return tfrs.tasks.Ranking(
            loss=keras.losses.BinaryCrossentropy(from_logits=True, reduction=reduction),
            metrics=[keras.metrics.AUC(from_logits=True, name=f"{task.name}_auc")],
            name=f"task_{task.name}",
        )
    return tfrs.tasks.Ranking(
        loss=keras.losses.MeanSquaredError(reduction=reduction),
        metrics=[keras.metrics.RootMeanSquaredError(name=f"{task.name}_rmse")],
        name=f"task_{task.name}",
    )


def build_ranker(spec: DatasetSpec, config: RankerConfig | str | Mapping[str, Any] = "small") -> Ranker:
    """A built `Ranker` for `spec`.

    Args:
        spec: The features and tasks.
        config: A `RankerConfig`, a preset name ("small", "large", "large_dcn"), or a `RankerConfig.from_dict`
            mapping (which may name a "preset" to start from).

    Returns:
        The ranker, its variables created by one forward pass on a placeholder batch.
    """
    if isinstance(config, str):
        config = RankerConfig.preset(config)
    elif not isinstance(config, RankerConfig):
        config = RankerConfig.from_dict(config)
    model = Ranker(spec, config)
    model(placeholder_features(spec))
    return model


def _sum_over_replicas(value: tf.Tensor) -> tf.Tensor:
    """`value` summed over the replicas in sync (itself with one replica, or outside a replica context)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)
