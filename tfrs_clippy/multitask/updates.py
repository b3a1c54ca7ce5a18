"""Per-task candidate updates from one shared optimizer state, and writing the balanced update (PUB's core).

With K tasks and a shared variable w, task i's gradient g_i would move w by d_i = step(state, g_i), computed from
the optimizer state every task shares; PUB moves w by sum_i alpha_i d_i and then advances the state with
sum_i alpha_i g_i, as if the optimizer had seen that gradient. An `UpdateRule` computes the d_i of one base
optimizer and commits the balanced move:

- `AdamRule`: Keras's Adam (either runtime), read from its own slots. For Adam sum_i d_i != step(sum_i g_i), so
  PUB with alpha = 1 is not Adam on the summed loss.
- `AdagradRule`: any optimizer of `tfrs_clippy.optimizers` (`Adagrad`, `ClippyAdagrad`, the GC,
  AGC and LAMB baselines), through `core.scaled_adagrad_step`: for ClippyAdagrad each d_i is a Clippy-clipped
  Adagrad update. With the delayed accumulator and no scaling rule d is linear in g, and alpha = 1 is exactly
  Adagrad on the summed loss.

Sparse gradients (`tf.IndexedSlices`, e.g. of embedding tables) stay sparse: the tasks' touched rows are merged
into one static-shaped set of rows (`TaskGradients`), the d_i are computed on those rows only, and only those rows
of the variable and of its optimizer state are written. For Adam this makes the embedding update lazy (rows no
batch touches keep their moments, as TF1's LazyAdam), whereas Keras's Adam decays every row's moments at every
step, a full-table read and write.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Optional, Sequence

import tensorflow as tf

from tfrs_clippy.keras_runtime import LEGACY_KERAS, keras
from tfrs_clippy.optimizers import core
from tfrs_clippy.optimizers.scaled_adagrad import ScaledAdagrad

Gradient = tf.Tensor | tf.IndexedSlices | None

UNSUPPORTED_OPTIMIZER_OPTIONS = ("clipnorm", "clipvalue", "global_clipnorm", "weight_decay", "use_ema", "amsgrad")
"""Optimizer options the balanced update does not reproduce; PUB refuses an optimizer that sets one."""


def tf_variable(variable: Any) -> tf.Variable:
    """The TensorFlow variable behind a model variable (Keras 3 wraps it; Keras 2 variables are TF's own)."""
    if not LEGACY_KERAS and isinstance(variable, keras.Variable):
        return variable.value
    return variable


@dataclasses.dataclass(frozen=True)
class TaskGradients:
    """The K tasks' gradients of one variable, stacked on a leading task axis.

    Attributes:
        values: [K, *variable shape] for a dense gradient; [K, R, *row shape] for a sparse one, on `rows`.
        rows: None (dense), or the [R] int64 row ids of the union of the rows the tasks touch, each once; rows
            beyond the union's size, if any, are padding (id 0, all-zero values).
        valid: None (dense), or the [R] float32 mask of the real (1) and padding (0) rows.
    """

    values: tf.Tensor
    rows: Optional[tf.Tensor] = None
    valid: Optional[tf.Tensor] = None

    @property
    def sparse(self) -> bool:
        return self.rows is not None

    def mask(self, values: tf.Tensor) -> tf.Tensor:
        """`values` (rows first) with padding rows zeroed: what may be added to a variable or a slot."""
        if self.valid is None:
            return values
        return values * tf.reshape(self.valid, [-1] + [1] * (values.shape.rank - 1))

    def combine(self, weights: tf.Tensor) -> tf.Tensor:
        """sum_i weights_i * values_i: [*variable shape], or [R, *row shape] on `rows`."""
        return tf.tensordot(weights, self.values, axes=1)


def stack_task_gradients(grads: Sequence[Gradient], variable: Any) -> TaskGradients:
    """Stacks K tasks' gradients of `variable` (None: the task does not reach it, a zero gradient).

    All-`IndexedSlices` gradients stay sparse (see `TaskGradients`); any dense one makes the stack dense.
    """
    present = [grad for grad in grads if grad is not None]
    if not all(isinstance(grad, tf.IndexedSlices) for grad in present):
        dense = [tf.zeros(variable.shape, tf.float32) if grad is None else tf.cast(grad, tf.float32) for grad in grads]
        return TaskGradients(tf.stack(dense))
    # Task i's values sit in its own block of the concatenated rows, zeros in the other tasks' blocks; summing the
    # repeated ids then leaves, in every task, one row per touched id, at the same position in every task.
    indices = tf.concat([tf.cast(grad.indices, tf.int64) for grad in present], axis=0)
    blocks = []
    for grad in grads:
        blocks.append(
            tf.concat(
                [
                    tf.cast(other.values, tf.float32) if other is grad else tf.zeros_like(other.values, tf.float32)
                    for other in present
                ],
                axis=0,
            )
        )
    unique = core.deduplicate(tf.IndexedSlices(tf.stack(blocks, axis=1), indices, present[0].dense_shape))
    # `deduplicate` may pad its result to the input's static row count (under XLA): mark the real rows. Ids are
    # non-negative, so a leading -1 counts the first id as new, also for an empty gradient.
    sorted_indices = tf.sort(indices)
    previous = tf.concat([tf.constant([-1], tf.int64), sorted_indices[:-1]], axis=0)
    num_unique = tf.reduce_sum(tf.cast(sorted_indices != previous, tf.int32))
    valid = tf.cast(tf.range(tf.shape(unique.indices)[0]) < num_unique, tf.float32)
    return TaskGradients(tf.transpose(unique.values, [1, 0] + list(range(2, unique.values.shape.rank))),
                         unique.indices, valid)


def _read(state: Any, task_gradients: TaskGradients) -> tf.Tensor:
    """The whole state tensor (dense), or its rows on `task_gradients.rows` (sparse), as float32."""
    state = tf_variable(state)
    if task_gradients.sparse:
        return tf.cast(tf.gather(state, task_gradients.rows), tf.float32)
    return tf.cast(tf.convert_to_tensor(state), tf.float32)


def _add(state: Any, task_gradients: TaskGradients, increment: tf.Tensor) -> tf.Operation:
    """state += increment, on the touched rows only for a sparse gradient (padding rows add nothing)."""
    state = tf_variable(state)
    increment = tf.cast(task_gradients.mask(increment), state.dtype)
    if task_gradients.sparse:
        return state.scatter_add(tf.IndexedSlices(increment, task_gradients.rows))
    return state.assign_add(increment)


def current_learning_rate(optimizer: Any) -> tf.Tensor:
    """The learning rate of the step about to run, also for a schedule (Keras 2 caches it only in its own step)."""
    schedule = getattr(optimizer, "_learning_rate", None)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return tf.cast(schedule(optimizer.iterations), tf.float32)
    return tf.cast(optimizer.learning_rate, tf.float32)


class UpdateRule(abc.ABC):
    """A base optimizer's candidate updates d_i, and the commit of a balanced move; see the module docstring."""

    def __init__(self, optimizer: Any) -> None:
        for option in UNSUPPORTED_OPTIMIZER_OPTIONS:
            if getattr(optimizer, option, None):
                raise ValueError(
                    f"Parameter update balancing does not support the optimizer option `{option}`="
                    f"{getattr(optimizer, option)!r} of {type(optimizer).__name__}; unset it."
                )
        self.optimizer = optimizer

    @abc.abstractmethod
    def candidates(self, variable: Any, task_gradients: TaskGradients) -> tf.Tensor:
        """The K candidate updates (to subtract), stacked like `task_gradients.values`, padding rows zero."""

    @abc.abstractmethod
    def commit(self, variable: Any, task_gradients: TaskGradients, delta: tf.Tensor, grad: tf.Tensor) -> tf.Operation:
        """variable -= delta, and advances the variable's optimizer state as one step on the gradient `grad`."""

    @staticmethod
    def _move(variable: Any, task_gradients: TaskGradients, delta: tf.Tensor) -> tf.Operation:
        return _add(variable, task_gradients, -delta)


class AdamRule(UpdateRule):
    """Keras's Adam: d_i = lr * sqrt(1 - b2^t) / (1 - b1^t) * m_i / (sqrt(v_i) + epsilon), t = iterations + 1,
    with m_i = b1 m + (1 - b1) g_i and v_i = b2 v + (1 - b2) g_i^2 (Keras's epsilon, added to sqrt(v))."""

    def _slots(self, variable: Any) -> tuple[Any, Any]:
        optimizer = self.optimizer
        if LEGACY_KERAS:
            index = optimizer._index_dict[optimizer._var_key(variable)]
        else:
            index = optimizer._get_variable_index(variable)
        return optimizer._momentums[index], optimizer._velocities[index]

    def _step_size(self) -> tuple[tf.Tensor, tf.Tensor]:
        """lr * sqrt(1 - b2^t) / (1 - b1^t), and epsilon (Keras 2's `adaptive_epsilon` scales it)."""
        optimizer = self.optimizer
        step = tf.cast(optimizer.iterations + 1, tf.float32)
        beta_1_power = tf.pow(tf.cast(optimizer.beta_1, tf.float32), step)
        beta_2_power = tf.pow(tf.cast(optimizer.beta_2, tf.float32), step)
        step_size = current_learning_rate(optimizer) * tf.sqrt(1.0 - beta_2_power) / (1.0 - beta_1_power)
        epsilon = tf.cast(optimizer.epsilon, tf.float32)
        if getattr(optimizer, "adaptive_epsilon", False):
            epsilon *= tf.sqrt(1.0 - beta_2_power)
        return step_size, epsilon

    def _moments(self, variable: Any, task_gradients: TaskGradients, grads: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The moments after one step on `grads` (which may carry a leading task axis)."""
        momentum, velocity = (_read(slot, task_gradients) for slot in self._slots(variable))
        beta_1, beta_2 = float(self.optimizer.beta_1), float(self.optimizer.beta_2)
        return momentum + (grads - momentum) * (1.0 - beta_1), velocity + (tf.square(grads) - velocity) * (1.0 - beta_2)

    def candidates(self, variable: Any, task_gradients: TaskGradients) -> tf.Tensor:
        step_size, epsilon = self._step_size()
        momentum, velocity = self._moments(variable, task_gradients, task_gradients.values)
        # Padding rows have a zero gradient but not zero moments: they must not count in D.
        candidates = step_size * momentum / (tf.sqrt(velocity) + epsilon)
        return tf.stack([task_gradients.mask(candidate) for candidate in tf.unstack(candidates)])

    def commit(self, variable: Any, task_gradients: TaskGradients, delta: tf.Tensor, grad: tf.Tensor) -> tf.Operation:
        momentum_slot, velocity_slot = self._slots(variable)
        new_momentum, new_velocity = self._moments(variable, task_gradients, grad)
        return tf.group(
            _add(momentum_slot, task_gradients, new_momentum - _read(momentum_slot, task_gradients)),
            _add(velocity_slot, task_gradients, new_velocity - _read(velocity_slot, task_gradients)),
            self._move(variable, task_gradients, delta),
        )


class AdagradRule(UpdateRule):
    """The scaled Adagrad of `tfrs_clippy.optimizers` (plain, Clippy, GC, AGC, LAMB): d_i from `core`."""

    def _step(self, variable: Any, task_gradients: TaskGradients, grad: tf.Tensor) -> core.StepResult:
        optimizer = self.optimizer
        rule, clipping_axis = optimizer.scaling_for(variable, task_gradients.sparse)
        return core.scaled_adagrad_step(
            grad,
            _read(variable, task_gradients),
            _read(optimizer.accumulator(variable), task_gradients),
            current_learning_rate(optimizer),
            epsilon=optimizer.epsilon,
            accumulator_update=optimizer.accumulator_update,
            rule=rule,
            clipping_axis=clipping_axis,
        )

    def candidates(self, variable: Any, task_gradients: TaskGradients) -> tf.Tensor:
        # One call per task: a scaling rule reduces over the whole tensor, which must not mix tasks.
        grads = tf.unstack(task_gradients.values)
        return tf.stack([self._step(variable, task_gradients, grad).delta for grad in grads])

    def commit(self, variable: Any, task_gradients: TaskGradients, delta: tf.Tensor, grad: tf.Tensor) -> tf.Operation:
        increment = self._step(variable, task_gradients, grad).accumulator_increment
        return tf.group(
            _add(self.optimizer.accumulator(variable), task_gradients, increment),
            self._move(variable, task_gradients, delta),
        )


def update_rule_for(optimizer: Any) -> UpdateRule:
    """The `UpdateRule` of `optimizer`: Keras's Adam, or an optimizer of `tfrs_clippy.optimizers`.

    Raises:
        ValueError: the optimizer is of another class, or sets an option in `UNSUPPORTED_OPTIMIZER_OPTIONS`.
    """
    if isinstance(optimizer, ScaledAdagrad):
        return AdagradRule(optimizer)
    if isinstance(optimizer, keras.optimizers.Adam):
        return AdamRule(optimizer)
    raise ValueError(
        f"Parameter update balancing needs Adam or an optimizer of tfrs_clippy.optimizers (Adagrad, "
        f"ClippyAdagrad, ...), got {type(optimizer).__name__}."
    )
