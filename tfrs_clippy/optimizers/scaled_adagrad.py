"""What both Keras adapters of the scaled Adagrad optimizer share: arguments, checks, config, slot dispatch.

A runtime adapter (`keras2_adapter`, `keras3_adapter`) combines `ScaledAdagradMixin` with its Keras optimizer
base and supplies only what differs between runtimes: how the base is initialized, how slots are created, how a
variable finds its index. The math is `core`'s.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfrs_clippy.optimizers import core


def check_non_negative(name: str, value: float) -> float:
    """Returns `value` as a float, or raises a ValueError naming the argument if it is negative or NaN."""
    value = float(value)
    if not value >= 0:
        raise ValueError(f"`{name}` must be a non-negative number, got {value}.")
    return value


def _normalize_learning_rate(learning_rate: Any) -> Any:
    """Returns a constant learning rate as a Python float (schedules and callables unchanged), checked.

    Keras 2 (TFRS's runtime) accepts ints, NumPy scalars and eager scalar tensors; Keras 3 only Python floats.
    Converting them here gives both runtimes TFRS's rule. Keras 2 copies a tensor's or variable's value into its
    own variable, so the float loses nothing.

    Raises:
        ValueError: The learning rate is a number that is negative, NaN or infinite.
    """
    if tf.is_tensor(learning_rate) and learning_rate.shape.rank == 0 and hasattr(learning_rate, "numpy"):
        learning_rate = learning_rate.numpy()  # an eager scalar; a symbolic one is left to the Keras base
    if isinstance(learning_rate, numbers.Real) and not isinstance(learning_rate, bool):
        learning_rate = float(learning_rate)
        if not (math.isfinite(learning_rate) and learning_rate >= 0):
            raise ValueError(
                f"`learning_rate` must be a finite non-negative number or a schedule, got {learning_rate}."
            )
    return learning_rate


def check_denominator(initial_accumulator_value: float, epsilon: float) -> None:
    """Raises a ValueError naming both arguments unless every step's sqrt(G + epsilon) is positive.

    G starts at `initial_accumulator_value` and never decreases (every order only adds squares), so the first
    step's G + epsilon is the smallest. It must be a positive *normal* number in float32 (and in float64, the
    accumulator dtype of float64 variables): TensorFlow flushes subnormals to 0 on CPU, where rsqrt then returns
    inf. epsilon 0 is therefore fine with a positive initial accumulator (TFRS's tests use it), and so is a
    negative epsilon smaller in size than it; both 0 divide by zero, in the "standard" order too (a coordinate
    whose gradient is 0 computes 0 * inf).
    """
    smallest_normal = float(np.finfo(np.float32).tiny)
    in_float32 = float(np.float32(initial_accumulator_value) + np.float32(epsilon))
    in_float64 = float(np.float64(initial_accumulator_value) + np.float64(epsilon))
    if not (in_float32 >= smallest_normal and in_float64 >= smallest_normal):
        raise ValueError(
            f"`initial_accumulator_value` + `epsilon` must be positive (every step divides by "
            f"sqrt(G + epsilon), and G starts at `initial_accumulator_value`), got "
            f"initial_accumulator_value={initial_accumulator_value} and epsilon={epsilon} (sum {in_float64}); "
            f"TFRS's defaults are 0.1 and 1e-7."
        )


class ScaledAdagradMixin:
    """Adagrad whose update is scaled by `scaling_rule()` per variable; plain Adagrad when the rule is None.

    Subclasses choose the rule (`scaling_rule`) and may add hyper-parameters (`get_config`). Every model variable
    gets a float32 accumulator (float64 for float64 variables), an int64 count of steps skipped for a non-finite
    gradient and, with `export_clipping_factors=True`, a scalar holding the smallest scale of the last step (float32;
    float64 for float64 variables, as TFRS's class has it, so that checkpoints of either class restore into the
    other).
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        initial_accumulator_value: float = 0.1,
        epsilon: float = 1e-7,
        accumulator_update: str = "standard",
        export_clipping_factors: bool = False,
        clipping_axis: Optional[int] = None,
        exclude_from_clipping: Optional[Sequence[str]] = None,
        fuse_dense_updates: bool = True,
        name: str = "ScaledAdagrad",
        **kwargs,
    ) -> None:
        """Initializes the optimizer.

        Args:
            learning_rate: A number (int, float, NumPy scalar or eager scalar tensor, as Keras 2 accepts) or a
                Keras learning-rate schedule.
            initial_accumulator_value: Starting value of every accumulator (>= 0).
            epsilon: Added to the accumulator inside the square root; 0 (or negative) is allowed as long as
                `initial_accumulator_value + epsilon` is positive.
            accumulator_update: One of `core.ACCUMULATOR_UPDATES`: "standard" (G += g^2, then the step),
                "delayed" (the step, then G += g^2) or "delayed_clipped" (the step, then G += (sigma*g)^2).
            export_clipping_factors: Keep one scalar per variable with the smallest scale of its last step,
                readable as `clipping_factors` and `clipping_factors_by_name()`.
            clipping_axis: None for one scale per tensor; an axis (0: one per embedding row) for one scale per
                slice along it.
            exclude_from_clipping: Regular expressions; a variable whose name (Keras 3: path) matches one gets
                plain Adagrad (scale 1).
            fuse_dense_updates: Compute dense steps with XLA, which fuses them into two passes over memory.
            name: The optimizer's name.
            **kwargs: The Keras optimizer base's keyword arguments (clipnorm, global_clipnorm, weight_decay, ...).

        Raises:
            ValueError: An argument is out of range; the message names it and its value.
        """
        learning_rate = _normalize_learning_rate(learning_rate)
        initial_accumulator_value = check_non_negative("initial_accumulator_value", initial_accumulator_value)
        epsilon = float(epsilon)
        if math.isnan(epsilon):
            raise ValueError(f"`epsilon` must be a number, got {epsilon}.")
        check_denominator(initial_accumulator_value, epsilon)
        self._init_keras_base(learning_rate, name, kwargs)
        self.initial_accumulator_value = initial_accumulator_value
        self.epsilon = epsilon
        if accumulator_update not in core.ACCUMULATOR_UPDATES:
            raise ValueError(
                f"`accumulator_update` must be one of {core.ACCUMULATOR_UPDATES}, got {accumulator_update!r}."
            )
        self.accumulator_update = accumulator_update
        if clipping_axis is not None and (isinstance(clipping_axis, bool) or not isinstance(clipping_axis, int)):
            raise ValueError(f"`clipping_axis` must be None or an int, got {clipping_axis!r}.")
        self.clipping_axis = clipping_axis
        if isinstance(exclude_from_clipping, str):
            raise ValueError(
                f"`exclude_from_clipping` must be a list of regular expressions, got the string "
                f"{exclude_from_clipping!r}; wrap it in a list."
            )
        self.exclude_from_clipping = list(exclude_from_clipping or [])
        for pattern in self.exclude_from_clipping:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"`exclude_from_clipping` has an invalid pattern {pattern!r}: {error}.") from None
        self.export_clipping_factors = bool(export_clipping_factors)
        self.fuse_dense_updates = bool(fuse_dense_updates)
        self._slots: list[core.Slots] = []
        self._clipped: list[bool] = []
        self._slot_names: list[str] = []

    def scaling_rule(self) -> Optional[core.ScalingRule]:
        """The rule that scales each variable's update; None means plain Adagrad."""
        return None

    def clipping_axis_for(self, name: str, rank: int, sparse: bool) -> Optional[int]:
        """The axis whose slices get a scale each for this variable (None: one scale for the tensor)."""
        del name, rank, sparse  # the same granularity for every variable, unless a subclass says otherwise
        return self.clipping_axis

    def accumulator(self, variable) -> tf.Variable:
        """The Adagrad accumulator G of a model variable this optimizer was built with."""
        return self._slots[self._slot_index(variable)].accumulator

    # Runtime hooks: each Keras adapter implements these ----------------------------------------------------------

    def _init_keras_base(self, learning_rate: Any, name: str, kwargs: dict) -> None:
        raise NotImplementedError

    def _create_accumulator(self, variable, dtype: tf.DType):
        raise NotImplementedError

    def _create_scalar_slot(self, variable, name: str, dtype: tf.DType, value: float):
        raise NotImplementedError

    def _slot_index(self, variable) -> int:
        raise NotImplementedError

    # Shared logic ---------------------------------------------------------------------------------------------

    @staticmethod
    def _variable_name(variable) -> str:
        return str(getattr(variable, "path", None) or variable.name)

    def _is_clipped(self, name: str) -> bool:
        return not any(re.search(pattern, name) for pattern in self.exclude_from_clipping)

    def _build_slots(self, var_list: Sequence[Any]) -> None:
        """Creates every variable's slots, in `var_list` order (the order the index hooks return)."""
        for variable in var_list:
            compute_dtype = tf.float64 if variable.dtype == tf.float64 else tf.float32
            name = self._variable_name(variable)
            self._slots.append(
                core.Slots(
                    accumulator=self._create_accumulator(variable, compute_dtype),
                    clipping_factor=(
                        self._create_scalar_slot(variable, "clipping_factor", compute_dtype, 1.0)
                        if self.export_clipping_factors
                        else None
                    ),
                    nonfinite_steps=self._create_scalar_slot(variable, "nonfinite_steps", tf.int64, 0),
                )
            )
            self._clipped.append(self._is_clipped(name))
            self._slot_names.append(name)

    def _apply_scaled_adagrad(self, gradient, variable, learning_rate) -> tf.Operation:
        """Applies one step to `variable`: the sparse path for `IndexedSlices`, the dense path otherwise."""
        index = self._slot_index(variable)
        sparse = isinstance(gradient, tf.IndexedSlices)
        options = dict(
            epsilon=self.epsilon,
            accumulator_update=self.accumulator_update,
            rule=self.scaling_rule() if self._clipped[index] else None,
            clipping_axis=self.clipping_axis_for(self._slot_names[index], variable.shape.rank, sparse),
        )
        if sparse:
            return core.apply_sparse(variable, gradient, self._slots[index], learning_rate, **options)
        return core.apply_dense(
            variable, gradient, self._slots[index], learning_rate, fused=self.fuse_dense_updates, **options
        )

    @property
    def clipping_factors(self) -> list:
        """One scalar variable per model variable (build order): the smallest scale of its last step.

        Empty unless `export_clipping_factors=True`. 1 means unclipped, 0 a skipped (non-finite) step.
        """
        return [slots.clipping_factor for slots in self._slots if slots.clipping_factor is not None]

    def _by_name(self, read: Callable[[core.Slots], Any]) -> dict[str, tf.Tensor]:
        return {name: tf.convert_to_tensor(read(slots)) for name, slots in zip(self._slot_names, self._slots)}

    def clipping_factors_by_name(self) -> dict[str, tf.Tensor]:
        """{model variable name: smallest scale of its last step}; needs `export_clipping_factors=True`."""
        if not self.export_clipping_factors:
            raise ValueError(
                "clipping_factors_by_name() needs the optimizer built with export_clipping_factors=True."
            )
        # float32 whatever the slot's dtype, so that the factors of float32 and float64 variables stack.
        return {name: tf.cast(factor, tf.float32)
                for name, factor in self._by_name(lambda slots: slots.clipping_factor).items()}

    def nonfinite_steps_by_name(self) -> dict[str, tf.Tensor]:
        """{model variable name: number of steps skipped because its gradient had a NaN or an Inf}."""
        return self._by_name(lambda slots: slots.nonfinite_steps)

    @property
    def nonfinite_steps(self) -> tf.Tensor:
        """Total number of (variable, step) updates skipped for a non-finite gradient."""
        counts = [tf.convert_to_tensor(slots.nonfinite_steps) for slots in self._slots]
        return tf.add_n(counts) if counts else tf.constant(0, tf.int64)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "initial_accumulator_value": self.initial_accumulator_value,
            "epsilon": self.epsilon,
            "accumulator_update": self.accumulator_update,
            "export_clipping_factors": self.export_clipping_factors,
            "clipping_axis": self.clipping_axis,
            "exclude_from_clipping": list(self.exclude_from_clipping),
            "fuse_dense_updates": self.fuse_dense_updates,
        })
        return config
