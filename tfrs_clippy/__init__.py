"""tfrs_clippy: Clippy (adaptive update clipping) and stability tools for multitask ranking in TensorFlow.

`tfrs_clippy.ClippyAdagrad` (and every optimizer here) is the optimizer class for the Keras runtime of this
process: Keras 2 (`tf_keras`) when TF_USE_LEGACY_KERAS=1 was set before TensorFlow was imported, Keras 3 otherwise.
"""

from tfrs_clippy import data, stability
from tfrs_clippy.keras_runtime import LEGACY_KERAS, KerasRuntimeError, keras
from tfrs_clippy.optimizers import (
    PAPER_SETTING,
    Adagrad,
    Adam,
    AdaptiveGradientClippingAdagrad,
    AdaptiveGradientClippingAdam,
    ClippyAdagrad,
    ClippyAdam,
    GradientClippingAdagrad,
    GradientClippingAdam,
    LambAdagrad,
    LambAdam,
    LinearWarmup,
    build_optimizer,
)
from tfrs_clippy.stability import (
    ClippingFactorLogger,
    DetectorConfig,
    DivergenceMonitor,
    InstabilityScore,
    OverClippingMonitor,
    OverClippingWarning,
    RollbackOnDivergence,
    SharpnessMonitor,
    detect_divergence,
    plot_clipping_factors,
    plot_divergence,
    plot_sharpness,
)

__all__ = [
    "Adagrad",
    "Adam",
    "AdaptiveGradientClippingAdagrad",
    "AdaptiveGradientClippingAdam",
    "ClippingFactorLogger",
    "ClippyAdagrad",
    "ClippyAdam",
    "DetectorConfig",
    "DivergenceMonitor",
    "GradientClippingAdagrad",
    "GradientClippingAdam",
    "InstabilityScore",
    "KerasRuntimeError",
    "LEGACY_KERAS",
    "LambAdagrad",
    "LambAdam",
    "LinearWarmup",
    "OverClippingMonitor",
    "OverClippingWarning",
    "PAPER_SETTING",
    "RollbackOnDivergence",
    "SharpnessMonitor",
    "build_optimizer",
    "data",
    "detect_divergence",
    "keras",
    "plot_clipping_factors",
    "plot_divergence",
    "plot_sharpness",
    "stability",
]
__version__ = "0.1.0"
