"""What every optimizer of `tfrs_clippy.optimizers` shares: a base step scaled per variable by a rule.

Two families build on it, `ScaledAdagrad` (Adagrad's step, `core`) and `ScaledAdam` (Adam's step, `adam_core`).
A family says which state a variable gets (`_create_tensor_slots`, `slots_type`) and how a step runs
(`_apply_step`); this class holds
the arguments both take (which variables are clipped, at which granularity, whether factors are exported), the
read-outs (clipping factors, skipped steps) and `scaling_for`, the public hook that tells anyone who computes
steps outside the optimizer (PUB, `multitask.updates`) a variable's rule and granularity. The Keras runtime base
(`adapter.RuntimeOptimizer`) creates the slots.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from typing import Any, Callable, NamedTuple, Optional, Sequence

import tensorflow as tf

from tfrs_clippy.keras_runtime import BACKEND
from tfrs_clippy.optimizers.adapter import RuntimeOptimizer
from tfrs_clippy.optimizers.rules import ScalingRule
from tfrs_clippy.optimizers.tensor_ops import TF_OPS, keras_ops
from tfrs_clippy.optimizers.variable_names import check_patterns, matches_any, variable_name


def check_non_negative(name: str, value: float) -> float:
    """Returns `value` as a float, or raises a ValueError naming the argument if it is negative or NaN."""
    value = float(value)
    if not value >= 0:
        raise ValueError(f"`{name}` must be a non-negative number, got {value}.")
    return value


def normalize_learning_rate(learning_rate: Any) -> Any:
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


_COUNT_DTYPE = tf.int32 if BACKEND == "jax" else tf.int64
"""The skip counters' dtype: int64, but int32 on JAX (its widest integer unless x64 is enabled)."""


def _backend_ops():
    """The tensor operations of this process's backend, for the read-outs."""
    return TF_OPS if BACKEND == "tensorflow" else keras_ops()


class Scaling(NamedTuple):
    """How one variable's step is scaled: its rule (None: unscaled) and the axis of its slices (None: per tensor)."""

    rule: Optional[ScalingRule]
    clipping_axis: Optional[int]


class ScaledOptimizer(RuntimeOptimizer):
    """A base optimizer's step, scaled per variable by `scaling_rule()`; see the module docstring.

    Every model variable gets its family's state, an int64 (int32 on JAX) count of steps skipped for a
    non-finite gradient and, with `export_clipping_factors=True`, a scalar holding the smallest scale of its last
    step (float32; float64 for float64 variables).
    """

    def _init_scaling(
        self,
        export_clipping_factors: bool,
        clipping_axis: Optional[int],
        exclude_from_clipping: Optional[Sequence[str]],
        fuse_dense_updates: bool,
    ) -> None:
        """Checks and stores the arguments every scaled optimizer takes (after the Keras base is initialized)."""
        if clipping_axis is not None and (isinstance(clipping_axis, bool) or not isinstance(clipping_axis, int)):
            raise ValueError(f"`clipping_axis` must be None or an int, got {clipping_axis!r}.")
        self.clipping_axis = clipping_axis
        self.exclude_from_clipping = check_patterns("exclude_from_clipping", exclude_from_clipping)
        self.export_clipping_factors = bool(export_clipping_factors)
        self.fuse_dense_updates = bool(fuse_dense_updates)
        self._slots: list = []
        self._scalings: list[Scaling] = []
        self._slot_names: list[str] = []

    def scaling_rule(self) -> Optional[ScalingRule]:
        """The rule that scales each variable's step; None means the plain base optimizer."""
        return None

    def clipping_axis_for(self, name: str, rank: int, sparse: bool) -> Optional[int]:
        """The axis whose slices get a scale each for this variable (None: one scale for the tensor)."""
        del name, rank, sparse  # the same granularity for every variable, unless a subclass says otherwise
        return self.clipping_axis

    def scaling_for(self, variable: Any, sparse: bool) -> Scaling:
        """The rule (None if `exclude_from_clipping` matches the variable) and slice axis of `variable`'s steps.

        Args:
            variable: A model variable (built or not).
            sparse: Whether the step is on touched rows of an `IndexedSlices` gradient.
        """
        name = variable_name(variable)
        rule = None if matches_any(self.exclude_from_clipping, name) else self.scaling_rule()
        return Scaling(rule, self.clipping_axis_for(name, len(variable.shape), sparse))

    @property
    def diagnostic_variables(self) -> list[tf.Variable]:
        """The variables that describe past steps instead of holding state: skip counts and exported factors.

        Keras 3 lists them in `variables`, Keras 2 only the factors (TFRS's checkpoint layout); a rollback
        (`stability.RollbackOnDivergence`) leaves them as they are in both, since the steps they count happened.
        """
        return [slot for slots in self._slots for slot in (slots.nonfinite_steps, slots.clipping_factor)
                if slot is not None]

    def slots_of(self, variable: Any) -> Any:
        """The optimizer state of a model variable this optimizer was built with: a `slots_type` instance
        (`core.Slots`, `adam_core.AdamSlots`), for code that computes steps outside the optimizer (PUB)."""
        return self._slots[self._slot_index(variable)]

    # The family's hooks ---------------------------------------------------------------------------------------

    slots_type: type = NotImplemented
    """The family's slots dataclass: its tensor slots plus `clipping_factor` and `nonfinite_steps`."""

    def _create_tensor_slots(self, variable: Any, dtype: tf.DType) -> dict[str, Any]:
        """The family's tensor slots of `variable` by field name, created with `_create_tensor_slot`."""
        raise NotImplementedError

    def _apply_step(self, gradient: Any, variable: Any, slots: Any, learning_rate: Any) -> tf.Operation:
        """One step of the family on `variable`."""
        raise NotImplementedError

    # Shared logic ---------------------------------------------------------------------------------------------

    def _build_slots(self, var_list: Sequence[Any]) -> None:
        """Creates every variable's slots, in `var_list` order (the order `_slot_index` returns)."""
        for variable in var_list:
            dtype = tf.float64 if variable.dtype == tf.float64 else tf.float32
            # Scalars after the tensor slots: Keras 2 checkpoints by creation order, TFRS's class in this one.
            tensor_slots = self._create_tensor_slots(variable, dtype)
            clipping_factor = (
                self._create_scalar_slot(variable, "clipping_factor", dtype, 1.0)
                if self.export_clipping_factors else None
            )
            nonfinite_steps = self._create_scalar_slot(variable, "nonfinite_steps", _COUNT_DTYPE, 0)
            self._slots.append(
                self.slots_type(**tensor_slots, clipping_factor=clipping_factor, nonfinite_steps=nonfinite_steps)
            )
            self._slot_names.append(variable_name(variable))

    def _run_step(self, gradient: Any, variable: Any, learning_rate: Any) -> tf.Operation:
        return self._apply_step(gradient, variable, self._slots[self._slot_index(variable)], learning_rate)

    @property
    def clipping_factors(self) -> list:
        """One scalar variable per model variable (build order): the smallest scale of its last step.

        Empty unless `export_clipping_factors=True`. 1 means unclipped, 0 a skipped (non-finite) step.
        """
        return [slots.clipping_factor for slots in self._slots if slots.clipping_factor is not None]

    def _by_name(self, read: Callable[[Any], Any]) -> dict[str, tf.Tensor]:
        ops = _backend_ops()
        return {name: ops.convert_to_tensor(read(slots)) for name, slots in zip(self._slot_names, self._slots)}

    def clipping_factors_by_name(self) -> dict[str, tf.Tensor]:
        """{model variable name: smallest scale of its last step}; needs `export_clipping_factors=True`.

        Tensors, not floats, so that a `tf.function` (a callback's, a train step's) can read them; float32 whatever
        the slot's dtype, so that the factors of float32 and float64 variables stack.
        """
        if not self.export_clipping_factors:
            raise ValueError(
                "clipping_factors_by_name() needs the optimizer built with export_clipping_factors=True."
            )
        return {name: _backend_ops().cast(factor, "float32")
                for name, factor in self._by_name(lambda slots: slots.clipping_factor).items()}

    def nonfinite_steps_by_name(self) -> dict[str, tf.Tensor]:
        """{model variable name: number of steps skipped because its gradient had a NaN or an Inf}."""
        return self._by_name(lambda slots: slots.nonfinite_steps)

    @property
    def nonfinite_steps(self) -> tf.Tensor:
        """Total number of (variable, step) updates skipped for a non-finite gradient."""
        ops = _backend_ops()
        counts = [ops.convert_to_tensor(slots.nonfinite_steps) for slots in self._slots]
        return functools.reduce(operator.add, counts) if counts else ops.cast(0, _COUNT_DTYPE)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "export_clipping_factors": self.export_clipping_factors,
            "clipping_axis": self.clipping_axis,
            "exclude_from_clipping": list(self.exclude_from_clipping),
            "fuse_dense_updates": self.fuse_dense_updates,
        })
        return config
