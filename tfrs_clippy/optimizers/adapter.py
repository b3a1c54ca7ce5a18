"""The Keras adapter of this process's runtime, chosen once from `tfrs_clippy.keras_runtime`."""

from tfrs_clippy.keras_runtime import LEGACY_KERAS

if LEGACY_KERAS:
    from tfrs_clippy.optimizers.keras2_adapter import KerasAdapter
else:
    from tfrs_clippy.optimizers.keras3_adapter import KerasAdapter

__all__ = ["KerasAdapter"]
