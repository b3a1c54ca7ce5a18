"""Adagrad with a per-variable scaling rule: its math, and the TensorFlow paths that apply it (no Keras).

Every method of the Clippy paper is Adagrad whose update is multiplied by a scale in [0, 1]:

    r = g / sqrt(G + epsilon) ;  w <- w - lr * sigma * r

where the methods differ only in how sigma is computed (a `rules.ScalingRule`). This module holds that one Adagrad
core (`scaled_adagrad_step`, on plain tensors), the two ways to apply it to variables: dense (`apply_dense`) and
sparse (`apply_sparse`, touched rows only), and what `adam_core` shares with it (`deduplicate`, `record_step`,
`call_compiled`). The Adagrad optimizers call these functions and nothing else. The step's formulas
(`scaled_adagrad_step`, `next_dense_values`) take a `tensor_ops.TensorOps`: TensorFlow's by default, `keras.ops` on
Keras 3's JAX and PyTorch backends (`keras_ops_steps`).

Speed: when sigma is a minimum over coordinates (no rule, or Clippy's rule per tensor, the common case), the
dense XLA step reduces it in cache-sized chunks before one elementwise pass writes both results
(`_two_pass_dense_values`), and a sparse step outside XLA deduplicates with `tf.unique` and computes its rows in
one XLA call (`_fused_sparse_rows_step`). Same formulas as the general path: sigma is bit-identical across chunk
sizes and the values agree to float rounding (tests/test_clippy_adagrad.py). Every other rule, per-slice scales
and XLA-compiled train steps' sparse steps take the general path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import tensorflow as tf

from tfrs_clippy.optimizers.rules import ClippyRule, ScalingRule, StepInputs, call_rule, reduce_axes_for
from tfrs_clippy.optimizers.tensor_ops import TF_OPS, TensorOps
from tfrs_clippy.xla_context import in_xla_context

ACCUMULATOR_UPDATES = ("delayed", "delayed_clipped", "standard")
"""When and with what the accumulator G is updated.

- "delayed": r uses G from before this step, then G += g^2 (TFRS's default).
- "delayed_clipped": as "delayed", but G += (sigma * g)^2 (TFRS's `clip_accumulator_update=True`).
- "standard": G += g^2 first, then r uses the new G (Adagrad and the paper's Algorithm 1).
"""


class StepResult(NamedTuple):
    """One step's outcome, before it is written to any variable."""

    delta: tf.Tensor  # in the accumulator's dtype, to subtract from the variable
    accumulator_increment: tf.Tensor  # to add to the accumulator
    scale: tf.Tensor  # sigma, broadcastable to the variable (keepdims)
    smallest_scale: tf.Tensor  # scalar: the smallest sigma of the slices that move (1 if none does)
    all_finite: tf.Tensor  # bool scalar: the gradient had no NaN or Inf


def apply_rule(rule: Optional[ScalingRule], step: StepInputs, clipping_axis: Optional[int],
               ops: TensorOps = TF_OPS) -> tf.Tensor:
    """sigma of `step` under `rule` (keepdims, one per tensor or slice); ones for no rule (the plain optimizer)."""
    rank = len(step.update.shape)
    if rule is None:
        return ops.ones([1] * rank, step.update.dtype)
    return call_rule(rule, step, reduce_axes_for(rank, clipping_axis), ops)


def smallest_moving_scale(rule: Optional[ScalingRule], scale: tf.Tensor, step: StepInputs,
                          clipping_axis: Optional[int], ops: TensorOps = TF_OPS) -> tf.Tensor:
    """The smallest sigma over the slices that move (1 if none moves): the step's exported clipping factor.

    A slice whose update is 0 moves by 0 whatever its sigma, so its sigma says nothing about the step. Counting it
    would make the factor depend on how many untouched rows a path sees: the dense step sees every row, a sparse
    step only the touched ones, and under XLA also `deduplicate`'s padding rows.
    """
    if rule is None:
        return ops.ones([], scale.dtype)  # and no pass over the update
    if _has_fast_scale(rule, clipping_axis, len(step.update.shape)):
        # Clippy per tensor: a coordinate that does not move has ratio 1, so sigma is already the minimum over the
        # moving ones (1 if none moves); no second pass over the update.
        return ops.reshape(scale, [])
    reduce_axes = reduce_axes_for(len(step.update.shape), clipping_axis)
    moves = ops.any(step.update != 0.0, axis=reduce_axes, keepdims=True)
    moving_scales = ops.where(moves, scale, ops.constant_like(scale, float("inf")))
    return ops.where(ops.any(moves), ops.min(moving_scales), ops.ones([], scale.dtype))


def adagrad_step_inputs(grad: tf.Tensor, squared_grad: tf.Tensor, variable: tf.Tensor, accumulator: tf.Tensor,
                        learning_rate: tf.Tensor, epsilon: float, accumulator_update: str,
                        ops: TensorOps = TF_OPS) -> StepInputs:
    """Adagrad's unscaled step as a rule sees it: p = 1 / sqrt(G + epsilon) (G with g^2 first in the standard
    order), direction g * p, update lr * g * p; all tensors in the accumulator's dtype."""
    denominator_accumulator = accumulator + squared_grad if accumulator_update == "standard" else accumulator
    precondition = ops.rsqrt(denominator_accumulator + epsilon)
    update = learning_rate * grad * precondition
    return StepInputs(grad=grad, variable=variable, precondition=precondition, direction=grad * precondition,
                      update=update)


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
    ops: TensorOps = TF_OPS,
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
        ops: The tensor operations to compute with (`tensor_ops`: TensorFlow's, or `keras.ops`).

    Returns:
        A `StepResult`; the caller commits it only when `all_finite`.
    """
    compute_dtype = accumulator.dtype  # float32, or float64 for float64 variables
    grad = ops.cast(grad, compute_dtype)
    variable = ops.cast(variable, compute_dtype)
    learning_rate = ops.cast(learning_rate, compute_dtype)
    squared_grad = ops.square(grad)
    step = adagrad_step_inputs(grad, squared_grad, variable, accumulator, learning_rate, epsilon, accumulator_update,
                               ops)
    scale = apply_rule(rule, step, clipping_axis, ops)
    if accumulator_update == "delayed_clipped":
        accumulator_increment = ops.square(grad * scale)
    else:
        accumulator_increment = squared_grad
    all_finite = ops.all(ops.is_finite(grad))
    smallest_scale = smallest_moving_scale(rule, scale, step, clipping_axis, ops)
    return StepResult(step.update * scale, accumulator_increment, scale, smallest_scale, all_finite)


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


def step_record(slots: Any, result: Any, ops: TensorOps = TF_OPS) -> tuple[Any, Optional[Any]]:
    """What a step adds to its skip count (1 if skipped, else 0) and the factor it exports (its smallest scale; 0
    for a skipped step; None without `export_clipping_factors`).

    `slots` is any optimizer state with `clipping_factor` (or None) and `nonfinite_steps` (`Slots`,
    `adam_core.AdamSlots`); `result` any step result with `smallest_scale` and `all_finite`.
    """
    skipped = ops.cast(ops.logical_not(result.all_finite), slots.nonfinite_steps.dtype)
    if slots.clipping_factor is None:
        return skipped, None
    smallest_scale = ops.cast(result.smallest_scale, slots.clipping_factor.dtype)
    return skipped, ops.where(result.all_finite, smallest_scale, 0.0)


def record_step(slots: Any, result: Any) -> list:
    """Writes `step_record` to the slots' TensorFlow variables; returns the assignments."""
    skipped, factor = step_record(slots, result)
    updates = [slots.nonfinite_steps.assign_add(skipped)]
    if factor is not None:
        updates.append(slots.clipping_factor.assign(factor))
    return updates


_CHUNK = 1 << 18
"""Elements per chunk of the XLA scale pass (1 MB of float32): the pass's temporaries then stay in cache."""


def _has_fast_scale(rule: Optional[ScalingRule], clipping_axis: Optional[int], rank: int) -> bool:
    """Whether sigma is a minimum over coordinates (no rule, or Clippy's per tensor), which chunks exactly."""
    per_tensor = clipping_axis is None or rank == 0
    return per_tensor and (rule is None or type(rule) is ClippyRule)


def _chunk_scale(grad, variable, accumulator, learning_rate, *, epsilon, accumulator_update, rule):
    """sigma (a scalar) and whether `grad` is finite, for flat chunks; `scaled_adagrad_step`'s formulas."""
    all_finite = tf.reduce_all(tf.math.is_finite(grad))
    if rule is None:
        return tf.ones([], accumulator.dtype), all_finite
    step = adagrad_step_inputs(grad, tf.square(grad), variable, accumulator, learning_rate, epsilon,
                               accumulator_update)
    return tf.reshape(rule(step, [0]), []), all_finite


def _chunked_scale(grad, variable, accumulator, learning_rate, **options):
    """sigma and finiteness of a whole tensor (cast to the compute dtype), reduced chunk by chunk.

    XLA on CPU does not fuse a reduction into the elementwise math that feeds it: over the whole tensor it writes
    the per-coordinate ratio (and an is_finite array) to memory and reads it back. An XLA while loop over
    cache-sized chunks keeps those temporaries in cache. Both reductions are a minimum (an all), so the result is
    bit-identical to one reduction over the tensor.
    """
    flat = [tf.reshape(t, [-1]) for t in (grad, variable, accumulator)]
    size = flat[0].shape[0]
    chunks = size // _CHUNK if size is not None else 0
    if chunks < 2:
        return _chunk_scale(*flat, learning_rate, **options)
    blocks = [tf.reshape(t[: chunks * _CHUNK], [chunks, _CHUNK]) for t in flat]

    def body(i, sigma, finite):
        chunk_sigma, chunk_finite = _chunk_scale(*(b[i] for b in blocks), learning_rate, **options)
        return i + 1, tf.minimum(sigma, chunk_sigma), tf.logical_and(finite, chunk_finite)

    _, sigma, finite = tf.while_loop(
        lambda i, *_: i < chunks, body, (tf.constant(0), tf.ones([], accumulator.dtype), tf.constant(True)))
    if chunks * _CHUNK < size:
        tail_sigma, tail_finite = _chunk_scale(*(t[chunks * _CHUNK:] for t in flat), learning_rate, **options)
        sigma, finite = tf.minimum(sigma, tail_sigma), tf.logical_and(finite, tail_finite)
    return sigma, finite


def _two_pass_dense_values(grad, variable, accumulator, learning_rate, *, epsilon, accumulator_update, rule):
    """`next_dense_values` for a rule `_has_fast_scale` accepts, as two explicit passes: the chunked scale, then
    one elementwise pass that writes both results from it (8 arrays of memory traffic; the fused kernel moves 5)."""
    compute_dtype = accumulator.dtype
    grad = tf.cast(grad, compute_dtype)
    state = tf.cast(variable, compute_dtype)
    learning_rate = tf.cast(learning_rate, compute_dtype)
    sigma, all_finite = _chunked_scale(grad, state, accumulator, learning_rate, epsilon=epsilon,
                                       accumulator_update=accumulator_update, rule=rule)
    squared_grad = tf.square(grad)
    denominator_accumulator = accumulator + squared_grad if accumulator_update == "standard" else accumulator
    update = learning_rate * grad * tf.math.rsqrt(denominator_accumulator + epsilon)
    scale = tf.reshape(sigma, [1] * grad.shape.rank)
    delta = update * scale
    increment = tf.square(grad * scale) if accumulator_update == "delayed_clipped" else squared_grad
    new_variable = tf.where(all_finite, tf.cast(state - delta, variable.dtype), variable)
    new_accumulator = tf.where(all_finite, accumulator + increment, accumulator)
    # Per tensor, Clippy's sigma is 1 when no coordinate moves, so it is also the smallest moving scale.
    return new_variable, new_accumulator, _Outcome(sigma, all_finite)


class _Outcome(NamedTuple):
    """What `record_step` reads of a dense step: all a compiled step returns besides the new values (every
    returned tensor is written to memory, so the full-size delta and increment are not)."""

    smallest_scale: tf.Tensor
    all_finite: tf.Tensor


def next_dense_values(
    grad: tf.Tensor,
    variable: tf.Tensor,
    accumulator: tf.Tensor,
    learning_rate: tf.Tensor,
    ops: TensorOps = TF_OPS,
    **options,
) -> tuple[tf.Tensor, tf.Tensor, _Outcome]:
    """The variable's and accumulator's values after one step; unchanged where the gradient was not finite.

    Selecting instead of branching lets XLA fuse everything into two passes (one to reduce the scale, one to write
    both results); the results are then assigned, not added, so no further pass reads them. Under XLA, a step
    whose sigma is a minimum (no rule, or Clippy's per tensor) reduces it in cache-sized chunks
    (`_chunked_scale`), with the same formulas: the results agree to the bit in the scale. With `ops` other than
    TensorFlow's (Keras 3 on JAX or PyTorch) the backend's compiler does the fusing.
    """
    if ops is TF_OPS and in_xla_context() and _has_fast_scale(options.get("rule"), options.get("clipping_axis"),
                                                                 len(grad.shape)):
        options = {k: v for k, v in options.items() if k != "clipping_axis"}
        return _two_pass_dense_values(grad, variable, accumulator, learning_rate, **options)
    result = scaled_adagrad_step(grad, variable, accumulator, learning_rate, ops=ops, **options)
    new_variable = ops.cast(ops.cast(variable, result.delta.dtype) - result.delta, variable.dtype)
    new_variable = ops.where(result.all_finite, new_variable, variable)
    new_accumulator = ops.where(result.all_finite, accumulator + result.accumulator_increment, accumulator)
    return new_variable, new_accumulator, _Outcome(result.smallest_scale, result.all_finite)


# Without XLA, TensorFlow runs ~20 full-tensor kernels per dense step. Sparse steps stay unfused: their row count
# changes every step and would recompile.
_fused_next_dense_values = tf.function(next_dense_values, jit_compile=True)


def call_compiled(compiled: Callable, *tensors: tf.Tensor, **options) -> Any:
    """Calls the XLA-compiled `tf.function` `compiled`, without TensorFlow's retracing warning in eager use.

    A dense step is traced once per variable shape, so an eager `apply_gradients` on a model with five differently
    shaped variables makes TensorFlow warn "5 out of the last 5 calls ... triggered tf.function retracing" on the
    first step, though every later step reuses the traces. That counter sees only eager calls of the
    `tf.function`; a concrete function looked up from its own cache traces exactly as often and is not counted.
    Inside a `tf.function` (graph building) the call is left as it was, so the compiled graph is unchanged.
    """
    if not tf.executing_eagerly():
        return compiled(*tensors, **options)
    return compiled.get_concrete_function(*tensors, **options)(*tensors)


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
    tensors = [grad, *(tf.convert_to_tensor(t) for t in (variable, slots.accumulator, learning_rate))]
    step_fn = functools.partial(call_compiled, _fused_next_dense_values) if fused else next_dense_values
    new_variable, new_accumulator, result = step_fn(
        *tensors,
        epsilon=epsilon,
        accumulator_update=accumulator_update,
        rule=rule,
        clipping_axis=clipping_axis,
    )
    return tf.group([variable.assign(new_variable), slots.accumulator.assign(new_accumulator),
                     *record_step(slots, result)])


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
    if not in_xla_context():
        num_distinct = tf.reduce_sum(tf.cast(is_first, tf.int32))
        values, indices = values[:num_distinct], indices[:num_distinct]
    return tf.IndexedSlices(values, indices, grad.dense_shape)


def _sparse_rows_step(values, variable_rows, accumulator_rows, learning_rate, **options):
    """One step on rows of a variable (distinct, except for padding rows whose values are 0).

    Returns the rows' delta and accumulator increment, both zero where the gradient is not finite (so that
    scatter-adding them writes nothing), and the step's smallest moving scale and finiteness.
    """
    result = scaled_adagrad_step(values, variable_rows, accumulator_rows, learning_rate, **options)
    keep = result.all_finite
    return (tf.where(keep, result.delta, tf.zeros_like(result.delta)),
            tf.where(keep, result.accumulator_increment, tf.zeros_like(result.accumulator_increment)),
            result.smallest_scale, keep)


def _gathered_rows_step(values, indices, variable_handle, accumulator_handle, learning_rate, *, variable_dtype,
                        accumulator_dtype, **options):
    """`_sparse_rows_step` on the rows `indices`, gathered from the variables behind the two resource handles.

    Handles, not the variables' values: a read value still alive at the scatter would make the scatter copy the
    whole table first. Not the variables either: a nested `tf.function` traced with variable arguments can keep
    the first caller's variables.
    """
    variable_rows = tf.raw_ops.ResourceGather(resource=variable_handle, indices=indices, dtype=variable_dtype)
    accumulator_rows = tf.raw_ops.ResourceGather(resource=accumulator_handle, indices=indices, dtype=accumulator_dtype)
    return _sparse_rows_step(values, variable_rows, accumulator_rows, learning_rate, **options)


@functools.lru_cache(maxsize=None)
def _fused_sparse_rows_step(**options) -> Callable:
    """`_gathered_rows_step` with `options` bound, as one XLA call. The rows are padded to a power of two, so it
    compiles once per bucket (log2 of the largest id count), not once per distinct row count."""
    return tf.function(functools.partial(_gathered_rows_step, **options), jit_compile=True)


def _tf_variable(variable: Any) -> tf.Variable:
    """The TensorFlow variable behind a model variable (Keras 3 wraps one)."""
    return variable if isinstance(variable, tf.Variable) else variable.value


def _bucketed_unique(grad: tf.IndexedSlices) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`tf.unique` + segment sum, the values and ids padded to the next power of two rows (at most the id count).

    Returns (values, ids, k): the first k rows are the distinct ids (in order of first appearance) and their
    summed values, the padding rows have id 0 and value 0 (scatter-adding them changes nothing).
    """
    unique, positions = tf.unique(grad.indices)
    k = tf.shape(unique, out_type=tf.int32)[0]
    n = tf.shape(grad.indices, out_type=tf.int32)[0]
    power = tf.math.ceil(tf.math.log(tf.cast(tf.maximum(k, 1), tf.float32)) / math.log(2.0))
    bucket = tf.maximum(tf.minimum(tf.bitwise.left_shift(1, tf.cast(power, tf.int32)), n), k)
    values = tf.math.unsorted_segment_sum(grad.values, positions, bucket)
    ids = tf.pad(unique, [[0, bucket - k]])
    return values, ids, k


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

    Outside XLA, a step whose sigma is a minimum (no rule, or Clippy's per tensor; zero padding rows then change
    nothing) deduplicates with `tf.unique` and computes the rows' step in one XLA call (`_bucketed_unique`,
    `_fused_sparse_rows_step`); every other step uses `deduplicate` and TensorFlow ops, and XLA-compiled train
    steps (static shapes) use `deduplicate`'s padding.
    """
    options = dict(epsilon=epsilon, accumulator_update=accumulator_update, rule=rule, clipping_axis=clipping_axis)
    learning_rate = tf.convert_to_tensor(learning_rate)
    if not in_xla_context() and _has_fast_scale(rule, clipping_axis, variable.shape.rank):
        values, indices, _ = _bucketed_unique(grad)
        table = _tf_variable(variable)
        compiled = _fused_sparse_rows_step(variable_dtype=tf.as_dtype(getattr(table, "true_dtype", table.dtype)),
                                           accumulator_dtype=slots.accumulator.dtype, **options)
        delta, increment, smallest_scale, all_finite = call_compiled(
            compiled, values, indices, table.handle, slots.accumulator.handle,
            tf.cast(learning_rate, slots.accumulator.dtype))
    else:
        unique = deduplicate(grad)
        indices = unique.indices
        delta, increment, smallest_scale, all_finite = _sparse_rows_step(
            unique.values, tf.gather(variable, indices), tf.gather(slots.accumulator, indices), learning_rate,
            **options)
    # Scatter-*add* (not update): padding rows then write nothing, and so does a non-finite gradient (zeros).
    return tf.group([
        slots.accumulator.scatter_add(tf.IndexedSlices(increment, indices)),
        variable.scatter_sub(tf.IndexedSlices(tf.cast(delta, variable.dtype), indices)),
        *record_step(slots, _Outcome(smallest_scale, all_finite)),
    ])
