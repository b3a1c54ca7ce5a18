"""Adam with a per-variable scaling rule, its math and TensorFlow paths (no Keras): the Adam counterpart of `core`.

Keras's Adam, with its epsilon convention (epsilon outside the square root, bias correction folded into the rate):

    m <- m + (1 - b1) (g - m) ;  v <- v + (1 - b2) (g^2 - v)   [amsgrad: v_hat <- max(v_hat, v), used for v]
    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t) ;  u = lr_t * m / (sqrt(v) + epsilon) ;  w <- w - sigma * u

The moments always see the raw gradient; only the step u is scaled. sigma comes from the same `rules` as
Adagrad's, given a `rules.StepInputs` with update = u, the bias-corrected preconditioner
p = 1 / (sqrt(v_hat) + epsilon_hat) (v_hat = v / (1 - b2^t), epsilon_hat = epsilon / sqrt(1 - b2^t): Keras's
epsilon, seen from the corrected moments) and the direction m_hat * p (m_hat = m / (1 - b1^t)), so that
u = lr * direction. A NaN/Inf gradient writes nothing: no weight, no moment.

Sparse gradients (`tf.IndexedSlices`) have two semantics (`SPARSE_UPDATES`):

- "dense": the gradient is densified and the dense step runs. This *is* Keras's Adam: every row's moments decay
  every step, and an untouched row still moves by its momentum, so sigma must see every row's step to bound them.
  It costs a full-table pass per step, as Keras's Adam does.
- "lazy": only the touched rows' moments and weights change (TF Addons' LazyAdam): an untouched row neither
  decays nor moves. Work is proportional to the touched rows; sigma is taken over them (the only rows that move).
  Bias correction uses the optimizer's global step, as LazyAdam does.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import tensorflow as tf

from tfrs_clippy.optimizers import core
from tfrs_clippy.optimizers.rules import ScalingRule, StepInputs
from tfrs_clippy.optimizers.tensor_ops import TF_OPS, TensorOps

SPARSE_UPDATES = ("dense", "lazy")


class AdamStepResult(NamedTuple):
    """One Adam step's outcome, before it is written to any variable (all in the moments' dtype)."""

    delta: tf.Tensor  # sigma * u, to subtract from the variable
    momentum: tf.Tensor  # the new m
    velocity: tf.Tensor  # the new v
    velocity_hat: Optional[tf.Tensor]  # the new v_hat (amsgrad), or None
    scale: tf.Tensor  # sigma, broadcastable to the variable (keepdims)
    smallest_scale: tf.Tensor  # scalar: the smallest sigma of the slices that move (1 if none does)
    all_finite: tf.Tensor  # bool scalar: the gradient had no NaN or Inf


@dataclasses.dataclass(frozen=True)
class AdamSlots:
    """The Adam state of one model variable (a dataclass, not a tuple, for the reason `core.Slots` gives)."""

    momentum: tf.Variable  # m: float32 (float64 for float64 variables), the variable's shape
    velocity: tf.Variable  # v
    velocity_hat: Optional[tf.Variable]  # v_hat with amsgrad, else None
    clipping_factor: Optional[tf.Variable]  # scalar: min sigma of the last step (0 if skipped), or None
    nonfinite_steps: tf.Variable  # int64 scalar: steps skipped for a non-finite gradient


def scaled_adam_step(
    grad: tf.Tensor,
    variable: tf.Tensor,
    momentum: tf.Tensor,
    velocity: tf.Tensor,
    velocity_hat: Optional[tf.Tensor],
    learning_rate: tf.Tensor,
    step: tf.Tensor,
    *,
    beta_1: float,
    beta_2: float,
    epsilon: float,
    rule: Optional[ScalingRule],
    clipping_axis: Optional[int] = None,
    moving: Optional[tf.Tensor] = None,
    ops: TensorOps = TF_OPS,
) -> AdamStepResult:
    """Computes one scaled Adam step on tensors (a whole variable, or its touched rows).

    Args:
        grad: The gradient.
        variable: The variable's current value.
        momentum, velocity, velocity_hat: The current moments (velocity_hat None without amsgrad); their dtype is
            the one the step is computed in.
        learning_rate: The learning rate of this step (a scalar).
        step: The 1-based step number t of the bias correction (a scalar).
        beta_1, beta_2, epsilon: Adam's hyper-parameters, epsilon outside the square root (Keras's convention).
        rule: The scaling rule; None for plain Adam (sigma = 1).
        clipping_axis: None for one scale per tensor, or the axis whose slices get a scale each.
        moving: Optional bool vector along axis 0: rows that may move (False rows get u = 0, which puts no limit
            on sigma). Used for the padding rows of a deduplicated sparse gradient.
        ops: The tensor operations to compute with (`tensor_ops`: TensorFlow's, or `keras.ops`).

    Returns:
        An `AdamStepResult`; the caller commits it only when `all_finite`.
    """
    dtype = momentum.dtype
    grad = ops.cast(grad, dtype)
    variable = ops.cast(variable, dtype)
    learning_rate = ops.cast(learning_rate, dtype)
    t = ops.cast(step, dtype)
    momentum_correction = 1 - ops.power(ops.constant_like(t, beta_1), t)
    velocity_correction = ops.sqrt(1 - ops.power(ops.constant_like(t, beta_2), t))
    alpha = learning_rate * velocity_correction / momentum_correction
    new_momentum = momentum + (grad - momentum) * (1 - beta_1)
    new_velocity = velocity + (ops.square(grad) - velocity) * (1 - beta_2)
    new_velocity_hat = None if velocity_hat is None else ops.maximum(velocity_hat, new_velocity)
    denominator = ops.sqrt(new_velocity if new_velocity_hat is None else new_velocity_hat) + epsilon
    update = (new_momentum * alpha) / denominator  # Keras's order of operations
    if moving is not None:
        mask = ops.reshape(moving, [-1] + [1] * (len(grad.shape) - 1))
        update = ops.where(mask, update, ops.zeros_like(update))
    precondition = velocity_correction / denominator
    inputs = StepInputs(grad=grad, variable=variable, precondition=precondition,
                        direction=new_momentum / momentum_correction * precondition, update=update)
    scale = core.apply_rule(rule, inputs, clipping_axis, ops)
    all_finite = ops.all(ops.is_finite(grad))
    return AdamStepResult(update * scale, new_momentum, new_velocity, new_velocity_hat, scale,
                          core.smallest_moving_scale(rule, scale, inputs, clipping_axis, ops), all_finite)


def next_dense_values(grad, variable, learning_rate, step, momentum, velocity, velocity_hat=None, ops=TF_OPS,
                      **options):
    """(variable, m, v, v_hat, result) after one dense step; all unchanged where the gradient was not finite."""
    result = scaled_adam_step(grad, variable, momentum, velocity, velocity_hat, learning_rate, step, ops=ops,
                              **options)
    keep = result.all_finite
    new_variable = ops.cast(ops.cast(variable, result.delta.dtype) - result.delta, variable.dtype)
    new_velocity_hat = None if velocity_hat is None else ops.where(keep, result.velocity_hat, velocity_hat)
    return (
        ops.where(keep, new_variable, variable),
        ops.where(keep, result.momentum, momentum),
        ops.where(keep, result.velocity, velocity),
        new_velocity_hat,
        result,
    )


# As in `core`: XLA fuses the ~20 element-wise kernels of a dense step into a few passes over memory.
_fused_next_dense_values = tf.function(next_dense_values, jit_compile=True)


def apply_dense(
    variable: tf.Variable,
    grad: tf.Tensor,
    slots: AdamSlots,
    learning_rate: tf.Tensor,
    step: tf.Tensor,
    *,
    fused: bool = True,
    **options,
) -> tf.Operation:
    """Applies one scaled Adam step to a whole variable; a non-finite gradient changes nothing but the count.

    `options` are `scaled_adam_step`'s keyword arguments (beta_1, beta_2, epsilon, rule, clipping_axis).
    """
    tensors = [tf.convert_to_tensor(t) for t in (grad, variable, learning_rate, step, slots.momentum, slots.velocity)]
    if slots.velocity_hat is not None:
        tensors.append(tf.convert_to_tensor(slots.velocity_hat))
    step_fn = functools.partial(core.call_compiled, _fused_next_dense_values) if fused else next_dense_values
    new_variable, new_momentum, new_velocity, new_velocity_hat, result = step_fn(*tensors, **options)
    updates = [variable.assign(new_variable), slots.momentum.assign(new_momentum), slots.velocity.assign(new_velocity)]
    if slots.velocity_hat is not None:
        updates.append(slots.velocity_hat.assign(new_velocity_hat))
    return tf.group([*updates, *core.record_step(slots, result)])


def _distinct_rows(indices: tf.Tensor) -> tf.Tensor:
    """For `core.deduplicate`'s output: True for its distinct (sorted, increasing) rows, False for the padding.

    Under XLA the padding rows repeat index 0 after the sorted distinct ones, so a row is genuine iff it is the
    first or its index exceeds the previous one. Elsewhere every row is genuine and this is all True.
    """
    rising = indices[1:] > indices[:-1]
    return tf.concat([tf.ones([1], tf.bool), rising], axis=0)[: tf.shape(indices)[0]]


def apply_sparse(
    variable: tf.Variable,
    grad: tf.IndexedSlices,
    slots: AdamSlots,
    learning_rate: tf.Tensor,
    step: tf.Tensor,
    *,
    sparse_updates: str = "dense",
    fused: bool = True,
    **options,
) -> tf.Operation:
    """Applies one scaled Adam step for an `IndexedSlices` gradient, in one of `SPARSE_UPDATES` semantics.

    Repeated indices are summed first in both: the gradient is the densified one.
    """
    if sparse_updates == "dense":
        return apply_dense(variable, tf.convert_to_tensor(grad), slots, learning_rate, step, fused=fused, **options)
    if sparse_updates != "lazy":
        raise ValueError(f"`sparse_updates` must be one of {SPARSE_UPDATES}, got {sparse_updates!r}.")
    unique = core.deduplicate(grad)
    genuine = _distinct_rows(unique.indices)
    result = scaled_adam_step(
        unique.values,
        tf.gather(variable, unique.indices),
        tf.gather(slots.momentum, unique.indices),
        tf.gather(slots.velocity, unique.indices),
        None if slots.velocity_hat is None else tf.gather(slots.velocity_hat, unique.indices),
        learning_rate,
        step,
        moving=genuine,
        **options,
    )
    # Differences are scatter-*added* so that masked (padding) rows and a skipped step write zeros.
    mask = tf.reshape(tf.logical_and(genuine, result.all_finite), [-1] + [1] * (variable.shape.rank - 1))

    def add(slot: tf.Variable, new_rows: tf.Tensor):
        change = new_rows - tf.gather(slot, unique.indices)
        return slot.scatter_add(tf.IndexedSlices(tf.where(mask, change, tf.zeros_like(change)), unique.indices))

    updates = [add(slots.momentum, result.momentum), add(slots.velocity, result.velocity)]
    if slots.velocity_hat is not None:
        updates.append(add(slots.velocity_hat, result.velocity_hat))
    delta = tf.cast(tf.where(mask, result.delta, tf.zeros_like(result.delta)), variable.dtype)
    updates.append(variable.scatter_sub(tf.IndexedSlices(delta, unique.indices)))
    return tf.group([*updates, *core.record_step(slots, result)])
