"""Detecting loss divergence, as a pure function over a loss sequence.

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

Losses are assumed non-negative (every standard Keras loss is). `detect_divergence` runs the detector on a
recorded sequence (`monitor.DivergenceMonitor` feeds it from Keras `fit`); `InstabilityScore` summarises a run;
`plot_divergence` draws a record.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Deque, List, Optional, Sequence, Tuple

import numpy as np

from tfrs_clippy.stability import _plotting

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
