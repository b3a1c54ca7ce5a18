"""The Clippy paper's baselines, each Adagrad with one scaling rule (Section 5, Table 2).

The paper writes every method as Adagrad, w <- w - eta * sigma * r with r = g / sqrt(G) and G accumulated from the
raw gradient first (`accumulator_update="standard"`), differing only in sigma:

- naive: sigma = 1 (`ScaledAdagrad`);
- GC: sigma = min(1, lambda / ||g||) per layer (`GradientClippingAdagrad`);
- AGC: sigma = min(1, lambda * ||w|| / ||g||) per unit (`AdaptiveGradientClippingAdagrad`);
- LAMB on Adagrad: sigma = mu * ||w|| / ||r|| per layer (`LambAdagrad`);
- Clippy: the per-coordinate rule (`ClippyAdagrad`).

Units. GC and LAMB take one norm per variable (a "layer"); AGC one per output unit, as in Brock et al.'s code:
the last axis of a kernel (norms over the others), the whole tensor for a bias. Embedding tables (names matching
`embedding_pattern`) and any variable updated by a sparse gradient use one norm per row for AGC and LAMB: a
whole-table weight norm would have to read every row at every step.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.optimizers import core
from tfrs_clippy.optimizers.adapter import KerasAdapter
from tfrs_clippy.optimizers.clippy_adagrad import PAPER_SETTING, ClippyAdagrad
from tfrs_clippy.optimizers.scaled_adagrad import check_non_negative

register = keras.saving.register_keras_serializable(package="tfrs_clippy")


@register
class ScaledAdagrad(KerasAdapter):
    """Adagrad (sigma = 1) with the library's exact sparse updates and non-finite skipping: the paper's "naive"."""


class _WeightNormAdagrad(KerasAdapter):
    """A method whose rule reads weight norms: per output unit or per row, never over a whole embedding table."""

    def __init__(self, embedding_pattern: str = "embedding", **kwargs) -> None:
        try:
            re.compile(embedding_pattern)
        except re.error as error:
            raise ValueError(f"`embedding_pattern` is not a valid pattern {embedding_pattern!r}: {error}.") from None
        kwargs.setdefault("accumulator_update", "standard")
        super().__init__(**kwargs)
        self.embedding_pattern = embedding_pattern

    def _is_row_wise(self, name: str, sparse: bool) -> bool:
        return sparse or bool(re.search(self.embedding_pattern, name))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "embedding_pattern": self.embedding_pattern}


@register
class GradientClippingAdagrad(KerasAdapter):
    """Adagrad with layer-wise gradient-norm clipping (the paper's GC; its grid: threshold in {1e-1, 1e-2, 1e-3})."""

    def __init__(self, learning_rate: Any = 0.001, threshold: float = 1e-2, **kwargs) -> None:
        kwargs.setdefault("accumulator_update", "standard")
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.rule = core.GradientClippingRule(check_non_negative("threshold", threshold))

    def scaling_rule(self) -> core.GradientClippingRule:
        return self.rule

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.rule.threshold}


@register
class AdaptiveGradientClippingAdagrad(_WeightNormAdagrad):
    """Adagrad with unit-wise adaptive gradient clipping (AGC; the paper's grid: threshold in {1e-2, 1e-3, 1e-4})."""

    def __init__(self, learning_rate: Any = 0.001, threshold: float = 1e-3, weight_floor: float = 1e-3,
                 **kwargs) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.rule = core.AdaptiveGradientClippingRule(
            check_non_negative("threshold", threshold), check_non_negative("weight_floor", weight_floor)
        )

    def scaling_rule(self) -> core.AdaptiveGradientClippingRule:
        return self.rule

    def clipping_axis_for(self, name: str, rank: int, sparse: bool) -> Optional[int]:
        if self._is_row_wise(name, sparse):
            return 0
        return -1 if rank >= 2 else None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "threshold": self.rule.threshold, "weight_floor": self.rule.weight_floor}


@register
class LambAdagrad(_WeightNormAdagrad):
    """LAMB's layer-wise trust ratio on Adagrad's direction (the paper's grid: trust_scale mu in {1e-1, 1e-2, 1e-3})."""

    def __init__(self, learning_rate: Any = 0.001, trust_scale: float = 1e-2, **kwargs) -> None:
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.rule = core.LambRule(check_non_negative("trust_scale", trust_scale))

    def scaling_rule(self) -> core.LambRule:
        return self.rule

    def clipping_axis_for(self, name: str, rank: int, sparse: bool) -> Optional[int]:
        return 0 if self._is_row_wise(name, sparse) else None

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "trust_scale": self.rule.trust_scale}


METHODS = {
    "naive": ScaledAdagrad,
    "gc": GradientClippingAdagrad,
    "agc": AdaptiveGradientClippingAdagrad,
    "lamb": LambAdagrad,
    "clippy": ClippyAdagrad,
}
# The paper's hyper-parameter grids (Section 5.1). Clippy's single point is `PAPER_SETTING`, which is also the
# factory's default for "clippy"; the point still names its two thresholds so that each run's record says them and
# keeps the key of the runs `scripts/reproduce.py` already stored.
PAPER_GRIDS = {
    "naive": [{}],
    "gc": [{"threshold": t} for t in (1e-1, 1e-2, 1e-3)],
    "agc": [{"threshold": t} for t in (1e-2, 1e-3, 1e-4)],
    "lamb": [{"trust_scale": m} for m in (1e-1, 1e-2, 1e-3)],
    "clippy": [{name: PAPER_SETTING[name] for name in ("variable_relative_threshold", "absolute_threshold")}],
}


def build_optimizer(method: str, learning_rate: Any, include_embeddings: bool = False,
                    embedding_pattern: str = "embedding", **hyperparameters) -> KerasAdapter:
    """One of the paper's methods with the paper's defaults, all on the same Adagrad (G accumulated first).

    "clippy" gets the paper's setting, `PAPER_SETTING` (the one `ClippyAdagrad.from_paper` uses): Algorithm 1's
    order, lambda_rel = 0.5, lambda_abs = 1e-2. `ClippyAdagrad()` itself keeps TFRS's defaults (lambda_rel = 0.1,
    lambda_abs = 1e-7, accumulating after the step), which with one scale per tensor can freeze a layer whose
    weights include a ~0 (a zero-initialized bias): `stability.OverClippingMonitor` reports that.

    Args:
        method: "naive", "gc", "agc", "lamb" or "clippy".
        learning_rate: A float or a Keras learning-rate schedule.
        include_embeddings: Also treat embedding tables; by default, as in the paper, tables matching
            `embedding_pattern` get plain Adagrad.
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
    if not include_embeddings and method != "naive":
        options["exclude_from_clipping"] = [*options.get("exclude_from_clipping", []), embedding_pattern]
    if method == "clippy":
        options = {**PAPER_SETTING, **options}
    elif method in ("agc", "lamb"):
        options["embedding_pattern"] = embedding_pattern
    return METHODS[method](learning_rate=learning_rate, **options)
