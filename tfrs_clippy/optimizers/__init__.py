"""Adaptive optimizers (Adagrad, Adam) with per-variable update scaling: ClippyAdagrad, ClippyAdam, the paper's
baselines, the math they share, and a learning-rate warm-up for any optimizer."""

from tfrs_clippy.optimizers.baselines import (
    ADAGRAD_METHODS,
    ADAM_METHODS,
    DEFAULT_SETTINGS,
    METHODS,
    PAPER_GRIDS,
    Adagrad,
    Adam,
    AdaptiveGradientClippingAdagrad,
    AdaptiveGradientClippingAdam,
    GradientClippingAdagrad,
    GradientClippingAdam,
    LambAdagrad,
    LambAdam,
    build_optimizer,
)
from tfrs_clippy.optimizers.clippy_adagrad import PAPER_SETTING, ClippyAdagrad
from tfrs_clippy.optimizers.clippy_adam import ClippyAdam
from tfrs_clippy.optimizers.scaled_adagrad import ScaledAdagrad
from tfrs_clippy.optimizers.scaled_adam import ScaledAdam
from tfrs_clippy.optimizers.scaled_optimizer import ScaledOptimizer
from tfrs_clippy.optimizers.schedules import LinearWarmup

__all__ = [
    "ADAGRAD_METHODS",
    "ADAM_METHODS",
    "Adagrad",
    "Adam",
    "AdaptiveGradientClippingAdagrad",
    "AdaptiveGradientClippingAdam",
    "ClippyAdagrad",
    "ClippyAdam",
    "DEFAULT_SETTINGS",
    "GradientClippingAdagrad",
    "GradientClippingAdam",
    "LambAdagrad",
    "LambAdam",
    "LinearWarmup",
    "METHODS",
    "PAPER_GRIDS",
    "PAPER_SETTING",
    "ScaledAdagrad",
    "ScaledAdam",
    "ScaledOptimizer",
    "build_optimizer",
]
