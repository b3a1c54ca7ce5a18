"""Per-task candidate updates from one shared optimizer state, and writing the balanced update (PUB's core).

With K tasks and a shared variable w, task i's gradient g_i would move w by d_i = step(state, g_i), computed from
the optimizer state every task shares; PUB moves w by sum_i alpha_i d_i and then advances the state with
sum_i alpha_i g_i, as if the optimizer had seen that gradient. An `UpdateRule` computes the d_i of one base
optimizer (`candidates`) and commits the balanced move (`commit`):

- `AdamRule`: Keras's Adam (either runtime), read from its own slots. For Adam sum_i d_i != step(sum_i g_i), so
  PUB with alpha = 1 is not Adam on the summed loss.
- `AdagradRule`: the Adagrad family of `tfrs_clippy.optimizers` (`Adagrad`, `ClippyAdagrad`, the GC, AGC and
  LAMB baselines), through `core.scaled_adagrad_step`. With the delayed accumulator and no scaling rule d is linear
  in g, and alpha = 1 is exactly Adagrad on the summed loss.
- `ScaledAdamRule`: the Adam family of `tfrs_clippy.optimizers` (`Adam`, `ClippyAdam`, the Adam baselines),
  through `adam_core.scaled_adam_step`.

The two `tfrs_clippy` rules (`ScaledRule`) read the optimizer only through its public hooks (`scaling_for`,
`slots_of`) and apply its scaling rule in one of two ways (`CLIP_MODES`, `BalancingConfig.clip`):

- "per_task": each d_i is the optimizer's own scaled step on g_i (for ClippyAdagrad a Clippy-clipped Adagrad
  update). Each d_i is within the rule's bound, but sum_i alpha_i d_i (alpha summing to K) can move a coordinate up
  to K times it.
- "combined": the d_i are the unscaled steps, and the rule scales the balanced move once: it sees the move as the
  update (move / lr as the direction), the weights, the combined gradient sum_i alpha_i g_i and the
  preconditioner of the step on it. For Clippy, no coordinate then moves more than the bound.

Without a scaling rule (plain Adagrad and Adam, variables excluded from clipping) the two are the same.

A NaN or Inf in a task's gradient of a variable, or in the combined gradient (a non-finite alpha), writes nothing
to the variable and its state; the `tfrs_clippy` rules count the step in the variable's `nonfinite_steps` and
export a clipping factor of 0, as the optimizers do for a step of their own.

Sparse gradients (`tf.IndexedSlices`, e.g. of embedding tables) stay sparse: the tasks' touched rows are merged
into one static-shaped set of rows (`TaskGradients`), the d_i are computed on those rows only, and only those rows
of the variable and of its optimizer state are written. For Adam this makes the embedding update lazy (rows no
batch touches keep their moments, as TF1's LazyAdam), whereas Keras's Adam decays every row's moments at every
step, a full-table read and write.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple, Optional, Sequence

import tensorflow as tf

from tfrs_clippy.keras_runtime import LEGACY_KERAS, keras
from tfrs_clippy.optimizers import adam_core, core
from tfrs_clippy.optimizers.rules import ScalingRule, StepInputs, call_rule
from tfrs_clippy.optimizers.scaled_adagrad import ScaledAdagrad
from tfrs_clippy.optimizers.scaled_adam import ScaledAdam
from tfrs_clippy.optimizers.tensor_ops import TF_OPS, TensorOps

Gradient = tf.Tensor | tf.IndexedSlices | None

UNSUPPORTED_OPTIMIZER_OPTIONS = ("clipnorm", "clipvalue", "global_clipnorm", "weight_decay", "use_ema")
"""Optimizer options the balanced update does not reproduce; PUB refuses an optimizer that sets one (and
`AdamRule` also Keras's `amsgrad`)."""

CLIP_MODES = ("per_task", "combined")
"""Where a `tfrs_clippy` optimizer's scaling rule applies under PUB: to each candidate, or once to the balanced
move (see the module docstring)."""


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


def _add(state: Any, task_gradients: TaskGradients, increment: tf.Tensor, keep: tf.Tensor) -> tf.Operation:
    """state += increment if `keep` (a bool scalar), else += 0; on the touched rows only for a sparse gradient
    (padding rows add nothing)."""
    state = tf_variable(state)
    increment = tf.where(keep, increment, tf.zeros_like(increment))
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


class Candidates(NamedTuple):
    """One variable's K candidate updates, and what `UpdateRule.commit` needs to know of them."""

    updates: tf.Tensor  # the d_i (to subtract), stacked like `TaskGradients.values`, padding rows zero
    smallest_scale: tf.Tensor  # scalar: the smallest scale the optimizer's rule gave a moving d_i (1: unscaled)
    all_finite: tf.Tensor  # bool scalar: no task's gradient had a NaN or an Inf

    def move(self, weights: tf.Tensor) -> tf.Tensor:
        """The balanced move sum_i weights_i d_i (to subtract)."""
        return tf.tensordot(weights, self.updates, axes=1)


class UpdateRule(abc.ABC):
    """A base optimizer's candidate updates d_i, and the commit of a balanced move; see the module docstring."""

    unsupported_options: tuple[str, ...] = UNSUPPORTED_OPTIMIZER_OPTIONS
    """The optimizer options this rule refuses."""

    def __init__(self, optimizer: Any, clip: str = "per_task") -> None:
        """Checks that the rule can reproduce `optimizer`.

        Args:
            optimizer: The base optimizer.
            clip: One of `CLIP_MODES`: where the optimizer's scaling rule applies (the module docstring).

        Raises:
            ValueError: the optimizer sets an option in `unsupported_options`, or `clip` is not in `CLIP_MODES`.
        """
        for option in self.unsupported_options:
            if getattr(optimizer, option, None):
                raise ValueError(
                    f"Parameter update balancing does not support the optimizer option `{option}`="
                    f"{getattr(optimizer, option)!r} of {type(optimizer).__name__}; unset it."
                )
        if clip not in CLIP_MODES:
            raise ValueError(f"Parameter update balancing: `clip` must be one of {CLIP_MODES}, got {clip!r}.")
        self.optimizer = optimizer
        self.clip = clip

    @abc.abstractmethod
    def candidates(self, variable: Any, task_gradients: TaskGradients) -> Candidates:
        """The K candidate updates of `variable` from its current optimizer state."""

    @abc.abstractmethod
    def commit(
        self, variable: Any, task_gradients: TaskGradients, candidates: Candidates, weights: tf.Tensor
    ) -> tf.Operation:
        """Moves `variable` by `candidates.move(weights)` and advances its optimizer state as one step on the
        combined gradient `task_gradients.combine(weights)`; writes nothing if a gradient is not finite."""


class AdamRule(UpdateRule):
    """Keras's Adam: d_i = lr * sqrt(1 - b2^t) / (1 - b1^t) * m_i / (sqrt(v_i) + epsilon), t = iterations + 1,
    with m_i = b1 m + (1 - b1) g_i and v_i = b2 v + (1 - b2) g_i^2 (Keras's epsilon, added to sqrt(v)).

    Keras's Adam has no scaling rule (both `clip` modes are the same) and no count of skipped steps: a non-finite
    gradient is only not written. `amsgrad` is refused: its slot is not read.
    """

    unsupported_options = (*UNSUPPORTED_OPTIMIZER_OPTIONS, "amsgrad")

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

    def candidates(self, variable: Any, task_gradients: TaskGradients) -> Candidates:
        step_size, epsilon = self._step_size()
        momentum, velocity = self._moments(variable, task_gradients, task_gradients.values)
        # Padding rows have a zero gradient but not zero moments: they must not count in D.
        candidates = step_size * momentum / (tf.sqrt(velocity) + epsilon)
        return Candidates(
            tf.stack([task_gradients.mask(candidate) for candidate in tf.unstack(candidates)]),
            tf.ones([]),
            tf.reduce_all(tf.math.is_finite(task_gradients.values)),
        )

    def commit(
        self, variable: Any, task_gradients: TaskGradients, candidates: Candidates, weights: tf.Tensor
    ) -> tf.Operation:
        grad = task_gradients.combine(weights)
        keep = tf.logical_and(candidates.all_finite, tf.reduce_all(tf.math.is_finite(grad)))
        momentum_slot, velocity_slot = self._slots(variable)
        new_momentum, new_velocity = self._moments(variable, task_gradients, grad)
        return tf.group(
            _add(momentum_slot, task_gradients, new_momentum - _read(momentum_slot, task_gradients), keep),
            _add(velocity_slot, task_gradients, new_velocity - _read(velocity_slot, task_gradients), keep),
            _add(variable, task_gradients, -candidates.move(weights), keep),
        )


class _RuleOnMove:
    """The optimizer's scaling rule judging the balanced move instead of the step it is called in ("combined").

    Passed as the rule of the step on the combined gradient, it is called with that step's `StepInputs` and hands
    the optimizer's rule the same gradient, weights and preconditioner with the move as the update (move / lr as
    the direction), so that the scale bounds what is applied. It keeps what the rule saw (`inputs`), from which the
    exported clipping factor is taken.
    """

    def __init__(self, rule: ScalingRule, move: tf.Tensor, learning_rate: tf.Tensor) -> None:
        self.rule = rule
        self.move = move
        self.learning_rate = learning_rate
        self.inputs: Optional[StepInputs] = None

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int], ops: TensorOps = TF_OPS) -> tf.Tensor:
        move = ops.cast(self.move, step.update.dtype)
        direction = ops.divide_no_nan(move, ops.cast(self.learning_rate, move.dtype))
        self.inputs = step._replace(update=move, direction=direction)
        return call_rule(self.rule, self.inputs, reduce_axes, ops)


class ScaledRule(UpdateRule):
    """The rules of the `tfrs_clippy.optimizers` families (`ScaledOptimizer`): the optimizer's step function on
    tensors, its per-variable scaling (`scaling_for`) applied as `clip` says, its state from `slots_of`, and its
    non-finite skipping and counting. A family says which slots a step reads (`slot_names`), how a step runs
    (`_step`) and what it adds to the slots (`_increments`).

    With clip="per_task", the combined step that advances the state is the optimizer's own, scaling rule included
    (which only Adagrad's "delayed_clipped" accumulator reads); its move is discarded for sum_i alpha_i d_i. The
    exported clipping factor is then the smallest of the candidates' factors; with "combined", the move's.
    """

    slot_names: tuple[str, ...] = ()
    """The fields of the optimizer's slots (`slots_of`) that a step reads and advances (None fields are skipped)."""

    @abc.abstractmethod
    def _step(
        self,
        task_gradients: TaskGradients,
        grad: tf.Tensor,
        value: tf.Tensor,
        state: dict[str, tf.Tensor],
        rule: Optional[ScalingRule],
        clipping_axis: Optional[int],
    ) -> Any:
        """The family's step result (`core.StepResult`, `adam_core.AdamStepResult`) on `grad` from `value` (the
        variable, or its touched rows) and `state` (the slots of `slot_names`, read like `value`)."""

    @abc.abstractmethod
    def _increments(self, state: dict[str, tf.Tensor], result: Any) -> dict[str, tf.Tensor]:
        """What the step `result` adds to each slot of `state`."""

    def _read_all(self, variable: Any, task_gradients: TaskGradients) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
        slots = self.optimizer.slots_of(variable)
        state = {
            name: _read(getattr(slots, name), task_gradients)
            for name in self.slot_names
            if getattr(slots, name) is not None
        }
        return _read(variable, task_gradients), state

    def candidates(self, variable: Any, task_gradients: TaskGradients) -> Candidates:
        rule, clipping_axis = self.optimizer.scaling_for(variable, task_gradients.sparse)
        if self.clip == "combined":
            rule = None  # `commit` applies it, once, to the balanced move
        value, state = self._read_all(variable, task_gradients)
        # One step per task: a scaling rule reduces over the whole tensor, which must not mix tasks.
        steps = [
            self._step(task_gradients, grad, value, state, rule, clipping_axis)
            for grad in tf.unstack(task_gradients.values)
        ]
        return Candidates(
            tf.stack([step.delta for step in steps]),
            tf.reduce_min(tf.stack([step.smallest_scale for step in steps])),
            tf.reduce_all(tf.stack([step.all_finite for step in steps])),
        )

    def commit(
        self, variable: Any, task_gradients: TaskGradients, candidates: Candidates, weights: tf.Tensor
    ) -> tf.Operation:
        optimizer = self.optimizer
        rule, clipping_axis = optimizer.scaling_for(variable, task_gradients.sparse)
        value, state = self._read_all(variable, task_gradients)
        move = candidates.move(weights)
        grad = task_gradients.combine(weights)
        if self.clip == "combined" and rule is not None:
            on_move = _RuleOnMove(rule, move, current_learning_rate(optimizer))
            result = self._step(task_gradients, grad, value, state, on_move, clipping_axis)
            delta = move * result.scale
            smallest_scale = core.smallest_moving_scale(rule, result.scale, on_move.inputs, clipping_axis)
        else:
            result = self._step(task_gradients, grad, value, state, rule, clipping_axis)
            delta, smallest_scale = move, candidates.smallest_scale
        keep = tf.logical_and(candidates.all_finite, result.all_finite)
        slots = optimizer.slots_of(variable)
        return tf.group(
            *[
                _add(getattr(slots, name), task_gradients, increment, keep)
                for name, increment in self._increments(state, result).items()
            ],
            _add(variable, task_gradients, -delta, keep),
            *core.record_step(slots, result._replace(smallest_scale=smallest_scale, all_finite=keep)),
        )


class AdagradRule(ScaledRule):
    """The Adagrad family of `tfrs_clippy.optimizers` (plain, Clippy, GC, AGC, LAMB): d_i from `core`."""

    slot_names = ("accumulator",)

    def _step(self, task_gradients, grad, value, state, rule, clipping_axis) -> core.StepResult:
        optimizer = self.optimizer
        return core.scaled_adagrad_step(
            grad,
            value,
            state["accumulator"],
            current_learning_rate(optimizer),
            epsilon=optimizer.epsilon,
            accumulator_update=optimizer.accumulator_update,
            rule=rule,
            clipping_axis=clipping_axis,
        )

    def _increments(self, state, result: core.StepResult) -> dict[str, tf.Tensor]:
        return {"accumulator": result.accumulator_increment}


class ScaledAdamRule(ScaledRule):
    """The Adam family of `tfrs_clippy.optimizers` (`Adam`, `ClippyAdam`, the GC, AGC and LAMB Adams): d_i from
    `adam_core`, at the optimizer's step t = iterations + 1; with amsgrad, v_hat is read and advanced too.

    Sparse tables: PUB's step is lazy whatever the optimizer's `sparse_updates` (as `AdamRule`'s for Keras's
    Adam): only the touched rows' weights and moments change, and the rule's scale is taken over them (as
    `sparse_updates="lazy"` does). With "dense" every row coasts on its momentum, so every candidate would be
    table-sized and share the same beta_1 m term on every untouched row: K full-table steps per step, and a
    D D^T dominated by the momentum all tasks share rather than by what the tasks' gradients ask for.
    """

    slot_names = ("momentum", "velocity", "velocity_hat")

    def _step(self, task_gradients, grad, value, state, rule, clipping_axis) -> adam_core.AdamStepResult:
        optimizer = self.optimizer
        return adam_core.scaled_adam_step(
            grad,
            value,
            state["momentum"],
            state["velocity"],
            state.get("velocity_hat"),
            current_learning_rate(optimizer),
            tf.convert_to_tensor(optimizer.iterations) + 1,
            beta_1=optimizer.beta_1,
            beta_2=optimizer.beta_2,
            epsilon=optimizer.epsilon,
            rule=rule,
            clipping_axis=clipping_axis,
            # Padding rows have a zero gradient but not zero moments: they must not move, nor limit the scale.
            moving=None if task_gradients.valid is None else task_gradients.valid > 0,
        )

    def _increments(self, state, result: adam_core.AdamStepResult) -> dict[str, tf.Tensor]:
        new = {"momentum": result.momentum, "velocity": result.velocity, "velocity_hat": result.velocity_hat}
        return {name: new[name] - old for name, old in state.items()}


def update_rule_for(optimizer: Any, clip: str = "per_task") -> UpdateRule:
    """The `UpdateRule` of `optimizer`: an optimizer of `tfrs_clippy.optimizers`, or Keras's Adam.

    Args:
        optimizer: The base optimizer.
        clip: One of `CLIP_MODES` (the module docstring).

    Raises:
        ValueError: the optimizer is of another class or sets an option its rule refuses, or an invalid `clip`.
    """
    if isinstance(optimizer, ScaledAdagrad):
        return AdagradRule(optimizer, clip)
    if isinstance(optimizer, ScaledAdam):
        return ScaledAdamRule(optimizer, clip)
    if isinstance(optimizer, keras.optimizers.Adam):
        return AdamRule(optimizer, clip)
    raise ValueError(
        f"Parameter update balancing needs Adam or an optimizer of tfrs_clippy.optimizers (Adagrad, "
        f"ClippyAdagrad, Adam, ClippyAdam, ...), got {type(optimizer).__name__}."
    )
