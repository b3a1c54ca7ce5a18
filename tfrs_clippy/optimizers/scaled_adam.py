"""The Adam family: Keras's Adam whose step is scaled per variable by a rule (`adam_core` has the math).

`ScaledAdam` is the family's base: Keras's Adam arguments and moments, and the step of `adam_core`; `ClippyAdam`
and the Adam baselines (`baselines`) set the rule, and `Adam` is the family with no rule.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import tensorflow as tf

from tfrs_clippy.keras_runtime import BACKEND
from tfrs_clippy.optimizers import adam_core, keras_ops_steps
from tfrs_clippy.optimizers.scaled_optimizer import ScaledOptimizer, normalize_learning_rate


class ScaledAdam(ScaledOptimizer):
    """Keras's Adam whose step is scaled by `scaling_rule()` per variable; plain Adam when the rule is None.

    Every model variable gets float32 moments m, v (float64 for float64 variables; and v_hat with amsgrad),
    created and checkpointed as Keras's `Adam` creates them (per variable m, v[, vhat]), besides
    `ScaledOptimizer`'s scalars.
    """

    slots_type = adam_core.AdamSlots

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        export_clipping_factors: bool = False,
        clipping_axis: Optional[int] = None,
        exclude_from_clipping: Optional[Sequence[str]] = None,
        sparse_updates: str = "dense",
        fuse_dense_updates: bool = True,
        name: str = "ScaledAdam",
        **kwargs,
    ) -> None:
        """Initializes the optimizer.

        Args:
            learning_rate: A number or a Keras learning-rate schedule.
            beta_1, beta_2: The moments' decay rates, in [0, 1).
            epsilon: Added to sqrt(v) (Keras's convention); must be positive, else a coordinate whose gradients
                were all 0 computes 0 / 0.
            amsgrad: Divide by the running maximum of v (Reddi et al. 2018), as Keras's `amsgrad=True`.
            export_clipping_factors: Keep one scalar per variable with the smallest scale of its last step.
            clipping_axis: None for one scale per tensor; an axis (0: one per embedding row) for one per slice.
            exclude_from_clipping: Regular expressions; a matching variable (name, Keras 3: path) gets plain Adam.
            sparse_updates: How an `IndexedSlices` gradient updates, one of `adam_core.SPARSE_UPDATES`: "dense"
                (Keras's Adam exactly: every row's moments decay and every row moves) or "lazy" (only the touched
                rows, as TF Addons' LazyAdam).
            fuse_dense_updates: Compute dense steps with XLA.
            name: The optimizer's name.
            **kwargs: The Keras optimizer base's keyword arguments (clipnorm, global_clipnorm, weight_decay, ...).
                Weight decay is the base's decoupled one, applied outside sigma (and also on a skipped step).

        Raises:
            ValueError: An argument is out of range; the message names it and its value.
        """
        learning_rate = normalize_learning_rate(learning_rate)
        for argument, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"`{argument}` must be in [0, 1), got {value}.")
        epsilon = float(epsilon)
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"`epsilon` must be a finite positive number, got {epsilon}.")
        if sparse_updates not in adam_core.SPARSE_UPDATES:
            raise ValueError(f"`sparse_updates` must be one of {adam_core.SPARSE_UPDATES}, got {sparse_updates!r}.")
        self._init_keras_base(learning_rate, name, kwargs)
        self._init_scaling(export_clipping_factors, clipping_axis, exclude_from_clipping, fuse_dense_updates)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = epsilon
        self.amsgrad = bool(amsgrad)
        self.sparse_updates = sparse_updates

    def momentum(self, variable) -> tf.Variable:
        """The first moment m of a model variable this optimizer was built with."""
        return self._slots[self._slot_index(variable)].momentum

    def velocity(self, variable) -> tf.Variable:
        """The second moment v of a model variable this optimizer was built with."""
        return self._slots[self._slot_index(variable)].velocity

    def _create_tensor_slots(self, variable, dtype: tf.DType) -> dict[str, Any]:
        # Keras's Adam's slot names and order, so that its checkpoints restore into this optimizer.
        return {
            "momentum": self._create_tensor_slot(variable, "m", dtype, 0.0),
            "velocity": self._create_tensor_slot(variable, "v", dtype, 0.0),
            "velocity_hat": self._create_tensor_slot(variable, "vhat", dtype, 0.0) if self.amsgrad else None,
        }

    def _apply_step(self, gradient, variable, slots: adam_core.AdamSlots, learning_rate) -> tf.Operation:
        """One step at the optimizer's step t = iterations + 1."""
        sparse = isinstance(gradient, tf.IndexedSlices)
        rule, clipping_axis = self.scaling_for(variable, sparse and self.sparse_updates == "lazy")
        options = dict(beta_1=self.beta_1, beta_2=self.beta_2, epsilon=self.epsilon, rule=rule,
                       clipping_axis=clipping_axis)
        if BACKEND != "tensorflow":
            return keras_ops_steps.apply_adam(self, variable, gradient, slots, learning_rate, self.iterations + 1,
                                              **options)
        options["fused"] = self.fuse_dense_updates
        step = tf.convert_to_tensor(self.iterations) + 1
        if sparse:
            return adam_core.apply_sparse(variable, gradient, slots, learning_rate, step,
                                          sparse_updates=self.sparse_updates, **options)
        return adam_core.apply_dense(variable, gradient, slots, learning_rate, step, **options)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({
            "beta_1": self.beta_1,
            "beta_2": self.beta_2,
            "epsilon": self.epsilon,
            "amsgrad": self.amsgrad,
            "sparse_updates": self.sparse_updates,
        })
        return config
