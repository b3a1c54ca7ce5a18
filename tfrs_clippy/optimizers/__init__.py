"""Adagrad with per-variable update scaling: ClippyAdagrad, the paper's baselines, and the math they share."""

from tfrs_clippy.optimizers.baselines import (
    METHODS,
    PAPER_GRIDS,
    AdaptiveGradientClippingAdagrad,
    GradientClippingAdagrad,
    LambAdagrad,
    ScaledAdagrad,
    build_optimizer,
)
from tfrs_clippy.optimizers.clippy_adagrad import PAPER_SETTING, ClippyAdagrad

__all__ = [
    "AdaptiveGradientClippingAdagrad",
    "ClippyAdagrad",
    "GradientClippingAdagrad",
    "LambAdagrad",
    "METHODS",
    "PAPER_GRIDS",
    "PAPER_SETTING",
    "ScaledAdagrad",
    "build_optimizer",
]
