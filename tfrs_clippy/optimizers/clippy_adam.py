"""ClippyAdam: Keras's Adam whose step is clipped, per coordinate, against the weight (Clippy's rule on Adam)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.optimizers import rules
from tfrs_clippy.optimizers.scaled_adam import ScaledAdam
from tfrs_clippy.optimizers.scaled_optimizer import check_non_negative


@keras.saving.register_keras_serializable(package="tfrs_clippy")
class ClippyAdam(ScaledAdam):
    r"""Adam with Clippy's adaptive update clipping, in either Keras runtime.

    Each step is Keras's Adam (same slots, bias correction and epsilon convention; the moments see the raw
    gradient):

        lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t) ;  u = lr_t * m / (sqrt(v) + epsilon)

    and the variable moves by sigma * u, with sigma the largest value in (0, 1] such that no coordinate moves more
    than `variable_relative_threshold * |w_i| + absolute_threshold` (one sigma per tensor, or per slice along
    `clipping_axis`). The rule is `rules.ClippyRule`, the one ClippyAdagrad uses. With `update_rms_threshold=d`,
    sigma is also at most StableAdamW's 1 / max(1, RMS(g / sqrt(v_hat)) / d) (`rules.UpdateRmsRule`): the step
    shrinks when the gradient outgrows the second moment, the loss-spike precursor Wortsman et al. (2023) found.

    The defaults are the paper's (lambda_rel 0.5, lambda_abs 1e-2), not TFRS's: with lambda_abs 1e-7, a
    zero-initialized bias cannot move. Adam's step is at most ~B(t) * lr per coordinate (B(1) = 1, B(inf) ~ 7.3 at
    the default betas), so at lr below ~1e-3 the rule does not fire: it is a safety net against too-large steps.
    Infinite thresholds give Keras's `Adam`.

    Sparse gradients (`tf.IndexedSlices`), `sparse_updates`:
        "dense" (default): the gradient is densified, so every row's moments decay and every row keeps moving by
            its momentum, exactly as in Keras's Adam. This is the default because it is Keras's Adam: swapping
            `Adam` for `ClippyAdam` with infinite thresholds changes no number, and sigma bounds every row that
            moves (an untouched row does move). It costs a full-table pass per step, as Keras's Adam does.
        "lazy": only the touched rows' moments and weights change (TF Addons' LazyAdam), so a step's work is
            proportional to its rows; sigma is taken over the touched rows, the only ones that move. Not Keras's
            Adam: an untouched row's moments do not decay, and it does not coast on its momentum.
    Repeated ids are summed first in both.

    A NaN/Inf gradient is skipped (weight and moments unchanged) and counted (`nonfinite_steps`,
    `nonfinite_steps_by_name()`); the optimizer's step count, and so the bias correction, still advances.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        amsgrad: bool = False,
        variable_relative_threshold: float = 0.5,
        absolute_threshold: float = 1e-2,
        update_rms_threshold: Optional[float] = None,
        export_clipping_factors: bool = False,
        clipping_axis: Optional[int] = None,
        exclude_from_clipping: Optional[Sequence[str]] = None,
        sparse_updates: str = "dense",
        fuse_dense_updates: bool = True,
        name: str = "ClippyAdam",
        **kwargs,
    ) -> None:
        """Initializes the optimizer.

        Args:
            learning_rate: A number or a Keras learning-rate schedule.
            beta_1, beta_2, epsilon, amsgrad: Keras's Adam's (epsilon > 0, added to sqrt(v)).
            variable_relative_threshold: lambda_rel (>= 0, may be inf): the bound's part relative to |w_i|.
            absolute_threshold: lambda_abs (>= 0, may be inf): the bound's constant part.
            update_rms_threshold: None, or StableAdamW's d (> 0; the paper's 1): also scale the step by
                1 / max(1, RMS(g / sqrt(v_hat)) / d), per tensor or slice.
            export_clipping_factors: Keep the smallest scale of each variable's last step, readable as
                `clipping_factors` and `clipping_factors_by_name()` (1: unclipped, 0: a skipped step).
            clipping_axis: None for one scale per tensor; 0 for one per embedding row; any axis for one per slice.
            exclude_from_clipping: Regular expressions; matching variables get plain Adam.
            sparse_updates: "dense" (Keras's Adam) or "lazy" (touched rows only); see the class docstring.
            fuse_dense_updates: Compute dense steps with XLA.
            name: The optimizer's name.
            **kwargs: The Keras optimizer base's keyword arguments (clipnorm, weight_decay, ...); weight decay is
                decoupled and applied by the base, outside sigma.

        Raises:
            ValueError: An argument is out of range; the message names it and its value.
        """
        clippy_rule = rules.ClippyRule(
            variable_relative_threshold=check_non_negative("variable_relative_threshold", variable_relative_threshold),
            accumulator_relative_threshold=0.0,
            absolute_threshold=check_non_negative("absolute_threshold", absolute_threshold),
        )
        if update_rms_threshold is not None:
            update_rms_threshold = float(update_rms_threshold)
            if not update_rms_threshold > 0:
                raise ValueError(
                    f"`update_rms_threshold` must be None or a positive number, got {update_rms_threshold}."
                )
        super().__init__(
            learning_rate=learning_rate,
            beta_1=beta_1,
            beta_2=beta_2,
            epsilon=epsilon,
            amsgrad=amsgrad,
            export_clipping_factors=export_clipping_factors,
            clipping_axis=clipping_axis,
            exclude_from_clipping=exclude_from_clipping,
            sparse_updates=sparse_updates,
            fuse_dense_updates=fuse_dense_updates,
            name=name,
            **kwargs,
        )
        self.clippy_rule = clippy_rule
        self.update_rms_threshold = update_rms_threshold
        if update_rms_threshold is None:
            self.rule = clippy_rule
        else:
            self.rule = rules.MinimumRule((clippy_rule, rules.UpdateRmsRule(update_rms_threshold)))

    def scaling_rule(self) -> rules.ScalingRule:
        return self.rule

    @property
    def variable_relative_threshold(self) -> float:
        return self.clippy_rule.variable_relative_threshold

    @property
    def absolute_threshold(self) -> float:
        return self.clippy_rule.absolute_threshold

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            variable_relative_threshold=self.variable_relative_threshold,
            absolute_threshold=self.absolute_threshold,
            update_rms_threshold=self.update_rms_threshold,
        )
        return config
