"""The Keras callbacks of `scripts/train.py`: checkpoints and TensorBoard scalars, numbered by the optimizer's step.

The `Epoch...` classes write at epoch ends only (what ParameterServerStrategy allows: it runs no per-batch
callback); their subclasses also write every N steps. Importers set TF_USE_LEGACY_KERAS=1 before TensorFlow is
imported (the rankers need Keras 2).
"""

from __future__ import annotations

from typing import Any, Optional

import tensorflow as tf

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.summaries import summary_tag, write_scalar


def optimizer_step(optimizer: Any) -> int:
    """The optimizer's step count, read from any strategy's variable (a mirrored one has no `__int__`)."""
    return int(optimizer.iterations.numpy())


class EpochCheckpointSaver(keras.callbacks.Callback):
    """Saves at each epoch end and at the end of training, numbered by the optimizer's step."""

    def __init__(self, manager: tf.train.CheckpointManager, every_n_steps: int) -> None:
        super().__init__()
        self.manager = manager
        self.every_n_steps = every_n_steps

    def _save(self, force: bool) -> None:
        step = optimizer_step(self.model.optimizer)
        last = self.manager.latest_checkpoint
        if last is not None and int(last.rsplit("-", 1)[1]) == step:
            return
        if force or step % self.every_n_steps == 0:
            self.manager.save(checkpoint_number=step)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._save(force=True)

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        self._save(force=True)


class CheckpointSaver(EpochCheckpointSaver):
    """Also saves every `every_n_steps` steps (batch hooks: not under ParameterServerStrategy, which forbids them)."""

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        self._save(force=False)


class EpochScalarLogger(keras.callbacks.Callback):
    """Writes the epoch logs (losses, metrics) and the optimizer's clipping factors to TensorBoard.

    Keras's own TensorBoard callback needs the `tensorboard` package, which this project does not install.
    Factors are written as `clipping_factor/<variable>` and `clipping_factor/min` (the smallest).
    """

    def __init__(self, log_dir: str, every_n_steps: int) -> None:
        super().__init__()
        self.writer = tf.summary.create_file_writer(log_dir)
        self.every_n_steps = every_n_steps

    def _write(self, prefix: str, logs: Optional[dict]) -> None:
        step = optimizer_step(self.model.optimizer)
        factors = {
            name: float(value) for name, value in self.model.optimizer.clipping_factors_by_name().items()
        }
        with self.writer.as_default():
            for name, value in (logs or {}).items():
                write_scalar(f"{prefix}{name}", float(value), step)
            for name, value in factors.items():
                write_scalar(f"clipping_factor/{summary_tag(name)}", value, step)
            if factors:
                write_scalar("clipping_factor/min", min(factors.values()), step)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        self._write("epoch/", logs)
        self.writer.flush()

    def write_scalars(self, prefix: str, values: dict[str, float]) -> None:
        """Writes `values` at the current step (results computed outside `fit`: the held-out metrics under PS)."""
        step = optimizer_step(self.model.optimizer)
        with self.writer.as_default():
            for name, value in values.items():
                write_scalar(f"{prefix}{name}", float(value), step)
        self.writer.flush()


class ScalarLogger(EpochScalarLogger):
    """Also writes the batch logs and factors every `every_n_steps` steps (batch hooks: not under PS)."""

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        if optimizer_step(self.model.optimizer) % self.every_n_steps == 0:
            self._write("batch/", logs)
