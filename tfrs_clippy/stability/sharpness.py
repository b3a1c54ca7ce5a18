"""Sharpness: the largest Hessian eigenvalue of the training loss, plain and Adagrad-preconditioned.

Gradient descent with step eta on a loss whose Hessian has largest eigenvalue lambda_max is stable only if
eta < 2 / lambda_max (the Clippy paper's explanation of divergence). For Adagrad the step is eta * P^-1 g with
P the per-coordinate denominator (P = sqrt(G + epsilon), G the accumulator, for the optimizers read here; see
`adagrad_preconditioner`), so what must stay below 2 / eta is the largest eigenvalue of P^-1 H, equal to that of
the symmetric P^-1/2 H P^-1/2. Both are estimated by power iteration on Hessian-vector
products (back-over-back automatic differentiation: two nested `tf.GradientTape`s), never forming H.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.stability import _callback, _plotting

Vectors = List[tf.Tensor]
"""One tensor per variable: a vector in parameter space."""

_LOGGER = logging.getLogger(__name__)


def hessian_vector_product(loss_fn: Callable[[], tf.Tensor], variables: Sequence[Any], vectors: Vectors) -> Vectors:
    """Returns H v, H the Hessian of `loss_fn()` with respect to `variables`, v given as `vectors`.

    Args:
        loss_fn: Computes the scalar loss from `variables` (reads them, takes no argument).
        variables: The variables (tf.Variable or Keras variables).
        vectors: One tensor per variable, of its shape.
    """
    with tf.GradientTape() as outer_tape:
        with tf.GradientTape() as inner_tape:
            loss = loss_fn()
        gradients = inner_tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        # Embedding gradients come as IndexedSlices; the inner product needs them dense.
        directional_derivative = tf.add_n(
            [tf.reduce_sum(tf.convert_to_tensor(g) * v) for g, v in zip(gradients, vectors)]
        )
    products = outer_tape.gradient(
        directional_derivative, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    # An embedding table's product comes as IndexedSlices too; the power iteration adds and scales vectors.
    return [tf.convert_to_tensor(product) for product in products]


def _dot(a: Vectors, b: Vectors) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(tf.cast(x, tf.float64) * tf.cast(y, tf.float64)) for x, y in zip(a, b)])


@dataclasses.dataclass(frozen=True)
class PowerIterationResult:
    """The outcome of `power_iteration`.

    Attributes:
        eigenvalue: The Rayleigh quotient v^T A v of the final unit vector: the eigenvalue of largest magnitude,
            with its sign.
        iterations: How many matrix-vector products were spent.
        converged: Whether the residual fell within the tolerance before the budget ran out (if not, the
            estimate is a lower bound on the magnitude, typically a close one).
    """

    eigenvalue: float
    iterations: int
    converged: bool


def power_iteration(
    matvec: Callable[[Vectors], Vectors],
    shapes: Sequence[Sequence[int]],
    max_iterations: int = 20,
    tolerance: float = 1e-3,
    seed: int = 0,
) -> PowerIterationResult:
    """Estimates the largest-magnitude eigenvalue of the symmetric operator `matvec` by power iteration.

    Stops when the residual of the eigenpair is small, ||A v - lambda v|| <= tolerance * |lambda|, rather than when
    successive estimates agree: near a second eigenvalue close to the first, estimates can stall for many iterations
    before climbing, and would stop there.

    Args:
        matvec: v -> A v on lists of tensors of `shapes`.
        shapes: The shape of each tensor of a vector.
        max_iterations: The budget of products A v (the cost bound).
        tolerance: Relative residual at which to stop.
        seed: Seed of the random start vector (stateless, so the same on every device and under any strategy).
    """
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"`max_iterations` must be an int >= 1, got {max_iterations!r}.")
    if not tolerance > 0:
        raise ValueError(f"`tolerance` must be positive, got {tolerance}.")
    vector = [tf.random.stateless_normal(shape, seed=[seed, index]) for index, shape in enumerate(shapes)]
    estimate = math.nan
    for iteration in range(1, max_iterations + 1):
        norm = float(tf.sqrt(_dot(vector, vector)))
        vector = [v / norm for v in vector]
        product = matvec(vector)
        estimate = float(_dot(vector, product))  # Rayleigh quotient of the unit vector
        if not math.isfinite(estimate):
            return PowerIterationResult(math.nan, iteration, False)
        residual = [p - estimate * tf.cast(v, p.dtype) for p, v in zip(product, vector)]
        if float(tf.sqrt(_dot(residual, residual))) <= tolerance * abs(estimate):
            return PowerIterationResult(estimate, iteration, True)
        vector = [tf.cast(p, v.dtype) for p, v in zip(product, vector)]
    return PowerIterationResult(estimate, max_iterations, False)


def largest_hessian_eigenvalue(
    loss_fn: Callable[[], tf.Tensor],
    variables: Sequence[Any],
    preconditioner: Optional[Vectors] = None,
    max_iterations: int = 20,
    tolerance: float = 1e-3,
    seed: int = 0,
) -> PowerIterationResult:
    """The largest eigenvalue of the Hessian of `loss_fn()`, or of P^-1/2 H P^-1/2 with `preconditioner` = P.

    Args:
        loss_fn: Computes the scalar loss from `variables`.
        variables: The variables to differentiate by.
        preconditioner: Optional P, one positive tensor per variable of its shape (a diagonal matrix), e.g.
            `adagrad_preconditioner(...)`.
        max_iterations: Budget of Hessian-vector products.
        tolerance: Relative residual at which power iteration stops.
        seed: Seed of the start vector.
    """
    if preconditioner is None:
        matvec = lambda vectors: hessian_vector_product(loss_fn, variables, vectors)  # noqa: E731
    else:
        inverse_roots = [tf.math.rsqrt(tf.cast(p, variable.dtype)) for p, variable in zip(preconditioner, variables)]

        def matvec(vectors: Vectors) -> Vectors:
            scaled = [r * v for r, v in zip(inverse_roots, vectors)]
            return [r * hv for r, hv in zip(inverse_roots, hessian_vector_product(loss_fn, variables, scaled))]

    shapes = [tuple(variable.shape) for variable in variables]
    return power_iteration(matvec, shapes, max_iterations, tolerance, seed)


def _optimizer_kind(optimizer: Any) -> str:
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


def _has_accumulator_method(optimizer: Any) -> bool:
    # tfrs_clippy's Adagrad family (ClippyAdagrad and the baselines) exposes `accumulator(variable)`; its Adam
    # family, Keras's optimizers and the legacy tf_keras ones do not.
    return callable(getattr(optimizer, "accumulator", None))


def preconditioner_unavailable_reason(optimizer: Any) -> Optional[str]:
    """Why `adagrad_preconditioner` cannot read `optimizer`, or None when it can.

    It can read an optimizer with a public `accumulator(variable)` method and an `epsilon` (tfrs_clippy's Adagrad
    family: ClippyAdagrad and the baselines), and Keras's own Adagrad of this runtime once built. Nothing else:
    SGD, any Adam (Keras's, tf_keras's legacy one, tfrs_clippy's Adam family), and
    `tf_keras.optimizers.legacy.Adagrad`, whose kernel divides by sqrt(G) + epsilon, not sqrt(G + epsilon).
    """
    kind = _optimizer_kind(optimizer)
    if _has_accumulator_method(optimizer):
        if not hasattr(optimizer, "epsilon"):
            return f"`optimizer` {kind} has `accumulator(variable)` but no `epsilon` to form P = sqrt(G + epsilon)"
        return None
    if isinstance(optimizer, keras.optimizers.Adagrad):
        if getattr(optimizer, "_accumulators", None):  # created by `build`, at the first step
            return None
        return f"`optimizer` {kind} is Keras's Adagrad but not built yet (its accumulators come with the first step)"
    return (
        f"`optimizer` {kind} exposes no Adagrad accumulator (neither a public `accumulator(variable)` method, as "
        "tfrs_clippy's Adagrad optimizers have, nor Keras's own Adagrad)"
    )


def has_adagrad_accumulators(optimizer: Any) -> bool:
    """Whether `optimizer` is an Adagrad-type optimizer `adagrad_preconditioner` can read (see its reasons)."""
    return preconditioner_unavailable_reason(optimizer) is None


# Keras's own Adagrads do not expose the accumulator; these lookups mirror each runtime's `update_step`.
# pylint: disable=protected-access
def _accumulator(optimizer: Any, variable: Any) -> Any:
    """The accumulator G of `variable` in tfrs_clippy's Adagrad family, Keras 3 Adagrad or tf_keras Adagrad."""
    if _has_accumulator_method(optimizer):
        return optimizer.accumulator(variable)
    if hasattr(optimizer, "_get_variable_index"):  # Keras 3
        return optimizer._accumulators[optimizer._get_variable_index(variable)]
    return optimizer._accumulators[optimizer._index_dict[optimizer._var_key(variable)]]
# pylint: enable=protected-access


def adagrad_preconditioner(optimizer: Any, variables: Sequence[Any]) -> Vectors:
    """P = sqrt(G + epsilon) for each variable, G its accumulator: the denominator of the next Adagrad step.

    That is the denominator of tfrs_clippy's Adagrad optimizers (ClippyAdagrad and the baselines, read through
    their public `accumulator(variable)` and `epsilon`), of Keras 3's `keras.optimizers.Adagrad` and of tf_keras's
    `tf_keras.optimizers.Adagrad`. It is not that of TensorFlow's `ApplyAdagradV2` kernel, used by
    `tf_keras.optimizers.legacy.Adagrad`, which divides by sqrt(G) + epsilon (so that one is not read; see
    `preconditioner_unavailable_reason`). P is taken as it is now, i.e. with G including the gradients of the
    steps so far: the next step also adds its own squared gradient to G before dividing, which only makes its
    denominator larger.

    Raises:
        ValueError: The optimizer has no readable Adagrad accumulators (the message says why), or none for one of
            `variables` (it was not built with it).
    """
    reason = preconditioner_unavailable_reason(optimizer)
    if reason is not None:
        raise ValueError(f"No Adagrad preconditioner: {reason}.")
    preconditioner = []
    for variable in variables:
        try:
            accumulator = _accumulator(optimizer, variable)
        except (LookupError, AttributeError) as error:
            # An optimizer not built yet, or built without this variable, has no accumulator to look up.
            raise ValueError(
                f"No Adagrad preconditioner: `optimizer` {_optimizer_kind(optimizer)} has no accumulator for "
                f"variable {getattr(variable, 'name', variable)!r} ({type(error).__name__}: {error}); is it built "
                "with the model's variables?"
            ) from error
        preconditioner.append(tf.sqrt(tf.cast(tf.convert_to_tensor(accumulator), variable.dtype) + optimizer.epsilon))
    return preconditioner


def current_learning_rate(optimizer: Any) -> float:
    """The optimizer's learning rate now; with a schedule, both runtimes return its current value."""
    return float(np.asarray(optimizer.learning_rate))


@dataclasses.dataclass
class SharpnessRecord:
    """Measurements of `SharpnessMonitor`, one entry per measured step.

    `preconditioned_sharpness` is NaN where it was not measured; `stability_threshold` is 2 / learning rate.
    """

    steps: List[int] = dataclasses.field(default_factory=list)
    sharpness: List[float] = dataclasses.field(default_factory=list)
    preconditioned_sharpness: List[float] = dataclasses.field(default_factory=list)
    stability_threshold: List[float] = dataclasses.field(default_factory=list)


class SharpnessMonitor(_callback.PeriodicCallback):
    """Every `every_n_steps` training steps, the sharpness of the training loss on a fixed batch against 2/eta.

    Measures the largest Hessian eigenvalue and, for an Adagrad-type optimizer, the preconditioned sharpness
    (largest eigenvalue of P^-1/2 H P^-1/2, P = sqrt(accumulator + epsilon)): training is locally unstable when
    the relevant one exceeds `sharpness_threshold` = 2 / learning rate. Cost per measurement: at most
    `max_iterations` Hessian-vector products (each about two backward passes) on at most `max_batch_size`
    examples, for each of the two sharpnesses.

    The loss on the batch is `loss_fn(model, batch)` if given, which works for any Keras model (TFRS models, dict
    outputs, losses computed in the model). Otherwise `batch` is a pair (x, y) and the loss is `loss` (or the
    model's compiled loss, which must then be a single loss) of y and `model(x, training=False)`, plus the model's
    regularization losses. Evaluating with `training=False` keeps dropout from making the Hessian random; a
    `loss_fn` should do the same.

    Results go to `record`, to the batch logs of the measured step and the epoch logs (`sharpness`,
    `preconditioned_sharpness`, `sharpness_threshold`, the latest values), and with `log_dir` to TensorBoard.
    Where the preconditioned sharpness is not measured it is NaN, and `preconditioned_skipped` says why (e.g. an
    optimizer without Adagrad accumulators, such as Adam); the first such skip is also logged as a warning.

    Args:
        batch: The fixed batch: (x, y) without `loss_fn`, any nested structure of tensors `loss_fn` takes with it;
            every tensor is cut to its first `max_batch_size` rows.
        every_n_steps: Measure after every this many steps (the first after step 0).
        loss: A Keras loss (name or callable (y_true, y_pred)) for the batch; None uses the model's compiled loss.
            Not with `loss_fn`.
        loss_fn: `loss_fn(model, batch) -> scalar tensor`, the whole training loss on `batch`, computed from the
            model's variables.
        preconditioned: Also measure the preconditioned sharpness: None when the optimizer exposes Adagrad
            accumulators (`preconditioner_unavailable_reason`; otherwise skipped, see `preconditioned_skipped`),
            True always (a ValueError saying why if it cannot), False never.
        max_iterations: Power-iteration budget per measurement.
        tolerance: Relative tolerance of power iteration.
        max_batch_size: Use only the first this many examples of `batch`.
        seed: Seed of the power iteration start vector (the same every measurement).
        log_dir: If set, a directory to write TensorBoard scalars to.
    """

    def __init__(
        self,
        batch: Any,
        every_n_steps: int = 100,
        loss: Any = None,
        loss_fn: Optional[Callable[[Any, Any], tf.Tensor]] = None,
        preconditioned: Optional[bool] = None,
        max_iterations: int = 20,
        tolerance: float = 1e-3,
        max_batch_size: int = 256,
        seed: int = 0,
        log_dir: Optional[str] = None,
    ) -> None:
        super().__init__(every_n_steps, log_dir)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"`loss_fn` must be callable as loss_fn(model, batch), got {loss_fn!r}.")
        if loss_fn is not None and loss is not None:
            raise ValueError(f"Pass `loss` or `loss_fn`, not both; got loss={loss!r} and a `loss_fn`.")
        if loss_fn is None and not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError(f"`batch` must be a pair (x, y) when no `loss_fn` is given, got {type(batch).__name__}.")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"`max_batch_size` must be an int >= 1, got {max_batch_size!r}.")
        if preconditioned not in (None, True, False):
            raise ValueError(f"`preconditioned` must be None, True or False, got {preconditioned!r}.")
        cut = lambda tensor: tf.convert_to_tensor(tensor)[:max_batch_size]  # noqa: E731
        self.batch = tf.nest.map_structure(cut, tuple(batch) if loss_fn is None else batch)
        self.loss = loss
        self.loss_fn = loss_fn
        self.preconditioned = preconditioned
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.seed = seed
        self.record = SharpnessRecord()
        self.preconditioned_skipped: Optional[str] = None
        """Why the last measurement has no preconditioned sharpness (NaN); None when it has one."""
        self._loss_object: Optional[Callable[[Any, Any], tf.Tensor]] = None

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        super().on_train_begin(logs)
        if self.loss_fn is not None:
            return
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        if not callable(loss):
            raise ValueError(
                "`loss` or `loss_fn` must be given when the model's compiled loss is not a single loss, got model "
                f"loss {loss!r}."
            )
        self._loss_object = loss

    def _training_loss(self) -> tf.Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(self.model, self.batch)
        x, y = self.batch
        loss = tf.reduce_mean(self._loss_object(y, self.model(x, training=False)))
        return loss + tf.add_n(self.model.losses) if self.model.losses else loss

    def measure(self) -> Dict[str, float]:
        """Measures now: {"sharpness", "preconditioned_sharpness", "sharpness_threshold"} (NaN if unmeasured)."""
        strategy = tf.distribute.get_strategy()
        if strategy.num_replicas_in_sync == 1 or not tf.distribute.in_cross_replica_context():
            return self._measure_on_this_device()
        # tf_keras cannot differentiate by a distributed variable outside a replica context. Every replica computes
        # the same numbers from the same batch and variables; keep the first replica's.
        per_replica = strategy.run(
            lambda: {name: tf.constant(value, tf.float64) for name, value in self._measure_on_this_device().items()}
        )
        return {name: float(strategy.experimental_local_results(value)[0]) for name, value in per_replica.items()}

    def _measure_on_this_device(self) -> Dict[str, float]:
        variables = list(self.model.trainable_variables)
        bounds = dict(max_iterations=self.max_iterations, tolerance=self.tolerance, seed=self.seed)
        sharpness = largest_hessian_eigenvalue(self._training_loss, variables, **bounds).eigenvalue
        optimizer = self.model.optimizer
        preconditioned_sharpness = math.nan
        preconditioner, skipped = None, "`preconditioned` is False"
        if self.preconditioned is not False:
            try:
                preconditioner, skipped = adagrad_preconditioner(optimizer, variables), None
            except ValueError as error:
                if self.preconditioned:
                    raise
                skipped = str(error)
        if preconditioner is not None:
            preconditioned_sharpness = largest_hessian_eigenvalue(
                self._training_loss, variables, preconditioner, **bounds
            ).eigenvalue
        if skipped is not None and self.preconditioned is None and self.preconditioned_skipped is None:
            _LOGGER.warning("SharpnessMonitor measures no preconditioned sharpness (NaN). %s", skipped)
        self.preconditioned_skipped = skipped
        learning_rate = current_learning_rate(optimizer)
        return {
            "sharpness": sharpness,
            "preconditioned_sharpness": preconditioned_sharpness,
            "sharpness_threshold": 2.0 / learning_rate if learning_rate > 0 else math.inf,
        }

    def on_step(self, step: int, logs: Dict[str, Any]) -> None:
        values = self.measure()
        self.record.steps.append(step)
        self.record.sharpness.append(values["sharpness"])
        self.record.preconditioned_sharpness.append(values["preconditioned_sharpness"])
        self.record.stability_threshold.append(values["sharpness_threshold"])
        logs.update(values)
        self.write_scalars(values, step)

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if logs is not None and self.record.steps:
            logs["sharpness"] = self.record.sharpness[-1]
            logs["preconditioned_sharpness"] = self.record.preconditioned_sharpness[-1]
            logs["sharpness_threshold"] = self.record.stability_threshold[-1]


def plot_sharpness(record: SharpnessRecord, path: str, title: str = "Sharpness against the stability threshold") -> str:
    """Plots sharpness, preconditioned sharpness and 2/eta over steps (log scale) to a PNG at `path`; returns it."""

    def draw(axes: Any) -> None:
        axes.plot(record.steps, np.abs(record.sharpness), marker="o", label="|lambda_max(H)|")
        if not np.all(np.isnan(record.preconditioned_sharpness)):
            axes.plot(
                record.steps, np.abs(record.preconditioned_sharpness), marker="s", label="|lambda_max(P^-1/2 H P^-1/2)|"
            )
        axes.plot(record.steps, record.stability_threshold, linestyle="--", color="black", label="2 / learning rate")

    return _plotting.plot_over_steps(record.steps, path, title, draw, figsize=(7, 4))
