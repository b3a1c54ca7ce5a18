"""Stability toolkit: measure, detect and survive loss divergence (Clippy paper, Tang et al. KDD 2023).

- `DivergenceMonitor` / `detect_divergence`: micro and full divergence per step, and an `InstabilityScore`.
- `classify_run`: the run-level verdict, whether a finished run diverged (`RunVerdict`).
- `RollbackOnDivergence`: restore a snapshot from before a spike, skip batches, optionally lower the learning rate.
- `SharpnessMonitor` / `largest_hessian_eigenvalue`: lambda_max of the Hessian (plain and Adagrad-preconditioned)
  against 2 / learning rate.
- `AdagradStepLogger`: per variable ||g||_2 and ||lr r||_inf of chosen steps, read from the accumulators.
- `ClippingFactorLogger` / `plot_clipping_factors`: the optimizer's per-variable clipping factors over steps.
- `OverClippingMonitor` / `OverClippingWarning`: a warning per variable whose clipping factor stays near 0.
"""

from tfrs_clippy.stability.adagrad_steps import AdagradStepLogger, AdagradStepRecord, learning_rate_at
from tfrs_clippy.stability.batch_loss import BatchLossReader
from tfrs_clippy.stability.clipping_log import ClippingFactorLogger, ClippingFactorRecord, plot_clipping_factors
from tfrs_clippy.stability.detection import (
    DetectorConfig,
    DivergenceEvent,
    DivergenceRecord,
    InstabilityScore,
    SpikeDetector,
    detect_divergence,
    plot_divergence,
)
from tfrs_clippy.stability.monitor import DivergenceMonitor
from tfrs_clippy.stability.over_clipping import OverClippingMonitor, OverClippingWarning
from tfrs_clippy.stability.rollback import RollbackEvent, RollbackOnDivergence, Snapshot
from tfrs_clippy.stability.run_verdict import RunVerdict, VerdictConfig, classify_run, moving_average
from tfrs_clippy.stability.sharpness import (
    SharpnessMonitor,
    SharpnessRecord,
    adagrad_preconditioner,
    hessian_vector_product,
    largest_hessian_eigenvalue,
    plot_sharpness,
    power_iteration,
)

__all__ = [
    "AdagradStepLogger",
    "AdagradStepRecord",
    "BatchLossReader",
    "ClippingFactorLogger",
    "ClippingFactorRecord",
    "DetectorConfig",
    "DivergenceEvent",
    "DivergenceMonitor",
    "DivergenceRecord",
    "InstabilityScore",
    "OverClippingMonitor",
    "OverClippingWarning",
    "RollbackEvent",
    "RollbackOnDivergence",
    "RunVerdict",
    "SharpnessMonitor",
    "SharpnessRecord",
    "Snapshot",
    "SpikeDetector",
    "VerdictConfig",
    "adagrad_preconditioner",
    "classify_run",
    "detect_divergence",
    "hessian_vector_product",
    "largest_hessian_eigenvalue",
    "learning_rate_at",
    "moving_average",
    "plot_clipping_factors",
    "plot_divergence",
    "plot_sharpness",
    "power_iteration",
]
