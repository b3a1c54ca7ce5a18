"""The few tensor operations the optimizers' math is written against, bound to TensorFlow and to `keras.ops`.

The scaling rules (`rules`) and the base steps (`core.scaled_adagrad_step`, `adam_core.scaled_adam_step`) take an
`ops` argument instead of calling `tf` directly, so that one definition of every formula serves the TensorFlow
path (Keras 2, Keras 3 on TensorFlow, sparse `IndexedSlices`, XLA) and the backend-neutral path of Keras 3 on JAX
and PyTorch. `TF_OPS` is the default everywhere, so TensorFlow graphs are the ones the `tf` calls built before.

>>> TF_OPS.min(tf.constant([[3.0, 1.0], [2.0, 5.0]]), axis=[1], keepdims=True).numpy().ravel().tolist()
[1.0, 2.0]
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class TensorOps:
    """Element-wise and reduction operations, with TensorFlow's names where TensorFlow and NumPy differ.

    Reductions take `axis` (a sequence of ints, possibly empty) and `keepdims`. `cast` and `ones` take a dtype of
    the bound library or its name; `constant_like(x, value)` is the scalar `value` in x's dtype (exact: a
    Python float is not rounded through float32 first), which broadcasts against x.
    """

    abs: Callable
    all: Callable
    any: Callable
    cast: Callable
    convert_to_tensor: Callable
    divide_no_nan: Callable
    constant_like: Callable
    is_finite: Callable
    logical_and: Callable
    logical_not: Callable
    maximum: Callable
    mean: Callable
    min: Callable
    minimum: Callable
    ones: Callable
    ones_like: Callable
    power: Callable
    reshape: Callable
    rsqrt: Callable
    sqrt: Callable
    square: Callable
    sum: Callable
    where: Callable
    zeros_like: Callable


def _tf_reduction(reduce: Callable) -> Callable:
    def reduction(x, axis: Sequence[int] | None = None, keepdims: bool = False):
        return reduce(x, axis=None if axis is None else list(axis), keepdims=keepdims)
    return reduction


TF_OPS = TensorOps(
    abs=tf.abs,
    all=_tf_reduction(tf.reduce_all),
    any=_tf_reduction(tf.reduce_any),
    cast=tf.cast,
    convert_to_tensor=tf.convert_to_tensor,
    divide_no_nan=tf.math.divide_no_nan,
    constant_like=lambda x, value: tf.constant(value, x.dtype),
    is_finite=tf.math.is_finite,
    logical_and=tf.logical_and,
    logical_not=tf.logical_not,
    maximum=tf.maximum,
    mean=_tf_reduction(tf.reduce_mean),
    min=_tf_reduction(tf.reduce_min),
    minimum=tf.minimum,
    ones=tf.ones,
    ones_like=tf.ones_like,
    power=tf.pow,
    reshape=tf.reshape,
    rsqrt=tf.math.rsqrt,
    sqrt=tf.sqrt,
    square=tf.square,
    sum=_tf_reduction(tf.reduce_sum),
    where=tf.where,
    zeros_like=tf.zeros_like,
)
"""TensorFlow's operations: the optimizers' default."""


def _keras_reduction(reduce: Callable) -> Callable:
    def reduction(x, axis: Sequence[int] | None = None, keepdims: bool = False):
        return reduce(x, axis=None if axis is None else tuple(axis), keepdims=keepdims)
    return reduction


@functools.lru_cache(maxsize=None)
def keras_ops() -> TensorOps:
    """`keras.ops` (Keras 3, any backend) as a `TensorOps`; imported on first use, so that a Keras 2 process never
    loads Keras 3's backend."""
    from keras import ops  # pylint: disable=import-outside-toplevel

    return TensorOps(
        abs=ops.abs,
        all=_keras_reduction(ops.all),
        any=_keras_reduction(ops.any),
        cast=ops.cast,
        convert_to_tensor=ops.convert_to_tensor,
        divide_no_nan=ops.divide_no_nan,
        constant_like=lambda x, value: ops.convert_to_tensor(value, dtype=x.dtype),
        is_finite=ops.isfinite,
        logical_and=ops.logical_and,
        logical_not=ops.logical_not,
        maximum=ops.maximum,
        mean=_keras_reduction(ops.mean),
        min=_keras_reduction(ops.min),
        minimum=ops.minimum,
        ones=lambda shape, dtype: ops.ones(shape, dtype=dtype),
        ones_like=ops.ones_like,
        power=ops.power,
        reshape=ops.reshape,
        rsqrt=ops.rsqrt,
        sqrt=ops.sqrt,
        square=ops.square,
        sum=_keras_reduction(ops.sum),
        where=ops.where,
        zeros_like=ops.zeros_like,
    )

