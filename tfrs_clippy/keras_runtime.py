"""The one place that decides which Keras runtime this process uses.

TensorFlow routes `tf.keras` to Keras 2 (the `tf_keras` package) when `TF_USE_LEGACY_KERAS` is "1", "true" or
"True" at the time TensorFlow is first imported, and to Keras 3 otherwise. We decide the same way, once, at import,
and check that what `tf.keras` really is agrees; nothing else in the project branches on the environment.
"""

from __future__ import annotations

import os
import types

import tensorflow as tf

LEGACY_KERAS: bool = os.environ.get("TF_USE_LEGACY_KERAS", None) in ("true", "True", "1")


class KerasRuntimeError(ImportError):
    """The installed or configured Keras cannot run tfrs_clippy."""


def _load_keras() -> types.ModuleType:
    if LEGACY_KERAS:
        try:
            import tf_keras as keras_module  # pylint: disable=import-outside-toplevel
        except ImportError as error:
            raise KerasRuntimeError(
                "TF_USE_LEGACY_KERAS=1 asks for Keras 2, but the `tf-keras` package is not installed. "
                "Install the version matching TensorFlow: pip install 'tf-keras==%s.*'."
                % ".".join(tf.__version__.split(".")[:2])
            ) from error
    else:
        import keras as keras_module  # pylint: disable=import-outside-toplevel

    if tf.keras.Model is not keras_module.Model:
        raise KerasRuntimeError(
            f"TF_USE_LEGACY_KERAS is {os.environ.get('TF_USE_LEGACY_KERAS')!r}, which asks for "
            f"{keras_module.__name__} {keras_module.__version__}, but tf.keras is {tf.keras.Model.__module__}. Set "
            "TF_USE_LEGACY_KERAS before TensorFlow is first imported (in the shell, not in a script after "
            "`import tensorflow`), and install tf-keras for Keras 2 or keras>=3 for Keras 3."
        )
    # TFRS issue #751: with mismatched packages `tf.keras.optimizers.Optimizer` can be the legacy V2 base, whose
    # subclasses must implement `_resource_apply_dense`. Our optimizers need the `build`/`update_step` base.
    base = keras_module.optimizers.Optimizer
    if not (hasattr(base, "update_step") and hasattr(base, "build")):
        raise KerasRuntimeError(
            f"{base.__module__}.{base.__name__} is the legacy optimizer base (it needs `_resource_apply_dense`, "
            "TFRS issue #751). Install matching versions: pip install 'tensorflow==2.21.*' 'tf-keras==2.21.*' "
            "'keras>=3.10', and do not set TF_USE_LEGACY_KERAS to route to an old Keras."
        )
    return keras_module


keras: types.ModuleType = _load_keras()
"""The Keras module of this process: `tf_keras` under Keras 2, `keras` under Keras 3."""

BACKEND: str = "tensorflow" if LEGACY_KERAS else keras.backend.backend()
"""The backend the optimizers compute on: TensorFlow under Keras 2, Keras 3's `KERAS_BACKEND` otherwise."""

TRAINING_BACKENDS = ("tensorflow", "jax", "torch")
"""The Keras 3 backends the optimizers train on; "numpy" and "openvino" cannot train."""


class UnsupportedBackendError(RuntimeError):
    """The optimizers were asked to run on a Keras backend they cannot serve."""


def check_training_backend(optimizer: str) -> None:
    """Raises `UnsupportedBackendError`, naming the backend and what to do, unless `BACKEND` can train.

    Args:
        optimizer: The name of the optimizer being created, for the message.
    """
    if BACKEND not in TRAINING_BACKENDS:
        raise UnsupportedBackendError(
            f"{optimizer} cannot run on the Keras backend {BACKEND!r}: it trains on {', '.join(TRAINING_BACKENDS)}. "
            f"Set KERAS_BACKEND to one of them before Keras is first imported (e.g. KERAS_BACKEND=jax); the "
            f"{BACKEND!r} backend has no training."
        )
