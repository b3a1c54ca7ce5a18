"""The Keras runtime base of this process, chosen once from `tfrs_clippy.keras_runtime`."""

from tfrs_clippy.keras_runtime import LEGACY_KERAS

if LEGACY_KERAS:
    from tfrs_clippy.optimizers.keras2_adapter import RuntimeOptimizer
else:
    from tfrs_clippy.optimizers.keras3_adapter import RuntimeOptimizer

__all__ = ["RuntimeOptimizer"]
