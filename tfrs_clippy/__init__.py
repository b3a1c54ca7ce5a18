"""tfrs_clippy: Clippy (adaptive update clipping) and stability tools for multitask ranking in TensorFlow."""

from tfrs_clippy.keras_runtime import LEGACY_KERAS, KerasRuntimeError, keras

__all__ = ["LEGACY_KERAS", "KerasRuntimeError", "keras"]
__version__ = "0.1.0"
