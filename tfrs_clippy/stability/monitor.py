"""Detecting loss divergence, as a pure function over a loss sequence and as a Keras callback.

The Clippy paper (Tang et al., KDD 2023) distinguishes *micro-divergence*, a loss spike that recovers on its own,
from *full divergence*, where training never recovers (or the loss is NaN/Inf). Both are hard to see in logged
metrics: a spike can come and go between two logging points. `SpikeDetector` watches every step:

- The baseline is the median of the last `baseline_window` losses that were not part of a spike (robust to the
  noise of single batches, and not dragged up by the spike it is measuring).
- A step *spikes* when its loss exceeds `spike_ratio * baseline` and also `baseline + spike_mads * sigma`, where
  sigma = 1.4826 * MAD of the window (a robust standard deviation), so that noisy low losses are not flagged.
- A spike is *micro* if the loss returns to or below the threshold fixed at the spike's start within
  `recovery_steps` steps, and *full* if it does not, or if any loss is NaN or Inf. A spike still open when the
  sequence (or training) ends counts as full: the run ended diverged.

Losses are assumed non-negative (every standard Keras loss is). `DivergenceMonitor` feeds the detector from
Keras `fit`; `detect_divergence` runs it on a recorded sequence; `InstabilityScore` summarises a run.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.stability import _plotting, _summary

MICRO = "micro"
FULL = "full"
_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation.


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of `SpikeDetector`.

    Attributes:
        spike_ratio: A loss above `spike_ratio * baseline` may be a spike. Default 2.0: the loss doubled.
        spike_mads: ... and must also exceed the baseline by this many robust standard deviations of the window
            (1.4826 * median absolute deviation). Default 6.0; 0 disables this test.
        recovery_steps: A spike is micro if the loss is back at or below the spike threshold within this many steps
            after it started, else full. Default 50.
        baseline_window: How many recent non-spike losses the median baseline is taken over. Default 50.
        warmup_steps: No spike is flagged until the window holds this many losses (NaN/Inf are flagged from the
            first step). Default 10.
    """

    spike_ratio: float = 2.0
    spike_mads: float = 6.0
    recovery_steps: int = 50
    baseline_window: int = 50
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        if not (self.spike_ratio > 1.0 and math.isfinite(self.spike_ratio)):
            raise ValueError(f"`spike_ratio` must be a finite number > 1, got {self.spike_ratio}.")
        if not (self.spike_mads >= 0.0 and math.isfinite(self.spike_mads)):
            raise ValueError(f"`spike_mads` must be a finite number >= 0, got {self.spike_mads}.")
        for name in ("recovery_steps", "baseline_window", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        if self.warmup_steps > self.baseline_window:
            raise ValueError(
                f"`warmup_steps` must be <= `baseline_window` ({self.baseline_window}), got {self.warmup_steps}."
            )


@dataclasses.dataclass(frozen=True)
class DivergenceEvent:
    """One detected divergence.

    Attributes:
        kind: "micro" (spiked and recovered) or "full" (non-finite, or no recovery within `recovery_steps`).
        start_step: The step whose loss first crossed the threshold (or was non-finite).
        end_step: The step the loss recovered (micro), or the step full divergence was declared.
        peak_loss: The largest loss during the event (NaN/Inf if it was non-finite).
        baseline: The baseline when the event started (NaN if it started before the warm-up ended).
        reason: "recovered", "non_finite", "no_recovery", or "unrecovered_at_end" (the sequence ended in a spike).
    """

    kind: str
    start_step: int
    end_step: int
    peak_loss: float
    baseline: float
    reason: str


@dataclasses.dataclass(frozen=True)
class DetectorUpdate:
    """What one `SpikeDetector.update` found.

    Attributes:
        spike_started: This step began a spike (including a first non-finite loss).
        in_spike: This step's loss is above the spike threshold (or non-finite).
        baseline: The baseline this step was compared with (NaN during warm-up).
        event: The event that ended at this step, if any.
    """

    spike_started: bool
    in_spike: bool
    baseline: float
    event: Optional[DivergenceEvent]


class SpikeDetector:
    """Streaming micro/full divergence detector over per-step losses; see the module docstring for the rules."""

    def __init__(self, config: Optional[DetectorConfig] = None) -> None:
        self.config = config or DetectorConfig()
        self._window: Deque[float] = collections.deque(maxlen=self.config.baseline_window)
        self._spike_start: Optional[int] = None
        self._spike_threshold = math.nan
        self._spike_baseline = math.nan
        self._spike_peak = -math.inf
        self._non_finite_run = False
        self.events: List[DivergenceEvent] = []

    @property
    def in_spike(self) -> bool:
        """Whether a spike has started and not yet ended."""
        return self._spike_start is not None

    def _threshold(self) -> Tuple[float, float]:
        """Returns (baseline, threshold) from the window, or (NaN, NaN) during warm-up."""
        if len(self._window) < self.config.warmup_steps:
            return math.nan, math.nan
        window = np.asarray(self._window)
        baseline = float(np.median(window))
        sigma = _MAD_TO_SIGMA * float(np.median(np.abs(window - baseline)))
        return baseline, max(self.config.spike_ratio * baseline, baseline + self.config.spike_mads * sigma)

    def _end_spike(self, step: int, kind: str, reason: str) -> DivergenceEvent:
        event = DivergenceEvent(kind, self._spike_start, step, self._spike_peak, self._spike_baseline, reason)
        self.events.append(event)
        self._spike_start = None
        if kind == FULL:
            # Training that goes on after a full divergence is at a new level: measure from scratch.
            self._window.clear()
        return event

    def finish(self, step: int) -> Optional[DivergenceEvent]:
        """Ends the sequence at `step`: a spike still open then counts as full ("unrecovered_at_end"); returns it."""
        return self._end_spike(step, FULL, "unrecovered_at_end") if self._spike_start is not None else None

    def update(self, step: int, loss: float) -> DetectorUpdate:
        """Feeds the loss of `step` (steps must increase) and returns what it showed."""
        loss = float(loss)
        if not math.isfinite(loss):
            if self._non_finite_run:  # One event per run of non-finite losses (a NaN running mean stays NaN).
                return DetectorUpdate(False, True, math.nan, None)
            self._non_finite_run = True
            started = self._spike_start is None
            if started:
                self._spike_start, self._spike_baseline = step, self._threshold()[0]
            self._spike_peak = loss  # NaN or Inf outranks any finite peak.
            return DetectorUpdate(started, True, self._spike_baseline, self._end_spike(step, FULL, "non_finite"))
        self._non_finite_run = False

        if self._spike_start is not None:
            self._spike_peak = max(self._spike_peak, loss)
            if loss <= self._spike_threshold:
                return DetectorUpdate(False, False, self._spike_baseline, self._end_spike(step, MICRO, "recovered"))
            if step - self._spike_start >= self.config.recovery_steps:
                return DetectorUpdate(False, True, self._spike_baseline, self._end_spike(step, FULL, "no_recovery"))
            return DetectorUpdate(False, True, self._spike_baseline, None)

        baseline, threshold = self._threshold()
        if loss > threshold:  # False during warm-up: comparisons with NaN are False.
            self._spike_start, self._spike_threshold = step, threshold
            self._spike_baseline, self._spike_peak = baseline, loss
            return DetectorUpdate(True, True, baseline, None)
        self._window.append(loss)
        return DetectorUpdate(False, False, baseline, None)


@dataclasses.dataclass(frozen=True)
class InstabilityScore:
    """Numbers that make the stability of runs comparable across configurations.

    Attributes:
        steps: Steps observed.
        micro_divergences: Spikes that recovered.
        full_divergences: Non-finite losses or spikes that did not recover.
        events_per_1000_steps: (micro + full) per 1,000 steps.
        fraction_steps_in_spike: Share of the steps whose loss was above the spike threshold or non-finite.
        worst_spike_ratio: The largest loss / baseline seen (inf if a loss was non-finite; 1.0 if no baseline yet).
    """

    steps: int
    micro_divergences: int
    full_divergences: int
    events_per_1000_steps: float
    fraction_steps_in_spike: float
    worst_spike_ratio: float

    @property
    def diverged(self) -> bool:
        """Whether the run fully diverged at least once (the paper's per-run stability outcome)."""
        return self.full_divergences > 0


@dataclasses.dataclass
class DivergenceRecord:
    """Every step a detector saw: losses, baselines, whether each was in a spike, and the events."""

    steps: List[int] = dataclasses.field(default_factory=list)
    losses: List[float] = dataclasses.field(default_factory=list)
    baselines: List[float] = dataclasses.field(default_factory=list)
    in_spike: List[bool] = dataclasses.field(default_factory=list)
    events: List[DivergenceEvent] = dataclasses.field(default_factory=list)

    def add(self, step: int, loss: float, update: DetectorUpdate) -> None:
        """Appends one step and the detector's verdict on it."""
        self.steps.append(step)
        self.losses.append(float(loss))
        self.baselines.append(update.baseline)
        self.in_spike.append(update.in_spike)
        if update.event is not None:
            self.events.append(update.event)

    def finish(self, detector: SpikeDetector, last_step: int) -> None:
        """Closes the record: an open spike becomes a full event at `last_step` (see `SpikeDetector.finish`)."""
        event = detector.finish(last_step)
        if event is not None:
            self.events.append(event)

    def count(self, kind: str) -> int:
        """The number of events of `kind` ("micro" or "full")."""
        return sum(event.kind == kind for event in self.events)

    def instability_score(self) -> InstabilityScore:
        """Summarises the record; see `InstabilityScore`."""
        steps = len(self.steps)
        micro, full = self.count(MICRO), self.count(FULL)
        ratios = [
            loss / baseline if math.isfinite(loss) else math.inf
            for loss, baseline in zip(self.losses, self.baselines)
            if baseline > 0 or not math.isfinite(loss)  # `baseline > 0` is False for NaN (warm-up).
        ]
        return InstabilityScore(
            steps=steps,
            micro_divergences=micro,
            full_divergences=full,
            events_per_1000_steps=1000.0 * (micro + full) / steps if steps else 0.0,
            fraction_steps_in_spike=sum(self.in_spike) / steps if steps else 0.0,
            worst_spike_ratio=max(ratios, default=1.0),
        )


def detect_divergence(losses: Sequence[float], config: Optional[DetectorConfig] = None) -> DivergenceRecord:
    """Runs a `SpikeDetector` over a whole loss sequence (steps numbered from 0) and returns its record."""
    detector = SpikeDetector(config)
    record = DivergenceRecord()
    for step, loss in enumerate(losses):
        record.add(step, loss, detector.update(step, loss))
    record.finish(detector, len(losses) - 1)
    return record


class BatchLossReader:
    """Recovers each training batch's loss from the logs Keras passes to `on_train_batch_end`.

    With the built-in `train_step`, both Keras 2 (tf_keras) and Keras 3 log `loss` as the *mean over the epoch so
    far* (weighted by batch size), not the batch's loss. The batch's loss is then recovered from two consecutive
    means: loss_k = (n_k * mean_k - n_j * mean_j) / (n_k - n_j), with n the number of batches. This is exact up to
    float32 rounding of the running sum (relative error ~ n * 6e-8, 6e-4 after 10,000 batches in an epoch). For a
    smaller last batch of an epoch it returns a value between the epoch mean and the batch's loss, so it can miss
    a spike there but cannot invent one. Models that report their per-batch loss instead -- TFRS models
    (`tfrs.models.Model.train_step` returns the batch's loss) or any custom `train_step` returning it -- are read
    directly and exactly.

    Args:
        loss_key: The logs key holding the loss.
        loss_is_running_mean: Whether `logs[loss_key]` is Keras's running mean. None (default) decides from the
            model: True if it uses Keras's own `train_step`, False if it overrides it (as TFRS models do). Pass it
            explicitly for a custom `train_step` that returns a `Mean` tracker's result.
    """

    def __init__(self, loss_key: str = "loss", loss_is_running_mean: Optional[bool] = None) -> None:
        if not isinstance(loss_key, str) or not loss_key:
            raise ValueError(f"`loss_key` must be a non-empty string, got {loss_key!r}.")
        if loss_is_running_mean not in (None, True, False):
            raise ValueError(f"`loss_is_running_mean` must be None, True or False, got {loss_is_running_mean!r}.")
        self.loss_key = loss_key
        self.loss_is_running_mean = loss_is_running_mean
        self._running = False
        self._first_batch_of_mean = 0  # Keras's batch index at which the running mean last restarted.
        self._previous_batches = 0  # Batches in the running mean at the previous read.
        self._previous_mean = 0.0

    def start_training(self, model: Any) -> None:
        """Resolves the logging mode for `model`."""
        if self.loss_is_running_mean is None:
            self._running = type(model).train_step is keras.Model.train_step
        else:
            self._running = self.loss_is_running_mean

    @property
    def reads_running_mean(self) -> bool:
        """Whether `read` recovers batch losses from a running mean (resolved by `start_training`)."""
        return self._running

    def restart_mean(self, next_batch: int) -> None:
        """The running mean restarts at batch `next_batch` (Keras does so every epoch, `reset_metrics` too)."""
        self._first_batch_of_mean, self._previous_batches, self._previous_mean = next_batch, 0, 0.0

    def read(self, batch: int, logs: Optional[Dict[str, Any]]) -> float:
        """Returns the loss of the batch(es) since the previous call; `batch` is Keras's index within the epoch."""
        if not logs or self.loss_key not in logs:
            raise ValueError(
                f"`loss_key` {self.loss_key!r} is not in the training logs (keys: {sorted(logs or {})})."
            )
        value = float(logs[self.loss_key])
        if not self._running:
            return value
        batches = batch + 1 - self._first_batch_of_mean  # steps_per_execution > 1 ends several batches per call.
        new_batches = batches - self._previous_batches
        if new_batches <= 0:
            raise ValueError(f"`batch` must increase within an epoch, got {batch} after a read of a later batch.")
        loss = (batches * value - self._previous_batches * self._previous_mean) / new_batches
        self._previous_batches, self._previous_mean = batches, value
        return loss


class DivergenceMonitor(keras.callbacks.Callback):
    """Watches the loss of every training step for micro and full divergence (see the module docstring).

    Adds to the batch and epoch logs (hence History and a later TensorBoard callback) `micro_divergences` and
    `full_divergences` (counts since training began) and, each epoch, `instability_events_per_1000_steps` and
    `worst_spike_ratio`. With `log_dir` it also writes per-step `batch_loss`, `loss_baseline` and the counts as
    TensorBoard scalars. `record` holds every step's loss and verdict and `events` the events with their steps; at
    the end of training a spike still open is closed as a full divergence.

    Args:
        config: Detection thresholds; defaults are `DetectorConfig()`'s.
        stop_on_full_divergence: Set `model.stop_training` when a full divergence is detected.
        loss_key: The logs key of the loss.
        loss_is_running_mean: How to read `logs[loss_key]`; see `BatchLossReader`.
        log_dir: If set, a directory to write per-step TensorBoard scalars to.
    """

    def __init__(
        self,
        config: Optional[DetectorConfig] = None,
        stop_on_full_divergence: bool = False,
        loss_key: str = "loss",
        loss_is_running_mean: Optional[bool] = None,
        log_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.config = config or DetectorConfig()
        self.stop_on_full_divergence = bool(stop_on_full_divergence)
        self.reader = BatchLossReader(loss_key, loss_is_running_mean)
        self.log_dir = log_dir
        self.detector = SpikeDetector(self.config)
        self.record = DivergenceRecord()
        self.global_step = 0
        self._writer: Optional[tf.summary.SummaryWriter] = None

    @property
    def events(self) -> List[DivergenceEvent]:
        """Every divergence detected so far, in order."""
        return self.record.events

    def on_train_begin(self, logs: Optional[Dict[str, Any]] = None) -> None:
        self.reader.start_training(self.model)
        if self.log_dir is not None and self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_epoch_begin(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self.reader.restart_mean(next_batch=0)

    def on_train_batch_end(self, batch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        self._observe(self.reader.read(batch, logs), logs)

    def _observe(self, loss: float, logs: Dict[str, Any]) -> DetectorUpdate:
        """Feeds the detector the loss of the next step, logs the counts, stops training if asked; returns the verdict."""
        update = self.detector.update(self.global_step, loss)
        self.record.add(self.global_step, loss, update)
        micro, full = self.record.count(MICRO), self.record.count(FULL)
        logs["micro_divergences"], logs["full_divergences"] = micro, full
        if self._writer is not None:
            with self._writer.as_default():
                _summary.write_scalar("batch_loss", loss, self.global_step)
                _summary.write_scalar("loss_baseline", update.baseline, self.global_step)
                _summary.write_scalar("micro_divergences", micro, self.global_step)
                _summary.write_scalar("full_divergences", full, self.global_step)
        self.global_step += 1
        if update.event is not None and update.event.kind == FULL and self.stop_on_full_divergence:
            self.model.stop_training = True
        return update

    def on_epoch_end(self, epoch: int, logs: Optional[Dict[str, Any]] = None) -> None:
        if logs is None:
            return
        score = self.record.instability_score()
        logs["micro_divergences"] = score.micro_divergences
        logs["full_divergences"] = score.full_divergences
        logs["instability_events_per_1000_steps"] = score.events_per_1000_steps
        logs["worst_spike_ratio"] = score.worst_spike_ratio

    def on_train_end(self, logs: Optional[Dict[str, Any]] = None) -> None:
        self.record.finish(self.detector, self.global_step - 1)
        if self._writer is not None:
            self._writer.flush()


def plot_divergence(record: DivergenceRecord, path: str, title: str = "Per-step loss and divergence events") -> str:
    """Plots the per-step loss, its baseline and the events (micro: orange, full: red) to a PNG; returns `path`."""
    if not record.steps:
        raise ValueError("`record` has no steps to plot.")
    pyplot = _plotting.pyplot()
    figure, axes = pyplot.subplots(figsize=(8, 4))
    losses = np.asarray(record.losses, dtype=np.float64)
    axes.plot(record.steps, np.where(np.isfinite(losses), losses, np.nan), linewidth=0.8, label="batch loss")
    axes.plot(record.steps, record.baselines, linewidth=1.5, label="baseline (median)")
    for event in record.events:
        axes.axvspan(event.start_step, event.end_step + 0.5, alpha=0.3, color="orange" if event.kind == MICRO else "red")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_title(f"{title}: {record.count(MICRO)} micro, {record.count(FULL)} full")
    axes.legend()
    return _plotting.save_png(figure, path)
