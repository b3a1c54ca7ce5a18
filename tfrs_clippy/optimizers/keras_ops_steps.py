"""The optimizers' steps on Keras 3's JAX and PyTorch backends: `core`'s and `adam_core`'s math with `keras.ops`.

Nothing here computes a formula: `core.next_dense_values` and `adam_core.next_dense_values` (and through them the
`rules`) are called with `tensor_ops.keras_ops()`, and the results are written with `Optimizer.assign`, which JAX's
stateless train step (`stateless_apply` under `jax.jit`) and PyTorch's eager variables both understand. These
backends hand the optimizer dense gradients only (an embedding's gradient is a dense table), so there is no sparse
path; a NaN/Inf gradient writes nothing but its count, as on TensorFlow.
"""

from __future__ import annotations

from typing import Any

from tfrs_clippy.optimizers import adam_core, core
from tfrs_clippy.optimizers.tensor_ops import keras_ops


def _record_step(optimizer: Any, slots: Any, outcome: Any) -> None:
    """`core.step_record` written through `optimizer.assign`."""
    skipped, factor = core.step_record(slots, outcome, keras_ops())
    optimizer.assign_add(slots.nonfinite_steps, skipped)
    if factor is not None:
        optimizer.assign(slots.clipping_factor, factor)


def apply_adagrad(optimizer: Any, variable: Any, grad: Any, slots: core.Slots, learning_rate: Any,
                  **options) -> None:
    """One scaled Adagrad step of `variable`; `options` are `core.scaled_adagrad_step`'s keyword arguments."""
    ops = keras_ops()
    tensors = [ops.convert_to_tensor(t) for t in (grad, variable, slots.accumulator, learning_rate)]
    new_variable, new_accumulator, outcome = core.next_dense_values(*tensors, ops=ops, **options)
    optimizer.assign(variable, new_variable)
    optimizer.assign(slots.accumulator, new_accumulator)
    _record_step(optimizer, slots, outcome)


def apply_adam(optimizer: Any, variable: Any, grad: Any, slots: adam_core.AdamSlots, learning_rate: Any, step: Any,
               **options) -> None:
    """One scaled Adam step of `variable` at the 1-based step `step`; `options` are
    `adam_core.scaled_adam_step`'s keyword arguments."""
    ops = keras_ops()
    tensors = [ops.convert_to_tensor(t) for t in (grad, variable, learning_rate, step, slots.momentum, slots.velocity)]
    velocity_hat = None if slots.velocity_hat is None else ops.convert_to_tensor(slots.velocity_hat)
    new_variable, new_momentum, new_velocity, new_velocity_hat, result = adam_core.next_dense_values(
        *tensors, velocity_hat, ops=ops, **options)
    optimizer.assign(variable, new_variable)
    optimizer.assign(slots.momentum, new_momentum)
    optimizer.assign(slots.velocity, new_velocity)
    if slots.velocity_hat is not None:
        optimizer.assign(slots.velocity_hat, new_velocity_hat)
    _record_step(optimizer, slots, result)
