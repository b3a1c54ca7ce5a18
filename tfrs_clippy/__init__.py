"""tfrs_clippy: Clippy (adaptive update clipping) and stability tools for multitask ranking in TensorFlow.

`tfrs_clippy.ClippyAdagrad` is the optimizer class for the Keras runtime of this process: Keras 2 (`tf_keras`)
when TF_USE_LEGACY_KERAS=1 was set before TensorFlow was imported, Keras 3 otherwise.
"""

from tfrs_clippy.keras_runtime import LEGACY_KERAS, KerasRuntimeError, keras
from tfrs_clippy.optimizers import PAPER_SETTING, ClippyAdagrad

__all__ = ["LEGACY_KERAS", "KerasRuntimeError", "keras", "ClippyAdagrad", "PAPER_SETTING"]
__version__ = "0.1.0"
