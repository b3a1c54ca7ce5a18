"""What the stability callbacks share: a training-step counter, acting every N steps, TensorBoard scalars, and the
check that an optimizer keeps the clipping factors a callback reads."""

from __future__ import annotations

from typing import Any, Dict, Optional

import tensorflow as tf

from tfrs_clippy import summaries
from tfrs_clippy.keras_runtime import keras


def require_clipping_factors(optimizer: Any, reader: str, turn_on_before_build: bool) -> None:
    """Raises a ValueError naming `reader` unless `optimizer` keeps per-variable clipping factors.

    tfrs_clippy's optimizers have `clipping_factors_by_name()` but keep factors only with
    `export_clipping_factors=True`, a setting they read when they make a variable's slots (at the first step). With
    `turn_on_before_build`, an optimizer that has made no slots yet gets the export turned on instead of an error.
    """
    if not callable(getattr(optimizer, "clipping_factors_by_name", None)):
        raise ValueError(
            f"{reader} needs clipping factors, but the model's optimizer {type(optimizer).__name__} has no "
            "`clipping_factors_by_name()`; use ClippyAdagrad or a method of `build_optimizer`."
        )
    if getattr(optimizer, "export_clipping_factors", True) is True:
        return
    # A non-finite step counter is among every variable's slots. (Keras 2's optimizer base keeps no public "built"
    # flag, and ours none at all.)
    if turn_on_before_build and not optimizer.nonfinite_steps_by_name():
        optimizer.export_clipping_factors = True
        return
    raise ValueError(
        f"The model's optimizer {type(optimizer).__name__} was built with export_clipping_factors="
        f"{optimizer.export_clipping_factors!r}, so it keeps no clipping factors for {reader}; create it with "
        "export_clipping_factors=True."
    )


class PeriodicCallback(keras.callbacks.Callback):
    """A Keras callback that acts after every `every_n_steps`-th training step, and may write TensorBoard scalars.

    Steps are counted over all of `fit` from 0 (`global_step` is the number of steps seen); the first action is
    after step 0. Subclasses implement `on_step`.

    Args:
        every_n_steps: Call `on_step` after every this many steps.
        log_dir: If set, a directory `write_scalars` writes TensorBoard scalars to (flushed when training ends).
    """

    def __init__(self, every_n_steps: int = 1, log_dir: Optional[str] = None) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"`every_n_steps` must be an int >= 1, got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.log_dir = log_dir
        self.global_step = 0
        self._writer: Optional[tf.summary.SummaryWriter] = None

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        step = self.global_step
        if step % self.every_n_steps == 0:
            # Keras passes None when no callback asked for logs; subclasses write to them unconditionally.
            self.on_step(step, logs if logs is not None else {})
        self.global_step = step + 1

    def on_step(self, step: int, logs: Dict[str, Any]) -> None:
        """Acts after training step `step`; `logs` are the batch's logs (written to by the subclass)."""
        raise NotImplementedError

    def write_scalars(self, scalars: Dict[str, float], step: int) -> None:
        """Writes `scalars` ({tag: value}) at `step` to TensorBoard if `log_dir` was given, else does nothing."""
        if self._writer is None:
            return
        with self._writer.as_default():
            summaries.write_scalars(scalars, step)

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        if self._writer is not None:
            self._writer.flush()
