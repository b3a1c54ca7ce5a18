"""ClippyAdagrad: Adagrad whose update is clipped, per coordinate, against the weight (Tang et al., KDD 2023)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.optimizers import rules
from tfrs_clippy.optimizers.scaled_adagrad import ScaledAdagrad
from tfrs_clippy.optimizers.scaled_optimizer import check_non_negative

# The paper's setting (Section 5, Algorithm 1): accumulate first, lambda_rel = 0.5, lambda_abs = 1e-2. The one
# definition of it: `ClippyAdagrad.from_paper` and `build_optimizer("clippy", ...)` both default to it.
PAPER_SETTING = dict(
    use_standard_accumulator_update=True,
    variable_relative_threshold=0.5,
    accumulator_relative_threshold=0.0,
    absolute_threshold=1e-2,
)


@keras.saving.register_keras_serializable(package="tfrs_clippy")
class ClippyAdagrad(ScaledAdagrad):
    r"""Adagrad with adaptive update clipping; a drop-in for `tfrs.experimental.optimizers.ClippyAdagrad`.

    Each step computes Adagrad's update u = lr * g / sqrt(G + epsilon) and moves the variable by sigma * u, with
    sigma the largest value in (0, 1] such that no coordinate moves more than

        variable_relative_threshold * |w_i| + accumulator_relative_threshold / sqrt(G_i + epsilon)
            + absolute_threshold.

    Arguments and defaults are TFRS's, so swapping TFRS's class for this one changes no number. Beyond TFRS:
    sparse gradients (`tf.IndexedSlices`) touch only their rows and sum repeated ids first; a NaN/Inf gradient is
    skipped and counted instead of reaching the weights; scales may be per slice (`clipping_axis`); variables can
    be excluded by name; every argument survives `get_config`.

    TFRS's defaults (lambda_rel = 0.1, lambda_abs = 1e-7) can freeze a whole tensor when one of its weights is ~0
    (a zero-initialized bias caps every coordinate's move at ~lambda_abs). For the paper's setting, `PAPER_SETTING`,
    use `ClippyAdagrad.from_paper(learning_rate)`, or `build_optimizer("clippy", learning_rate)`, which also leaves
    embedding tables to plain Adagrad as the paper does. `stability.OverClippingMonitor` warns about frozen tensors.
    """

    def __init__(
        self,
        learning_rate: Any = 0.001,
        initial_accumulator_value: float = 0.1,
        variable_relative_threshold: float = 0.1,
        accumulator_relative_threshold: float = 0.0,
        absolute_threshold: float = 1e-7,
        epsilon: float = 1e-7,
        export_clipping_factors: bool = False,
        clip_accumulator_update: bool = False,
        use_standard_accumulator_update: bool = False,
        clipping_axis: Optional[int] = None,
        exclude_from_clipping: Optional[Sequence[str]] = None,
        fuse_dense_updates: bool = True,
        name: str = "ClippyAdagrad",
        **kwargs,
    ) -> None:
        """Initializes the optimizer.

        Args:
            learning_rate: A number (int, float, NumPy scalar or eager scalar tensor, as TFRS accepts) or a Keras
                learning-rate schedule.
            initial_accumulator_value: Starting value of the accumulators G (>= 0).
            variable_relative_threshold: lambda_rel (>= 0): the bound's part relative to |w_i|.
            accumulator_relative_threshold: (>= 0) the bound's part relative to 1 / sqrt(G_i + epsilon).
            absolute_threshold: lambda_abs (>= 0): the bound's constant part.
            epsilon: Added to G inside the square root. 0 is allowed (as in TFRS) when
                `initial_accumulator_value + epsilon` is positive: G never falls below its initial value.
            export_clipping_factors: Keep the smallest scale of each variable's last step, readable as
                `clipping_factors` (a list, as in TFRS) and `clipping_factors_by_name()`.
            clip_accumulator_update: Accumulate (sigma * g)^2 instead of g^2, after the step.
            use_standard_accumulator_update: Accumulate g^2 before the step, as Adagrad and the paper's
                Algorithm 1 do. Exclusive with `clip_accumulator_update`.
            clipping_axis: None for one scale per tensor (TFRS, the paper); 0 for one per embedding row; any axis
                for one per slice along it.
            exclude_from_clipping: Regular expressions; matching variables get plain Adagrad (the paper clips
                only non-embedding parameters: pass e.g. ["embedding"]).
            fuse_dense_updates: Compute dense steps with XLA (two passes over memory instead of ~20).
            name: The optimizer's name.
            **kwargs: The Keras optimizer base's keyword arguments.

        Raises:
            ValueError: An argument is out of range, `initial_accumulator_value + epsilon` is not positive, or both
                accumulator flags are set.
        """
        if clip_accumulator_update and use_standard_accumulator_update:
            raise ValueError(
                "`clip_accumulator_update` and `use_standard_accumulator_update` cannot both be True: the standard "
                "update accumulates g^2 before the step, when the clipping factor is not known yet."
            )
        rule = rules.ClippyRule(
            variable_relative_threshold=check_non_negative("variable_relative_threshold", variable_relative_threshold),
            accumulator_relative_threshold=check_non_negative(
                "accumulator_relative_threshold", accumulator_relative_threshold
            ),
            absolute_threshold=check_non_negative("absolute_threshold", absolute_threshold),
        )
        if use_standard_accumulator_update:
            accumulator_update = "standard"
        elif clip_accumulator_update:
            accumulator_update = "delayed_clipped"
        else:
            accumulator_update = "delayed"
        super().__init__(
            learning_rate=learning_rate,
            initial_accumulator_value=initial_accumulator_value,
            epsilon=epsilon,
            accumulator_update=accumulator_update,
            export_clipping_factors=export_clipping_factors,
            clipping_axis=clipping_axis,
            exclude_from_clipping=exclude_from_clipping,
            fuse_dense_updates=fuse_dense_updates,
            name=name,
            **kwargs,
        )
        self.rule = rule

    @classmethod
    def from_paper(cls, learning_rate: Any = 0.001, **kwargs) -> "ClippyAdagrad":
        """The paper's recommended setting: Algorithm 1's order, lambda_rel = 0.5, lambda_abs = 1e-2.

        Args:
            learning_rate: A float or a Keras learning-rate schedule.
            **kwargs: Any other argument of `ClippyAdagrad`, which overrides the paper's where both give it.
        """
        return cls(learning_rate=learning_rate, **{**PAPER_SETTING, **kwargs})

    def scaling_rule(self) -> rules.ClippyRule:
        return self.rule

    @property
    def variable_relative_threshold(self) -> float:
        return self.rule.variable_relative_threshold

    @property
    def accumulator_relative_threshold(self) -> float:
        return self.rule.accumulator_relative_threshold

    @property
    def absolute_threshold(self) -> float:
        return self.rule.absolute_threshold

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        accumulator_update = config.pop("accumulator_update")
        config.update(
            variable_relative_threshold=self.variable_relative_threshold,
            accumulator_relative_threshold=self.accumulator_relative_threshold,
            absolute_threshold=self.absolute_threshold,
            clip_accumulator_update=accumulator_update == "delayed_clipped",
            use_standard_accumulator_update=accumulator_update == "standard",
        )
        return config
