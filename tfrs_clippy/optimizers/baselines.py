"""The Clippy paper's baselines, each an adaptive optimizer with one scaling rule (Section 5, Table 2).

The paper writes every method as Adagrad, w <- w - eta * sigma * r with r = g / sqrt(G) and G accumulated from the
raw gradient first (`accumulator_update="standard"`, `ScaledAdagrad`'s default), differing only in sigma:

- naive: sigma = 1 (`Adagrad`);
- GC: sigma = min(1, lambda / ||g||) per layer (`GradientClippingAdagrad`);
- AGC: sigma = min(1, lambda * ||w|| / ||g||) per unit (`AdaptiveGradientClippingAdagrad`);
- LAMB on Adagrad: sigma = mu * ||w|| / ||r|| per layer (`LambAdagrad`);
- Clippy: the per-coordinate rule (`ClippyAdagrad`).

The same rules on Keras's Adam (not in the paper; for the comparison with `ClippyAdam`) scale Adam's step, the
moments fed the raw gradient: `Adam`, `GradientClippingAdam`, `AdaptiveGradientClippingAdam`, `LambAdam` (LAMB's
trust ratio on Adam's direction m_hat / (sqrt(v_hat) + eps): LAMB itself, without weight decay), `ClippyAdam`.
Each method is one rule class (`GradientClipping`, ...) combined with each family's base.

Units. GC and LAMB take one norm per variable (a "layer"); AGC one per output unit, as in Brock et al.'s code:
the last axis of a kernel (norms over the others), the whole tensor for a bias. Embedding tables (names matching
`embedding_pattern`) and any variable updated by a sparse gradient use one norm per row for AGC and LAMB: a
whole-table weight norm would have to read every row at every step.
"""

from __future__ import annotations

from typing import Any, Optional

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.optimizers import rules
from tfrs_clippy.optimizers.clippy_adagrad import PAPER_SETTING, ClippyAdagrad
from tfrs_clippy.optimizers.clippy_adam import ClippyAdam
from tfrs_clippy.optimizers.scaled_adagrad import ScaledAdagrad
from tfrs_clippy.optimizers.scaled_adam import ScaledAdam
from tfrs_clippy.optimizers.scaled_optimizer import ScaledOptimizer, check_non_negative
from tfrs_clippy.optimizers.variable_names import check_patterns, matches_any

register = keras.saving.register_keras_serializable(package="tfrs_clippy")


@register
class Adagrad(ScaledAdagrad):
    """Adagrad (sigma = 1), the paper's "naive", with exact sparse updates and non-finite skipping.

    Also the fast sparse Adagrad of Keras 3, whose own `keras.optimizers.Adagrad` densifies `tf.IndexedSlices`
    (a full-table pass per step). Accumulates first, as Keras's Adagrad does.
    """

    def __init__(self, learning_rate: Any = 0.001, name: str = "Adagrad", **kwargs) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)


@register
class Adam(ScaledAdam):
    """Keras's Adam (sigma = 1) with non-finite skipping and, with `sparse_updates="lazy"`, touched-rows updates."""

    def __init__(self, learning_rate: Any = 0.001, name: str = "Adam", **kwargs) -> None:
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)


class GradientClipping(ScaledOptimizer):
    """Layer-wise gradient-norm clipping of the step (the paper's GC; its grid: threshold in {1e-1, 1e-2, 1e-3})."""

    def __init__(self, learning_rate: Any = 0.001, threshold: float = 1e-2, **kwargs) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.rule = rules.GradientClippingRule(check_non_negative("threshold", threshold))

    def scaling_rule(self) -> rules.GradientClippingRule:
        return self.rule

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.rule.threshold}


class WeightNormScaling(ScaledOptimizer):
    """A method whose rule reads weight norms: per output unit or per row, never over a whole embedding table."""

    def __init__(self, embedding_pattern: str = "embedding", **kwargs) -> None:
        (embedding_pattern,) = check_patterns("embedding_pattern", [embedding_pattern])
        super().__init__(**kwargs)
        self.embedding_pattern = embedding_pattern

    def _is_row_wise(self, name: str, sparse: bool) -> bool:
        return sparse or matches_any([self.embedding_pattern], name)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "embedding_pattern": self.embedding_pattern}


class AdaptiveGradientClipping(WeightNormScaling):
    """Unit-wise adaptive gradient clipping of the step (AGC; the paper's grid: threshold in {1e-2, 1e-3, 1e-4})."""

    def __init__(self, learning_rate: Any = 0.001, threshold: float = 1e-3, weight_floor: float = 1e-3,
                 **kwargs) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.rule = rules.AdaptiveGradientClippingRule(
            check_non_negative("threshold", threshold), check_non_negative("weight_floor", weight_floor)
        )

    def scaling_rule(self) -> rules.AdaptiveGradientClippingRule:
        return self.rule

    def clipping_axis_for(self, name: str, rank: int, sparse: bool) -> Optional[int]:
        if self._is_row_wise(name, sparse):
            return 0
        return -1 if rank >= 2 else None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.rule.threshold, "weight_floor": self.rule.weight_floor}


class Lamb(WeightNormScaling):
    """LAMB's layer-wise trust ratio on the base optimizer's direction (the paper's grid: mu in {1e-1, 1e-2, 1e-3})."""

    def __init__(self, learning_rate: Any = 0.001, trust_scale: float = 1e-2, **kwargs) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.rule = rules.LambRule(check_non_negative("trust_scale", trust_scale))

    def scaling_rule(self) -> rules.LambRule:
        return self.rule

    def clipping_axis_for(self, name: str, rank: int, sparse: bool) -> Optional[int]:
        return 0 if self._is_row_wise(name, sparse) else None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "trust_scale": self.rule.trust_scale}


@register
class GradientClippingAdagrad(GradientClipping, ScaledAdagrad):
    """Adagrad with layer-wise gradient-norm clipping (GC)."""


@register
class AdaptiveGradientClippingAdagrad(AdaptiveGradientClipping, ScaledAdagrad):
    """Adagrad with unit-wise adaptive gradient clipping (AGC)."""


@register
class LambAdagrad(Lamb, ScaledAdagrad):
    """LAMB's trust ratio on Adagrad's direction r = g / sqrt(G)."""


@register
class GradientClippingAdam(GradientClipping, ScaledAdam):
    """Adam whose step is scaled by layer-wise gradient-norm clipping (GC's factor; the moments see raw g)."""


@register
class AdaptiveGradientClippingAdam(AdaptiveGradientClipping, ScaledAdam):
    """Adam whose step is scaled by unit-wise adaptive gradient clipping (AGC's factor; the moments see raw g)."""


@register
class LambAdam(Lamb, ScaledAdam):
    """LAMB: the trust ratio on Adam's direction m_hat / (sqrt(v_hat) + eps)."""


ADAGRAD_METHODS = {
    "naive": Adagrad,
    "gc": GradientClippingAdagrad,
    "agc": AdaptiveGradientClippingAdagrad,
    "lamb": LambAdagrad,
    "clippy": ClippyAdagrad,
}
"""The paper's methods, on Adagrad."""
ADAM_METHODS = {
    "adam": Adam,
    "gc_adam": GradientClippingAdam,
    "agc_adam": AdaptiveGradientClippingAdam,
    "lamb_adam": LambAdam,
    "clippy_adam": ClippyAdam,
}
"""The same methods on Adam, in the same order."""
METHODS = {**ADAGRAD_METHODS, **ADAM_METHODS}
"""Every method `build_optimizer` makes."""

_ADAGRAD_GRIDS = {
    "naive": [{}],
    "gc": [{"threshold": t} for t in (1e-1, 1e-2, 1e-3)],
    "agc": [{"threshold": t} for t in (1e-2, 1e-3, 1e-4)],
    "lamb": [{"trust_scale": m} for m in (1e-1, 1e-2, 1e-3)],
    # Clippy's single point is `PAPER_SETTING`, which is also the factory's default for "clippy"; the point still
    # names its two thresholds so that each run's record says them and keeps the key of the runs already stored.
    "clippy": [{name: PAPER_SETTING[name] for name in ("variable_relative_threshold", "absolute_threshold")}],
}
PAPER_GRIDS = {
    **_ADAGRAD_GRIDS,
    # On Adam, the paper's grids of the same rules; ClippyAdam's defaults are the paper's thresholds.
    **{adam: _ADAGRAD_GRIDS[adagrad] for adagrad, adam in zip(ADAGRAD_METHODS, ADAM_METHODS)},
}
"""The paper's hyper-parameter grids (Section 5.1), per method of `METHODS`."""
DEFAULT_SETTINGS = {method: dict(grid[len(grid) // 2]) for method, grid in PAPER_GRIDS.items()}
"""Each method's one default setting: the middle point of its grid, which is also its class's default arguments
(GC threshold 1e-2, AGC 1e-3, LAMB trust_scale 1e-2; Clippy the paper's setting)."""

_UNCLIPPED = ("naive", "adam")
_WEIGHT_NORM = ("agc", "lamb", "agc_adam", "lamb_adam")


def build_optimizer(method: str, learning_rate: Any, include_embeddings: bool = False,
                    embedding_pattern: str = "embedding", **hyperparameters) -> ScaledOptimizer:
    """One of the paper's methods with the paper's defaults, on Adagrad (G accumulated first) or on Adam.

    "clippy" gets the paper's setting, `PAPER_SETTING` (the one `ClippyAdagrad.from_paper` uses): Algorithm 1's
    order, lambda_rel = 0.5, lambda_abs = 1e-2. `ClippyAdagrad()` itself keeps TFRS's defaults (lambda_rel = 0.1,
    lambda_abs = 1e-7, accumulating after the step), which with one scale per tensor can freeze a layer whose
    weights include a ~0 (a zero-initialized bias): `stability.OverClippingMonitor` reports that. "clippy_adam"'s
    own defaults are the paper's thresholds.

    Args:
        method: A key of `METHODS`: "naive", "gc", "agc", "lamb", "clippy" (Adagrad) or "adam", "gc_adam",
            "agc_adam", "lamb_adam", "clippy_adam" (Adam).
        learning_rate: A float or a Keras learning-rate schedule.
        include_embeddings: Also treat embedding tables; by default, as in the paper, tables matching
            `embedding_pattern` get the unscaled base step.
        embedding_pattern: A regular expression matching the names of embedding tables.
        **hyperparameters: The method's own arguments (threshold, trust_scale, variable_relative_threshold, ...) and
            any argument of the optimizer base (export_clipping_factors, epsilon, ...); each overrides the
            method's default.

    Raises:
        ValueError: An unknown method, or an argument out of range.
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {sorted(METHODS)}, got {method!r}.")
    options = dict(hyperparameters)
    if not include_embeddings and method not in _UNCLIPPED:
        options["exclude_from_clipping"] = [*options.get("exclude_from_clipping", []), embedding_pattern]
    if method == "clippy":
        options = {**PAPER_SETTING, **options}
    elif method in _WEIGHT_NORM:
        options["embedding_pattern"] = embedding_pattern
    return METHODS[method](learning_rate=learning_rate, **options)
