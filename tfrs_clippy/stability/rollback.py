"""Surviving loss spikes: roll model and optimizer back to a snapshot from before the spike and skip batches.

This is the mitigation large-model teams use (PaLM: restart about 100 steps before the spike and skip the
200-500 batches around it; OPT: also lower the learning rate), as a Keras callback for any model and optimizer.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np
import tensorflow as tf

from tfrs_clippy.stability.detection import DetectorConfig
from tfrs_clippy.stability.monitor import DivergenceMonitor

_LOGGER = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Model and optimizer state after the training step `step`, in memory or in an .npz file.

    Attributes:
        step: The training step (0-based, counted over all of `fit`) after whose update the state was taken; the
            state a `fit` starts from is recorded as the step before its first (-1 for the first `fit`).
        model_weights: `model.get_weights()`, or None when the state is on disk.
        optimizer_variables: The values of `optimizer.variables` (iteration counter, slots, ...), or None on disk.
        path: The .npz file holding both lists when the snapshot is on disk, else None.
    """

    step: int
    model_weights: Optional[List[np.ndarray]]
    optimizer_variables: Optional[List[np.ndarray]]
    path: Optional[str]

    def load(self) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        """Returns (model_weights, optimizer_variables)."""
        if self.path is None:
            return self.model_weights, self.optimizer_variables
        with np.load(self.path) as archive:
            model_count = int(archive["model_count"])
            arrays = [archive[f"arr_{index}"] for index in range(len(archive.files) - 1)]
        return arrays[:model_count], arrays[model_count:]


@dataclasses.dataclass(frozen=True)
class RollbackEvent:
    """One rollback.

    Attributes:
        step: The step whose loss spiked (or was NaN/Inf).
        loss: That step's loss.
        restored_step: The step of the restored snapshot, or None if no snapshot was old enough (nothing done).
        learning_rate: The optimizer's learning rate after the rollback (NaN if it is a schedule).
    """

    step: int
    loss: float
    restored_step: Optional[int]
    learning_rate: float


def optimizer_state_variables(optimizer: Any) -> List[tf.Variable]:
    """The optimizer's state: `optimizer.variables` without tfrs_clippy's diagnostic counters and factors.

    Keras 3 lists the counters in `variables` and Keras 2 does not: leaving them out in both makes a rollback keep
    the count of skipped steps in either runtime (the skips happened).
    """
    diagnostic = {id(variable) for variable in getattr(optimizer, "diagnostic_variables", [])}
    # Keras 3 wraps each TensorFlow variable, which the optimizers' slots hold, in a Keras variable.
    backing = lambda variable: variable if isinstance(variable, tf.Variable) else getattr(variable, "value", variable)
    # `variables` is a list in Keras 3; a list that can also be called in tf_keras (`CallableList`).
    return [variable for variable in optimizer.variables if id(backing(variable)) not in diagnostic]


def _learning_rate_variable(optimizer: Any) -> Optional[tf.Variable]:
    """The optimizer's learning-rate variable, or None if the learning rate is a schedule."""
    # With a schedule, `optimizer.learning_rate` is its current value (a tensor in Keras 3, a variable overwritten
    # every step in tf_keras): the config, which serializes a schedule as a dict, tells the cases apart.
    if isinstance(optimizer.get_config()["learning_rate"], dict):
        return None
    return optimizer.learning_rate


def _scalable_schedule(optimizer: Any) -> Optional[Any]:
    """The optimizer's learning-rate schedule if it has a public `scale(factor)` method (`LinearWarmup`), else None."""
    if _learning_rate_variable(optimizer) is not None:
        return None
    # Both runtimes keep the schedule object only as `_learning_rate`; the public `learning_rate` is its value.
    schedule = optimizer._learning_rate  # pylint: disable=protected-access
    return schedule if callable(getattr(schedule, "scale", None)) else None


def _optimizer_built(optimizer: Any) -> bool:
    # Keras 3 has a public `built`; Keras 2's optimizer has only `_built`, set by its first `build`.
    return bool(getattr(optimizer, "built", False) or getattr(optimizer, "_built", False))


class RollbackOnDivergence(DivergenceMonitor):
    """A `DivergenceMonitor` that, when a spike starts, restores a snapshot from before it and skips batches.

    Every `snapshot_every_n_steps` steps (outside spikes) it keeps a copy of `model.get_weights()` and of every
    `optimizer.variables` value (iteration counter and slots), the last `keep_snapshots` of them, in memory or, with
    `directory`, as .npz files; the state each `fit` starts from is one too, taken at `on_train_begin` as the
    snapshot of the step before the first (-1). When the detector flags the start of a spike at step s (a loss above
    the threshold or non-finite), it restores the newest snapshot taken at step s - 2 or before: the loss of step s
    was computed on the state after step s - 1, so that state and the update that made it are both discarded (a
    blow-up at step 1 goes back to the initial state). Snapshots newer than the restored one are dropped. The
    learning rate is not rolled back: it is then multiplied by `lr_factor` (a numeric one directly; a schedule
    through its `scale(factor)`, as `tfrs_clippy.LinearWarmup` has).

    Skipping batches: Keras `fit` cannot un-feed a batch, so each of the next `skip_batches` batches is trained on
    and then undone by restoring the same snapshot again. The spiking batch and those batches leave no trace in the
    weights or the optimizer state, at the compute cost of the skipped steps. With `steps_per_execution` > 1 the
    callback runs once per execution, so "a batch" here means one execution.

    The model's metrics are reset after each rollback (`model.reset_metrics()`): the undone steps' losses, a NaN
    or a huge one, would otherwise stay in Keras's epoch running means; epoch metrics then cover the batches since
    the last rollback.

    A non-finite loss whose step a rollback undid is recorded as a "rescued" event, not a full divergence (the run
    goes on from a state the NaN never touched), and does not stop training with `stop_on_full_divergence`. A spike
    that is rolled back stays open until the loss recovers (micro) or not (full), as without rollback.

    Everything `DivergenceMonitor` logs is logged too, plus `rollbacks` (the count) in the batch and epoch logs and
    a warning through `logging` per rollback; `rollback_events` holds them all.

    Args:
        config: Spike detection thresholds (`DetectorConfig`).
        snapshot_every_n_steps: Take a snapshot after every this many steps.
        keep_snapshots: How many snapshots to keep.
        skip_batches: How many batches after the spiking one to skip.
        lr_factor: Multiply the learning rate by this at each rollback (1.0: leave it). Needs a learning rate that
            is a number, or a schedule with a public `scale(factor)` method (`tfrs_clippy.LinearWarmup`).
        max_rollbacks: After this many rollbacks, the next spike stops training instead.
        directory: If set, keep snapshots as .npz files in this directory instead of in memory.
        stop_on_full_divergence: As in `DivergenceMonitor`; rescued events do not stop training.
        loss_key: As in `DivergenceMonitor`.
        log_dir: As in `DivergenceMonitor`; rollbacks are written as the `rollbacks` scalar.
    """

    def __init__(
        self,
        config: Optional[DetectorConfig] = None,
        snapshot_every_n_steps: int = 10,
        keep_snapshots: int = 3,
        skip_batches: int = 10,
        lr_factor: float = 1.0,
        max_rollbacks: int = 10,
        directory: Optional[str] = None,
        stop_on_full_divergence: bool = False,
        loss_key: str = "loss",
        log_dir: Optional[str] = None,
    ) -> None:
        super().__init__(config, stop_on_full_divergence, loss_key, log_dir)
        for name, value, minimum in (
            ("snapshot_every_n_steps", snapshot_every_n_steps, 1),
            ("keep_snapshots", keep_snapshots, 1),
            ("skip_batches", skip_batches, 0),
            ("max_rollbacks", max_rollbacks, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
        if not (0.0 < lr_factor <= 1.0):
            raise ValueError(f"`lr_factor` must be in (0, 1], got {lr_factor}.")
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.skip_batches = skip_batches
        self.lr_factor = float(lr_factor)
        self.max_rollbacks = max_rollbacks
        self.directory = directory
        self.snapshots: Deque[Snapshot] = collections.deque(maxlen=keep_snapshots)
        self.rollback_events: List[RollbackEvent] = []
        self._restoring: Optional[Snapshot] = None
        self._batches_left_to_skip = 0

    @property
    def rollbacks(self) -> int:
        """How many rollbacks restored a snapshot."""
        return sum(event.restored_step is not None for event in self.rollback_events)

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        super().on_train_begin(logs)
        optimizer = self.model.optimizer
        scalable = _learning_rate_variable(optimizer) is not None or _scalable_schedule(optimizer) is not None
        if self.lr_factor != 1.0 and not scalable:
            raise ValueError(
                f"`lr_factor` {self.lr_factor} needs a numeric learning rate or a schedule with a `scale(factor)` "
                f"method (tfrs_clippy.LinearWarmup), but the optimizer's is the schedule "
                f"{optimizer.get_config()['learning_rate']!r}."
            )
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
        # A Keras 2 model without an input shape has no weights before its first step: its first snapshot is the
        # one after that step. A Keras 2 optimizer makes its slots at the first step: made now, the snapshot of the
        # initial state holds every optimizer variable a later restore writes.
        if self.model.built:
            if not _optimizer_built(optimizer):
                with self.model.distribute_strategy.scope():
                    optimizer.build(self.model.trainable_variables)
            self._save(self.global_step - 1)

    def on_step(self, step: int, logs: Dict[str, Any]) -> None:
        if self._batches_left_to_skip > 0:
            self._restore(self._restoring)
            self._batches_left_to_skip -= 1
        else:
            loss = self.reader.read(logs)
            update = self._observe(step, loss)
            if update.spike_started:
                self._roll_back(step, loss, non_finite=not math.isfinite(loss))
            elif not self.detector.in_spike and step % self.snapshot_every_n_steps == 0:
                self._save(step)
            self._report(step, update, logs)
        logs["rollbacks"] = self.rollbacks

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        super().on_epoch_end(epoch, logs)
        if logs is not None:
            logs["rollbacks"] = self.rollbacks

    def _save(self, step: int) -> None:
        if self.snapshots and self.snapshots[-1].step == step:
            # A `fit` starting where the last one saved its last snapshot: the state may have been changed between
            # the two (weights loaded, say), and the new one is what this `fit` starts from.
            self._drop_newest()
        model_weights = self.model.get_weights()
        optimizer_values = [variable.numpy() for variable in optimizer_state_variables(self.model.optimizer)]
        if self.directory is None:
            self.snapshots.append(Snapshot(step, model_weights, optimizer_values, None))
            return
        path = os.path.join(self.directory, f"rollback_snapshot_{step:010d}.npz")
        np.savez(path, *model_weights, *optimizer_values, model_count=len(model_weights))
        if len(self.snapshots) == self.snapshots.maxlen:
            os.remove(self.snapshots[0].path)
        self.snapshots.append(Snapshot(step, None, None, path))

    def _drop_newest(self) -> None:
        dropped = self.snapshots.pop()
        if dropped.path is not None:
            os.remove(dropped.path)

    def _restore(self, snapshot: Snapshot) -> None:
        """Sets model weights and optimizer variables to the snapshot's, except the learning rate, kept as is."""
        model_weights, optimizer_values = snapshot.load()
        optimizer = self.model.optimizer
        variables = optimizer_state_variables(optimizer)
        if len(variables) != len(optimizer_values):
            raise ValueError(
                f"The optimizer has {len(variables)} variables but the snapshot of step {snapshot.step} has "
                f"{len(optimizer_values)}; it cannot be restored."
            )
        learning_rate = _learning_rate_variable(optimizer)
        learning_rate_value = None if learning_rate is None else learning_rate.numpy()
        self.model.set_weights(model_weights)
        for variable, value in zip(variables, optimizer_values):
            variable.assign(value)
        if learning_rate is not None:
            learning_rate.assign(learning_rate_value)

    def _roll_back(self, step: int, loss: float, non_finite: bool) -> None:
        """Restores the newest snapshot from before `step` if there is one and rollbacks are left."""
        if self.rollbacks >= self.max_rollbacks:
            _LOGGER.warning("Step %d: loss %g spiked after %d rollbacks; stopping training.", step, loss,
                            self.rollbacks)
            self.model.stop_training = True
            return
        while self.snapshots and self.snapshots[-1].step > step - 2:
            self._drop_newest()
        learning_rate = _learning_rate_variable(self.model.optimizer)
        if not self.snapshots:
            _LOGGER.warning("Step %d: loss %g spiked but no snapshot predates it; not rolling back.", step, loss)
            self.rollback_events.append(RollbackEvent(step, loss, None, self._current_learning_rate(learning_rate)))
            return
        snapshot = self.snapshots[-1]
        self._restore(snapshot)
        if self.lr_factor != 1.0:
            if learning_rate is not None:
                learning_rate.assign(learning_rate.numpy() * self.lr_factor)
            else:  # checked at `on_train_begin`: a schedule with `scale`
                _scalable_schedule(self.model.optimizer).scale(self.lr_factor)
        self._restoring, self._batches_left_to_skip = snapshot, self.skip_batches
        self.model.reset_metrics()
        if non_finite:
            self.record.rescue_last_event()
        event = RollbackEvent(step, loss, snapshot.step, self._current_learning_rate(learning_rate))
        self.rollback_events.append(event)
        _LOGGER.warning(
            "Step %d: loss %g spiked; restored the snapshot of step %d, skipping %d batches, learning rate %g.",
            step, loss, snapshot.step, self.skip_batches, event.learning_rate,
        )
        self.write_scalars({"rollbacks": self.rollbacks}, step)

    @staticmethod
    def _current_learning_rate(learning_rate: Optional[tf.Variable]) -> float:
        return math.nan if learning_rate is None else float(learning_rate.numpy())
