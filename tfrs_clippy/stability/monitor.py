"""`DivergenceMonitor`: the divergence detector (`detection`) on every step of Keras `fit`."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from tfrs_clippy.stability import _callback
from tfrs_clippy.stability.batch_loss import BATCH_LOSS_KEY, BatchLossReader
from tfrs_clippy.stability.detection import (
    FULL,
    MICRO,
    RESCUED,
    DetectorConfig,
    DetectorUpdate,
    DivergenceEvent,
    DivergenceRecord,
    SpikeDetector,
)


class DivergenceMonitor(_callback.PeriodicCallback):
    """Watches the loss of every training step for micro and full divergence (see `detection`).

    Reads each batch's own loss through `BatchLossReader`. Adds to the batch and epoch logs (hence History and a
    later TensorBoard callback) `micro_divergences`, `full_divergences` and `rescued_divergences` (counts since
    training began) and, each epoch, `instability_events_per_1000_steps` and `worst_spike_ratio`. With `log_dir` it
    also writes per-step `batch_loss`, `loss_baseline` and the counts as TensorBoard scalars. `record` holds every
    step's loss and verdict and `events` the events with their steps; at the end of training a spike still open
    is closed as a full divergence.

    Args:
        config: Detection thresholds; defaults are `DetectorConfig()`'s.
        stop_on_full_divergence: Set `model.stop_training` when a full divergence is detected.
        loss_key: The logs key of the batch loss of a model with its own `train_step`; see `BatchLossReader`.
        log_dir: If set, a directory to write per-step TensorBoard scalars to.
    """

    def __init__(
        self,
        config: Optional[DetectorConfig] = None,
        stop_on_full_divergence: bool = False,
        loss_key: str = "loss",
        log_dir: Optional[str] = None,
    ) -> None:
        super().__init__(every_n_steps=1, log_dir=log_dir)
        self.config = config or DetectorConfig()
        self.stop_on_full_divergence = bool(stop_on_full_divergence)
        self.reader = BatchLossReader(loss_key)
        self.detector = SpikeDetector(self.config)
        self.record = DivergenceRecord()

    @property
    def events(self) -> List[DivergenceEvent]:
        """Every divergence detected so far, in order."""
        return self.record.events

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        super().on_train_begin(logs)
        self.reader.start_training(self.model)

    def on_step(self, step: int, logs: Dict[str, Any]) -> None:
        update = self._observe(step, self.reader.read(logs))
        self._report(step, update, logs)

    def _observe(self, step: int, loss: float) -> DetectorUpdate:
        """Feeds the detector the loss of `step`, records and writes it; returns the detector's verdict."""
        update = self.detector.update(step, loss)
        self.record.add(step, loss, update)
        self.write_scalars({"batch_loss": loss, "loss_baseline": update.baseline}, step)
        return update

    def _report(self, step: int, update: DetectorUpdate, logs: Dict[str, Any]) -> None:
        """Logs the counts once the step is settled; stops training on a full divergence if asked."""
        counts = {kind + "_divergences": self.record.count(kind) for kind in (MICRO, FULL, RESCUED)}
        logs.update(counts)
        self.write_scalars(counts, step)
        if self.stop_on_full_divergence and update.event is not None and self.events[-1].kind == FULL:
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if logs is None:
            return
        # The probe's last batch loss is no epoch statistic: keep it out of History.
        logs.pop(BATCH_LOSS_KEY, None)
        score = self.record.instability_score()
        logs["micro_divergences"] = score.micro_divergences
        logs["full_divergences"] = score.full_divergences
        logs["rescued_divergences"] = score.rescued_divergences
        logs["instability_events_per_1000_steps"] = score.events_per_1000_steps
        logs["worst_spike_ratio"] = score.worst_spike_ratio

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        self.reader.stop_training()
        self.record.finish(self.detector, self.global_step - 1)
        super().on_train_end(logs)
