"""Scaling rules: what every method of the Clippy paper is, given a step of an adaptive optimizer.

A base optimizer (Adagrad in `core`, Adam in `adam_core`) computes an unscaled step u = lr * d, where d is its
direction (Adagrad: g / sqrt(G + epsilon); Adam: m_hat / (sqrt(v_hat) + epsilon)), and moves the weights by
sigma * u. A rule maps the step to sigma, one value per tensor or per slice. Rules are pure functions of a
`StepInputs`: they can be tested alone, and the same rule serves every base optimizer. They compute with the
`tensor_ops.TensorOps` they are given (TensorFlow's by default, `keras.ops` on Keras 3's JAX and PyTorch
backends), so each formula is written once for every backend.

>>> rule = ClippyRule(variable_relative_threshold=0.1, accumulator_relative_threshold=0.0, absolute_threshold=0.01)
>>> step = StepInputs(grad=tf.constant([4.0, -1.0]), variable=tf.constant([0.1, 5.0]), precondition=tf.ones(2),
...                   direction=tf.constant([4.0, -1.0]), update=tf.constant([0.4, -0.1]))
>>> float(rule(step, reduce_axes=[0])[0])  # (0.01 + 0.1 * 0.1) / 0.4
0.05
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Protocol, Sequence

import tensorflow as tf

from tfrs_clippy.optimizers.tensor_ops import TF_OPS, TensorOps


class StepInputs(NamedTuple):
    """What a scaling rule may look at, all in the optimizer state's dtype (float32, or float64) and of the
    variable's (or the touched rows') shape."""

    grad: tf.Tensor
    variable: tf.Tensor
    precondition: tf.Tensor  # per coordinate: Adagrad 1 / sqrt(G + eps), Adam 1 / (sqrt(v_hat) + eps)
    direction: tf.Tensor  # the unscaled step per unit learning rate
    update: tf.Tensor  # lr * direction: the unscaled step


def call_rule(rule: "ScalingRule", step: StepInputs, reduce_axes: Sequence[int], ops: TensorOps) -> tf.Tensor:
    """`rule(step, reduce_axes)`, with `ops` only when it is not TensorFlow's: a rule written before rules took
    `ops` (two arguments) keeps working on TensorFlow."""
    return rule(step, reduce_axes) if ops is TF_OPS else rule(step, reduce_axes, ops)


class ScalingRule(Protocol):
    """Maps a step to its scale sigma: a scalar, or one value per slice when `reduce_axes` is narrower.

    `ops` (`tensor_ops`) is what to compute with; callers pass it only off TensorFlow (`call_rule`), so a rule that
    takes just (step, reduce_axes) serves TensorFlow unchanged.
    """

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int], ops: TensorOps = TF_OPS) -> tf.Tensor:
        ...


def reduce_axes_for(rank: int, clipping_axis: Optional[int]) -> list[int]:
    """Axes over which one scale is shared: all of them (per tensor), or all but `clipping_axis` (per slice)."""
    if clipping_axis is None or rank == 0:
        return list(range(rank))
    axis = clipping_axis % rank
    return [a for a in range(rank) if a != axis]


def _scaled_term(threshold: float, reference: tf.Tensor, ops: TensorOps) -> tf.Tensor:
    """threshold * reference, where an infinite threshold means "no limit" (inf) but still 0 for a 0 reference."""
    if math.isinf(threshold):
        return ops.where(reference > 0, ops.constant_like(reference, math.inf), ops.zeros_like(reference))
    return threshold * reference


def _norm(tensor: tf.Tensor, reduce_axes: Sequence[int], ops: TensorOps) -> tf.Tensor:
    return ops.sqrt(ops.sum(ops.square(tensor), axis=reduce_axes, keepdims=True))


@dataclasses.dataclass(frozen=True)
class ClippyRule:
    """Clippy's rule: the largest sigma <= 1 with sigma*|u_i| <= rel*|w_i| + acc_rel*p_i + abs for every i.

    Attributes:
        variable_relative_threshold: lambda_rel, the bound relative to |w_i|.
        accumulator_relative_threshold: the bound relative to the preconditioner p_i (Adagrad: 1/sqrt(G_i + eps)).
        absolute_threshold: lambda_abs, the constant part of the bound.
    """

    variable_relative_threshold: float
    accumulator_relative_threshold: float
    absolute_threshold: float

    def bound(self, step: StepInputs, ops: TensorOps = TF_OPS) -> tf.Tensor:
        """The largest move each coordinate may make."""
        return (
            self.absolute_threshold
            + _scaled_term(self.variable_relative_threshold, ops.abs(step.variable), ops)
            + _scaled_term(self.accumulator_relative_threshold, step.precondition, ops)
        )

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int], ops: TensorOps = TF_OPS) -> tf.Tensor:
        magnitude = ops.abs(step.update)
        # A coordinate that does not move puts no limit on sigma; a zero bound on a moving one forces sigma = 0.
        ratio = ops.where(magnitude == 0.0, ops.ones_like(magnitude),
                          ops.divide_no_nan(self.bound(step, ops), magnitude))
        return ops.minimum(ops.min(ratio, axis=reduce_axes, keepdims=True), 1.0)


@dataclasses.dataclass(frozen=True)
class GradientClippingRule:
    """Layer-wise gradient clipping (GC): sigma = min(1, threshold / ||g||); 1 for a zero gradient."""

    threshold: float

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int], ops: TensorOps = TF_OPS) -> tf.Tensor:
        grad_norm = _norm(step.grad, reduce_axes, ops)
        clipped = ops.divide_no_nan(ops.constant_like(grad_norm, self.threshold), grad_norm)
        return ops.where(grad_norm > self.threshold, clipped, ops.ones_like(grad_norm))


@dataclasses.dataclass(frozen=True)
class AdaptiveGradientClippingRule:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021):

    sigma = min(1, threshold * max(||w||, weight_floor) / ||g||) per unit; 1 for a zero gradient. The floor keeps
    zero-initialized units (biases) trainable, as in the authors' code.
    """

    threshold: float
    weight_floor: float = 1e-3

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int], ops: TensorOps = TF_OPS) -> tf.Tensor:
        grad_norm = _norm(step.grad, reduce_axes, ops)
        limit = self.threshold * ops.maximum(_norm(step.variable, reduce_axes, ops), self.weight_floor)
        return ops.where(grad_norm > limit, ops.divide_no_nan(limit, grad_norm), ops.ones_like(grad_norm))


@dataclasses.dataclass(frozen=True)
class LambRule:
    """LAMB's trust ratio on the optimizer's direction d: sigma = trust_scale * ||w|| / ||d||.

    phi(x) = x. LAMB's guard: sigma = 1 when ||w|| or ||d|| is zero. Unlike the clipping rules sigma may exceed 1.
    """

    trust_scale: float

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int], ops: TensorOps = TF_OPS) -> tf.Tensor:
        weight_norm = _norm(step.variable, reduce_axes, ops)
        direction_norm = _norm(step.direction, reduce_axes, ops)
        ratio = self.trust_scale * ops.divide_no_nan(weight_norm, direction_norm)
        return ops.where(ops.logical_and(weight_norm > 0.0, direction_norm > 0.0), ratio, ops.ones_like(ratio))


@dataclasses.dataclass(frozen=True)
class UpdateRmsRule:
    """StableAdamW's learning-rate scale (Wortsman et al. 2023): sigma = 1 / max(1, RMS(g * p) / threshold).

    RMS(g * p) over the tensor (or slice) measures how far the gradient has outgrown the second moment the
    preconditioner p was built from (Adam: g / sqrt(v_hat) has RMS ~1 when v_hat tracks g^2); a spike above
    `threshold` (d = 1 in the paper) shrinks the step by that factor. Adafactor's update clipping is the same test
    on the update.
    """

    threshold: float

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int], ops: TensorOps = TF_OPS) -> tf.Tensor:
        normalized = step.grad * step.precondition
        rms = ops.sqrt(ops.mean(ops.square(normalized), axis=reduce_axes, keepdims=True))
        return 1.0 / ops.maximum(1.0, rms / self.threshold)


@dataclasses.dataclass(frozen=True)
class MinimumRule:
    """The smallest of several rules' scales: every rule's limit holds at once."""

    rules: tuple

    def __call__(self, step: StepInputs, reduce_axes: Sequence[int], ops: TensorOps = TF_OPS) -> tf.Tensor:
        scales = [call_rule(rule, step, reduce_axes, ops) for rule in self.rules]
        smallest = scales[0]
        for scale in scales[1:]:
            smallest = ops.minimum(smallest, scale)
        return smallest
