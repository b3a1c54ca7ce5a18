"""Each training batch's own loss, read from Keras `fit` in either runtime (`BatchLossReader`)."""

from __future__ import annotations

import functools
import threading
from typing import Any, Dict, Optional

import tensorflow as tf

from tfrs_clippy.keras_runtime import keras

BATCH_LOSS_KEY = "batch_loss"
"""The logs key under which the batch-loss probe reports each batch's own loss."""

_PROBE_MARKER = "_tfrs_clippy_batch_loss_probe"


def _install_batch_loss_probe(model: Any) -> bool:
    """Makes Keras's built-in `train_step` of `model` also return its batch's own loss as `logs["batch_loss"]`.

    Patches, on this model instance only, `compute_loss` (the public override point both runtimes' `train_step`
    computes the loss through) to keep the loss tensor it returns, and `train_step` to add that tensor to the logs,
    then rebuilds the train function (both runtimes build it before `on_train_begin`, from `model.train_step`).
    Under a distribution strategy `compute_loss` returns the replica's loss divided by the number of replicas (Keras
    unscales it for its loss tracker), so the sum over replicas is the batch's loss. Returns False, doing nothing,
    if the probe is already installed (another monitor in the same `fit`).
    """
    if getattr(model.train_step, _PROBE_MARKER, False):
        return False
    # Replicas of a MirroredStrategy trace their steps in parallel threads: each keeps its own loss.
    traced = threading.local()
    compute_loss, train_step = model.compute_loss, model.train_step

    @functools.wraps(compute_loss)
    def compute_loss_keeping_the_loss(*args: Any, **kwargs: Any) -> Any:
        traced.loss = compute_loss(*args, **kwargs)
        return traced.loss

    @functools.wraps(train_step)
    def train_step_reporting_the_batch_loss(data: Any) -> Dict[str, Any]:
        traced.loss = None
        logs = dict(train_step(data))  # Keras's own train_step: it computes its loss through `compute_loss`.
        logs[BATCH_LOSS_KEY] = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, traced.loss)
        return logs

    setattr(train_step_reporting_the_batch_loss, _PROBE_MARKER, True)
    model.compute_loss = compute_loss_keeping_the_loss
    model.train_step = train_step_reporting_the_batch_loss
    model.make_train_function(force=True)
    return True


def _remove_batch_loss_probe(model: Any) -> None:
    """Undoes `_install_batch_loss_probe`; the next `fit` builds a train function from the class's `train_step`."""
    del model.train_step
    del model.compute_loss
    model.train_function = None


class BatchLossReader:
    """Reads each training batch's own loss from the logs Keras passes to `on_train_batch_end`.

    With Keras's built-in `train_step`, both runtimes log `loss` as the *mean over the epoch so far*, not the
    batch's loss, and that float32 mean cannot be undone: once a loss of 1e8 is in its running sum, the later
    batches' losses are below its rounding error. So for such models `start_training` installs a probe on the
    model instance (`compute_loss` and `train_step` wrapped, the train function rebuilt) that reports the loss
    `train_step` computed for the batch as `logs["batch_loss"]`, and `stop_training` removes it. The logged `loss`
    and every metric stay what Keras makes them. With `steps_per_execution` > 1 a read gives the loss of the
    execution's last batch.

    Models that override `train_step` -- TFRS models (`tfrs.models.Model.train_step` returns the batch's loss as
    `loss`) or any custom step -- are read from `logs[loss_key]` as is: the step must report the batch's own loss
    there, not a running mean.

    Args:
        loss_key: The logs key holding the batch's loss for a model that overrides `train_step`.
    """

    def __init__(self, loss_key: str = "loss") -> None:
        if not isinstance(loss_key, str) or not loss_key:
            raise ValueError(f"`loss_key` must be a non-empty string, got {loss_key!r}.")
        self.loss_key = loss_key
        self.probes_train_step = False
        """Whether the last `start_training` found Keras's own `train_step`, read through the probe."""
        self._installed_on: Any = None  # The model this reader installed the probe on, until `stop_training`.

    def start_training(self, model: Any) -> None:
        """Installs the batch-loss probe if `model` uses Keras's own `train_step`; chooses the key to read."""
        self.probes_train_step = type(model).train_step is keras.Model.train_step
        if self.probes_train_step and _install_batch_loss_probe(model):
            self._installed_on = model

    def stop_training(self) -> None:
        """Removes the probe `start_training` installed, if any."""
        if self._installed_on is not None:
            _remove_batch_loss_probe(self._installed_on)
            self._installed_on = None

    def read(self, logs: Optional[Dict[str, Any]]) -> float:
        """Returns the loss of the batch whose `on_train_batch_end` received `logs`."""
        key = BATCH_LOSS_KEY if self.probes_train_step else self.loss_key
        if not logs or key not in logs:
            raise ValueError(f"The batch loss {key!r} is not in the training logs (keys: {sorted(logs or {})}).")
        return float(logs[key])
