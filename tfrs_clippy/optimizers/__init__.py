"""Adagrad with per-variable update scaling: ClippyAdagrad, the paper's baselines, the math they share, and a
learning-rate warm-up for any optimizer."""

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
from tfrs_clippy.optimizers.schedules import LinearWarmup

__all__ = [
    "AdaptiveGradientClippingAdagrad",
    "ClippyAdagrad",
    "GradientClippingAdagrad",
    "LambAdagrad",
    "LinearWarmup",
    "METHODS",
    "PAPER_GRIDS",
    "PAPER_SETTING",
    "ScaledAdagrad",
    "build_optimizer",
]
