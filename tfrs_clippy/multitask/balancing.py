"""The multitask training step: PUB, Nash-MTL on gradients, or uncertainty weighting, as one Keras layer.

A model that owns a `MultitaskBalancer` delegates its `train_step` to `MultitaskBalancer.minimize`, giving it the
K task losses (as a function, run under the balancer's tape), the *shared* trainable variables (those more than one
task's loss reaches: embeddings, shared experts, ...) and the task-specific ones (towers, gates, ...). Methods:

- "pub" (Yuan, Cai, Dong 2024, arXiv 2410.05806): per shared variable, the update d_i each task's gradient alone
  would make from the optimizer's state (`updates.UpdateRule`), stacked into D; alpha solves the Nash bargaining
  problem alpha_i (D D^T alpha)_i = 1 (`solver.nash_weights`); the shared variables move by sum_i alpha_i d_i and
  the optimizer state advances with sum_i alpha_i g_i. With a scaling optimizer of `tfrs_clippy` (ClippyAdagrad,
  ClippyAdam, ...), `clip` says whether its rule scales each d_i ("per_task") or the balanced move once
  ("combined", which keeps Clippy's per-coordinate bound on what is applied); see `updates`.
- "nash_mtl" (Navon et al. 2022): the same solver on the gradients' Gram matrix G G^T; the shared variables get the
  optimizer's own step on sum_i alpha_i g_i. One code path with "pub": only the utilities differ (updates vs
  gradients).
- "uncertainty" (Kendall, Gal, Cipolla 2018): one trainable log-variance s_i per task and the loss
  sum_i exp(-s_i) L_i + s_i, for every task kind (Kendall's 1/2 factors for regression dropped, as LibMTL does:
  the minimizer s_i = log L_i is the same). Every variable gets the optimizer's step on that loss.

For "pub" and "nash_mtl", the task-specific variables get the optimizer's step on the sum of the task losses, and
alpha is solved every `solve_every` steps (warm-started from the last solution) and held in between, as the authors
do; a solve on a non-finite Gram matrix (a NaN or Inf gradient) keeps the held solution, so that one bad batch
does not poison every later step. Under "pub", a shared variable whose task gradients (or combined gradient) are
not finite is not written, and `tfrs_clippy` optimizers count the skipped step (`updates`). alpha's scale is a
design decision (`alpha_scaling`):

- "nash": the bargaining solution itself. It goes as 1 / ||d||, so under PUB the move sum_i alpha_i d_i has a norm
  of order sqrt(K) whatever the learning rate: the learning rate cancels out, and Adagrad's accumulator grows by
  (alpha g)^2, with alpha of order 1 / (lr ||g||).
- "normalized" (the default): alpha rescaled to sum to K (over the tasks with a non-zero utility). The bargaining
  fixes the tasks' relative weights, the optimizer's learning rate keeps its meaning, and equal weights give
  alpha = 1. The authors' released code ran with alpha = 1 throughout (its solver call failed silently), which is
  this scale.

`minimize` returns the logs `loss` (the sum of the task losses), `weight_<task>` (alpha_i, or exp(-s_i) for
"uncertainty") and, for "pub"/"nash_mtl", `cosine_<task>_<task>` between the tasks' updates (resp. gradients),
every step: `fit` puts them in its batch logs (callbacks) and History, and `minimize` also writes them as scalars
"multitask/<name>" to the default summary writer, which Keras's TensorBoard callback provides (per step with
`update_freq=1`; not under XLA).

Runs in graph mode and under XLA (`jit_compile=True`), in one replica (the per-task gradients of several replicas
would need their own all-reduce).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import tensorflow as tf

from tfrs_clippy import summaries
from tfrs_clippy.keras_runtime import LEGACY_KERAS, keras
from tfrs_clippy.multitask import solver, updates

METHODS = ("pub", "nash_mtl", "uncertainty")
ALPHA_SCALINGS = ("normalized", "nash")


@dataclasses.dataclass(frozen=True)
class BalancingConfig:
    """The options of a `MultitaskBalancer` (see the module docstring).

    Attributes:
        method: One of `METHODS`.
        alpha_scaling: One of `ALPHA_SCALINGS` ("pub", "nash_mtl").
        solve_every: Solve alpha every this many steps, hold it in between ("pub", "nash_mtl").
        max_solver_iterations: Most Newton steps per solve (K > 2; K = 2 is closed-form).
        ridge: The solver's ridge, relative to each task's squared utility norm.
        clip: One of `updates.CLIP_MODES` ("pub"): "per_task" scales each candidate update by the optimizer's
            rule, "combined" the balanced move, once (`updates`). The same for optimizers without a scaling rule.
    """

    method: str = "pub"
    alpha_scaling: str = "normalized"
    solve_every: int = 10
    max_solver_iterations: int = 20
    ridge: float = 1e-6
    clip: str = "per_task"

    def __post_init__(self) -> None:
        for field, choices in (("method", METHODS), ("alpha_scaling", ALPHA_SCALINGS), ("clip", updates.CLIP_MODES)):
            if getattr(self, field) not in choices:
                raise ValueError(f"BalancingConfig: `{field}` must be one of {choices}, got {getattr(self, field)!r}.")
        for field in ("solve_every", "max_solver_iterations"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BalancingConfig: `{field}` must be an integer >= 1, got {value!r}.")
        if not (isinstance(self.ridge, (int, float)) and self.ridge >= 0):
            raise ValueError(f"BalancingConfig: `ridge` must be a number >= 0, got {self.ridge!r}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, value: "BalancingConfig | Mapping[str, Any] | str") -> "BalancingConfig":
        """A config from itself, a method name ("pub"), or a `to_dict` mapping.

        Raises:
            ValueError: an unknown key or an invalid value.
        """
        if isinstance(value, BalancingConfig):
            return value
        if isinstance(value, str):
            return cls(method=value)
        if not isinstance(value, Mapping):
            raise ValueError(f"BalancingConfig: expected a method name or a mapping, got {type(value).__name__}.")
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"BalancingConfig: unknown options {unknown}; the options are {sorted(fields)}.")
        return cls(**value)


def _sum_gradients(grads: Sequence[updates.Gradient]) -> updates.Gradient:
    """The sum of some tasks' gradients of one variable (None where no task reaches it); sparse stays sparse."""
    present = [grad for grad in grads if grad is not None]
    if not present:
        return None
    if all(isinstance(grad, tf.IndexedSlices) for grad in present):
        return tf.IndexedSlices(
            tf.concat([grad.values for grad in present], 0),
            tf.concat([tf.cast(grad.indices, tf.int64) for grad in present], 0),
            present[0].dense_shape,
        )
    return tf.add_n([tf.convert_to_tensor(grad) for grad in present])


def _check_can_balance(shared_variables: Sequence[Any]) -> None:
    """Raises unless this step can be balanced: one replica, and shared variables to balance.

    The per-task gradients of several replicas would need their own all-reduce, which `minimize` does not do.
    """
    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        raise ValueError("MultitaskBalancer: runs in one replica; the strategy has several.")
    if not shared_variables:
        raise ValueError("MultitaskBalancer: `shared_variables` is empty; there is nothing to balance.")


def _optimizer_built(optimizer: Any) -> bool:
    return bool(getattr(optimizer, "_built", False) if LEGACY_KERAS else optimizer.built)


def _build_optimizer(optimizer: Any, variables: Sequence[Any]) -> None:
    """Builds `optimizer` for `variables` (its slots), unless it is built, outside the traced step.

    "pub" reads the optimizer's state (`updates`) before any `apply_gradients` would have built it, so the slots
    must exist first; being variables, they are created eagerly (`tf.init_scope`), not in the train function.
    """
    if not _optimizer_built(optimizer):
        with tf.init_scope():
            optimizer.build(variables)


def _stack_shared_gradients(
    per_task: Sequence[Sequence[updates.Gradient]], shared_variables: Sequence[Any]
) -> list[updates.TaskGradients]:
    """Per shared variable (the first of each task's gradient list), the K tasks' gradients stacked into one.

    Stacked, the tasks' gradients of a variable are one [K, ...] tensor (over the union of the rows they touch, for
    an embedding): what the update rules and the Gram matrix work on.
    """
    return [
        updates.stack_task_gradients([grads[index] for grads in per_task], variable)
        for index, variable in enumerate(shared_variables)
    ]


def _candidate_updates(
    rule: updates.UpdateRule | None, shared_variables: Sequence[Any], stacked: Sequence[updates.TaskGradients]
) -> list[updates.Candidates] | None:
    """"pub": per shared variable, the update d_i each task's gradient alone would make; None without a rule."""
    if rule is None:
        return None
    return [rule.candidates(variable, grads) for variable, grads in zip(shared_variables, stacked)]


def _specific_gradients(per_task: Sequence[Sequence[updates.Gradient]], num_shared: int) -> list[updates.Gradient]:
    """The gradients of the sum of the task losses for the task-specific variables (those after `num_shared`).

    Summing the per-task gradients gives them without another backward pass.
    """
    return [_sum_gradients([grads[index] for grads in per_task]) for index in range(num_shared, len(per_task[0]))]


def _commit_shared_moves(
    rule: updates.UpdateRule,
    shared_variables: Sequence[Any],
    stacked: Sequence[updates.TaskGradients],
    candidates: Sequence[updates.Candidates],
    weights: tf.Tensor,
) -> None:
    """"pub": moves each shared variable by its alpha-weighted candidate updates, and advances its optimizer state.

    The rule writes the variable itself (the optimizer's own step would apply its rule to the combined gradient,
    not combine the updates), so these variables get no gradient in the optimizer's `apply_gradients`.
    """
    for variable, grads, variable_candidates in zip(shared_variables, stacked, candidates):
        rule.commit(variable, grads, variable_candidates, weights)


def _combined_gradients(
    shared_variables: Sequence[Any], stacked: Sequence[updates.TaskGradients], weights: tf.Tensor
) -> list[tf.Tensor | tf.IndexedSlices]:
    """"nash_mtl": each shared variable's gradient sum_i alpha_i g_i, for the optimizer's own step.

    A sparse (embedding) gradient stays an `IndexedSlices` over the rows the tasks touched, so that the optimizer
    takes its sparse step.
    """
    return [
        tf.IndexedSlices(grads.combine(weights), grads.rows, tf.shape(variable, out_type=tf.int64))
        if grads.sparse
        else grads.combine(weights)
        for variable, grads in zip(shared_variables, stacked)
    ]


def _apply_gradients(optimizer: Any, grads: Sequence[updates.Gradient], variables: Sequence[Any]) -> None:
    """The optimizer's step on `grads` (None: not stepped), or only its step count when every gradient is None.

    Always the full variable list, in one order: the Keras 2 optimizers of tfrs_clippy re-index their slots by the
    list each `apply_gradients` gets. Keras skips the None gradients. With no gradient at all there is nothing to
    apply, but the step still happened ("pub" moved the shared variables itself), so it is counted.
    """
    if any(grad is not None for grad in grads):
        optimizer.apply_gradients(zip(grads, variables))
    else:
        optimizer.iterations.assign_add(1)


def _step_logs(loss: tf.Tensor, logs: Mapping[str, tf.Tensor], iterations: tf.Tensor) -> dict[str, tf.Tensor]:
    """The step's logs, `loss` first; `logs` are also written as TensorBoard scalars "multitask/<name>".

    They go to the default summary writer, if there is one: Keras's TensorBoard callback makes its writer the
    default during `fit`, recording every `update_freq` steps. Keras 2 writes no batch-level scalars of the logs
    itself, and its default summary step is frozen at the start of `fit`, hence the optimizer's `iterations` as the
    step. Not under XLA (`summaries.write_scalars`).
    """
    summaries.write_scalars(logs, iterations, prefix="multitask/")
    return {"loss": loss, **logs}


@keras.utils.register_keras_serializable(package="tfrs_clippy")
class MultitaskBalancer(keras.layers.Layer):
    """The multitask train step of the module docstring; holds alpha (or the log-variances) as its weights."""

    def __init__(
        self,
        task_names: Sequence[str],
        balancing: BalancingConfig | Mapping[str, Any] | str = "pub",
        **kwargs,
    ) -> None:
        """Creates the balancer's weights.

        Args:
            task_names: The K >= 2 tasks, in the order of the losses `minimize` will get.
            balancing: A `BalancingConfig`, a method name, or a `BalancingConfig.to_dict` mapping.
            **kwargs: Passed to the Keras layer.

        Raises:
            ValueError: fewer than two tasks, repeated names, or an invalid option.
        """
        super().__init__(**kwargs)
        self.task_names = list(task_names)
        if len(self.task_names) < 2:
            raise ValueError(
                f"MultitaskBalancer: `task_names` must name at least 2 tasks to balance, got {self.task_names}."
            )
        if len(set(self.task_names)) != len(self.task_names):
            raise ValueError(f"MultitaskBalancer: `task_names` has repeated names: {self.task_names}.")
        self.balancing = BalancingConfig.from_value(balancing)
        num_tasks = len(self.task_names)
        if self.balancing.method == "uncertainty":
            self.log_variances = self.add_weight(
                name="log_variances", shape=(num_tasks,), initializer="zeros", trainable=True
            )
        else:
            # The last bargaining solution in the Nash scale, held between solves and warm-starting the next.
            self.solved_weights = self.add_weight(
                name="solved_weights", shape=(num_tasks,), initializer="ones", trainable=False
            )
        self.built = True

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def minimize(
        self,
        optimizer: Any,
        compute_task_losses: Callable[[], Sequence[tf.Tensor]],
        shared_variables: Sequence[Any],
        specific_variables: Sequence[Any],
    ) -> dict[str, tf.Tensor]:
        """Runs one training step.

        Args:
            optimizer: The model's optimizer. "pub" needs Keras's Adam or an optimizer of
                `tfrs_clippy.optimizers`; the other methods take any.
            compute_task_losses: Runs the forward pass and returns the K scalar task losses, in `task_names` order
                (each already multiplied by its task weight, if any).
            shared_variables: The trainable variables more than one task reaches.
            specific_variables: The other trainable variables. The balancer's own log-variances are added.

        Returns:
            The logs of the module docstring.

        Raises:
            ValueError: more than one replica, a wrong number of losses, a task with no gradient path to the shared
                variables, or an optimizer "pub" cannot use.
        """
        _check_can_balance(shared_variables)
        variables = list(shared_variables) + self._with_own_variables(specific_variables)
        rule = updates.update_rule_for(optimizer, self.balancing.clip) if self.balancing.method == "pub" else None
        _build_optimizer(optimizer, variables)
        if self.balancing.method == "uncertainty":
            return self._minimize_uncertainty(optimizer, compute_task_losses, variables)
        return self._minimize_balanced(optimizer, compute_task_losses, list(shared_variables), variables, rule)

    def _with_own_variables(self, specific_variables: Sequence[Any]) -> list[Any]:
        """`specific_variables` and, after them, the balancer's own trainable variables (the log-variances).

        The caller lists the model's variables; the balancer's weights are the balancer's business, so it adds them
        itself (once: a caller that already listed them does not get them twice).
        """
        own_ids = {id(variable) for variable in specific_variables}
        return list(specific_variables) + [
            variable for variable in self.trainable_variables if id(variable) not in own_ids
        ]

    def _task_losses(self, compute_task_losses: Callable[[], Sequence[tf.Tensor]]) -> list[tf.Tensor]:
        """The K task losses of the forward pass (run under the caller's tape), checked to be one per task.

        A wrong count would silently pair losses with the wrong task names (and weights), hence the error.
        """
        task_losses = list(compute_task_losses())
        if len(task_losses) != self.num_tasks:
            raise ValueError(
                f"MultitaskBalancer: `compute_task_losses` returned {len(task_losses)} losses for the "
                f"{self.num_tasks} tasks {self.task_names}."
            )
        return task_losses

    def _minimize_uncertainty(
        self, optimizer: Any, compute_task_losses: Callable[[], Sequence[tf.Tensor]], variables: list[Any]
    ) -> dict[str, tf.Tensor]:
        """The "uncertainty" step: the optimizer's own step on sum_i exp(-s_i) L_i + s_i, for every variable.

        One loss, so one backward pass and no per-task gradients: the log-variances s_i are trained with the model.
        """
        with tf.GradientTape() as tape:
            task_losses = self._task_losses(compute_task_losses)
            loss = tf.add_n(task_losses)
            precisions = tf.exp(-tf.convert_to_tensor(self.log_variances))
            uncertainty_loss = tf.reduce_sum(precisions * tf.stack(task_losses) + self.log_variances)
        optimizer.apply_gradients(zip(tape.gradient(uncertainty_loss, variables), variables))
        return _step_logs(loss, self._weight_logs(precisions), optimizer.iterations)

    def _minimize_balanced(
        self,
        optimizer: Any,
        compute_task_losses: Callable[[], Sequence[tf.Tensor]],
        shared_variables: list[Any],
        variables: list[Any],
        rule: updates.UpdateRule | None,
    ) -> dict[str, tf.Tensor]:
        """The "pub" (with `rule`) and "nash_mtl" (without) step: alpha from the tasks' utilities, then the moves.

        The shared variables (the first `len(shared_variables)` of `variables`) move by the alpha-weighted
        combination: under "pub" the rule commits it itself, under "nash_mtl" the optimizer steps on the combined
        gradient. The task-specific variables get the optimizer's step on the sum of the task losses.
        """
        with tf.GradientTape(persistent=True) as tape:
            task_losses = self._task_losses(compute_task_losses)
            loss = tf.add_n(task_losses)
        # One backward pass per task, through every variable: the task-specific gradient is then their sum.
        per_task = [tape.gradient(task_loss, variables) for task_loss in task_losses]
        del tape
        num_shared = len(shared_variables)
        self._check_shared_gradient_paths(per_task, num_shared)
        stacked = _stack_shared_gradients(per_task, shared_variables)
        candidates = _candidate_updates(rule, shared_variables, stacked)
        gram = self._utility_gram(stacked, candidates)
        weights = self._weights(gram, optimizer.iterations)

        specific_grads = _specific_gradients(per_task, num_shared)
        if rule is not None:
            _commit_shared_moves(rule, shared_variables, stacked, candidates, weights)
            shared_grads = [None] * num_shared  # moved already
        else:
            shared_grads = _combined_gradients(shared_variables, stacked, weights)
        _apply_gradients(optimizer, shared_grads + specific_grads, variables)
        logs = {**self._weight_logs(weights), **self._cosine_logs(gram)}
        return _step_logs(loss, logs, optimizer.iterations)

    def _check_shared_gradient_paths(self, per_task: Sequence[Sequence[updates.Gradient]], num_shared: int) -> None:
        """Raises unless every task has a gradient on at least one shared variable (the first `num_shared`).

        A task that reaches no shared variable has a zero utility everywhere: there is nothing to bargain over, and
        the model is most likely wired wrongly (or the variables were split wrongly).
        """
        for task, grads in zip(self.task_names, per_task):
            if all(grad is None for grad in grads[:num_shared]):
                raise ValueError(
                    f"MultitaskBalancer: task {task!r} has no gradient path to the shared variables; every task must "
                    "reach at least one (or it is not a shared-parameter multitask model)."
                )

    def _utility_gram(
        self, stacked: Sequence[updates.TaskGradients], candidates: Sequence[updates.Candidates] | None
    ) -> tf.Tensor:
        """The K x K Gram matrix of the tasks' utilities over all shared variables: D D^T, or G G^T without a rule.

        The utilities are the candidate updates d_i under "pub" and the gradients g_i under "nash_mtl"; flattening
        each variable's per-task utilities and summing the per-variable Gram matrices is the Gram matrix of the
        concatenated vectors, without concatenating them.
        """
        utilities = [grads.values for grads in stacked] if candidates is None else [c.updates for c in candidates]
        flat_utilities = [tf.reshape(utility, [self.num_tasks, -1]) for utility in utilities]
        return tf.add_n([tf.matmul(flat, flat, transpose_b=True) for flat in flat_utilities])

    def _weights(self, gram: tf.Tensor, iterations: tf.Tensor) -> tf.Tensor:
        """alpha for this step: solved every `solve_every` steps from the warm start (if `gram` is finite), else
        the held solution."""
        held = tf.convert_to_tensor(self.solved_weights)
        solve_step = tf.equal(tf.math.floormod(tf.cast(iterations, tf.int64), self.balancing.solve_every), 0)
        solved = tf.cond(
            tf.logical_and(solve_step, tf.reduce_all(tf.math.is_finite(gram))),
            lambda: solver.nash_weights(
                gram, held, max_iterations=self.balancing.max_solver_iterations, ridge=self.balancing.ridge
            ),
            lambda: held,
        )
        self.solved_weights.assign(solved)
        if self.balancing.alpha_scaling == "nash":
            return solved
        num_active = tf.reduce_sum(tf.cast(solved > 0.0, tf.float32))
        return tf.math.divide_no_nan(num_active * solved, tf.reduce_sum(solved))

    def _weight_logs(self, weights: tf.Tensor) -> dict[str, tf.Tensor]:
        return {f"weight_{task}": weights[index] for index, task in enumerate(self.task_names)}

    def _cosine_logs(self, gram: tf.Tensor) -> dict[str, tf.Tensor]:
        cosines = solver.cosines(gram)
        return {
            f"cosine_{first}_{second}": cosines[i, j]
            for i, first in enumerate(self.task_names)
            for j, second in enumerate(self.task_names)
            if i < j
        }

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "task_names": list(self.task_names), "balancing": self.balancing.to_dict()}
