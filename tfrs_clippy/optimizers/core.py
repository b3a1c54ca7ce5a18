"""Adagrad with a per-variable scaling rule, in pure TensorFlow (no Keras).

Every method of the Clippy paper is Adagrad whose update is multiplied by a scale in [0, 1]:

    r = g / sqrt(G + epsilon) ;  w <- w - lr * sigma * r

where the methods differ only in how sigma is computed (`ScalingRule`). This module holds that one Adagrad core
(`scaled_adagrad_step`, on plain tensors) and the two ways to apply it to variables: dense (`apply_dense`) and
sparse (`apply_sparse`, touched rows only). Both Keras adapters call these functions and nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Protocol, Sequence

import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # pylint: disable=g-direct-tensorflow-import

ACCUMULATOR_UPDATES = ("delayed", "delayed_clipped", "standard")
"""When and with what the accumulator G is updated.

- "delayed": r uses G from before this step, then G += g^2 (TFRS's default).
- "delayed_clipped": as "delayed", but G += (sigma * g)^2 (TFRS's `clip_accumulator_update=True`).
- "standard": G += g^2 first, then r uses the new G (Adagrad and the paper's Algorithm 1).
"""


class StepInputs(NamedTuple):
    """What a scaling rule may look at, all in the accumulator's dtype (float32, or float64) and of the variable's (or the touched rows') shape."""

    grad: tf.Tensor
    variable: tf.Tensor
    precondition: tf.Tensor  # 1 / sqrt(G + epsilon)
    update: tf.Tensor  # lr * grad * precondition: the unscaled Adagrad step


class ScalingRule(Protocol):
    """Maps a step to its scale sigma in [0, 1]: a scalar, or one value per slice when `reduce_axes` is narrower."""

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int]) -> tf.Tensor:
        ...


def _scaled_term(threshold: float, reference: tf.Tensor) -> tf.Tensor:
    """threshold * reference, where an infinite threshold means "no limit" (inf) but still 0 for a 0 reference."""
    if math.isinf(threshold):
        return tf.where(reference > 0, tf.constant(math.inf, reference.dtype), tf.zeros_like(reference))
    return threshold * reference


@dataclasses.dataclass(frozen=True)
class ClippyRule:
    """Clippy's rule: the largest sigma <= 1 with sigma*|u_i| <= rel*|w_i| + acc_rel*p_i + abs for every i.

    Attributes:
        variable_relative_threshold: lambda_rel, the bound relative to |w_i|.
        accumulator_relative_threshold: the bound relative to p_i = 1/sqrt(G_i + epsilon).
        absolute_threshold: lambda_abs, the constant part of the bound.
    """

    variable_relative_threshold: float
    accumulator_relative_threshold: float
    absolute_threshold: float

    def bound(self, step: StepInputs) -> tf.Tensor:
        """The largest move each coordinate may make."""
        return (
            self.absolute_threshold
            + _scaled_term(self.variable_relative_threshold, tf.abs(step.variable))
            + _scaled_term(self.accumulator_relative_threshold, step.precondition)
        )

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int]) -> tf.Tensor:
        magnitude = tf.abs(step.update)
        # A coordinate that does not move puts no limit on sigma; a zero bound on a moving one forces sigma = 0.
        ratio = tf.where(magnitude == 0.0, tf.ones_like(magnitude), tf.math.divide_no_nan(self.bound(step), magnitude))
        return tf.minimum(tf.reduce_min(ratio, axis=reduce_axes, keepdims=True), 1.0)


def _norm(tensor: tf.Tensor, reduce_axes: Sequence[int]) -> tf.Tensor:
    return tf.sqrt(tf.reduce_sum(tf.square(tensor), axis=reduce_axes, keepdims=True))


@dataclasses.dataclass(frozen=True)
class GradientClippingRule:
    """Layer-wise gradient clipping (GC): sigma = min(1, threshold / ||g||); 1 for a zero gradient."""

    threshold: float

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int]) -> tf.Tensor:
        grad_norm = _norm(step.grad, reduce_axes)
        clipped = tf.math.divide_no_nan(tf.cast(self.threshold, grad_norm.dtype), grad_norm)
        return tf.where(grad_norm > self.threshold, clipped, tf.ones_like(grad_norm))


@dataclasses.dataclass(frozen=True)
class AdaptiveGradientClippingRule:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021):

    sigma = min(1, threshold * max(||w||, weight_floor) / ||g||) per unit; 1 for a zero gradient. The floor keeps
    zero-initialized units (biases) trainable, as in the authors' code.
    """

    threshold: float
    weight_floor: float = 1e-3

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int]) -> tf.Tensor:
        grad_norm = _norm(step.grad, reduce_axes)
        limit = self.threshold * tf.maximum(_norm(step.variable, reduce_axes), self.weight_floor)
        return tf.where(grad_norm > limit, tf.math.divide_no_nan(limit, grad_norm), tf.ones_like(grad_norm))


@dataclasses.dataclass(frozen=True)
class LambRule:
    """LAMB's trust ratio on Adagrad's direction r = g / sqrt(G): sigma = trust_scale * ||w|| / ||r||.

    phi(x) = x. LAMB's guard: sigma = 1 when ||w|| or ||r|| is zero. Unlike the clipping rules sigma may exceed 1.
    """

    trust_scale: float

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int]) -> tf.Tensor:
        weight_norm = _norm(step.variable, reduce_axes)
        direction_norm = _norm(step.grad * step.precondition, reduce_axes)
        ratio = self.trust_scale * tf.math.divide_no_nan(weight_norm, direction_norm)
        return tf.where((weight_norm > 0.0) & (direction_norm > 0.0), ratio, tf.ones_like(ratio))


class StepResult(NamedTuple):
    """One step's outcome, before it is written to any variable."""

    delta: tf.Tensor  # in the accumulator's dtype, to subtract from the variable
    accumulator_increment: tf.Tensor  # to add to the accumulator
    scale: tf.Tensor  # sigma, broadcastable to the variable (keepdims)
    all_finite: tf.Tensor  # bool scalar: the gradient had no NaN or Inf


def reduce_axes_for(rank: int, clipping_axis: Optional[int]) -> list[int]:
    """Axes over which one scale is shared: all of them (per tensor), or all but `clipping_axis` (per slice)."""
    if clipping_axis is None or rank == 0:
        return list(range(rank))
    axis = clipping_axis % rank
    return [a for a in range(rank) if a != axis]


def scaled_adagrad_step(
    grad: tf.Tensor,
    variable: tf.Tensor,
    accumulator: tf.Tensor,
    learning_rate: tf.Tensor,
    *,
    epsilon: float,
    accumulator_update: str,
    rule: Optional[ScalingRule],
    clipping_axis: Optional[int] = None,
) -> StepResult:
    """Computes one scaled Adagrad step on tensors (a whole variable, or its touched rows).

    Args:
        grad: The gradient, of the variable's dtype.
        variable: The variable's current value.
        accumulator: The accumulator G; its dtype (float32, or float64) is the one the step is computed in.
        learning_rate: The learning rate of this step (a scalar).
        epsilon: Added to G inside the square root.
        accumulator_update: One of `ACCUMULATOR_UPDATES`.
        rule: The scaling rule; None for plain Adagrad (sigma = 1).
        clipping_axis: None for one scale per tensor, or the axis whose slices get a scale each.

    Returns:
        A `StepResult`; the caller commits it only when `all_finite`.
    """
    compute_dtype = accumulator.dtype  # float32, or float64 for float64 variables
    grad = tf.cast(grad, compute_dtype)
    variable = tf.cast(variable, compute_dtype)
    learning_rate = tf.cast(learning_rate, compute_dtype)
    squared_grad = tf.square(grad)
    denominator_accumulator = accumulator + squared_grad if accumulator_update == "standard" else accumulator
    precondition = tf.math.rsqrt(denominator_accumulator + epsilon)
    update = learning_rate * grad * precondition
    if rule is None:
        scale = tf.ones([1] * grad.shape.rank, compute_dtype)
    else:
        step = StepInputs(grad=grad, variable=variable, precondition=precondition, update=update)
        scale = rule(step, reduce_axes_for(grad.shape.rank, clipping_axis))
    if accumulator_update == "delayed_clipped":
        accumulator_increment = tf.square(grad * scale)
    else:
        accumulator_increment = squared_grad
    all_finite = tf.reduce_all(tf.math.is_finite(grad))
    return StepResult(update * scale, accumulator_increment, scale, all_finite)


@dataclasses.dataclass(frozen=True)
class Slots:
    """The optimizer state of one model variable.

    Deliberately not a tuple: a list of tuples of variables on a Keras optimizer would be tracked for checkpoints
    by position, which does not line up between a sharded table and the same table unsharded. The adapters track
    the variables themselves.
    """

    accumulator: tf.Variable  # float32 (float64 for float64 variables), the variable's shape
    clipping_factor: Optional[tf.Variable]  # scalar, the accumulator's dtype: min sigma of the last step, or None
    nonfinite_steps: tf.Variable  # int64 scalar: steps skipped for a non-finite gradient


def _record(slots: Slots, result: StepResult) -> list:
    """Counts a skipped step, and exports the step's smallest scale (0 for a skipped step)."""
    updates = [slots.nonfinite_steps.assign_add(tf.cast(tf.logical_not(result.all_finite), tf.int64))]
    if slots.clipping_factor is not None:
        smallest_scale = tf.cast(tf.reduce_min(result.scale), slots.clipping_factor.dtype)
        updates.append(slots.clipping_factor.assign(tf.where(result.all_finite, smallest_scale, 0.0)))
    return updates


def next_dense_values(
    grad: tf.Tensor,
    variable: tf.Tensor,
    accumulator: tf.Tensor,
    learning_rate: tf.Tensor,
    **options,
) -> tuple[tf.Tensor, tf.Tensor, StepResult]:
    """The variable's and accumulator's values after one step; unchanged where the gradient was not finite.

    Selecting instead of branching lets XLA fuse everything into two passes (one to reduce the scale, one to write
    both results); the results are then assigned, not added, so no further pass reads them.
    """
    result = scaled_adagrad_step(grad, variable, accumulator, learning_rate, **options)
    new_variable = tf.cast(tf.cast(variable, result.delta.dtype) - result.delta, variable.dtype)
    new_variable = tf.where(result.all_finite, new_variable, variable)
    new_accumulator = tf.where(result.all_finite, accumulator + result.accumulator_increment, accumulator)
    return new_variable, new_accumulator, result


# Without XLA, TensorFlow runs ~20 full-tensor kernels per dense step. Sparse steps stay unfused: their row count
# changes every step and would recompile.
_fused_next_dense_values = tf.function(next_dense_values, jit_compile=True)


def _fused_dense_step(grad, variable, accumulator, learning_rate, **options):
    """`_fused_next_dense_values`, without TensorFlow's retracing warning in eager use.

    The step is traced once per variable shape, so an eager `apply_gradients` on a model with five differently
    shaped variables makes TensorFlow warn "5 out of the last 5 calls ... triggered tf.function retracing" on the
    first step, though every later step reuses the traces. That counter sees only eager calls of the
    `tf.function`; a concrete function looked up from its own cache traces exactly as often and is not counted.
    Inside a `tf.function` (graph building) the call is left as it was, so the compiled graph is unchanged.
    """
    if not tf.executing_eagerly():
        return _fused_next_dense_values(grad, variable, accumulator, learning_rate, **options)
    concrete = _fused_next_dense_values.get_concrete_function(grad, variable, accumulator, learning_rate, **options)
    return concrete(grad, variable, accumulator, learning_rate)


def apply_dense(
    variable: tf.Variable,
    grad: tf.Tensor,
    slots: Slots,
    learning_rate: tf.Tensor,
    *,
    epsilon: float,
    accumulator_update: str,
    rule: Optional[ScalingRule],
    clipping_axis: Optional[int] = None,
    fused: bool = True,
) -> tf.Operation:
    """Applies one scaled Adagrad step to a whole variable; a non-finite gradient changes nothing but the count.

    Args:
        variable: The model variable.
        grad: Its dense gradient.
        slots: Its optimizer state.
        learning_rate: The learning rate of this step.
        epsilon, accumulator_update, rule, clipping_axis: As in `scaled_adagrad_step`.
        fused: Compute the step with XLA (two passes over memory) instead of one TensorFlow kernel per operation.
    """
    step_fn = _fused_dense_step if fused else next_dense_values
    new_variable, new_accumulator, result = step_fn(
        grad,
        tf.convert_to_tensor(variable),
        tf.convert_to_tensor(slots.accumulator),
        tf.convert_to_tensor(learning_rate),
        epsilon=epsilon,
        accumulator_update=accumulator_update,
        rule=rule,
        clipping_axis=clipping_axis,
    )
    return tf.group([variable.assign(new_variable), slots.accumulator.assign(new_accumulator), *_record(slots, result)])


def _in_xla_context() -> bool:
    """Whether the graph being traced is compiled by XLA (`jit_compile=True`), which needs static shapes."""
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


def deduplicate(grad: tf.IndexedSlices) -> tf.IndexedSlices:
    """Sums the values of repeated indices; the result's indices are distinct and sorted.

    Under XLA the result keeps the static number of rows: the first k rows hold the k distinct indices and their
    summed values, the remaining rows have index 0 and value 0, so scatter-*adding* them changes nothing. Elsewhere
    the padding is cut off, so that later gathers and scatters touch each row once.
    """
    num_rows = tf.shape(grad.indices)[0]
    order = tf.argsort(grad.indices, stable=True)
    sorted_indices = tf.gather(grad.indices, order)
    # Ids are non-negative, so -1 marks the start: correct for an empty gradient too.
    previous = tf.concat([tf.constant([-1], sorted_indices.dtype), sorted_indices[:-1]], axis=0)
    is_first = sorted_indices != previous
    segment = tf.cumsum(tf.cast(is_first, tf.int32)) - 1
    values = tf.math.unsorted_segment_sum(tf.gather(grad.values, order), segment, num_rows)
    indices = tf.tensor_scatter_nd_update(
        tf.zeros_like(grad.indices), tf.expand_dims(segment, 1), sorted_indices
    )
    if not _in_xla_context():
        num_distinct = tf.reduce_sum(tf.cast(is_first, tf.int32))
        values, indices = values[:num_distinct], indices[:num_distinct]
    return tf.IndexedSlices(values, indices, grad.dense_shape)


def apply_sparse(
    variable: tf.Variable,
    grad: tf.IndexedSlices,
    slots: Slots,
    learning_rate: tf.Tensor,
    *,
    epsilon: float,
    accumulator_update: str,
    rule: Optional[ScalingRule],
    clipping_axis: Optional[int] = None,
) -> tf.Operation:
    """Applies one scaled Adagrad step to the rows an `IndexedSlices` gradient touches, and to no other row.

    Repeated indices are summed first, so the result equals `apply_dense` on the densified gradient: rows that are
    not touched have a zero update, which puts no limit on sigma, and keep their accumulator.
    """
    unique = deduplicate(grad)
    result = scaled_adagrad_step(
        unique.values,
        tf.gather(variable, unique.indices),
        tf.gather(slots.accumulator, unique.indices),
        learning_rate,
        epsilon=epsilon,
        accumulator_update=accumulator_update,
        rule=rule,
        clipping_axis=clipping_axis,
    )
    # Scatter-*add* (not update): the padding rows of `deduplicate` then write nothing. A non-finite gradient
    # writes zeros.
    keep = result.all_finite
    return tf.group([
        slots.accumulator.scatter_add(
            tf.IndexedSlices(tf.where(keep, result.accumulator_increment, tf.zeros_like(result.accumulator_increment)), unique.indices)
        ),
        variable.scatter_sub(
            tf.IndexedSlices(tf.cast(tf.where(keep, result.delta, tf.zeros_like(result.delta)), variable.dtype), unique.indices)
        ),
        *_record(slots, result),
    ])
