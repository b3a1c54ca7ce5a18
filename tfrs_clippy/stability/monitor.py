"""Detecting loss divergence, as a pure function over a loss sequence and as a Keras callback.

The Clippy paper (Tang et al., KDD 2023) distinguishes *micro-divergence*, a loss spike that recovers on its own,
from *full divergence*, where training never recovers (or the loss is NaN/Inf). Both are hard to see in logged
metrics: a spike can come and go between two logging points. `SpikeDetector` watches every step:

- The baseline is the median of the last `baseline_window` losses that were not part of a spike (robust to the
  noise of single batches, and not dragged up by the spike it is measuring).
- A step *spikes* when its loss exceeds `spike_ratio * baseline` and also `baseline + spike_mads * sigma`, where
  sigma = 1.4826 * MAD of the window (a robust standard deviation), so that noisy low losses are not flagged.
- Until the window holds `warmup_steps` losses there is no median to trust, but a blow-up there is the one that
  matters most (Adagrad's first steps on a badly initialized net: 17 at step 0, 1e5 at step 1). So during the
  warm-up the baseline is the smallest loss of the window (every non-spike loss so far) and a step spikes when
  its loss exceeds `warmup_spike_ratio * baseline` (10x by default: a warm-up loss is noisy, and falls fast).
- A spike is *micro* if the loss returns to or below the threshold fixed at the spike's start within
  `recovery_steps` steps, and *full* if it does not, or if any loss is NaN or Inf. A spike still open when the
  sequence (or training) ends counts as full: the run ended diverged.
- A non-finite loss whose update `RollbackOnDivergence` undid (it restored a snapshot from before it) is
  *rescued*: counted apart, since training went on from a state the NaN never touched.

Losses are assumed non-negative (every standard Keras loss is). `DivergenceMonitor` feeds the detector from
Keras `fit`; `detect_divergence` runs it on a recorded sequence; `InstabilityScore` summarises a run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import threading
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from tfrs_clippy.keras_runtime import keras
from tfrs_clippy.stability import _callback, _plotting

MICRO = "micro"
FULL = "full"
RESCUED = "rescued"
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
        warmup_steps: The median rule above starts once the window holds this many losses. Default 10.
        warmup_spike_ratio: Before that, a loss above `warmup_spike_ratio` times the smallest loss of the window
            starts a spike (with that threshold, and that smallest loss as its baseline); the first loss, with
            nothing to compare it with, never does. Default 10.0; `math.inf` disables it (no finite spike is then
            flagged during the warm-up). NaN/Inf are flagged from the first step either way.
    """

    spike_ratio: float = 2.0
    spike_mads: float = 6.0
    recovery_steps: int = 50
    baseline_window: int = 50
    warmup_steps: int = 10
    warmup_spike_ratio: float = 10.0

    def __post_init__(self) -> None:
        if not (self.spike_ratio > 1.0 and math.isfinite(self.spike_ratio)):
            raise ValueError(f"`spike_ratio` must be a finite number > 1, got {self.spike_ratio}.")
        if not self.warmup_spike_ratio > 1.0:  # NaN fails too; inf is allowed: it disables the warm-up rule
            raise ValueError(f"`warmup_spike_ratio` must be > 1 (inf disables), got {self.warmup_spike_ratio}.")
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
        kind: "micro" (spiked and recovered), "full" (non-finite, or no recovery within `recovery_steps`) or
            "rescued" (non-finite, but a rollback undid the step; see `DivergenceRecord.rescue_last_event`).
        start_step: The step whose loss first crossed the threshold (or was non-finite).
        end_step: The step the loss recovered (micro), or the step full divergence was declared.
        peak_loss: The largest loss during the event (NaN/Inf if it was non-finite).
        baseline: The baseline when the event started: the window's median, or during the warm-up its smallest
            loss (NaN if the window was empty, or the warm-up rule is disabled).
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
        baseline: The baseline this step was compared with (during the warm-up the smallest loss of the window;
            NaN with an empty window, or during the warm-up when `warmup_spike_ratio` is inf).
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

    @property
    def in_spike(self) -> bool:
        """Whether a spike has started and not yet ended."""
        return self._spike_start is not None

    def _threshold(self) -> Tuple[float, float]:
        """Returns (baseline, threshold) from the window by the median or the warm-up rule, or (NaN, NaN) if none."""
        if len(self._window) < self.config.warmup_steps:
            if not self._window or math.isinf(self.config.warmup_spike_ratio):
                return math.nan, math.nan
            smallest = min(self._window)
            return smallest, self.config.warmup_spike_ratio * smallest
        window = np.asarray(self._window)
        baseline = float(np.median(window))
        sigma = _MAD_TO_SIGMA * float(np.median(np.abs(window - baseline)))
        return baseline, max(self.config.spike_ratio * baseline, baseline + self.config.spike_mads * sigma)

    def _end_spike(self, step: int, kind: str, reason: str) -> DivergenceEvent:
        event = DivergenceEvent(kind, self._spike_start, step, self._spike_peak, self._spike_baseline, reason)
        self._spike_start = None
        if reason == "no_recovery":
            # Training that goes on after a spike that never came back is at a new level: measure from scratch.
            # (After a NaN the finite losses that may follow, e.g. after a rollback, are at the old level.)
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
        if loss > threshold:  # False without a threshold: comparisons with NaN are False.
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
        full_divergences: Non-finite losses or spikes that did not recover (not counting rescued ones).
        rescued_divergences: Non-finite losses whose step a rollback undid.
        events_per_1000_steps: (micro + full + rescued) per 1,000 steps: how often the run was unstable, whether
            or not something saved it.
        fraction_steps_in_spike: Share of the steps whose loss was above the spike threshold or non-finite.
        worst_spike_ratio: The largest loss / baseline seen (inf if a loss was non-finite; 1.0 if no baseline yet).
    """

    steps: int
    micro_divergences: int
    full_divergences: int
    rescued_divergences: int
    events_per_1000_steps: float
    fraction_steps_in_spike: float
    worst_spike_ratio: float

    @property
    def had_full_divergence(self) -> bool:
        """Whether the loss fully diverged at least once and no rollback rescued it.

        Not the run's verdict: whether a run *diverged* (the word's one meaning in this project) also looks at its
        final loss and held-out metrics, `stability.classify_run`.
        """
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

    def rescue_last_event(self) -> DivergenceEvent:
        """Re-labels the last event, a non-finite loss whose step a rollback undid, as "rescued"; returns it."""
        if not self.events or (self.events[-1].kind, self.events[-1].reason) != (FULL, "non_finite"):
            raise ValueError(f"Only a non-finite full divergence can be rescued, the last event is {self.events[-1:]}.")
        self.events[-1] = dataclasses.replace(self.events[-1], kind=RESCUED)
        return self.events[-1]

    def finish(self, detector: SpikeDetector, last_step: int) -> None:
        """Closes the record: an open spike becomes a full event at `last_step` (see `SpikeDetector.finish`)."""
        event = detector.finish(last_step)
        if event is not None:
            self.events.append(event)

    def count(self, kind: str) -> int:
        """The number of events of `kind` ("micro", "full" or "rescued")."""
        return sum(event.kind == kind for event in self.events)

    def instability_score(self) -> InstabilityScore:
        """Summarises the record; see `InstabilityScore`."""
        steps = len(self.steps)
        micro, full, rescued = self.count(MICRO), self.count(FULL), self.count(RESCUED)
        ratios = [
            loss / baseline if math.isfinite(loss) else math.inf
            for loss, baseline in zip(self.losses, self.baselines)
            if baseline > 0 or not math.isfinite(loss)  # `baseline > 0` is False for NaN (no baseline).
        ]
        return InstabilityScore(
            steps=steps,
            micro_divergences=micro,
            full_divergences=full,
            rescued_divergences=rescued,
            events_per_1000_steps=1000.0 * (micro + full + rescued) / steps if steps else 0.0,
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


class DivergenceMonitor(_callback.PeriodicCallback):
    """Watches the loss of every training step for micro and full divergence (see the module docstring).

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


_EVENT_COLORS = {MICRO: "orange", FULL: "red", RESCUED: "green"}


def plot_divergence(record: DivergenceRecord, path: str, title: str = "Per-step loss and divergence events") -> str:
    """Plots the per-step loss, its baseline and the events (micro orange, full red, rescued green) to a PNG."""

    def draw(axes: Any) -> None:
        losses = np.asarray(record.losses, dtype=np.float64)
        axes.plot(record.steps, np.where(np.isfinite(losses), losses, np.nan), linewidth=0.8, label="batch loss")
        axes.plot(record.steps, record.baselines, linewidth=1.5, label="baseline (median)")
        for event in record.events:
            axes.axvspan(event.start_step, event.end_step + 0.5, alpha=0.3, color=_EVENT_COLORS[event.kind])

    counts = ", ".join(f"{record.count(kind)} {kind}" for kind in (MICRO, FULL, RESCUED))
    return _plotting.plot_over_steps(record.steps, path, f"{title}: {counts}", draw)
